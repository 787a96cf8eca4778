"""One slide file -> :class:`SlideData`: the readers below the Cohort (HDF5/.pt files here, the packed store
in :mod:`slidefm.cohort.store`), so both can be used without the cohort tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from slidefm import buffers
from slidefm.cohort import h5, pagecache
from slidefm.errors import SlidefmError
from slidefm.grid import GridError, coords_to_grid


@dataclass
class SlideData:
    """One slide: features in the file's dtype, level-0 coords and integer grid positions, same row order.

    Features stay float16 when the file holds float16 (bfloat16 files come as float32): half the bytes to read,
    send between processes and keep; :func:`slidefm.data.batch.pack_slides` casts them to float32 while it
    packs a batch.

    A features-only bag (a .pt file, or HDF5 without ``coords``) has ``has_positions=False`` and
    all-zero ``coords``/``positions``, ``step`` 0: only position-free models may use it (the
    training and export pre-flight checks refuse the others, see slidefm.models.positions).
    """

    slide_id: str
    features: torch.Tensor  # (N, D) float16 or float32, as stored
    coords: torch.Tensor  # (N, 2) int64 level-0 (x, y)
    positions: torch.Tensor  # (N, 2) int64 grid (col, row)
    step: int  # level-0 stride between neighbouring grid cells
    patch_size_level0: int | None
    has_positions: bool = True

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[0])


def slide_tensors(n: int, dim: int, dtype: np.dtype | str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (n, dim) features (float16 or float32) and (2, n, 2) int64 grid (coords, positions), one
    storage.

    One storage per slide instead of three: a DataLoader worker sends each storage through its own
    shared-memory segment, and on a VM a fresh segment costs more than the slide's read (measured in
    benchmarks/io.py). The grid comes first so both views are aligned for their dtypes. In a worker of
    slidefm's shared-memory transport the storage is the worker's arena (:mod:`slidefm.buffers`).
    """
    dt = buffers.torch_dtype(np.dtype(dtype))
    buf = buffers.empty(n * 32 + n * dim * dt.itemsize)
    return buf[n * 32:].view(dt).view(n, dim), buf[:n * 32].view(torch.int64).view(2, n, 2)


def feature_dtype(stored: np.dtype) -> np.dtype:
    """The dtype a slide's features are handed out in, from the dtype they are stored in: float16 kept (half the
    bytes to read, send and hold; :func:`slidefm.data.batch.pack_slides` casts), anything else float32."""
    return np.dtype(np.float16) if stored == np.float16 else np.dtype(np.float32)


def slide_data(slide_id: str, features: np.ndarray, coords: np.ndarray | None, positions: np.ndarray | None,
               step: int, patch_size_level0: int | None) -> SlideData:
    """Build a SlideData from numpy arrays; every reader goes through here so outputs are identical.

    ``coords``/``positions`` None: a features-only bag (zeros, ``has_positions=False``).
    """
    feats, grid = slide_tensors(*features.shape, feature_dtype(features.dtype))
    feats.copy_(torch.from_numpy(np.ascontiguousarray(features)))
    return finish_slide(slide_id, feats, grid, coords, positions, step, patch_size_level0)


def finish_slide(slide_id: str, feats: torch.Tensor, grid: torch.Tensor, coords, positions, step: int,
                 patch_size_level0: int | None) -> SlideData:
    """A SlideData over ``slide_tensors``' outputs, ``feats`` already filled: the grid gets ``coords`` and
    ``positions`` ((n, 2) integer arrays, strided views included), or zeros for a features-only bag (either
    one None)."""
    if coords is None or positions is None:
        grid.zero_()
        return SlideData(slide_id, feats, grid[0], grid[1], 0, patch_size_level0, False)
    grid[0].copy_(torch.from_numpy(np.asarray(coords, dtype=np.int64)))
    grid[1].copy_(torch.from_numpy(np.asarray(positions, dtype=np.int64)))
    return SlideData(slide_id, feats, grid[0], grid[1], int(step), patch_size_level0, True)


def slide_grid(coords: np.ndarray, header: h5.SlideHeader):
    """Grid of a slide from its coords and attributes; an implausible grid raises SlideFileError."""
    try:
        grid = coords_to_grid(coords, attrs=header.attrs)
    except GridError as e:
        raise h5.SlideFileError(str(e)) from None
    bad = grid.problems()
    if bad:
        raise h5.SlideFileError("; ".join(bad))
    return grid


