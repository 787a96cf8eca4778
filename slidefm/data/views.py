"""Token strategies for training: region crops, block masks, subsampling and augmentations.

Everything works on one slide as numpy arrays (``features`` (N, D), ``positions`` (N, 2) integer
grid cells (x, y)), is vectorised, and draws randomness only from the ``numpy.random.Generator``
passed in, so a view is a deterministic function of (slide, config, seed). It runs inside
DataLoader workers; nothing here touches torch.

Augmentations and relative positions: with a distance-only position bias (2-D ALiBi over the
Euclidean grid distance) and no absolute positions, flips, 90-degree rotations and transposes of
the grid preserve every pairwise distance, so they are exact no-ops for such a model. They do
change RoPE outputs (RoPE encodes signed per-axis offsets). Feature-space augmentations (Gaussian
noise, feature dropout, stain jitter) and token dropout change the input for every model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np
import torch

__all__ = [
    "View",
    "ViewConfig",
    "block_mask",
    "check_views",
    "dihedral",
    "feature_dropout",
    "gaussian_noise",
    "SlideViews",
    "share_crop",
    "ViewPlan",
    "finish_views",
    "make_views",
    "plan_rows",
    "plan_views",
    "random_crop",
    "random_dihedral",
    "random_mask",
    "region_crop",
    "stain_jitter",
    "subsample",
    "tissue_window_counts",
    "token_dropout",
    "whole_slide",
]


# --------------------------------------------------------------------------- token selection


def whole_slide(n: int) -> np.ndarray:
    """Identity strategy: every token, in order."""
    return np.arange(n, dtype=np.int64)


def subsample(n: int, max_tokens: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``max_tokens`` tokens drawn without replacement (all when n fits)."""
    if max_tokens is None or n <= max_tokens:
        return np.arange(n, dtype=np.int64)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    return np.sort(rng.choice(n, size=max_tokens, replace=False)).astype(np.int64)


