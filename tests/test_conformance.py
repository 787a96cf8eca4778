"""Conformance: feature files shaped like what real extractors write, each with the grid it must give.

Fixtures are built here in code, from what the tools are documented to write (docs/cohort.md):
CLAM tiles every tissue contour on its own lattice from the contour's bounding box (origins a few
pixels apart) and writes ``patch_size``/``patch_level``/``downsample`` on ``coords``; TRIDENT tiles
one slide-wide lattice and writes ``patch_size_level0``, magnifications and ``overlap``; CLAM
``pt_files/`` and HIPT-style region bags hold features only.
"""

from __future__ import annotations

import time

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slidefm.cli import main
from slidefm.cohort import Cohort
from slidefm.errors import SlidefmError
from slidefm.grid import coords_to_grid

CLAM_40X = {"patch_size": 512, "patch_level": 0, "downsample": np.array([1.0, 1.0]),
            "downsampled_level_dim": np.array([90000, 70000]), "level_dim": np.array([90000, 70000]),
            "name": "slide", "save_path": "/data/patches"}
# 20x patches read from level 1 of a 40x scan: 256 px at level 1 = 512 px at level 0.
CLAM_20X_FROM_40X = {**CLAM_40X, "patch_size": 256, "patch_level": 1, "downsample": np.array([2.0, 2.0])}
# 20x scan, 256 px patches at level 0.
CLAM_20X = {**CLAM_40X, "patch_size": 256}


def run_check(capsys, root, *extra):
    code = main(["check", str(root), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def blob(rng, a: float, b: float) -> np.ndarray:
    """Cells (x, y) of an irregular tissue piece: an ellipse with ragged edges, x-major like CLAM."""
    xs, ys = np.meshgrid(np.arange(int(2 * a) + 1), np.arange(int(2 * b) + 1), indexing="ij")
    r = ((xs - a) / a) ** 2 + ((ys - b) / b) ** 2
    keep = r <= 1 + 0.15 * rng.standard_normal(r.shape)
    return np.stack([xs[keep], ys[keep]], 1).astype(np.int64)


def clam_slide(rng, step: int, pieces: list[tuple[tuple[int, int], tuple[int, int], float, float]]):
    """CLAM-style coordinates: each piece (cell offset, pixel origin offset, a, b) tiled on its own
    lattice. Returns (coords in CLAM's contour-by-contour order, the grid positions they must give,
    how many patches are off the slide's lattice)."""
    coords, cells, sizes = [], [], []
    for (cx, cy), off, a, b in pieces:
        c = blob(rng, a, b)
        coords.append((c + [cx, cy]) * step + 2000 + np.asarray(off))
        cells.append(c + [cx, cy])
        sizes.append(len(c))
    # The slide's lattice is the one most patches share (the largest piece); other pieces go to the
    # nearest cell of it: their offset relative to it, rounded half up.
    ref = np.asarray(pieces[int(np.argmax(sizes))][1])
    expected = [c + np.floor((np.asarray(p[1]) - ref) / step + 0.5).astype(np.int64) for c, p in zip(cells, pieces)]
    expected = np.concatenate(expected)
    off = sum(n for n, p in zip(sizes, pieces) if np.any((np.asarray(p[1]) - ref) % step))
    return np.concatenate(coords), expected - expected.min(0), off


def write_cohort(root, slides: dict[str, dict], expression: bool = False, extra_yaml: dict | None = None):
    """slides: sid -> {features, coords (or None), attrs, root_attrs, kind ('h5'|'pt'), batch_dim, path}."""
    rows = []
    for i, (sid, s) in enumerate(slides.items()):
        feats = s["features"]
        row = {"slide_id": sid, "patient_id": s.get("patient", f"P{i:03d}"), "center": "A" if i % 2 else "B"}
        if s.get("kind") == "pt":
            p = root / s.get("path", f"features/{sid}.pt")
            p.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(feats[None] if s.get("batch_dim") else feats), p)
        else:
            p = root / s.get("path", f"features/{sid}.h5")
            p.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(p, "w") as f:
                f.create_dataset("features", data=feats[None] if s.get("batch_dim") else feats)
                if s.get("coords") is not None:
                    c = f.create_dataset("coords", data=s["coords"])
                    for k, v in (s.get("attrs") or {}).items():
                        c.attrs[k] = v
                for k, v in (s.get("root_attrs") or {}).items():
                    f.attrs[k] = v
        if "path" in s:
            row["path"] = s["path"]
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "slides.csv", index=False)
    if expression:
        pids = list(dict.fromkeys(r["patient_id"] for r in rows))
        rng = np.random.default_rng(1)
        anndata.AnnData(X=rng.poisson(5, (len(pids), 64)).astype(np.float32), obs=pd.DataFrame(index=pids),
                        var=pd.DataFrame(index=[f"G{j}" for j in range(64)])).write_h5ad(root / "expression.h5ad")
    if extra_yaml:
        (root / "cohort.yaml").write_text(yaml.safe_dump(extra_yaml))
    return root


