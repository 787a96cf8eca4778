"""Packed store: every slide's features in a few large memory-mappable shards plus one index.

Layout (docs/cohort.md)::

    STORE/index.json          format, D, shards, per-slide table (columnar), source sizes/mtimes
    STORE/features-00000.npy  (rows, D) in the slides' stored dtype (float16 stays float16)
    STORE/grid.npy            (T, 4) int64: level-0 x, y, grid col, grid row for every patch (zeros for
                              features-only bags, whose index entry has has_positions=false)

A slide is one contiguous row range of one shard and of ``grid.npy``. Rows are in the HDF5 order,
so reading from the store returns exactly what reading the HDF5 file returns.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from slidefm.cohort import h5
from slidefm.cohort.reader import Cohort, SlideData, SlideReader, slide_data
from slidefm.errors import CohortError, Problem, SlidefmError
from slidefm.grid import GridError
from slidefm.io_utils import atomic_path

FORMAT = "slidefm-store/1"
INDEX = "index.json"
GRID = "grid.npy"
DEFAULT_SHARD_BYTES = 1 << 30
_COLUMNS = ("slide_id", "shard", "offset", "row", "n", "step", "patch_size_level0", "origin_x", "origin_y",
            "source", "source_size", "source_mtime_ns", "has_positions", "step_source", "snapped", "collided")


def _source_stat(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _npy_data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        return f.tell()


class StoreSlideReader(SlideReader):
    """Reads slides from a packed store; picklable, files opened lazily in each process.

    A slide is read with one ``pread`` per array rather than through a memory map: one large
    request instead of page faults in readahead-sized pieces, which matters on a cold cache.
    """

    def __init__(self, path: Path, index: dict):
        self.path = Path(path)
        self.shards = [(s["file"], np.dtype(s["dtype"])) for s in index["shards"]]
        self.dim = int(index["dim"])
        t = index["slides"]
        self.pos = {sid: i for i, sid in enumerate(t["slide_id"])}
        self.table = {k: np.asarray(t[k], dtype=np.int64) for k in ("shard", "offset", "row", "n", "step")}
        self.psl0 = list(t["patch_size_level0"])
        # Stores packed before features-only bags existed have no such column: every slide had coords.
        self.has_positions = [bool(v) for v in t.get("has_positions", [True] * len(t["slide_id"]))]
        self._files: tuple[list[tuple[int, int]], tuple[int, int]] | None = None  # (fd, data offset)
        self._pid = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = None
        state["_pid"] = None
        return state

    def __del__(self):
        self._close()

    def _close(self) -> None:
        if self._files is not None and self._pid == os.getpid():
            for fd, _ in self._files[0] + [self._files[1]]:
                os.close(fd)
        self._files = None

    def _open(self):
        if self._files is None or self._pid != os.getpid():
            self._files = None  # descriptors inherited through fork belong to the parent
            opened = []
            for f in [name for name, _ in self.shards] + [GRID]:
                p = self.path / f
                opened.append((os.open(p, os.O_RDONLY), _npy_data_offset(p)))
            self._files = (opened[:-1], opened[-1])
            self._pid = os.getpid()
        return self._files

    @staticmethod
    def _pread(fd: int, out: np.ndarray, pos: int) -> np.ndarray:
        view = memoryview(out).cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], pos + done)
            if got == 0:
                raise SlidefmError("packed store file is truncated; run `slidefm pack` again")
            done += got
        return out

    def read_arrays(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(features in the stored dtype, (n, 4) grid rows: x, y, col, row)."""
        try:
            i = self.pos[slide_id]
        except KeyError:
            raise SlidefmError(f"slide {slide_id!r} is not in the packed store {self.path}") from None
        shards, (gfd, gstart) = self._open()
        t = self.table
        k, off, row, n = t["shard"][i], t["offset"][i], t["row"][i], t["n"][i]
        dtype = self.shards[k][1]
        fd, start = shards[k]
        feats = self._pread(fd, np.empty((n, self.dim), dtype), start + off * self.dim * dtype.itemsize)
        grid = self._pread(gfd, np.empty((n, 4), np.int64), gstart + row * 4 * 8)  # grid rows: 4 x int64
        return feats, grid

    def read(self, slide_id: str) -> SlideData:
        feats, g = self.read_arrays(slide_id)
        i = self.pos[slide_id]
        if not self.has_positions[i]:
            return slide_data(slide_id, feats, None, None, 0, self.psl0[i])
        return slide_data(slide_id, feats, g[:, :2], g[:, 2:], int(self.table["step"][i]), self.psl0[i])


class PackedStore:
    """An existing packed store directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.index = json.loads((self.path / INDEX).read_text())
        except (OSError, ValueError) as e:
            raise SlidefmError(f"cannot read packed store index {self.path / INDEX}: {e}") from None
        if self.index.get("format") != FORMAT:
            raise SlidefmError(f"{self.path / INDEX}: unsupported store format {self.index.get('format')!r}")
        self.dim = int(self.index["dim"])

    @property
    def slide_ids(self) -> list[str]:
        return list(self.index["slides"]["slide_id"])

    def has_positions(self) -> list[bool]:
        """Per slide (in ``slide_ids`` order): False for features-only bags."""
        t = self.index["slides"]
        return [bool(v) for v in t.get("has_positions", [True] * len(t["slide_id"]))]

    def reader(self) -> StoreSlideReader:
        return StoreSlideReader(self.path, self.index)

    def stale_reason(self, cohort: Cohort) -> str | None:
        """Why the store does not match the cohort's current HDF5 files, or None if it does."""
        t = self.index["slides"]
        packed = {sid: i for i, sid in enumerate(t["slide_id"])}
        for sid, path in zip(cohort.slides.index, cohort.slides["path"]):
            i = packed.get(sid)
            if i is None:
                return f"slide {sid} is not in it"
            if t["source"][i] != cohort.display(path):
                return f"slide {sid} now points to {cohort.display(path)}"
            try:
                size, mtime = _source_stat(path)
            except OSError:
                return f"{cohort.display(path)} no longer exists"
            if size != t["source_size"][i] or mtime != t["source_mtime_ns"][i]:
                return f"{cohort.display(path)} changed after packing"
        return None