def token_dropout(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of the tokens kept when each is dropped with probability ``p`` (at least one kept)."""
    if p <= 0 or n == 0:
        return np.arange(n, dtype=np.int64)
    keep = rng.random(n) >= p
    if not keep.any():
        keep[rng.integers(n)] = True
    return np.flatnonzero(keep).astype(np.int64)


def tissue_window_counts(positions: np.ndarray, size: int) -> np.ndarray:
    """Number of tissue cells in every ``size`` x ``size`` window, indexed by window origin (x0, y0).

    Tissue = grid cells holding a patch. Grids smaller than the window are padded with empty cells,
    so such a slide has one window (origin 0) holding all of it. Uses a summed-area table: O(grid).
    """
    pos = np.asarray(positions, dtype=np.int64)
    lo = pos.min(0)
    w, h = (pos.max(0) - lo + 1).tolist()
    wp, hp = max(w, size), max(h, size)
    table = np.zeros((wp + 1, hp + 1), dtype=np.int32)
    table[pos[:, 0] - lo[0] + 1, pos[:, 1] - lo[1] + 1] = 1  # a cell is tissue once, however many rows name it
    table = table.cumsum(0).cumsum(1)
    return table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]


def share_crop(
    n: int, scale: tuple[float, float], cap: int, rng: np.random.Generator, count: int = 1
) -> list[np.ndarray]:
    """``count`` random subsets of a slide's ``n`` tokens (sorted indices), each a share drawn uniformly in
    ``scale`` of the slide (at least one token, at most ``cap``): crops relative to the slide's size that
    need no positions (features-only bags; slides far smaller than a grid window)."""
    lo, hi = scale
    out = []
    for _ in range(count):
        k = int(np.clip(round(float(rng.uniform(lo, hi)) * n), 1, max(1, min(n, cap))))
        out.append(np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64))
    return out


def _mask_count(n: int, ratio: tuple[float, float] | float, rng: np.random.Generator) -> int:
    """round(r * n) for a ratio r drawn uniformly in ``ratio`` (a fixed ratio draws nothing)."""
    lo_r, hi_r = (ratio, ratio) if np.isscalar(ratio) else ratio
    r = float(rng.uniform(lo_r, hi_r)) if hi_r > lo_r else float(lo_r)
    return int(round(r * n))


def random_mask(n: int, rng: np.random.Generator, ratio: tuple[float, float] | float) -> np.ndarray:
    """iBOT's random mask: boolean (n,), exactly round(r * n) tokens True for r drawn uniformly in ``ratio``
    (for views without a grid, where blocks have no meaning)."""
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=_mask_count(n, ratio, rng), replace=False)] = True
    return mask


def region_crop(
    positions: np.ndarray,
    size: int,
    rng: np.random.Generator,
    min_tissue: float,
    n: int = 1,
    counts: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` crops of ``size`` x ``size`` grid cells: list of (token indices, positions re-based to the crop).

    Origins are drawn uniformly among windows whose tissue fraction (tissue cells / size**2) is at
    least ``min_tissue``; when none qualifies (small or sparse slide) among the densest windows.
    Re-based positions lie in [0, size). ``counts`` may pass a precomputed
    :func:`tissue_window_counts` for the same positions and size.
    """
    pos = np.asarray(positions, dtype=np.int64)
    if len(pos) == 0:
        return [(np.zeros(0, np.int64), np.zeros((0, 2), np.int64)) for _ in range(n)]
    if counts is None:
        counts = tissue_window_counts(pos, size)
    need = int(np.ceil(min_tissue * size * size - 1e-9))
    ok = np.flatnonzero(counts.ravel() >= max(need, 1))
    if ok.size == 0:
        ok = np.flatnonzero(counts.ravel() == counts.max())
    picks = ok[rng.integers(ok.size, size=n)]
    lo = pos.min(0)
    rel = pos - lo
    out = []
    for p in picks:
        origin = np.array(np.unravel_index(p, counts.shape), dtype=np.int64)
        inside = np.all((rel >= origin) & (rel < origin + size), axis=1)
        idx = np.flatnonzero(inside).astype(np.int64)
        out.append((idx, rel[idx] - origin))
    return out


def random_crop(positions: np.ndarray, size: int, rng: np.random.Generator, min_tissue: float) -> np.ndarray:
    """Token indices of one :func:`region_crop` (the ``crop`` token strategy of the slide branch)."""
    return region_crop(positions, size, rng, min_tissue, n=1)[0][0]


def block_mask(
    positions: np.ndarray,
    rng: np.random.Generator,
    ratio: tuple[float, float] | float,
    min_block: int,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """iBOT-style blockwise mask over a slide's tokens: boolean (N,), True = masked.

    A ratio r is drawn uniformly in ``ratio`` and exactly round(r * N) tokens are masked, N counting
    tissue tokens only (cells without a patch have no token, so they never count as masked).
    Rectangles of area >= ``min_block`` cells with a log-uniform aspect ratio are placed around a
    not-yet-masked token until the target is reached; the last block is trimmed to the cells nearest
    its centre so the count is exact.
    """
    pos = np.asarray(positions, dtype=np.int64)
    n = len(pos)
    target = _mask_count(n, ratio, rng)
    mask = np.zeros(n, dtype=bool)
    log_a = np.log(aspect)
    while mask.sum() < target:
        remaining = target - int(mask.sum())
        area = rng.uniform(min_block, max(min_block, remaining))
        ar = np.exp(rng.uniform(*log_a))
        bh = max(1, int(round(np.sqrt(area * ar))))
        bw = max(1, int(round(np.sqrt(area / ar))))
        free = np.flatnonzero(~mask)
        c = pos[free[rng.integers(free.size)]]
        # Block corner drawn so the chosen token lies inside it: every block masks something.
        x0 = c[0] - rng.integers(bw)
        y0 = c[1] - rng.integers(bh)
        new = (~mask) & (pos[:, 0] >= x0) & (pos[:, 0] < x0 + bw) & (pos[:, 1] >= y0) & (pos[:, 1] < y0 + bh)
        new_idx = np.flatnonzero(new)
        if new_idx.size > remaining:
            centre = np.array([x0 + (bw - 1) / 2, y0 + (bh - 1) / 2])
            d = ((pos[new_idx] - centre) ** 2).sum(1)
            new_idx = new_idx[np.argsort(d, kind="stable")[:remaining]]
        mask[new_idx] = True
    return mask


# --------------------------------------------------------------------------- augmentations


def dihedral(positions: np.ndarray, t: int) -> np.ndarray:
    """Element ``t`` in 0..7 of the dihedral group on grid positions (t=0 identity).

    ``t % 4`` quarter turns, then a transpose when ``t >= 4``; the result (identity included) is
    shifted to start at 0.
    Exact no-op for distance-only ALiBi models; changes RoPE outputs.
    """
    p = np.asarray(positions, dtype=np.int64)
    if len(p) == 0:
        return p.copy()
    x, y = p[:, 0], p[:, 1]
    for _ in range(t % 4):
        x, y = -y, x
    if t % 8 >= 4:
        x, y = y, x
    out = np.stack([x, y], 1)
    return out - out.min(0)


def random_dihedral(positions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn flip / rot90 / transpose of the grid (identity included)."""
    return dihedral(positions, int(rng.integers(8)))


def _feature_scale(features: np.ndarray) -> np.ndarray:
    """Per-dimension scale used by the noise augmentations: std over tokens, RMS when that is 0."""
    f = np.asarray(features, dtype=np.float32)
    std = f.std(0) if len(f) > 1 else np.zeros(f.shape[1], np.float32)
    if (std > 0).all() or len(f) == 0:
        return std.astype(np.float32)
    return np.where(std > 0, std, np.sqrt((f**2).mean(0))).astype(np.float32)


def gaussian_noise(
    features: np.ndarray, std: float, rng: np.random.Generator, scale: np.ndarray | None = None
) -> np.ndarray:
    """Add N(0, (std * scale_d)^2) noise; ``scale`` defaults to the per-dimension std of ``features``."""
    f = np.asarray(features, dtype=np.float32)
    if std <= 0:
        return f.copy()
    s = _feature_scale(f) if scale is None else np.asarray(scale, np.float32)
    return f + (std * s) * rng.standard_normal(f.shape, dtype=np.float32)


def feature_dropout(features: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Zero each feature entry with probability ``p``, rescaling the rest by 1/(1-p) (inverted dropout)."""
    f = np.asarray(features, dtype=np.float32)
    if p <= 0:
        return f.copy()
    keep = rng.random(f.shape, dtype=np.float32) >= p
    return np.where(keep, f / (1.0 - p), 0.0).astype(np.float32)


def _orthonormal(v: np.ndarray) -> np.ndarray:
    """Gram-Schmidt on the rows of ``v`` (k, D), k small.

    A LAPACK QR would do, but its thread pool costs ~100x more than these k passes inside a
    loaded DataLoader worker.
    """
    out = np.empty_like(v)
    for i in range(len(v)):
        w = v[i] - out[:i].T @ (out[:i] @ v[i])
        out[i] = w / np.linalg.norm(w)
    return out


def stain_jitter(features: np.ndarray, strength: float, rng: np.random.Generator, n_dirs: int) -> np.ndarray:
    """Per-view random affine map in feature space, the same for every token of the view.

    Stain and scanner shifts move a whole slide's patch embeddings coherently, so ``n_dirs`` random
    orthonormal directions are drawn; along each, the centred projection is scaled by
    exp(strength * N(0,1)) and shifted by strength * N(0,1) * (projection std). Orthogonal
    complements are untouched.
    """
    f = np.asarray(features, dtype=np.float32)
    if strength <= 0 or len(f) == 0:
        return f.copy()
    d = f.shape[1]
    k = min(n_dirs, d)
    u = _orthonormal(rng.standard_normal((k, d))).T.astype(np.float32)  # (D, k)
    mu = f.mean(0)
    proj = (f - mu) @ u  # (N, k)
    # A single token has no spread to measure; fall back to the feature RMS as the shift unit.
    sd = proj.std(0) if len(f) > 1 else np.full(k, np.sqrt((f**2).mean()), np.float32)
    sd = np.where(sd > 0, sd, np.sqrt((f**2).mean())).astype(np.float32)
    scale = np.exp(strength * rng.standard_normal(k)).astype(np.float32)
    shift = (strength * rng.standard_normal(k)).astype(np.float32) * sd
    return (f + (proj * (scale - 1.0) + shift) @ u.T).astype(np.float32)


# --------------------------------------------------------------------------- views


@dataclass
class ViewConfig:
    """How one slide becomes the global and local crops of masked self-distillation."""

    crop: Literal["grid", "share"] = field(default="grid", metadata={
        "help": "how a view is cut: grid: a square window of global_size/local_size cells, block-masked; share: "
                "a random share of the slide's tokens (global_scale/local_scale, at most global_size**2/local_size**2 "
                "tokens), randomly masked, needing no positions (features-only bags, slides of a few dozen patches)"})
    n_global: int = field(default=2, metadata={"help": "global crops per slide"})
    global_size: int = field(default=20, metadata={"help": "global crop side in grid cells"})
    n_local: int = field(default=4, metadata={"help": "local crops per slide"})
    local_size: int = field(default=12, metadata={"help": "local crop side in grid cells"})
    global_scale: tuple[float, float] = field(default=(0.5, 1.0), metadata={
        "help": "crop=share: range of the share of the slide's tokens in a global view"})
    local_scale: tuple[float, float] = field(default=(0.1, 0.4), metadata={
        "help": "crop=share: range of the share of the slide's tokens in a local view"})
    mask_ratio: tuple[float, float] = field(default=(0.1, 0.5), metadata={"help": "block-mask ratio range"})
    mask_prob: float = field(default=0.5, metadata={"help": "probability that a global crop is masked"})
    min_block: int = field(default=4, metadata={"help": "smallest mask block in cells"})
    min_tissue: float = field(default=0.25, metadata={"help": "minimum tissue fraction of a crop window"})
    max_tokens: int | None = field(default=None, metadata={"help": "cap on tokens per view (random subset)"})
    noise_std: float = field(default=0.0, metadata={"help": "Gaussian feature noise, in per-dim std units"})
    feature_dropout: float = field(default=0.0, metadata={"help": "probability of zeroing a feature entry"})
    stain_jitter: float = field(default=0.0, metadata={"help": "strength of the per-view feature affine"})
    stain_dirs: int = field(default=8, metadata={"help": "directions the stain jitter acts along"})
    token_dropout: float = field(default=0.0, metadata={"help": "probability of dropping a token"})
    dihedral: bool = field(
        default=False, metadata={"help": "random flip/rot90/transpose of the grid (no-op for ALiBi)"}
    )


def check_views(cfg: ViewConfig) -> None:
    """OptionError naming the ``data.views`` option that is out of range (before any work starts)."""
    from slidefm.registry import OptionError, check_choices

    check_choices(cfg, "data.views.", ViewConfig)
    for name in ("global_scale", "local_scale"):
        lo, hi = (float(v) for v in getattr(cfg, name))
        if not 0 < lo <= hi <= 1:
            raise OptionError(f"data.views.{name} must be a range 0 < low <= high <= 1, got [{lo}, {hi}]")


@dataclass
class View:
    """One crop of a slide; ``features`` (not ``source[indices]``) is what the model must see.

    Iterates as ``(indices, positions, token_mask)``.
    """

    indices: np.ndarray  # (n,) int64 rows of the slide
    positions: np.ndarray  # (n, 2) int64, re-based to the crop (and possibly flipped/rotated)
    token_mask: np.ndarray  # (n,) bool, True = masked
    features: np.ndarray  # (n, D) float32, source rows after the feature-space augmentations
    kind: str  # "global" | "local"

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.indices, self.positions, self.token_mask))


@dataclass
class SlideViews:
    """The views of one slide: globals and locals; iterates over all of them, globals first."""

    global_views: list[View]
    local_views: list[View]

    def __iter__(self) -> Iterator[View]:
        return iter(self.global_views + self.local_views)

    def __len__(self) -> int:
        return len(self.global_views) + len(self.local_views)


@dataclass
class ViewPlan:
    """Where one view lies in its slide, drawn from positions alone (no feature values needed)."""

    kind: str  # "global" | "local"
    indices: np.ndarray  # (n,) int64 rows of the slide
    positions: np.ndarray  # (n, 2) int64, re-based to the crop (and possibly flipped/rotated)
    token_mask: np.ndarray  # (n,) bool, True = masked


def plan_views(positions: np.ndarray, cfg: ViewConfig, rng: np.random.Generator) -> list[ViewPlan]:
    """The rows, positions and masks of ``cfg.n_global`` global and ``cfg.n_local`` local views.

    Per view: crop (a grid window, or with ``crop=share`` a share of the tokens) -> ``max_tokens``
    subsample -> token dropout -> mask (global views, with probability ``cfg.mask_prob``; local views
    never; block mask on the grid, random mask for shares) -> grid transform. Only positions are
    needed, so a reader can fetch just the union of the views' rows (:func:`plan_rows`).
    """
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) == 0:
        raise ValueError("cannot make views of a slide without tokens")
    share = cfg.crop == "share"
    plans: list[ViewPlan] = []
    for kind, n, size in (("global", cfg.n_global, cfg.global_size), ("local", cfg.n_local, cfg.local_size)):
        if n <= 0:
            continue
        if share:
            scale = cfg.global_scale if kind == "global" else cfg.local_scale
            lo = positions.min(0)
            crops = [(i, positions[i] - lo) for i in share_crop(len(positions), scale, size * size, rng, n)]
        else:
            crops = region_crop(positions, size, rng, cfg.min_tissue, n=n)
        for idx, pos in crops:
            masked = kind == "global" and cfg.mask_prob > 0 and rng.random() < cfg.mask_prob
            keep = subsample(len(idx), cfg.max_tokens, rng)
            keep = keep[token_dropout(len(keep), cfg.token_dropout, rng)]
            idx, pos = idx[keep], pos[keep]
            if masked and share:
                m = random_mask(len(idx), rng, cfg.mask_ratio)
            elif masked:
                m = block_mask(pos, rng, cfg.mask_ratio, min_block=cfg.min_block)
            else:
                m = np.zeros(len(idx), dtype=bool)
            if cfg.dihedral:
                pos = random_dihedral(pos, rng)
            plans.append(ViewPlan(kind, idx, pos, m))
    return plans