def feats(rng, n, d=16, dtype=np.float16):
    return rng.standard_normal((n, d), dtype=np.float32).astype(dtype)


# --------------------------------------------------------------------------- CLAM


@pytest.mark.parametrize("mag,attrs,step", [("40x", CLAM_40X, 512), ("40x-level1", CLAM_20X_FROM_40X, 512),
                                            ("20x", CLAM_20X, 256)])
def test_clam_multi_contour(tmp_path, capsys, mag, attrs, step):
    """Contours whose lattices are 1-300 px apart: stride = patch size, one grid, nothing collapses."""
    rng = np.random.default_rng(0)
    pieces = [((0, 0), (0, 0), 12, 9), ((30, 2), (1, 3), 6, 5), ((2, 25), (4, 1), 5, 7),
              ((40, 30), (300, 17), 7, 4), ((20, 40), (3, 2), 2, 2)]
    coords, expected, n_off = clam_slide(rng, step, pieces)
    old_gcd = np.gcd.reduce(np.concatenate([np.diff(np.unique(coords[:, a])) for a in (0, 1)]))
    assert old_gcd <= 4  # what the previous rule took as the stride
    root = write_cohort(tmp_path / "c", {"S1": {"features": feats(rng, len(coords)), "coords": coords,
                                                "attrs": attrs}})
    s = Cohort.open(root).read_slide("S1")
    assert s.step == step and s.has_positions
    np.testing.assert_array_equal(s.positions.numpy(), expected)
    g = coords_to_grid(coords, attrs=attrs)
    assert (g.source, g.step, g.footprint, g.collided) == ("clam", step, step, 0)
    assert g.shape == tuple(expected.max(0) + 1)
    assert g.snapped == n_off > 0
    code, out = run_check(capsys, root, "--verbose")
    assert code == 0, out
    assert f"grid stride: {step} px x1 (from clam x1)" in out
    w, h = g.shape
    assert f"slide S1: {len(coords)} patches, stride {step} px (clam), grid {w} x {h}" in out
    assert "collided 0" in out and "OK: 0 error(s), 0 warning(s)" in out


def test_regression_gcd_collapse_without_any_attribute(tmp_path, capsys):
    """The silent collapse of issue 13: CLAM coordinates with no usable attribute at all.

    The gcd of coordinate differences is 1 px here, so the previous rule built a grid tens of
    thousands of cells wide with occupancy ~0. The stride must come out as the patch size.
    """
    rng = np.random.default_rng(5)
    pieces = [((0, 0), (0, 0), 15, 11), ((40, 0), (1, 2), 9, 9), ((5, 30), (3, 1), 8, 6)]
    coords, expected, n_off = clam_slide(rng, 512, pieces)
    assert np.gcd.reduce(np.concatenate([np.diff(np.unique(coords[:, a])) for a in (0, 1)])) == 1
    g = coords_to_grid(coords)
    assert (g.step, g.source) == (512, "inferred")
    np.testing.assert_array_equal(g.positions, expected)
    assert g.occupancy > 0.2 and g.neighbour_share > 0.95 and g.problems() == []
    # The old gcd grid, for the record: what must never come back.
    old_shape = (coords.max(0) - coords.min(0)) // 1 + 1
    assert old_shape.prod() > 1000 * np.prod(g.shape)
    root = write_cohort(tmp_path / "c", {"S1": {"features": feats(rng, len(coords)), "coords": coords}})
    code, out = run_check(capsys, root)
    assert code == 0 and "grid stride: 512 px x1 (from inferred x1)" in out, out
    assert "no patch geometry attributes" in out  # a warning, says where the stride came from


