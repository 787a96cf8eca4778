"""The one place where level-0 patch coordinates become integer grid positions.

Grid position = (coords - min(coords)) // step, where ``step`` is the level-0 stride between
neighbouring patches. The stride equals ``patch_size_level0`` only for non-overlapping extraction;
with overlap it is inferred from the coordinates themselves (or from the ``overlap`` attribute when
the coordinates cannot tell, e.g. a single patch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class GridError(ValueError):
    """Coordinates that cannot be mapped to a regular grid."""


@dataclass(frozen=True)
class Grid:
    positions: np.ndarray  # (N, 2) int64, (col, row) = (x, y) grid cells, min at 0
    step: int  # level-0 stride in pixels
    origin: tuple[int, int]  # level-0 (x, y) of grid cell (0, 0)

    @property
    def shape(self) -> tuple[int, int]:
        """(width, height) of the bounding grid in cells."""
        if len(self.positions) == 0:
            return (0, 0)
        return tuple(int(v) + 1 for v in self.positions.max(0))  # type: ignore[return-value]


def _axis_gcd(coords: np.ndarray) -> int:
    diffs = []
    for axis in range(2):
        u = np.unique(coords[:, axis])
        if len(u) > 1:
            diffs.append(np.diff(u))
    if not diffs:
        return 0
    return int(np.gcd.reduce(np.concatenate(diffs).astype(np.int64)))


def infer_step(
    coords: np.ndarray,
    patch_size_level0: float | None = None,
    overlap: float | None = None,
    patch_size: float | None = None,
) -> int:
    """Level-0 stride between neighbouring patches.

    The stride is the gcd of coordinate differences along both axes, which is exact for any lattice
    even with gaps. For non-overlapping extraction, sparse tissue can make every gap a multiple of
    the patch size: the gcd is then a multiple of ``patch_size_level0`` and the patch size wins.
    """
    coords = np.asarray(coords, dtype=np.int64)
    g = _axis_gcd(coords)
    hinted = None
    if patch_size_level0:
        ps = float(patch_size_level0)
        if overlap:
            # TRIDENT stores overlap in pixels at the target magnification.
            scale = ps / float(patch_size) if patch_size else 1.0
            hinted = int(round(ps - float(overlap) * scale))
        else:
            hinted = int(round(ps))
    if g == 0:
        if hinted is None or hinted <= 0:
            return 1
        return hinted
    if hinted and hinted > 0 and g % hinted == 0:
        return hinted
    if patch_size_level0 and g < float(patch_size_level0) / 16:
        raise GridError(
            f"coordinates are not on a regular lattice: inferred stride {g} px is far below "
            f"patch_size_level0={patch_size_level0}"
        )
    return g


def coords_to_grid(
    coords: np.ndarray,
    patch_size_level0: float | None = None,
    overlap: float | None = None,
    patch_size: float | None = None,
    step: int | None = None,
    check_duplicates: bool = True,
) -> Grid:
    """Map (N, 2) level-0 (x, y) coordinates in any order and with any origin to grid cells."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise GridError(f"coords must have shape (N, 2), got {coords.shape}")
    if len(coords) == 0:
        return Grid(np.zeros((0, 2), np.int64), int(step or patch_size_level0 or 1), (0, 0))
    if not np.issubdtype(coords.dtype, np.integer):
        if not np.all(np.isfinite(coords)) or np.any(coords != np.round(coords)):
            raise GridError("coords must be integer pixel positions")
    c = coords.astype(np.int64)
    if step is None:
        step = infer_step(c, patch_size_level0, overlap, patch_size)
    origin = c.min(0)
    pos = (c - origin) // int(step)
    if check_duplicates:
        key = pos[:, 0] * (int(pos[:, 1].max()) + 1) + pos[:, 1]
        uniq, counts = np.unique(key, return_counts=True)
        if np.any(counts > 1):
            n_dup = int((counts > 1).sum())
            raise GridError(f"{n_dup} grid cell(s) hold more than one patch (duplicate coordinates)")
    return Grid(pos, int(step), (int(origin[0]), int(origin[1])))