def read_slide_arrays(path: Path) -> tuple[h5.SlideHeader, np.ndarray, np.ndarray | None, Any]:
    """Features (stored dtype), coords (int64) and grid of one slide file (HDF5 or .pt);
    coords and grid are None for a features-only bag. Raises SlideFileError."""
    with h5.SlideSource(path) as src:
        header = src._need_header()
        feats = src.features()
        coords = src.coords()
    grid = None if coords is None else slide_grid(coords, header)
    return header, feats, coords, grid



@dataclass
class SlideRows:
    """Part of one slide: every patch's grid position, and the features (as :class:`SlideData`'s) of chosen
    rows only."""

    slide_id: str
    positions: np.ndarray  # (N, 2) int64 grid (col, row) of every patch (zeros for a features-only bag)
    has_positions: bool
    rows: np.ndarray | None  # (k,) sorted unique row indices of ``features``; None = every row
    features: np.ndarray  # (k, D) float16 or float32 (N rows when ``rows`` is None)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Features of slide rows ``idx`` (each one of ``rows``), in the order of ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        return self.features[idx] if self.rows is None else self.features[np.searchsorted(self.rows, idx)]


RowSelector = Callable[[np.ndarray], "np.ndarray | None"]


def selected_rows(selected) -> np.ndarray | None:
    """A RowSelector's answer as sorted unique int64 rows (None: every row); shared by every reader."""
    return None if selected is None else np.unique(np.asarray(selected, dtype=np.int64))


class SlideReader:
    """Reads one slide by id; subclasses are picklable so DataLoader workers can each hold one."""

    def read(self, slide_id: str) -> SlideData:
        raise NotImplementedError

    def read_rows(self, slide_id: str, select: RowSelector) -> SlideRows:
        """Positions of every patch, then features of the rows ``select(positions)`` returns (None: all).

        Training crops need a few hundred rows of a slide of ~10k; readers that can read part of a
        file override this (``H5SlideReader``). This fallback reads the whole slide.
        """
        sd = self.read(slide_id)
        pos = sd.positions.numpy()
        rows = selected_rows(select(pos))
        feats = sd.features.numpy()
        return SlideRows(slide_id, pos, sd.has_positions, rows, feats if rows is None else feats[rows])

    def will_need(self, slide_id: str) -> None:
        """Hint that ``slide_id`` will be read soon: start fetching its bytes into the page cache without
        waiting (``POSIX_FADV_WILLNEED``), so a cold read overlaps the reads before it. Never raises: a
        hint for a missing slide or file is dropped, and the read itself reports the problem."""

    def __call__(self, slide_id: str) -> SlideData:
        return self.read(slide_id)


class H5SlideReader(SlideReader):
    """Per-slide files (HDF5 or features-only .pt); opens each only for the duration of one read (fork-safe)."""

    def __init__(self, paths: dict[str, str], root: Path):
        self.paths = paths
        self.root = Path(root)

    def will_need(self, slide_id: str) -> None:
        if slide_id in self.paths:
            pagecache.will_need_file(self.paths[slide_id])

    def read(self, slide_id: str) -> SlideData:
        path = Path(self.paths[slide_id])
        try:
            header, feats, coords, grid = read_slide_arrays(path)
        except h5.SlideFileError as e:
            raise SlidefmError(f"{_display(path, self.root)} [slide {slide_id}]: {e}") from None
        if grid is None:
            return slide_data(slide_id, feats, None, None, 0, header.patch_size_level0)
        return slide_data(slide_id, feats, coords, grid.positions, grid.step, header.patch_size_level0)

    def read_rows(self, slide_id: str, select: RowSelector) -> SlideRows:
        path = Path(self.paths[slide_id])
        try:
            with h5.SlideSource(path) as src:
                header = src._need_header()
                coords = src.coords()
                # Same grid (and the same refusal of an implausible one) as read().
                pos = np.zeros((header.n, 2), np.int64) if coords is None else slide_grid(coords, header).positions
                rows = selected_rows(select(pos))
                feats = src.features() if rows is None else src.feature_rows(rows)
        except h5.SlideFileError as e:
            raise SlidefmError(f"{_display(path, self.root)} [slide {slide_id}]: {e}") from None
        feats = np.ascontiguousarray(feats, dtype=feature_dtype(feats.dtype))
        return SlideRows(slide_id, np.ascontiguousarray(pos, dtype=np.int64), coords is not None, rows, feats)


def _display(p: Path, root: Path) -> str:
    try:
        return str(Path(p).relative_to(root))
    except ValueError:
        return str(p)