def test_collapsed_grid_is_an_error_naming_slide_and_numbers(tmp_path, capsys):
    """Stride far below the patch size (coords written in the wrong units): never a silent pass."""
    rng = np.random.default_rng(0)
    cells = blob(rng, 8, 8)
    root = write_cohort(tmp_path / "c", {"S1": {"features": feats(rng, len(cells)), "coords": cells * 2,
                                                "attrs": CLAM_40X}})
    code, out = run_check(capsys, root)
    assert code == 1
    err = [ln for ln in out.splitlines() if "error:" in ln]
    assert any("features/S1.h5" in ln and "slide S1" in ln and "stride 2 px" in ln and "patch size 512" in ln
               for ln in err), out
    with pytest.raises(SlidefmError, match=r"features/S1.h5 \[slide S1\]: implausible grid"):
        Cohort.open(root).read_slide("S1")


# --------------------------------------------------------------------------- TRIDENT


@pytest.mark.parametrize("overlap,step", [(0, 512), (32, 448)])
@pytest.mark.parametrize("attrs_on", ["coords", "root"])
def test_trident(tmp_path, capsys, overlap, step, attrs_on):
    """TRIDENT: 256 px at 20x from a 40x scan, one lattice from (0, 0), overlap at the target magnification."""
    rng = np.random.default_rng(2)
    cells = blob(rng, 10, 7) + [3, 4]
    coords = cells * step
    attrs = {"patch_size": 256, "patch_size_level0": 512, "target_magnification": 20, "level0_magnification": 40,
             "overlap": overlap, "name": "S1", "savetodir": "/x", "level0_width": 60000, "level0_height": 40000}
    spec = {"features": feats(rng, len(coords)), "coords": coords}
    spec["attrs" if attrs_on == "coords" else "root_attrs"] = attrs
    root = write_cohort(tmp_path / "c", {"S1": spec})
    s = Cohort.open(root).read_slide("S1")
    assert s.step == step and s.patch_size_level0 == 512
    np.testing.assert_array_equal(s.positions.numpy(), cells - cells.min(0))
    code, out = run_check(capsys, root)
    assert code == 0 and f"grid stride: {step} px x1 (from attribute x1)" in out, out
    assert "snapped to the slide's lattice: 0 patches on 0 slide(s)" in out


def test_trident_without_patch_size_level0(tmp_path):
    """Older TRIDENT files: patch_size + magnifications (+ overlap) give the stride."""
    rng = np.random.default_rng(3)
    cells = blob(rng, 6, 6)
    attrs = {"patch_size": 224, "target_magnification": 20, "level0_magnification": 40, "overlap": 16}
    g = coords_to_grid(cells * 416 + 9, attrs=attrs)  # (224 - 16) * 2
    assert (g.step, g.source, g.footprint, g.snapped) == (416, "trident", 448, 0)
    np.testing.assert_array_equal(g.positions, cells - cells.min(0))


def test_overlap_without_attribute_follows_the_coordinates(tmp_path, capsys):
    rng = np.random.default_rng(4)
    cells = blob(rng, 9, 9)
    root = write_cohort(tmp_path / "c", {"S1": {"features": feats(rng, len(cells)), "coords": cells * 256,
                                                "attrs": {"patch_size_level0": 512}}})
    s = Cohort.open(root).read_slide("S1")
    assert s.step == 256
    np.testing.assert_array_equal(s.positions.numpy(), cells - cells.min(0))
    code, out = run_check(capsys, root)
    assert code == 0 and "512 px stride, but neighbouring patches are 256 px apart" in out, out


# --------------------------------------------------------------------------- shapes and orders


def test_batch_dim_features_and_coords(tmp_path):
    """(1, N, D) features and (1, N, 2) coords, as some pipelines write them."""
    rng = np.random.default_rng(6)
    cells = blob(rng, 4, 4)
    f = feats(rng, len(cells), dtype=np.float32)
    root = tmp_path / "c"
    write_cohort(root, {"S1": {"features": f, "coords": None}})
    with h5py.File(root / "features" / "S1.h5", "w") as h:
        h.create_dataset("features", data=f[None])
        c = h.create_dataset("coords", data=(cells * 512)[None])
        c.attrs["patch_size_level0"] = 512
    s = Cohort.open(root).read_slide("S1")
    assert torch.equal(s.features, torch.from_numpy(f))
    np.testing.assert_array_equal(s.positions.numpy(), cells - cells.min(0))


