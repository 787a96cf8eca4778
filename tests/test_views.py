import numpy as np
import pytest

from slidefm.data.views import (
    ViewConfig,
    block_mask,
    dihedral,
    feature_dropout,
    gaussian_noise,
    make_views,
    random_crop,
    region_crop,
    stain_jitter,
    subsample,
    tissue_window_counts,
    token_dropout,
    whole_slide,
)


def blob_slide(seed=0, w=60, h=50, d=16, radius=18.0, noise_cells=60):
    """A disk of tissue plus a few scattered patches on a w x h grid."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    disk = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 <= radius**2
    cells = set(zip(xx[disk].tolist(), yy[disk].tolist()))
    for _ in range(noise_cells):
        cells.add((int(rng.integers(w)), int(rng.integers(h))))
    pos = np.array(sorted(cells), dtype=np.int64)
    pos = pos[rng.permutation(len(pos))] + np.array([7, 3])  # arbitrary order and origin
    feats = rng.standard_normal((len(pos), d)).astype(np.float32)
    return feats, pos


def views_equal(a, b):
    return all(
        np.array_equal(x.indices, y.indices)
        and np.array_equal(x.positions, y.positions)
        and np.array_equal(x.token_mask, y.token_mask)
        and np.array_equal(x.features, y.features)
        for x, y in zip(a, b)
    ) and len(a) == len(b)


AUG = ViewConfig(noise_std=0.1, feature_dropout=0.1, stain_jitter=0.2, token_dropout=0.1, dihedral=True, mask_prob=1.0)


def test_make_views_deterministic_per_seed():
    f, p = blob_slide()
    a = make_views(f, p, AUG, np.random.default_rng(3))
    b = make_views(f, p, AUG, np.random.default_rng(3))
    c = make_views(f, p, AUG, np.random.default_rng(4))
    assert views_equal(a, b)
    assert not views_equal(a, c)
    assert len(a.global_views) == 2 and len(a.local_views) == 4
    assert [v.kind for v in a] == ["global"] * 2 + ["local"] * 4
    idx, pos, mask = a.global_views[0]  # unpacks as the (indices, positions, token_mask) triple
    assert len(idx) == len(pos) == len(mask) == len(a.global_views[0].features)


@pytest.mark.parametrize("size,min_tissue", [(20, 0.5), (12, 0.9)])
def test_crop_respects_tissue_fraction_and_rebases(size, min_tissue):
    f, p = blob_slide()
    rng = np.random.default_rng(0)
    crops = region_crop(p, size, rng, min_tissue=min_tissue, n=30)
    origins = set()
    for idx, pos in crops:
        assert len(idx) >= min_tissue * size * size
        assert pos.min() >= 0 and pos.max() < size
        shift = p[idx] - pos  # re-basing is one translation per crop
        assert (shift == shift[0]).all()
        origins.add(tuple(shift[0]))
        # every tissue cell inside the window is in the crop
        inside = np.all((p >= shift[0]) & (p < shift[0] + size), axis=1)
        assert np.array_equal(np.flatnonzero(inside), np.sort(idx))
    assert len(origins) > 5  # origins vary


def test_crop_falls_back_to_densest_window():
    # 5x5 slide, smaller than the crop: the crop holds the whole slide
    p = np.stack(np.meshgrid(np.arange(5), np.arange(5)), -1).reshape(-1, 2)
    idx, pos = region_crop(p, 12, np.random.default_rng(0), min_tissue=0.25)[0]
    assert np.array_equal(np.sort(idx), np.arange(25))
    # sparse slide where no window reaches the tissue fraction: the densest windows win
    f, p = blob_slide(radius=3.0, noise_cells=30)
    counts = tissue_window_counts(p, 10)
    for idx, _ in region_crop(p, 10, np.random.default_rng(1), min_tissue=0.9, n=5):
        assert counts.max() < 90 and len(idx) == counts.max()
    assert len(random_crop(p, 10, np.random.default_rng(1), min_tissue=0.9)) == counts.max()


def test_window_counts_match_brute_force():
    f, p = blob_slide(w=15, h=11, radius=4.0, noise_cells=20)
    counts = tissue_window_counts(p, 4)
    rel = p - p.min(0)
    for x0, y0 in [(0, 0), (3, 5), (counts.shape[0] - 1, counts.shape[1] - 1)]:
        brute = np.all((rel >= (x0, y0)) & (rel < (x0 + 4, y0 + 4)), axis=1).sum()
        assert counts[x0, y0] == brute


def test_block_mask_ratio_bounds_and_blockiness():
    _, p = blob_slide()
    n = len(p)
    fracs, clustered = [], []
    occupied = {tuple(c): i for i, c in enumerate(p.tolist())}
    for s in range(20):
        m = block_mask(p, np.random.default_rng(s), (0.1, 0.5), min_block=4)
        assert m.shape == (n,) and m.dtype == bool
        fracs.append(m.mean())
        # fraction of masked tokens' tissue neighbours that are masked too
        hits = tot = 0
        for i in np.flatnonzero(m):
            x, y = p[i]
            for nb in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                j = occupied.get(nb)
                if j is not None:
                    tot += 1
                    hits += m[j]
        clustered.append(hits / tot - m.mean())
    fracs = np.array(fracs)
    assert fracs.min() >= 0.1 - 0.5 / n and fracs.max() <= 0.5 + 0.5 / n
    assert fracs.std() > 0.03  # the ratio is drawn, not fixed
    assert np.mean(clustered) > 0.2  # blocks, not i.i.d. tokens


def test_mask_only_on_global_views_and_prob():
    f, p = blob_slide()
    always = make_views(f, p, ViewConfig(mask_prob=1.0), np.random.default_rng(0))
    never = make_views(f, p, ViewConfig(mask_prob=0.0), np.random.default_rng(0))
    for v in always.global_views:
        assert 0.1 - 0.01 <= v.token_mask.mean() <= 0.5 + 0.01
    for v in list(always.local_views) + list(never):
        assert not v.token_mask.any()


def test_subsample_and_whole_slide():
    rng = np.random.default_rng(0)
    idx = subsample(100, 30, rng)
    assert len(idx) == 30 and len(np.unique(idx)) == 30 and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, subsample(100, 30, np.random.default_rng(0)))
    assert np.array_equal(subsample(20, 30, rng), np.arange(20))
    assert np.array_equal(whole_slide(7), np.arange(7))
    f, p = blob_slide()
    for v in make_views(f, p, ViewConfig(max_tokens=50, global_size=30), np.random.default_rng(0)):
        assert len(v.indices) <= 50


def test_feature_augmentations_change_features():
    f, p = blob_slide()
    rng = np.random.default_rng(0)
    for g in (
        gaussian_noise(f, 0.1, rng),
        feature_dropout(f, 0.2, rng),
        stain_jitter(f, 0.3, rng, n_dirs=8),
    ):
        assert g.shape == f.shape and g.dtype == np.float32
        assert np.abs(g - f).max() > 1e-3
    # zero strength is the identity
    assert np.array_equal(gaussian_noise(f, 0.0, rng), f)
    assert np.array_equal(stain_jitter(f, 0.0, rng, n_dirs=8), f)
    # stain jitter acts along n_dirs directions only: the change has rank <= n_dirs
    g = stain_jitter(f, 0.5, np.random.default_rng(1), n_dirs=3)
    assert np.linalg.matrix_rank(g - f, tol=1e-4) <= 3
    # and is one affine map for the whole view: one-token views still change (shift)
    assert np.abs(stain_jitter(f[:1], 0.5, np.random.default_rng(2), n_dirs=8) - f[:1]).max() > 1e-3
    keep = token_dropout(len(f), 0.3, rng)
    assert 0 < len(keep) < len(f)
    assert len(token_dropout(3, 0.999999, rng)) >= 1


def test_dihedral_preserves_distances_but_not_offsets():
    _, p = blob_slide(w=12, h=7, radius=3.0, noise_cells=10)
    d0 = np.linalg.norm(p[:, None] - p[None], axis=-1)
    seen = set()
    for t in range(8):
        q = dihedral(p, t)
        assert q.min() == 0
        assert np.allclose(np.linalg.norm(q[:, None] - q[None], axis=-1), d0)  # ALiBi sees the same
        seen.add((q - q[0]).tobytes())
    assert len(seen) == 8  # eight distinct signed-offset patterns: RoPE sees different inputs


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_augmentations_change_vit_output(pos):
    """Feature and token augmentations change both ViTs; grid transforms change RoPE only.

    Flips, rot90 and transposes keep every pairwise grid distance, so for distance-only ALiBi (no
    absolute positions) they are exact no-ops.
    """
    import torch

    from slidefm.data.batch import pack_slides
    from slidefm.models.aggregators import build_aggregator
    from slidefm.models.aggregators.vit import ViTConfig

    torch.manual_seed(0)
    vit = build_aggregator(ViTConfig(dim=16, depth=1, heads=2, pos=pos), in_dim=16).eval()
    f, p = blob_slide(w=12, h=9, radius=3.5, noise_cells=6)

    def run(feats, positions):
        with torch.no_grad():
            return vit(pack_slides([feats], [positions])).slide[0]

    base = run(f, p)
    if pos == "alibi":  # (RoPE is not: the position-less CLS query sees absolute rotations)
        torch.testing.assert_close(run(f, p + 5), base, atol=1e-5, rtol=1e-5)
    rng = np.random.default_rng(0)
    keep = token_dropout(len(f), 0.2, rng)
    changed = {
        "noise": run(gaussian_noise(f, 0.1, rng), p),
        "feature_dropout": run(feature_dropout(f, 0.1, rng), p),
        "stain_jitter": run(stain_jitter(f, 0.2, rng, n_dirs=8), p),
        "token_dropout": run(f[keep], p[keep]),
    }
    for name, out in changed.items():
        assert (out - base).abs().max() > 1e-4, name
    for t in range(1, 8):
        out = run(f, dihedral(p, t))
        if pos == "alibi":
            torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)
        else:
            assert (out - base).abs().max() > 1e-5, t


# --------------------------------------------------------------------------- share crops (no positions)


def test_share_crop_sizes_follow_the_slide_and_the_cap():
    from slidefm.data.views import share_crop

    rng = np.random.default_rng(0)
    for n in (1, 7, 38, 500):
        for idx in share_crop(n, (0.1, 0.4), 10**6, rng, count=50):
            assert 1 <= len(idx) <= n and len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
            assert len(idx) == 1 or 0.1 * n - 0.5 <= len(idx) <= 0.4 * n + 0.5
    sizes = [len(i) for i in share_crop(500, (0.5, 1.0), 64, rng, count=20)]
    assert max(sizes) == 64  # capped (local_size**2 / global_size**2 in views)


def test_random_mask_is_exact_and_unstructured():
    from slidefm.data.views import random_mask

    rng = np.random.default_rng(1)
    for n in (1, 10, 333):
        for _ in range(20):
            m = random_mask(n, rng, (0.1, 0.5))
            assert m.dtype == bool and len(m) == n and round(0.1 * n) <= m.sum() <= round(0.5 * n)
    assert random_mask(40, rng, 0.25).sum() == 10
    # every token gets masked sometimes: no spatial block structure needed
    hits = sum(random_mask(40, rng, 0.25).astype(int) for _ in range(200))
    assert hits.min() > 0


def test_share_views_need_no_positions():
    """crop=share on a features-only bag (all-zero positions): views differ in size relative to the
    slide, locals are smaller than globals, masks are random and only on globals, rows are real rows."""
    rng = np.random.default_rng(2)
    n = 38  # the median HIPT region bag: a 16-cell grid window would be the whole slide
    feats = rng.standard_normal((n, 8)).astype(np.float32)
    cfg = ViewConfig(crop="share", n_global=2, n_local=4, global_size=16, local_size=8, mask_prob=1.0)
    sizes = {"global": [], "local": []}
    for s in range(30):
        v = make_views(feats, np.zeros((n, 2), np.int64), cfg, np.random.default_rng(s))
        for view in v:
            sizes[view.kind].append(len(view.indices))
            assert np.array_equal(view.features, feats[view.indices]) and not view.positions.any()
            assert view.token_mask.any() == (view.kind == "global")
    assert min(sizes["global"]) >= round(0.5 * n) and max(sizes["global"]) <= n
    assert max(sizes["local"]) <= round(0.4 * n) and min(sizes["local"]) >= round(0.1 * n)
    # with grid crops every view of this slide would hold all its tokens
    grid = make_views(feats, np.stack([np.arange(n) % 7, np.arange(n) // 7], 1), ViewConfig(
        global_size=16, local_size=8, n_local=4), np.random.default_rng(0))
    assert {len(v.indices) for v in grid} == {n}


@pytest.mark.parametrize("bad", [{"global_scale": (0.0, 1.0)}, {"local_scale": (0.5, 0.2)},
                                 {"local_scale": (0.1, 1.5)}, {"crop": "circle"}])
def test_check_views_names_the_option(bad):
    from slidefm.data.views import check_views
    from slidefm.registry import OptionError

    with pytest.raises(OptionError, match="data.views." + next(iter(bad))):
        check_views(ViewConfig(**bad))