def _plan(stats, order: list[str], shard_bytes: int) -> tuple[list[tuple[int, int]], list[list]]:
    """(shard, offset) per slide; a shard holds one dtype and at most ``shard_bytes`` (or one slide)."""
    plan: list[tuple[int, int]] = []
    shards: list[list] = []  # [dtype, rows]
    for sid in order:
        n, dim, dtype = int(stats.at[sid, "n"]), int(stats.at[sid, "dim"]), stats.at[sid, "dtype"]
        row_bytes = dim * np.dtype(dtype).itemsize
        if not shards or shards[-1][0] != dtype or (shards[-1][1] and (shards[-1][1] + n) * row_bytes > shard_bytes):
            shards.append([dtype, 0])
        plan.append((len(shards) - 1, shards[-1][1]))
        shards[-1][1] += n
    return plan, shards


def pack_cohort(cohort: Cohort, out: str | Path | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> Path:
    """Validate the cohort, then write its packed store atomically; returns the store path.

    Feature values are checked for NaN/Inf while they are copied (one read of the data); a bad
    slide aborts the pack and the temporary directory is removed, so no partial store appears.
    """
    from slidefm.cohort.validate import validate_cohort

    out = Path(out) if out is not None else cohort.layout.files["store"]
    report = validate_cohort(cohort, scan_values=False, workers=workers)
    if report.errors:
        raise CohortError(report.errors)
    order = list(cohort.slides.index)
    stats = report.slide_stats
    dim = int(stats["dim"].iloc[0])
    plan, shard_meta = _plan(stats, order, shard_bytes)
    total = int(stats["n"].sum())
    cols: dict[str, list] = {k: [] for k in _COLUMNS}
    with atomic_path(out, is_dir=True) as tmp:
        grid = np.lib.format.open_memmap(tmp / GRID, mode="w+", dtype=np.int64, shape=(total, 4))
        files = [f"features-{k:05d}.npy" for k in range(len(shard_meta))]
        current, mm = -1, None
        row = 0
        for k, (sid, (shard, offset)) in enumerate(zip(order, plan)):
            if shard != current:
                if mm is not None:
                    mm.flush()
                    del mm
                dtype, rows = shard_meta[shard]
                mm = np.lib.format.open_memmap(tmp / files[shard], mode="w+", dtype=np.dtype(dtype), shape=(rows, dim))
                current = shard
            path = cohort.slide_path(sid)
            size, mtime = _source_stat(path)  # taken before reading: a file changed mid-pack reads as stale
            n, g, psl0 = _copy_slide(sid, path, cohort, mm, offset, grid, row)
            geo = (g.step, g.origin[0], g.origin[1]) if g is not None else (0, 0, 0)
            for key, v in zip(_COLUMNS, (sid, shard, offset, row, n, geo[0], psl0, geo[1], geo[2],
                                         cohort.display(path), size, mtime, g is not None,
                                         g.source if g is not None else None, g.snapped if g is not None else 0,
                                         g.collided if g is not None else 0)):
                cols[key].append(v)
            row += n
            if progress is not None:
                progress(k + 1, len(order))
        if mm is not None:
            mm.flush()
            del mm
        grid.flush()
        del grid
        index = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cohort": str(cohort.root),
            "dim": dim,
            "total_patches": total,
            "shards": [{"file": f, "dtype": d, "rows": r} for f, (d, r) in zip(files, shard_meta)],
            "grid": GRID,
            "slides": cols,
        }
        (tmp / INDEX).write_text(json.dumps(index))
    return out


def _copy_slide(sid: str, path: Path, cohort: Cohort, mm: np.ndarray, offset: int, grid: np.ndarray,
                row: int):
    """Copy one slide's features into the shard and its grid rows; returns (n, Grid or None, patch_size_level0)."""
    from slidefm.cohort.reader import slide_grid

    where = f"slide {sid}"

    def fail(msg: str) -> CohortError:
        return CohortError([Problem(cohort.display(path), where, msg)])

    try:
        with h5.SlideSource(path) as src:
            if src.header is None:
                raise fail("; ".join(src.problems))
            header = src.header
            coords = src.coords()
            g = None if coords is None else slide_grid(coords, header)
            for start, chunk in src.chunks(8192):
                bad = h5.nonfinite_rows(chunk)
                if len(bad):
                    raise fail(f"NaN/Inf features at patch row {start + int(bad[0])}")
                mm[offset + start:offset + start + len(chunk)] = chunk
    except (h5.SlideFileError, GridError, OSError) as e:
        raise fail(str(e)) from None
    n = header.n
    if g is None:
        grid[row:row + n] = 0  # features-only bag: no positions (has_positions=False in the index)
    else:
        grid[row:row + n, :2] = coords
        grid[row:row + n, 2:] = g.positions
    return n, g, header.patch_size_level0