def test_mixed_base_magnifications_give_the_same_grid(tmp_path, capsys):
    """Same tissue, same 20x patch: 40x scanner (512 px at level 0) and 80x scanner (1024 px)."""
    rng = np.random.default_rng(7)
    cells = blob(rng, 8, 6)
    f = feats(rng, len(cells))
    root = write_cohort(tmp_path / "c", {
        "S40": {"features": f, "coords": cells * 512 + 100, "attrs": {"patch_size_level0": 512, "patch_size": 256}},
        "S80": {"features": f, "coords": cells * 1024 + 7, "attrs": {"patch_size_level0": 1024, "patch_size": 256}},
    })
    c = Cohort.open(root)
    a, b = c.read_slide("S40"), c.read_slide("S80")
    assert (a.step, b.step) == (512, 1024)
    assert torch.equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.positions.numpy(), cells - cells.min(0))
    code, out = run_check(capsys, root)
    assert code == 0 and "grid stride: 512 px x1, 1024 px x1 (from attribute x2)" in out, out


def test_single_patch_slide(tmp_path, capsys):
    root = write_cohort(tmp_path / "c", {"S1": {"features": feats(np.random.default_rng(0), 1),
                                                "coords": np.array([[40960, 8192]]), "attrs": CLAM_40X}})
    s = Cohort.open(root).read_slide("S1")
    assert s.step == 512 and s.positions.tolist() == [[0, 0]]
    code, out = run_check(capsys, root, "--verbose")
    assert code == 0 and "slide S1: 1 patches, stride 512 px (clam), grid 1 x 1, occupancy 100.0%" in out, out


def test_unsorted_coordinates_keep_row_correspondence(tmp_path):
    rng = np.random.default_rng(8)
    coords, expected, n_off = clam_slide(rng, 512, [((0, 0), (0, 0), 7, 5), ((20, 0), (2, 5), 4, 4)])
    perm = rng.permutation(len(coords))
    g_sorted = coords_to_grid(coords, attrs=CLAM_40X)
    g_perm = coords_to_grid(coords[perm], attrs=CLAM_40X)
    np.testing.assert_array_equal(g_perm.positions, expected[perm])
    np.testing.assert_array_equal(g_sorted.positions, expected)
    assert g_perm.origin == g_sorted.origin


def test_duplicated_coordinates_are_an_error_naming_rows(tmp_path, capsys):
    rng = np.random.default_rng(9)
    cells = blob(rng, 5, 5)
    coords = cells * 512
    coords[7] = coords[3]
    root = write_cohort(tmp_path / "c", {"S1": {"features": feats(rng, len(coords)), "coords": coords,
                                                "attrs": CLAM_40X}})
    code, out = run_check(capsys, root)
    assert code == 1
    assert any("slide S1" in ln and "patch rows 3 and 7" in ln and "duplicate coordinate" in ln
               for ln in out.splitlines() if "error:" in ln), out


def test_near_duplicates_from_overlapping_contours_collide_but_keep_every_row(tmp_path, capsys):
    """Two contours whose bounding boxes overlap: a few patches land on the same cell."""
    rng = np.random.default_rng(10)
    a = blob(rng, 8, 8)
    coords = np.concatenate([a * 512, a[:3] * 512 + [5, 9]])  # 3 near-copies, 5/9 px off
    root = write_cohort(tmp_path / "c", {"S1": {"features": feats(rng, len(coords)), "coords": coords,
                                                "attrs": CLAM_40X}})
    s = Cohort.open(root).read_slide("S1")
    assert s.num_patches == len(coords)  # no feature row dropped
    assert len(np.unique(s.positions.numpy(), axis=0)) == len(coords)  # cells unique
    g = coords_to_grid(coords, attrs=CLAM_40X)
    assert (g.collided, g.snapped) == (3, 3)
    np.testing.assert_array_equal(g.positions[: len(a)], a - a.min(0) + (g.positions[: len(a)].min(0)))
    code, out = run_check(capsys, root)
    assert code == 0 and "collided (moved to a free cell): 3 patches on 1 slide(s)" in out, out


