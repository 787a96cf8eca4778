"""The one place where level-0 patch coordinates become integer grid positions.

Real extractors (CLAM, TRIDENT) tile each tissue contour on its own lattice: every lattice has the
same stride, but their origins differ by a few pixels, so the gcd of coordinate differences
collapses to 1-4 px. The rule implemented here (documented in docs/cohort.md):

1. **Stride.** From the file's declared geometry, in this order: ``patch_size_level0`` (minus the
   ``overlap``, which TRIDENT stores at the target magnification); else CLAM's ``patch_size`` x
   ``downsample`` (of ``patch_level``); else TRIDENT's ``patch_size`` x ``level0_magnification`` /
   ``target_magnification`` (minus overlap). The coordinates are always measured too: the dominant
   spacing between consecutive patches of one row or column (robust to per-contour offsets, unlike
   the gcd). The declared stride wins when the measurement agrees with it, is a multiple of it
   (sparse tissue) or rests on too few gaps (fewer than 3, or under a quarter of all gaps); a
   well-supported measured spacing that contradicts it (overlapping extraction without an
   ``overlap`` attribute, a scanner whose true pixel size differs from its nominal magnification)
   wins over the declaration, since positions must follow where the patches really are.
2. **Lattice.** One slide-wide lattice: its origin is the (x, y) offset modulo the stride that most
   patches share (ties: the smallest). Every patch goes to the nearest cell (``snapped`` counts those
   that were not exactly on the lattice, i.e. came from another contour's origin).
3. **Collisions.** Two patches in one cell after snapping: the one nearest the cell's lattice point
   keeps it (ties: first in file order); each other one moves to the nearest free cell (searched
   ring by ring, nearest to its true position, ties by row then column). No feature row is ever
   dropped, and cells stay unique within a slide (grid convolutions rely on it); ``collided``
   counts the moved patches. Identical coordinates are not a collision but an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

import numpy as np

# Where a slide's stride came from: an explicit argument, patch_size_level0, CLAM's or TRIDENT's
# attributes, or the coordinates alone (also when they contradict the declared geometry).
STRIDE_SOURCES = ("given", "attribute", "clam", "trident", "inferred")

# Implausible-grid thresholds (see Grid.problems).
MIN_PATCHES_FOR_SHAPE_CHECK = 32
MIN_NEIGHBOUR_SHARE = 0.2
MAX_COLLIDED_SHARE = 0.1
MIN_STRIDE_FRACTION = 1 / 8


class GridError(ValueError):
    """Coordinates that cannot be mapped to a grid."""


@dataclass(frozen=True)
class Geometry:
    """What a slide file declares about its patches, in level-0 pixels."""

    stride: int  # distance between neighbouring patches
    footprint: int  # level-0 size of one patch
    source: str  # "attribute" | "clam" | "trident"


@dataclass(frozen=True)
class Grid:
    positions: np.ndarray  # (N, 2) int64, (col, row) = (x, y) grid cells, min at 0, unique
    step: int  # level-0 stride in pixels
    origin: tuple[int, int]  # level-0 (x, y) of grid cell (0, 0)
    source: str = "given"  # one of STRIDE_SOURCES
    footprint: int | None = None  # declared level-0 patch size, when known
    snapped: int = 0  # patches that were not exactly on the slide's lattice
    collided: int = 0  # patches moved to a free cell because their nearest cell was taken
    declared_step: int | None = None  # the declared stride when the coordinates overruled it
    measured_step: int | None = None  # dominant spacing of the coordinates (None: no neighbours)

    @property
    def shape(self) -> tuple[int, int]:
        """(width, height) of the bounding grid in cells."""
        if len(self.positions) == 0:
            return (0, 0)
        return tuple(int(v) + 1 for v in self.positions.max(0))  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        return int(len(self.positions))

    @property
    def occupancy(self) -> float:
        """Patches / cells of the bounding grid (tissue gives a few % to ~70%; a collapsed grid ~0)."""
        w, h = self.shape
        return self.num_patches / (w * h) if w * h else 0.0

    @cached_property
    def neighbour_share(self) -> float:
        """Share of patches with at least one of their 8 neighbouring cells occupied.

        Tissue gives nearly every patch a neighbour whatever the slide's overall extent, so this is
        the occupancy measure that tells a real grid from a collapsed one (where no patch has one).
        """
        n = self.num_patches
        if n < 2:
            return 1.0
        p = self.positions.astype(np.int64) + 1  # keep neighbours of column/row 0 non-negative
        h = int(p[:, 1].max()) + 2
        keys = np.sort(p[:, 0] * h + p[:, 1])
        has = np.zeros(n, bool)
        own = p[:, 0] * h + p[:, 1]
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                if dx or dy:
                    q = own + dx * h + dy
                    i = np.minimum(np.searchsorted(keys, q), n - 1)
                    has |= keys[i] == q
        return float(has.mean())

    def summary(self) -> str:
        """One line: stride, its source, grid size, occupancy, snapped and collided patches."""
        w, h = self.shape
        src = self.source
        if self.declared_step is not None:
            src += f"; declared {self.declared_step} px"
        return (f"stride {self.step} px ({src}), grid {w} x {h}, occupancy {100 * self.occupancy:.1f}%, "
                f"{100 * self.neighbour_share:.0f}% with a neighbour, snapped {self.snapped}, "
                f"collided {self.collided}")

    def problems(self) -> list[str]:
        """Why this grid is implausible (empty when it looks like tissue on one lattice)."""
        out = []
        n = self.num_patches
        w, h = self.shape
        if self.footprint and self.step < self.footprint * MIN_STRIDE_FRACTION:
            out.append(f"implausible grid: stride {self.step} px ({self.source}) is far below the patch size "
                       f"{self.footprint} px; a {w} x {h} grid for {n} patches")
        if n >= MIN_PATCHES_FOR_SHAPE_CHECK and self.neighbour_share < MIN_NEIGHBOUR_SHARE:
            k = int(round(self.neighbour_share * n))
            out.append(f"implausible grid: only {k} of {n} patches have a neighbouring patch on the {w} x {h} "
                       f"grid (stride {self.step} px, {self.source}; occupancy {100 * self.occupancy:.3g}%); "
                       "tissue gives most patches a neighbour: are coords level-0 pixels of one tiling?")
        if n and self.collided > MAX_COLLIDED_SHARE * n:
            out.append(f"implausible grid: {self.collided} of {n} patches ({100 * self.collided / n:.0f}%) "
                       f"collided with another patch's cell at stride {self.step} px ({self.source})")
        return out


# --------------------------------------------------------------------------- declared geometry


def _num(v: Any) -> float | None:
    """A positive finite number from an attribute value, else None (absent, 'NA', 0, arrays...)."""
    if v is None or isinstance(v, (str, bytes)):
        return None
    a = np.asarray(v, dtype=object)
    if a.size != 1:
        return None
    try:
        x = float(a.reshape(()).item())
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) and x > 0 else None


def _overlap(v: Any) -> float:
    x = _num(v)
    return 0.0 if x is None else x


def _clam_downsample(v: Any, patch_level: Any) -> float | None:
    """CLAM's ``downsample``: the patch level's (dx, dy), a scalar, or one row per level."""
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if a.ndim == 0:
        d = float(a)
    elif a.ndim == 1 and a.size in (1, 2):
        d = float(a[0])
    elif a.ndim == 2 and a.shape[1] == 2:
        lvl = int(_num(patch_level) or 0)
        if lvl >= len(a):
            return None
        d = float(a[lvl, 0])
    else:
        return None
    return d if np.isfinite(d) and d > 0 else None


def declared_geometry(attrs: Mapping[str, Any] | None = None, patch_size_level0: float | None = None,
                      overlap: float | None = None, patch_size: float | None = None) -> Geometry | None:
    """Stride and patch footprint a file declares, or None when its attributes do not say.

    Explicit arguments override ``attrs``. Raises GridError when the overlap leaves no stride.
    """
    a = dict(attrs or {})
    for k, v in (("patch_size_level0", patch_size_level0), ("overlap", overlap), ("patch_size", patch_size)):
        if v is not None:
            a[k] = v
    ps = _num(a.get("patch_size"))
    ov = _overlap(a.get("overlap"))
    psl0 = _num(a.get("patch_size_level0"))
    if psl0 is not None:
        scale = psl0 / ps if ps else 1.0  # TRIDENT stores overlap at the target magnification
        foot, stride, source = psl0, psl0 - ov * scale, "attribute"
    elif ps is not None and _clam_downsample(a.get("downsample"), a.get("patch_level")) is not None:
        # CLAM: coords are level 0, patches are patch_size at patch_level; its step_size is not
        # recorded, and defaults to the patch size (the coordinates confirm or overrule it).
        foot = ps * _clam_downsample(a.get("downsample"), a.get("patch_level"))
        stride, source = foot, "clam"
    elif ps is not None and _num(a.get("target_magnification")) and _num(a.get("level0_magnification")):
        scale = _num(a["level0_magnification"]) / _num(a["target_magnification"])
        foot, stride, source = ps * scale, (ps - ov) * scale, "trident"
    else:
        return None
    foot_i, stride_i = int(round(foot)), int(round(stride))
    if stride_i < 1:
        raise GridError(f"overlap={a.get('overlap')} leaves no stride for patches of {foot_i} px at level 0")
    return Geometry(stride_i, foot_i, source)


# --------------------------------------------------------------------------- measured spacing


def _axis_diffs(c: np.ndarray) -> np.ndarray:
    """Gaps between consecutive patches sharing a row (same y) or a column (same x)."""
    out = []
    for axis in (0, 1):
        other = 1 - axis
        order = np.lexsort((c[:, axis], c[:, other]))
        a = c[order]
        same = a[1:, other] == a[:-1, other]
        d = (a[1:, axis] - a[:-1, axis])[same]
        out.append(d[d > 0])
    return np.concatenate(out)


def measure_spacing(coords: np.ndarray, with_support: bool = False):
    """Dominant level-0 spacing between neighbouring patches, or None when no two share a row/column.

    The most frequent gap between consecutive patches of a row or column; a smaller gap that
    divides it and is nearly as frequent wins (the fundamental spacing, when tissue gaps make
    2-stride gaps common). Gaps between contours with different origins are rare, so unlike the
    gcd they cannot pull the result down. ``with_support``: also return whether the spacing is
    well supported (at least 3 gaps and a quarter of all gaps), which it must be to overrule a
    declared stride.
    """
    c = np.asarray(coords, dtype=np.int64)
    d = _axis_diffs(c) if len(c) >= 2 else np.zeros(0, np.int64)
    if len(d) == 0:
        return (None, False) if with_support else None
    vals, counts = np.unique(d, return_counts=True)
    best = int(np.argmax(counts))  # ties: the smallest gap
    mode, support = int(vals[best]), int(counts[best])
    for v, k in zip(vals, counts):  # ascending
        if v < mode and k >= 0.5 * counts.max() and mode % int(v) == 0:
            mode, support = int(v), int(k)
            break
    strong = support >= 3 and support >= 0.25 * len(d)
    return (mode, strong) if with_support else mode


def _gcd_spacing(c: np.ndarray) -> int:
    diffs = [np.diff(np.unique(c[:, axis])) for axis in range(2)]
    d = np.concatenate(diffs)
    return int(np.gcd.reduce(d)) if len(d) else 0


def resolve_step(coords: np.ndarray, declared: Geometry | None) -> tuple[int, str, int | None, int | None]:
    """(stride, source, declared stride if overruled, measured spacing) for a slide."""
    measured, strong = measure_spacing(coords, with_support=True)
    if declared is not None:
        if measured is None or measured % declared.stride == 0 or not strong:
            return declared.stride, declared.source, None, measured
        return measured, "inferred", declared.stride, measured
    if measured is not None:
        return measured, "inferred", None, measured
    # No two patches share a row or column and nothing is declared: the gcd is all there is.
    return max(1, _gcd_spacing(np.asarray(coords, np.int64))), "inferred", None, None


def infer_step(
    coords: np.ndarray,
    patch_size_level0: float | None = None,
    overlap: float | None = None,
    patch_size: float | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> int:
    """Level-0 stride between neighbouring patches (the rule in this module's docstring)."""
    coords = np.asarray(coords, dtype=np.int64)
    return resolve_step(coords, declared_geometry(attrs, patch_size_level0, overlap, patch_size))[0]


# --------------------------------------------------------------------------- snapping


def _mode(v: np.ndarray) -> int:
    vals, counts = np.unique(v, return_counts=True)
    return int(vals[np.argmax(counts)])


def _relocate(cells: np.ndarray, frac: np.ndarray, losers: np.ndarray, occupied: set) -> None:
    """Move each loser (in order) to the nearest free cell, ring by ring around its snapped cell."""
    for i in losers:
        cx, cy = int(cells[i, 0]), int(cells[i, 1])
        r = 1
        while True:
            best = None
            for x in range(cx - r, cx + r + 1):
                for y in (range(cy - r, cy + r + 1) if x in (cx - r, cx + r) else (cy - r, cy + r)):
                    if (x, y) in occupied:
                        continue
                    key = ((x - frac[i, 0]) ** 2 + (y - frac[i, 1]) ** 2, y, x)
                    if best is None or key < best:
                        best = key
            if best is not None:
                cells[i] = (best[2], best[1])
                occupied.add((best[2], best[1]))
                break
            r += 1


def coords_to_grid(
    coords: np.ndarray,
    patch_size_level0: float | None = None,
    overlap: float | None = None,
    patch_size: float | None = None,
    step: int | None = None,
    check_duplicates: bool = True,
    attrs: Mapping[str, Any] | None = None,
) -> Grid:
    """Map (N, 2) level-0 (x, y) coordinates in any order and with any origin(s) to unique grid cells.

    ``attrs``: the slide file's attributes (TRIDENT/CLAM names); explicit arguments override them.
    ``step`` forces the stride. Identical coordinates raise GridError unless ``check_duplicates``
    is False (they are then treated as collisions).
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise GridError(f"coords must have shape (N, 2), got {coords.shape}")
    declared = declared_geometry(attrs, patch_size_level0, overlap, patch_size)
    if len(coords) == 0:
        s = int(step or (declared.stride if declared else 1))
        return Grid(np.zeros((0, 2), np.int64), s, (0, 0), "given" if step else (declared.source if declared else
                                                                                   "inferred"))
    if not np.issubdtype(coords.dtype, np.integer):
        if not np.all(np.isfinite(coords)) or np.any(coords != np.round(coords)):
            raise GridError("coords must be integer pixel positions")
    c = coords.astype(np.int64)
    if check_duplicates:
        dup = _first_duplicate(c)
        if dup is not None:
            i, j, k = dup
            raise GridError(f"{k} duplicate coordinate(s), e.g. patch rows {i} and {j} at ({c[i, 0]}, {c[i, 1]})")
    if step is not None:
        s, source, overruled, measured = int(step), "given", None, None
        if s < 1:
            raise GridError(f"step must be >= 1, got {step}")
    else:
        s, source, overruled, measured = resolve_step(c, declared)
    r = _mode((c[:, 0] % s) * s + c[:, 1] % s)  # the (x, y) offset most patches share; ties: the smallest
    residue = np.array([r // s, r % s], np.int64)
    rel = c - residue
    cells = (rel + s // 2) // s  # nearest lattice point; exactly half-way goes up
    snapped = int(np.count_nonzero((rel % s != 0).any(axis=1)))
    collided = 0
    lo = cells.min(0)
    cells -= lo
    h = int(cells[:, 1].max()) + 1
    key = cells[:, 0] * h + cells[:, 1]
    order = np.argsort(key, kind="stable")
    ks = key[order]
    clash = np.zeros(len(ks), bool)
    clash[1:] = ks[1:] == ks[:-1]
    if clash.any():
        # Keeper of each cell: nearest its lattice point, then first in file order.
        dist = ((rel - (cells + lo) * s) ** 2).sum(1)
        order = np.lexsort((np.arange(len(c)), dist, key))
        ks = key[order]
        first = np.ones(len(ks), bool)
        first[1:] = ks[1:] != ks[:-1]
        losers = np.sort(order[~first])  # file order
        collided = len(losers)
        occupied = {(int(x), int(y)) for x, y in cells[order[first]]}
        frac = rel / s - lo
        _relocate(cells, frac, losers, occupied)
        lo2 = cells.min(0)
        cells -= lo2
        lo = lo + lo2
    origin = residue + lo * s
    return Grid(cells, s, (int(origin[0]), int(origin[1])), source, declared.footprint if declared else None,
                snapped, collided, overruled, measured)


def _first_duplicate(c: np.ndarray) -> tuple[int, int, int] | None:
    """(first row, its duplicate's row, number of duplicate rows) for identical coordinates."""
    order = np.lexsort((c[:, 1], c[:, 0]))
    a = c[order]
    same = np.flatnonzero((a[1:] == a[:-1]).all(axis=1))
    if len(same) == 0:
        return None
    i, j = sorted((int(order[same[0]]), int(order[same[0] + 1])))
    return i, j, len(same)
