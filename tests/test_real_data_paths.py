"""What real cohorts need: recipes that fit the modalities a cohort has, bag import, the mean path
of exported embeddings, the attention readout, and eval splits that hold out whole sites."""

from __future__ import annotations

import shutil

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from slidefm.cli import main as cli
from slidefm.cohort import Cohort, validate_cohort
from slidefm.errors import SlidefmError
from conftest import write_cohort
from test_train import compose_cfg


def _variant(tmp_path, reports: bool, expression: bool):
    return write_cohort(tmp_path, n_slides=12, reports=reports, expression=expression,
                        name=f"c_r{int(reports)}_e{int(expression)}")


@pytest.mark.parametrize("reports,expression,pairs", [
    (False, False, None),
    (True, False, [["slide", "report"]]),
    (False, True, [["slide", "expression"]]),
    (True, True, [["slide", "report"], ["slide", "expression"]]),
])
def test_house_recipe_fits_the_cohorts_modalities(tmp_path, reports, expression, pairs, caplog):
    from slidefm.train.modality_check import fit_to_cohort

    root = _variant(tmp_path, reports, expression)
    cfg = compose_cfg("slidefm", root, tmp_path / "run")
    with caplog.at_level("INFO", logger="slidefm.train"):
        lines = fit_to_cohort(cfg, Cohort.open(root))
    con = cfg.objectives.contrastive
    assert (None if con is None else [list(p) for p in con.pairs]) == pairs
    assert (cfg.model.report is not None) == reports
    assert (cfg.model.expression is not None) == expression
    assert cfg.objectives.distillation is not None
    # Without any contrast nothing trains the case transformer: it gives way to pooling the slides.
    assert (cfg.model.case is None) == (pairs is None)
    assert len(lines) == (not reports) + (not expression) + (not reports) + (not expression) + 2 * (pairs is None)
    assert all(line in caplog.text for line in lines)


def test_recipe_without_a_feedable_objective_is_refused_in_one_line(tmp_path):
    from slidefm.train.modality_check import fit_to_cohort

    root = _variant(tmp_path, reports=False, expression=False)
    cfg = compose_cfg("threads", root, tmp_path / "run")
    with pytest.raises(SlidefmError, match=r"recipe 'threads' has no objective.*expression\.h5ad not found"):
        fit_to_cohort(cfg, Cohort.open(root))


def test_features_only_cohort_trains_the_house_recipe(tmp_path):
    """The README's features-only command: no reports, no expression; trains, checkpoints, exports."""
    from slidefm.train.run import train

    root = _variant(tmp_path, reports=False, expression=False)
    cfg = compose_cfg("slidefm", root, tmp_path / "run", "trainer.max_steps=3", "data.batch_size=4",
                      "data.views.global_size=4", "data.views.local_size=2")
    out = train(cfg)
    assert out["global_step"] == 3
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.objectives.contrastive is None and saved.model.report is None and saved.model.case is None
    emb = tmp_path / "p.h5ad"
    assert cli(["export", "--checkpoint", out["checkpoint"], "--cohort", str(root), "--out", str(emb),
                "--level", "patient"]) == 0
    a = anndata.read_h5ad(emb)
    assert a.n_obs == 6 and np.isfinite(a.X).all()
    # The patient embedding is the mean of the patient's slide embeddings (no untrained case model).
    s_emb = tmp_path / "s.h5ad"
    assert cli(["export", "--checkpoint", out["checkpoint"], "--cohort", str(root), "--out", str(s_emb),
                "--level", "slide"]) == 0
    s = anndata.read_h5ad(s_emb)
    by_patient = pd.DataFrame(s.X, index=s.obs["patient_id"].astype(str)).groupby(level=0).mean()
    np.testing.assert_allclose(a.X, by_patient.loc[a.obs_names.astype(str)].to_numpy(), rtol=1e-4, atol=1e-5)
    import slidefm

    enc = slidefm.load(out["checkpoint"])
    with pytest.raises(SlidefmError, match=r"model.aggregator=vit .* needs patch coordinates; embed_slide got coords"):
        enc.embed_slide(np.zeros((5, 16), np.float32))