# --------------------------------------------------------------------------- features-only bags


def test_features_only_bags(tmp_path, capsys):
    """CLAM pt_files (found as features/{slide_id}.pt), a (1, N, D) .pt, an HDF5 bag without coords
    (HIPT-style regions) and a .pt named in the path column."""
    rng = np.random.default_rng(11)
    f = {k: feats(rng, n, 192, np.float32) for k, n in (("A", 12), ("B", 30), ("C", 5), ("D", 9))}
    root = write_cohort(tmp_path / "c", {
        "A": {"features": f["A"], "kind": "pt"},
        "B": {"features": f["B"], "kind": "pt", "batch_dim": True},
        "C": {"features": f["C"], "coords": None},
        "D": {"features": f["D"], "kind": "pt", "path": "pt_files/D.pt"},
    })
    c = Cohort.open(root)
    assert c.slide_path("A") == root / "features" / "A.pt" and c.feature_dim == 192
    for sid in "ABCD":
        s = c.read_slide(sid)
        assert not s.has_positions and s.step == 0
        assert torch.equal(s.features, torch.from_numpy(f[sid]))
        assert s.positions.shape == (len(f[sid]), 2) and not s.positions.any()
    assert c.slides_without_positions() == list("ABCD")
    code, out = run_check(capsys, root)
    assert code == 0, out
    assert "features-only slides (no coords): 4 of 4" in out and "grid stride" not in out
    # Packed store: the same tensors, and the flag survives.
    assert main(["pack", str(root)]) == 0
    packed = Cohort.open(root)
    assert packed.store is not None and packed.slides_without_positions() == list("ABCD")
    s = packed.read_slide("B")
    assert not s.has_positions and torch.equal(s.features, torch.from_numpy(f["B"]))


def test_features_only_bad_files(tmp_path, capsys):
    rng = np.random.default_rng(12)
    root = write_cohort(tmp_path / "c", {"A": {"features": feats(rng, 4, 8, np.float32), "kind": "pt"},
                                         "B": {"features": feats(rng, 4, 8, np.float32), "kind": "pt"},
                                         "C": {"features": feats(rng, 4, 8, np.float32), "kind": "pt"}})
    torch.save({"model": torch.zeros(3)}, root / "features" / "A.pt")  # not a feature bag
    torch.save(torch.zeros(4, 8, dtype=torch.int64), root / "features" / "B.pt")
    (root / "features" / "C.pt").write_bytes(b"garbage")
    code, out = run_check(capsys, root)
    assert code == 1
    err = [ln for ln in out.splitlines() if "error:" in ln]
    assert any("features/A.pt" in ln and "slide A" in ln and "holds a dict" in ln for ln in err), out
    assert any("features/B.pt" in ln and "dtype torch.int64" in ln for ln in err), out
    assert any("features/C.pt" in ln and "weights_only=True" in ln for ln in err), out


def test_mixed_cohort_rules(tmp_path, capsys):
    """A .pt bag among slides with coords: a warning (position models will refuse); an HDF5 file
    missing coords among them: an error (the contract's 'missing coords')."""
    rng = np.random.default_rng(13)
    cells = blob(rng, 4, 4)
    with_coords = {"features": feats(rng, len(cells)), "coords": cells * 512, "attrs": CLAM_40X}
    root = write_cohort(tmp_path / "c", {"S1": with_coords, "S2": {"features": feats(rng, 5), "kind": "pt"}})
    code, out = run_check(capsys, root)
    assert code == 0 and "1 features-only .pt bag(s) among 1 slide(s) with coordinates" in out, out
    root = write_cohort(tmp_path / "d", {"S1": with_coords, "S2": {"features": feats(rng, 5), "coords": None}})
    code, out = run_check(capsys, root)
    assert code == 1 and "no 'coords' dataset, while 1 other slide(s) have coordinates" in out, out


