"""Per-slide feature files: cheap header inspection and full reads.

Two kinds (docs/cohort.md): HDF5 in the TRIDENT / CLAM layout (``features`` plus, usually,
``coords`` with the extractor's attributes), and features-only torch files (CLAM ``pt_files/``,
HIPT-style region bags: a tensor (N, D) or (1, N, D), loaded with ``weights_only=True``). An
HDF5 file without ``coords`` is a features-only bag as well. :class:`SlideSource` reads either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from slidefm.errors import SlidefmError

# TRIDENT writes these on `coords` (older files put patch_size_level0 on the file root); CLAM writes
# patch_size, patch_level and downsample (the patch level's (dx, dy)) on `coords`.
GRID_ATTRS = ("patch_size_level0", "patch_size", "overlap", "target_magnification", "level0_magnification",
              "patch_level", "downsample")
TORCH_SUFFIXES = (".pt", ".pth")


class SlideFileError(SlidefmError):
    """A slide's HDF5 file cannot be read as the contract describes."""


@dataclass
class SlideHeader:
    """What a slide file declares, from shapes and attributes only (no feature values read)."""

    n: int
    dim: int
    dtype: np.dtype
    squeeze_features: bool  # features stored (1, N, D)
    squeeze_coords: bool  # coords stored (1, N, 2)
    attrs: dict[str, Any] = field(default_factory=dict)
    has_coords: bool = True  # False: a features-only bag (no positions)
    kind: str = "h5"  # "h5" | "pt"

    @property
    def patch_size_level0(self) -> int | None:
        v = self.attrs.get("patch_size_level0")
        return None if v is None else int(round(float(v)))