def _bags(tmp_path, n_slides=6, dim=8):
    rng = np.random.default_rng(0)
    bags = tmp_path / "pt_files"
    bags.mkdir()
    rows = []
    for i in range(n_slides):
        sid = f"TCGA-A{(i // 2) % 3}-{1000 + i // 2:04d}-01Z-00-DX{1 + i % 2}.ABC{i}"
        torch.save(torch.from_numpy(rng.standard_normal((3 + i, dim)).astype(np.float32)), bags / f"{sid}.pt")
        rows.append({"slide_id": f"{sid}.svs", "case_id": sid[:12], "oncotree_code": "LUAD" if (i // 2) % 2 else "LUSC",
                     "stain": f"b{i}"})
    return bags, pd.DataFrame(rows)


def test_import_bags_writes_the_contract(tmp_path):
    from slidefm.cohort.importer import import_bags

    bags, table = _bags(tmp_path)
    s = import_bags(bags, tmp_path / "cohort", [table], tcga=True, patch_size=512)
    assert (s.slides, s.patients, s.dim) == (6, 3, 8)
    assert s.clinical_columns == ["oncotree_code"] and s.slide_columns == ["stain"]
    c = Cohort.open(tmp_path / "cohort")
    assert validate_cohort(c).ok
    assert list(c.slides["center"].unique()) == ["A0", "A1", "A2"]
    sid = c.slide_ids[2]
    with h5py.File(tmp_path / "cohort" / "features" / f"{sid}.h5") as f:
        n = f["features"].shape[0]
        assert f.attrs["slidefm_layout"] == "raster"
        coords = f["coords"][()]
    w = int(np.ceil(np.sqrt(n)))
    assert (coords[:, 0] // 512 < w).all() and coords[1, 0] == 512
    sd = c.read_slide(sid)
    assert torch.equal(sd.features, torch.load(bags / f"{sid}.pt", weights_only=True))
    assert len({tuple(p) for p in sd.positions.tolist()}) == n  # distinct raster cells


def test_import_bags_refuses_bad_input_and_leaves_nothing(tmp_path):
    from slidefm.cohort.importer import import_bags

    bags, table = _bags(tmp_path)
    torch.save(torch.zeros(4, 5), bags / "odd.pt")
    with pytest.raises(SlidefmError, match=r"odd\.pt: D=5 differs"):
        import_bags(bags, tmp_path / "out", [table])
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    (bags / "odd.pt").write_bytes(b"not a pickle")
    with pytest.raises(SlidefmError, match=r"odd\.pt: cannot load with torch\.load\(weights_only=True\)"):
        import_bags(bags, tmp_path / "out", [table])


def test_import_bags_cli_is_one_line_on_error(tmp_path, capsys):
    assert cli(["import-bags", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bag directory not found" in err[0]


def test_mean_path_export_carries_the_slide_mean(tmp_path):
    """With model.mean_path the export ends with each slide's (patient's) mean input feature."""
    from slidefm.data.batch import pack_slides
    from slidefm.models.model import SlideFM

    cfg = OmegaConf.create({"aggregator": {"name": "vit", "dim": 16, "depth": 1, "heads": 2, "pool": "mean_attn"},
                            "case": {"name": "transformer", "depth": 1, "heads": 2}, "report": None,
                            "expression": None, "omics": {}, "input_norm": "center", "embed_dim": 8,
                            "patient_pool": "mean", "mean_path": True})
    torch.manual_seed(0)
    m = SlideFM(cfg, in_dim=6).eval()
    feats = [torch.randn(5, 6) + 3, torch.randn(9, 6) - 1, torch.randn(4, 6)]
    x = pack_slides(feats, [torch.randint(0, 4, (len(f), 2)) for f in feats])
    with torch.no_grad():
        out = m.export_slides(x).slide
        assert out.shape == (3, 16 + 6) and m.export_dim == 22
        assert torch.allclose(out[:, :16], m.encode_slides(x).slide)
        assert torch.allclose(out[:, 16:], torch.stack([f.mean(0) for f in feats]), atol=1e-6)
        pat = m.export_patients(out, torch.tensor([0, 2, 3]))
    assert pat.shape == (2, 22)
    assert torch.allclose(pat[0, 16:], (feats[0].mean(0) + feats[1].mean(0)) / 2, atol=1e-6)
    assert torch.allclose(pat[:, :16], m.encode_patients(out[:, :16], torch.tensor([0, 2, 3])))


def test_attention_readout_lets_a_focus_through():
    """mean_attn: a few strongly gated tokens move the slide embedding more than under the plain mean."""
    from slidefm.models.aggregators.vit import AttentionReadout

    torch.manual_seed(0)
    r = AttentionReadout(8, heads=2)
    tokens = torch.zeros(100, 8)
    tokens[:2] = 5.0  # a 2% focus
    with torch.no_grad():
        r.w.bias.zero_()
        r.w.weight.fill_(1.0)
        r.v.weight.copy_(torch.eye(8)[:4].repeat(1, 1) * 3)
        r.u.weight.fill_(0.5)
        pooled = r(tokens, torch.zeros(100, dtype=torch.long), 1)
    assert pooled[0].mean() > 5 * tokens.mean()
    with pytest.raises(ValueError, match="must divide"):
        AttentionReadout(10, heads=4)


def test_pool_norm_normalises_the_pooled_slide_embedding():
    """pool_norm: each slide embedding leaves the ViT layer-normalised (zero mean, unit spread over channels at
    init), so its scale no longer follows the slide's size; the token outputs are unchanged."""
    from slidefm.data.batch import pack_slides
    from slidefm.models.aggregators.vit import ViTAggregator, ViTConfig

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(n, 6, generator=g) for n in (3, 40, 400)]
    x = pack_slides(feats, [torch.stack([torch.arange(len(f)) % 20, torch.arange(len(f)) // 20], 1) for f in feats])
    outs = {}
    for on in (False, True):
        torch.manual_seed(0)
        vit = ViTAggregator(ViTConfig(dim=16, depth=1, heads=2, pool="mean", pool_norm=on), in_dim=6).eval()
        with torch.no_grad():
            outs[on] = vit(x)
    s = outs[True].slide
    assert torch.allclose(s.mean(1), torch.zeros(3), atol=1e-5)
    # LayerNorm's eps shows when the un-normalised spread is small (a large slide's mean): v / (v + eps)
    v = outs[False].slide.var(1, unbiased=False)
    assert torch.allclose(s.var(1, unbiased=False), v / (v + 1e-5), atol=1e-4)
    assert torch.allclose(outs[True].tokens, outs[False].tokens)
    assert v[0] > 2 * v[2], "without it, the pooled embedding's scale falls with the slide's size"


def test_site_split_holds_out_whole_sites():
    from slidefm.evals.config import EvalConfig
    from slidefm.evals.data import EvalTask, TaskData
    from slidefm.evals.evaluate import make_splits

    n = 60
    sites = np.array([f"s{i % 6}" for i in range(n)], dtype=object)
    td = TaskData(EvalTask(name="t", kind="classification", label="y"), ids=np.arange(n), X=np.zeros((n, 2)),
                  groups=np.array([f"p{i}" for i in range(n)]), sites=sites, y=np.arange(n) % 2, classes=[0, 1])
    splits = make_splits(td, EvalConfig(split_by="site", folds=3))
    assert len(splits) == 3
    for tr, te in splits:
        assert not set(sites[tr]) & set(sites[te])
    with pytest.raises(SlidefmError, match="split_by must be"):
        EvalConfig(split_by="centre")


def test_synthetic_site_effect_is_not_removed_by_centring():
    """realistic site effects survive per-slide centring (tissue-dependent and multiplicative); additive ones
    are a per-site shift and gain that centring (up to the gain) removes exactly."""
    from slidefm.cohort.synth import SynthConfig, _apply_site, make_world

    world = make_world(32, sites=2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 32)).astype(np.float32)
    regions = rng.integers(0, 7, 200)
    out = {}
    for mode in ("additive", "realistic"):
        cfg = SynthConfig(site_effect=mode)
        c = []
        for s in world.sites:
            y = _apply_site(x.copy(), regions, s, cfg, np.random.default_rng(1))
            y = (y - y.mean(0)) / s.gain
            c.append(y)
        out[mode] = float(np.abs(c[0] - c[1]).max())
    assert out["additive"] < 1e-4
    assert out["realistic"] > 0.1


def test_import_bags_without_layout_gives_a_features_only_cohort(tmp_path):
    from slidefm.cohort.importer import import_bags

    bags, table = _bags(tmp_path)
    import_bags(bags, tmp_path / "cohort", [table], tcga=True, layout="none")
    c = Cohort.open(tmp_path / "cohort")
    assert validate_cohort(c).ok
    sd = c.read_slide(c.slide_ids[0])
    assert not sd.has_positions and sd.num_patches == 3
    with h5py.File(tmp_path / "cohort" / "features" / f"{c.slide_ids[0]}.h5") as f:
        assert "coords" not in f and f.attrs["slidefm_layout"] == "none"