def test_position_options_refuse_features_only(tmp_path):
    from slidefm.models.positions import position_options, require_positions
    from slidefm.export import ExportConfig, encode_slides_chunked

    rng = np.random.default_rng(14)
    root = write_cohort(tmp_path / "c", {"A": {"features": feats(rng, 4), "coords": blob(rng, 2, 2)[:4] * 512,
                                               "attrs": CLAM_40X},
                                         "B": {"features": feats(rng, 4), "kind": "pt"}})
    c = Cohort.open(root)
    vit = {"model": {"aggregator": {"name": "vit"}}, "data": {"tokens": "whole", "views": None}}
    assert position_options(vit) == ["model.aggregator=vit (2-D RoPE/ALiBi and grid PEG)"]
    for cfg in ({"model": {"aggregator": {"name": n}}, "data": {"tokens": "subsample"}} for n in
                ("mean", "abmil", "perceiver")):
        assert position_options(cfg) == []
        require_positions(cfg, c)
    setvit = {"model": {"aggregator": {"name": "vit", "pos": "none", "peg": 0}},
              "data": {"tokens": "whole", "views": {"crop": "share"}}}
    assert position_options(setvit) == []  # a set model on share crops: what recipe=slidefm_bags trains
    require_positions(setvit, c)
    for kw in ({"pos": "none", "peg": 3}, {"pos": "alibi", "peg": 0}):
        assert position_options({"model": {"aggregator": {"name": "vit", **kw}}}) != []
    crop = {"model": {"aggregator": {"name": "abmil"}}, "data": {"tokens": "crop", "views": {"n_global": 2}}}
    assert position_options(crop) == ["data.tokens=crop (grid crops)", "data.views (grid crops and block masks)"]
    assert position_options(crop, training=False) == []  # export encodes whole slides
    with pytest.raises(SlidefmError, match=r"model\.aggregator=transmil \(PPEG on the grid\) needs patch coordinates") as e:
        require_positions({"model": {"aggregator": {"name": "transmil"}}}, c)
    msg = str(e.value)
    assert "\n" not in msg and "model.aggregator=transmil (PPEG on the grid)" in msg
    assert "slide B (features/B.pt) has none" in msg

    class FakeEncoder:  # export refuses before reading a single slide
        config = vit

        def encode_packed(self, *a, **k):
            raise AssertionError("no work may start")

    with pytest.raises(SlidefmError, match="model.aggregator=vit .* slide B"):
        encode_slides_chunked(FakeEncoder(), c, c.slide_ids, ExportConfig(progress=False), None, "x")


# --------------------------------------------------------------------------- training and export

TINY_THREADS = ["model.aggregator.dim=32", "model.aggregator.hidden=32", "model.aggregator.attn_dim=16",
                "model.embed_dim=32", "model.expression.hidden_dims=[32]", "data.max_tokens=256"]
COMMON = ["data.batch_size=8", "trainer.log_every_n_steps=1", "trainer.progress_bar=false", "data.num_workers=0"]


def compose_cfg(recipe, cohort, run_dir, *extra):
    from hydra import compose, initialize_config_module

    from slidefm.config import register_configs

    register_configs()
    over = [f"recipe={recipe}", f"data.cohort={cohort}", f"run_dir={run_dir}", *COMMON, *extra]
    with initialize_config_module("slidefm.recipes", version_base="1.3"):
        return compose("config", overrides=over)


@pytest.fixture(scope="module")
def features_only_run(tmp_path_factory):
    """A features-only cohort (CLAM pt_files, 1024-D) and a 2-step threads run on it."""
    rng = np.random.default_rng(15)
    root = tmp_path_factory.mktemp("fo") / "c"
    slides = {f"S{i:02d}": {"features": feats(rng, int(rng.integers(20, 80)), 1024), "kind": "pt",
                            "patient": f"P{i // 2:02d}"} for i in range(24)}
    write_cohort(root, slides, expression=True)
    from slidefm.train.run import train

    run_dir = tmp_path_factory.mktemp("run")
    out = train(compose_cfg("threads", root, run_dir, *TINY_THREADS, "trainer.max_steps=2"))
    return root, out


def test_features_only_cohort_trains_with_threads_and_exports(features_only_run, tmp_path):
    root, out = features_only_run
    assert out["global_step"] == 2
    ckpt = out["checkpoint"]
    for level, n in (("slide", 24), ("patient", 12)):
        dest = tmp_path / f"{level}.h5ad"
        assert main(["export", "--checkpoint", ckpt, "--cohort", str(root), "--out", str(dest), "--level", level,
                     "--device", "cpu", "--no-progress"]) == 0
        a = anndata.read_h5ad(dest)
        assert a.shape == (n, 32) and np.isfinite(a.X).all()