def _scalar(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(()).item()
    elif isinstance(v, np.ndarray):
        v = v.tolist()  # CLAM's downsample (dx, dy)
    if isinstance(v, np.generic):
        v = v.item()
    return v


def _grid_attrs(f: h5py.File, coords: h5py.Dataset | None) -> dict[str, Any]:
    # Each h5py attribute/dataset lookup costs tens of microseconds: list names once per object.
    out: dict[str, Any] = {}
    for obj in (f, coords):  # coords last: its attributes win over the file root's
        if obj is None:
            continue
        attrs = obj.attrs
        for name in set(attrs.keys()).intersection(GRID_ATTRS):
            out[name] = _scalar(attrs[name])
    return out


def inspect_file(f: h5py.File) -> tuple[SlideHeader | None, list[str]]:
    """Header of an open slide file plus every structural problem (as messages)."""
    problems: list[str] = []
    feats = f.get("features")
    coords = f.get("coords")
    if not isinstance(feats, h5py.Dataset):
        problems.append("no 'features' dataset" if feats is None else "'features' is not a dataset")
        feats = None
    has_coords = coords is not None  # no coords at all: a features-only bag
    if coords is not None and not isinstance(coords, h5py.Dataset):
        problems.append("'coords' is not a dataset")
        coords = None
    sq_f = sq_c = False
    n_f = n_c = dim = None
    if feats is not None:
        shp = feats.shape
        if len(shp) == 3 and shp[0] == 1:
            sq_f, n_f, dim = True, shp[1], shp[2]
        elif len(shp) == 2:
            n_f, dim = shp
        else:
            problems.append(f"'features' has shape {shp}; expected (N, D) or (1, N, D)")
        if feats.dtype.kind != "f":
            problems.append(f"'features' has dtype {feats.dtype}; expected float16 or float32")
    if coords is not None:
        shp = coords.shape
        if len(shp) == 3 and shp[0] == 1 and shp[2] == 2:
            sq_c, n_c = True, shp[1]
        elif len(shp) == 2 and shp[1] == 2:
            n_c = shp[0]
        else:
            problems.append(f"'coords' has shape {shp}; expected (N, 2)")
        if coords.dtype.kind not in "iuf":
            problems.append(f"'coords' has dtype {coords.dtype}; expected integers")
    if n_f is not None and n_c is not None and n_f != n_c:
        problems.append(f"'features' has {n_f} rows but 'coords' has {n_c}")
    if n_f == 0 or n_c == 0:
        problems.append("zero patches")
    attrs = _grid_attrs(f, coords)
    psl0 = attrs.get("patch_size_level0")
    if psl0 is not None:
        try:
            if not float(psl0) > 0:
                problems.append(f"patch_size_level0={psl0} must be positive")
        except (TypeError, ValueError):
            problems.append(f"patch_size_level0={psl0!r} is not a number")
    if problems:
        return None, problems
    return SlideHeader(int(n_f), int(dim), feats.dtype, sq_f, sq_c, attrs, has_coords), []


def open_slide_file(path: Path) -> h5py.File:
    if not path.exists():
        raise SlideFileError("file not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise SlideFileError(f"cannot open as HDF5 ({e})") from None


def read_header(path: Path) -> SlideHeader:
    """Header of an HDF5 or torch slide file; raises SlideFileError."""
    with SlideSource(path) as src:
        return src._need_header()


def read_coords(f: h5py.File, header: SlideHeader) -> np.ndarray:
    c = f["coords"][0] if header.squeeze_coords else f["coords"][()]
    if c.dtype.kind == "f":
        if not np.all(np.isfinite(c)) or np.any(c != np.round(c)):
            raise SlideFileError("'coords' holds non-integer values")
    return c.astype(np.int64, copy=False)


def read_features(f: h5py.File, header: SlideHeader, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of the features in their stored dtype."""
    stop = header.n if stop is None else stop
    ds = f["features"]
    return ds[0, start:stop] if header.squeeze_features else ds[start:stop]


def row_runs(rows: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Sorted unique ``rows`` as half-open ranges [a, b), merging runs separated by at most ``max_gap``
    unwanted rows: one larger read costs less than another HDF5 selection (tens of microseconds each)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) > max_gap + 1)
    starts = np.concatenate([[rows[0]], rows[breaks + 1]])
    stops = np.concatenate([rows[breaks], [rows[-1]]]) + 1
    return list(zip(starts.tolist(), stops.tolist()))


def _contiguous_offset(ds: h5py.Dataset) -> int | None:
    """Byte offset of an uncompressed, contiguous dataset in its file (TRIDENT's and CLAM's layout), else None."""
    if ds.chunks is not None or ds.compression is not None or ds.external:
        return None
    try:
        return ds.id.get_offset()
    except Exception:  # noqa: BLE001 - not yet allocated, or a driver without file offsets: use h5py
        return None


def pread_into(fd: int, out: np.ndarray, pos: int, truncated: Exception) -> np.ndarray:
    """Fill ``out`` with the bytes of ``fd`` at ``pos`` (looping over short reads); ``truncated`` is raised
    at end of file. Returns ``out``."""
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], pos + done)
        if got == 0:
            raise truncated
        done += got
    return out


def gather_rows(rows: np.ndarray, max_gap: int, dim: int, dtype: np.dtype,
                read_block: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """Rows ``rows`` (sorted, unique) of an (N, dim) array stored row after row, read as runs merged across
    gaps of up to ``max_gap`` rows; ``read_block(a, b)`` returns rows [a, b)."""
    out = np.empty((rows.size, dim), dtype)
    runs = row_runs(rows, max_gap)
    ends = np.searchsorted(rows, [b for _, b in runs]).tolist()  # wanted rows before each run's end
    done = 0
    for (a, b), end in zip(runs, ends):
        out[done:end] = read_block(a, b)[rows[done:end] - a]
        done = end
    return out


def read_feature_rows(f: h5py.File, header: SlideHeader, rows: np.ndarray) -> np.ndarray:
    """Feature rows ``rows`` (sorted, unique) in their stored dtype, read as a few contiguous ranges.

    Grid crops of a slide stored in scan order are a few dozen runs of consecutive rows, so this reads
    a crop's share of the file instead of the whole (N, D) array. A contiguous dataset is read with one
    ``pread`` per run at its file offset (each h5py selection costs ~0.1 ms, more than reading the run);
    chunked or compressed ones through h5py, with runs merged across gaps of up to 32 rows.
    """
    rows = np.asarray(rows, dtype=np.int64)
    offset = _contiguous_offset(f["features"])
    if offset is None:
        return gather_rows(rows, 32, header.dim, header.dtype, lambda a, b: read_features(f, header, a, b))
    row_bytes = header.dim * header.dtype.itemsize
    fd = os.open(f.filename, os.O_RDONLY)
    try:
        return gather_rows(rows, 4, header.dim, header.dtype, lambda a, b: pread_into(
            fd, np.empty((b - a, header.dim), header.dtype), offset + a * row_bytes,
            SlideFileError("'features' is truncated")))
    finally:
        os.close(fd)


def iter_feature_chunks(f: h5py.File, header: SlideHeader, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, header.n, rows):
        yield start, read_features(f, header, start, min(header.n, start + rows))


def nonfinite_rows(chunk: np.ndarray) -> np.ndarray:
    """Indices of rows holding NaN/Inf; a float64 row sum is the fast path since NaN/Inf propagate."""
    if np.isfinite(chunk.sum(dtype=np.float64)):
        return np.zeros(0, np.int64)
    return np.flatnonzero(~np.isfinite(chunk).all(axis=1))


# --------------------------------------------------------------------------- features-only torch files


def is_torch_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in TORCH_SUFFIXES


def _load_torch(path: Path):
    import torch

    try:
        # mmap: checking a file reads its header, not its values (needs torch's zip format).
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        pass
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise SlideFileError(f"cannot load with torch.load(weights_only=True) ({type(e).__name__}: {e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as e:  # noqa: BLE001
        raise SlideFileError(f"cannot load with torch.load(weights_only=True) ({type(e).__name__}: {e})") from None


def inspect_torch(obj) -> tuple[Any, SlideHeader | None, list[str]]:
    """(features tensor, header, problems) of a loaded .pt object: a tensor (N, D) or (1, N, D)."""
    import torch

    if isinstance(obj, dict) and "features" in obj:
        obj = obj["features"]  # a dict bag; its other entries are not positions slidefm can trust
    if not torch.is_tensor(obj):
        return None, None, [f"holds a {type(obj).__name__}; expected a tensor (N, D) of patch features"]
    shp = tuple(obj.shape)
    problems = []
    sq = len(shp) == 3 and shp[0] == 1
    if len(shp) == 2 or sq:
        n, dim = shp[-2], shp[-1]
    else:
        return None, None, [f"tensor has shape {shp}; expected (N, D) or (1, N, D)"]
    if not obj.is_floating_point():
        problems.append(f"tensor has dtype {obj.dtype}; expected float16 or float32")
    if n == 0:
        problems.append("zero patches")
    if problems:
        return None, None, problems
    t = obj[0] if sq else obj
    # bfloat16 has no numpy dtype: it is read (and packed) as float32.
    dtype = np.dtype("float32") if t.dtype == torch.bfloat16 else np.dtype(str(t.dtype).replace("torch.", ""))
    return t, SlideHeader(int(n), int(dim), dtype, sq, False, {}, False, "pt"), []


class SlideSource:
    """One open slide file, HDF5 or torch: header, coords (None for a features-only bag), features.

    ``header`` is None when the file does not follow the contract; ``problems`` says why.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f: h5py.File | None = None
        self._t = None
        if is_torch_file(self.path):
            if not self.path.exists():
                raise SlideFileError("file not found")
            self._t, self.header, self.problems = inspect_torch(_load_torch(self.path))
        else:
            self._f = open_slide_file(self.path)
            self.header, self.problems = inspect_file(self._f)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f = self._t = None

    def __enter__(self) -> "SlideSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _need_header(self) -> SlideHeader:
        if self.header is None:
            raise SlideFileError("; ".join(self.problems))
        return self.header

    def coords(self) -> np.ndarray | None:
        h = self._need_header()
        return read_coords(self._f, h) if h.has_coords else None

    def features(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) in the stored dtype (bfloat16 as float32)."""
        h = self._need_header()
        if self._f is not None:
            return read_features(self._f, h, start, stop)
        import torch

        t = self._t[start:h.n if stop is None else stop]
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    def feature_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique) in the stored dtype (bfloat16 as float32), without reading the rest."""
        h = self._need_header()
        if self._f is not None:
            return read_feature_rows(self._f, h, rows)
        import torch

        t = self._t[torch.as_tensor(np.asarray(rows, dtype=np.int64))]
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        h = self._need_header()
        for start in range(0, h.n, rows):
            yield start, self.features(start, min(h.n, start + rows))