def plan_rows(plans: list[ViewPlan]) -> np.ndarray:
    """Sorted unique slide rows the planned views read."""
    if not plans:
        return np.zeros(0, np.int64)
    return np.unique(np.concatenate([p.indices for p in plans]))


def finish_views(take, plans: list[ViewPlan], cfg: ViewConfig, rng: np.random.Generator) -> SlideViews:
    """Views from their plans; ``take(indices)`` returns the slide's feature rows ``indices``.

    Feature-space augmentations per view: stain jitter -> Gaussian noise -> feature dropout.
    """
    out = SlideViews([], [])
    for p in plans:
        # float16 rows cast by torch (several times faster than numpy's cast on CPU, and equally exact)
        f = torch.from_numpy(np.ascontiguousarray(take(p.indices))).to(torch.float32).numpy()
        if cfg.stain_jitter > 0:
            f = stain_jitter(f, cfg.stain_jitter, rng, cfg.stain_dirs)
        if cfg.noise_std > 0:
            f = gaussian_noise(f, cfg.noise_std, rng)  # in units of the view's own per-dim std
        if cfg.feature_dropout > 0:
            f = feature_dropout(f, cfg.feature_dropout, rng)
        view = View(p.indices, p.positions, p.token_mask, f, p.kind)
        (out.global_views if p.kind == "global" else out.local_views).append(view)
    return out


def make_views(
    features: np.ndarray, positions: np.ndarray, cfg: ViewConfig, rng: np.random.Generator
) -> SlideViews:
    """``cfg.n_global`` global and ``cfg.n_local`` local views of one slide: :func:`plan_views` (all
    geometry first, from positions), then :func:`finish_views` (feature-space augmentations)."""
    features = np.asarray(features)
    positions = np.asarray(positions, dtype=np.int64)
    if len(features) != len(positions):
        raise ValueError(f"{len(features)} feature rows but {len(positions)} positions")
    return finish_views(lambda idx: features[idx], plan_views(positions, cfg, rng), cfg, rng)