def test_house_recipe_refuses_features_only_cohort_in_one_line(features_only_run, tmp_path):
    from slidefm.train.run import train

    root, _ = features_only_run
    cfg = compose_cfg("slidefm", root, tmp_path / "run", "trainer.max_steps=1")
    with pytest.raises(SlidefmError, match="patch coordinates") as e:
        train(cfg)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith("model.aggregator=vit (2-D RoPE/ALiBi and grid PEG), data.views (grid crops and block "
                          "masks) need patch coordinates, but slide S00 (features/S00.pt) has none"), msg
    assert "recipe=slidefm_bags" in msg
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_bags_recipe_pretrains_on_features_only_bags_and_exports(features_only_run, tmp_path):
    """recipe=slidefm_bags on CLAM pt_files without coordinates: masked self-distillation on share crops
    (the contrast pairs with expression here), a checkpoint, and slide embeddings with the mean path."""
    from slidefm.train.run import train

    root, _ = features_only_run
    tiny = ["model.aggregator.dim=32", "model.aggregator.depth=1", "model.aggregator.heads=2", "model.embed_dim=32",
            "model.case.depth=1", "model.case.heads=2", "objectives.distillation.out_dim=64",
            "objectives.distillation.hidden_dim=64", "objectives.distillation.bottleneck_dim=32",
            "model.expression.hidden_dims=[32]"]
    out = train(compose_cfg("slidefm_bags", root, tmp_path / "run", *tiny, "trainer.max_steps=3"))
    assert out["global_step"] == 3
    dest = tmp_path / "slide.h5ad"
    assert main(["export", "--checkpoint", out["checkpoint"], "--cohort", str(root), "--out", str(dest),
                 "--level", "slide", "--device", "cpu", "--no-progress"]) == 0
    a = anndata.read_h5ad(dest)
    assert a.shape == (24, 32 + 1024) and np.isfinite(a.X).all()  # learned part, then the mean input


# --------------------------------------------------------------------------- real size


def test_real_size_slide_loads_checks_and_exports(features_only_run, tmp_path, capsys):
    """30,000 patches x 1024-D fp16 in CLAM's multi-contour layout: load, check, export (< ~30 s)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(16)
    pieces = [((0, 0), (0, 0), 75, 55), ((160, 0), (3, 1), 55, 50), ((0, 120), (1, 4), 45, 40),
              ((110, 120), (250, 2), 42, 40)]
    coords, expected, _ = clam_slide(rng, 512, pieces)
    keep = np.sort(rng.choice(len(coords), size=30_000, replace=False))  # a few holes in the tissue
    coords, expected = coords[keep], expected[keep]
    expected = expected - expected.min(0)
    n = len(coords)
    f = rng.standard_normal((n, 1024), dtype=np.float32).astype(np.float16)
    small = blob(rng, 3, 3)
    root = write_cohort(tmp_path / "c", {
        "BIG": {"features": f, "coords": coords, "attrs": CLAM_40X},
        "SMALL": {"features": feats(rng, len(small), 1024), "coords": small * 512 + 77, "attrs": CLAM_40X},
    })
    s = Cohort.open(root).read_slide("BIG")
    assert s.num_patches == n and s.step == 512
    np.testing.assert_array_equal(s.positions.numpy(), expected)
    assert torch.equal(s.features, torch.from_numpy(f.astype(np.float32)))
    code, out = run_check(capsys, root, "--verbose")
    assert code == 0, out
    assert "grid stride: 512 px x2 (from clam x2)" in out
    g = coords_to_grid(coords, attrs=CLAM_40X)
    assert f"slide BIG: {n} patches, stride 512 px (clam), grid {g.shape[0]} x {g.shape[1]}" in out
    _, run = features_only_run
    dest = tmp_path / "big.h5ad"
    assert main(["export", "--checkpoint", run["checkpoint"], "--cohort", str(root), "--out", str(dest),
                 "--device", "cpu", "--no-progress"]) == 0
    a = anndata.read_h5ad(dest)
    assert a.shape == (2, 32) and np.isfinite(a.X).all()
    assert time.perf_counter() - t0 < 60  # ~30 s budget on 2 shared cores, with headroom
