"""Per-slide HDF5 files in the TRIDENT / CLAM layout: cheap header inspection and full reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from slidefm.errors import SlidefmError

# TRIDENT writes these on `coords`; older CLAM files put patch_size_level0 on the file root.
GRID_ATTRS = ("patch_size_level0", "patch_size", "overlap", "target_magnification", "level0_magnification")


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

    @property
    def patch_size_level0(self) -> int | None:
        v = self.attrs.get("patch_size_level0")
        return None if v is None else int(round(float(v)))


def _scalar(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(()).item()
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
    if not isinstance(coords, h5py.Dataset):
        problems.append("no 'coords' dataset" if coords is None else "'coords' is not a dataset")
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
    return SlideHeader(int(n_f), int(dim), feats.dtype, sq_f, sq_c, attrs), []


def open_slide_file(path: Path) -> h5py.File:
    if not path.exists():
        raise SlideFileError("file not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise SlideFileError(f"cannot open as HDF5 ({e})") from None


def read_header(path: Path) -> SlideHeader:
    with open_slide_file(path) as f:
        header, problems = inspect_file(f)
    if header is None:
        raise SlideFileError("; ".join(problems))
    return header


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


def iter_feature_chunks(f: h5py.File, header: SlideHeader, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, header.n, rows):
        yield start, read_features(f, header, start, min(header.n, start + rows))


def nonfinite_rows(chunk: np.ndarray) -> np.ndarray:
    """Indices of rows holding NaN/Inf; a float64 row sum is the fast path since NaN/Inf propagate."""
    if np.isfinite(chunk.sum(dtype=np.float64)):
        return np.zeros(0, np.int64)
    return np.flatnonzero(~np.isfinite(chunk).all(axis=1))
