"""Export: checkpoint -> AnnData at slide and patient level, resumable, atomic, deterministic."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

import slidefm
from slidefm.cli import main as cli
from slidefm.config import register_configs

TINY = ["model.aggregator.dim=32", "model.aggregator.depth=1", "model.aggregator.heads=2", "model.embed_dim=32",
        "model.case.depth=1", "model.case.heads=2", "objectives.distillation.out_dim=64",
        "objectives.distillation.hidden_dim=64", "objectives.distillation.bottleneck_dim=32",
        "model.expression.hidden_dims=[32]", "data.batch_size=8", "trainer.progress_bar=false",
        "data.expression.n_top_genes=100"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_tiny_bert):
    """A 4-step house-recipe checkpoint (ViT + case transformer + text + expression towers)."""
    from slidefm.train.run import train

    base = tmp_path_factory.mktemp("export")
    cohort = base / "cohort"
    assert cli(["synth", str(cohort), "--patients", "24", "--seed", "5", "--dim", "32", "--genes", "200",
                "--min-side", "10", "--max-side", "14"]) == 0
    bert = make_tiny_bert(base / "bert")
    register_configs()
    with initialize_config_module("slidefm.recipes", version_base="1.3"):
        cfg = compose("config", overrides=["recipe=slidefm", f"data.cohort={cohort}", f"run_dir={base / 'run'}",
                                           "trainer.max_steps=4", *TINY])
    cfg.model.report.model_dir = str(bert)
    cfg.model.report.max_length = 64
    train(cfg)
    return cohort, base / "run" / "checkpoints" / "last.ckpt", base


def test_slide_export_cli_opens_in_scanpy_with_metadata(trained, tmp_path):
    import pandas as pd
    import scanpy as sc

    cohort, ckpt, _ = trained
    out = tmp_path / "slides.h5ad"
    assert cli(["export", "--checkpoint", str(ckpt), "--cohort", str(cohort), "--out", str(out),
                "--level", "slide", "--no-progress", "--num-workers", "0"]) == 0
    a = sc.read_h5ad(out)
    slides = pd.read_csv(cohort / "slides.csv")
    assert list(a.obs_names) == slides["slide_id"].tolist()
    for col in slides.columns.drop("slide_id"):
        assert col in a.obs.columns
    # The house recipe exports the learned part (32) followed by the slide's mean input (mean_path).
    enc = slidefm.load(ckpt)
    assert enc.model.mean_path and a.X.shape == (len(slides), 32 + enc.in_dim) and np.isfinite(a.X).all()
    assert a.uns["embedding_layout"] == f"learned[0:32] + mean_input[32:{32 + enc.in_dim}]"
    assert a.uns["level"] == "slide" and a.uns["model"] == "slidefm"
    assert len(a.uns["checkpoint_sha256"]) == 64 and "token_cap" in a.uns
    assert not (tmp_path / "slides.h5ad.partial").exists()
    sc.pp.neighbors(a, use_rep="X", n_neighbors=5)  # usable by scanpy as is


def test_token_export_goes_to_a_sidecar_file(trained, tmp_path):
    import h5py

    cohort, ckpt, _ = trained
    out = tmp_path / "slides.h5ad"
    assert cli(["export", "--checkpoint", str(ckpt), "--cohort", str(cohort), "--out", str(out), "--tokens",
                "--chunk-slides", "5", "--no-progress", "--num-workers", "0"]) == 0
    a = ad.read_h5ad(out)
    assert "tokens" not in a.uns and a.uns["tokens_file"] == "slides.tokens.h5"
    enc = slidefm.load(ckpt)
    with h5py.File(tmp_path / "slides.tokens.h5") as f:
        assert list(f["tokens"]) == sorted(a.obs_names) and f.attrs["dim"] == 32
        for sid in a.obs_names[:2]:
            with h5py.File(cohort / "features" / f"{sid}.h5") as g:
                feats, coords = g["features"][:], g["coords"][:]
                attrs = {k: g["coords"].attrs.get(k) for k in ("patch_size_level0", "overlap", "patch_size")}
            _, ref = enc.embed_slide(feats, coords, **attrs, return_tokens=True)
            np.testing.assert_allclose(f["tokens"][sid][:], ref.numpy(), rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slides.h5ad", "slides.tokens.h5"]  # no temporaries left
    assert cli(["export", "--checkpoint", str(ckpt), "--cohort", str(cohort), "--out", str(tmp_path / "p.h5ad"),
                "--tokens", "--level", "patient", "--no-progress"]) == 2


def test_embed_slide_equals_batch_export(trained):
    from slidefm.cohort import Cohort

    cohort, ckpt, _ = trained
    enc = slidefm.load(ckpt)
    c = Cohort.open(cohort)
    a = enc.embed_slides(c)
    import h5py

    for sid in c.slide_ids[:3]:
        with h5py.File(cohort / "features" / f"{sid}.h5") as f:
            feats, coords = f["features"][:], f["coords"][:]
            ps = f["coords"].attrs.get("patch_size_level0")
            overlap = f["coords"].attrs.get("overlap")
            patch_size = f["coords"].attrs.get("patch_size")
        one, tokens = enc.embed_slide(feats, coords, patch_size_level0=ps, overlap=overlap, patch_size=patch_size,
                                      return_tokens=True)
        assert tokens.shape == (len(feats), enc.dim)
        np.testing.assert_allclose(one.numpy(), a[sid].X[0], rtol=1e-4, atol=1e-5)


def test_export_is_deterministic_and_resumes_after_kill(trained, tmp_path, monkeypatch):
    from slidefm.api import Encoder
    from slidefm.export import ExportConfig

    cohort, ckpt, _ = trained
    cfg = ExportConfig(chunk_slides=4, batch_tokens=3000, num_workers=0, progress=False)
    ref = slidefm.load(ckpt).embed_slides(str(cohort), cfg)
    again = slidefm.load(ckpt).embed_slides(str(cohort), cfg)
    np.testing.assert_array_equal(ref.X, again.X)

    partial = tmp_path / "out.h5ad.partial"
    calls = {"n": 0}
    real = Encoder.encode_packed

    def dying(self, packed, want_tokens=False):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("killed")
        return real(self, packed, want_tokens)

    monkeypatch.setattr(Encoder, "encode_packed", dying)
    with pytest.raises(KeyboardInterrupt, match="killed"):
        slidefm.load(ckpt).embed_slides(str(cohort), cfg, partial_dir=partial)
    done = sorted(partial.glob("chunk*.npz"))
    assert 0 < len(done) < -(-ref.n_obs // 4)
    monkeypatch.setattr(Encoder, "encode_packed", real)
    counted = {"n": 0}

    def counting(self, packed, want_tokens=False):
        counted["n"] += packed.num_slides
        return real(self, packed, want_tokens)

    monkeypatch.setattr(Encoder, "encode_packed", counting)
    resumed = slidefm.load(ckpt).embed_slides(str(cohort), cfg, partial_dir=partial)
    assert counted["n"] == ref.n_obs - 4 * len(done)  # finished chunks were not re-encoded
    np.testing.assert_array_equal(resumed.X, ref.X)


def test_patient_export_uses_case_transformer_and_masks_missing_modalities(trained, tmp_path):
    cohort, ckpt, _ = trained
    out = tmp_path / "patients.h5ad"
    assert cli(["export", "--checkpoint", str(ckpt), "--cohort", str(cohort), "--out", str(out),
                "--level", "patient", "--no-progress", "--num-workers", "0"]) == 0
    a = ad.read_h5ad(out)
    from slidefm.cohort import Cohort

    c = Cohort.open(cohort)
    assert list(a.obs_names) == list(c.patient_ids)
    assert a.uns["patient_pooling"] == "case_transformer"
    assert (a.obs["n_slides"].to_numpy() == [len(c.slides_of(p)) for p in c.patient_ids]).all()
    has = a.obs["has_expression"].to_numpy().astype(bool)
    assert has.sum() == len(set(c.expression.obs_names) & set(c.patient_ids)) and (~has).any()
    z = a.obsm["X_expression"]
    assert np.isnan(z[~has]).all() and np.isfinite(z[has]).all()
    # Patient embeddings do not depend on slide order within a patient (case transformer has no positions).
    enc = slidefm.load(ckpt)
    multi = [p for p in c.patient_ids if len(c.slides_of(p)) > 1]
    assert multi
    slide_emb = enc.embed_slides(c)
    p = multi[0]
    rows = [list(slide_emb.obs_names).index(s) for s in c.slides_of(p)]
    x = torch.from_numpy(slide_emb.X[rows[::-1]])
    with torch.inference_mode():
        flipped = enc.model.export_patients(x, torch.tensor([0, len(rows)])).numpy()[0]
    np.testing.assert_allclose(flipped, a[p].X[0], rtol=1e-4, atol=1e-5)


def test_checkpointed_expression_transform_equals_training_and_reindexes_genes(trained, tmp_path):
    from slidefm.cohort import Cohort
    from slidefm.data.config import DataConfig, ExpressionDataConfig
    from slidefm.data.tables import build_tables
    from slidefm.modalities import ExpressionTransform, GeneMismatchWarning

    cohort, ckpt, _ = trained
    c = Cohort.open(cohort)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["slidefm"]["preprocessing"]["expression"]
    fresh = build_tables(c, DataConfig(cohort=str(cohort), expression=ExpressionDataConfig(n_top_genes=100)),
                         needs={"expression"})
    x_train, present_train = fresh.tabular["expression"]
    x_ckpt, present_ckpt = ExpressionTransform.from_state(state).transform(c.expression, list(c.patient_ids))
    torch.testing.assert_close(x_ckpt, x_train, rtol=0, atol=0)
    assert torch.equal(present_ckpt, present_train)

    # A new cohort whose expression lacks 5 training genes and has 3 unknown ones.
    other = tmp_path / "other"
    shutil.copytree(cohort, other)
    e = ad.read_h5ad(other / "expression.h5ad")
    genes = list(ExpressionTransform.from_state(state).genes)
    keep = [g for g in e.var_names if g not in genes[:5]]
    e2 = e[:, keep].copy()
    extra = ad.AnnData(np.ones((e2.n_obs, 3), np.float32), obs=e2.obs.copy())
    extra.var_names = ["NEW1", "NEW2", "NEW3"]
    e3 = ad.concat([e2, extra], axis=1, merge="same")
    e3.write_h5ad(other / "expression.h5ad")
    enc = slidefm.load(ckpt)
    with pytest.warns(GeneMismatchWarning, match="5"):
        a = enc.embed_patients(str(other))
    has = a.obs["has_expression"].to_numpy().astype(bool)
    assert np.isfinite(a.obsm["X_expression"][has]).all()


def test_feature_width_mismatch_is_a_clear_error(trained, tmp_path, capsys):
    cohort, ckpt, _ = trained
    other = tmp_path / "d16"
    assert cli(["synth", str(other), "--patients", "3", "--seed", "1", "--dim", "16", "--genes", "50",
                "--min-side", "10", "--max-side", "10"]) == 0
    rc = cli(["export", "--checkpoint", str(ckpt), "--cohort", str(other), "--out", str(tmp_path / "x.h5ad"),
              "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "D=16" in err and "D=32" in err
    assert not (tmp_path / "x.h5ad").exists()


def test_teacher_weights_export_the_ema_teacher(trained, tmp_path, capsys):
    from slidefm import checkpoint as checkpoints
    from slidefm.export import ExportConfig

    cohort, ckpt, _ = trained
    outs = {}
    for weights in ("student", "teacher"):
        outs[weights] = tmp_path / f"{weights}.h5ad"
        assert cli(["export", "--checkpoint", str(ckpt), "--cohort", str(cohort), "--out", str(outs[weights]),
                    "--level", "slide", "--no-progress", "--num-workers", "0", "--weights", weights]) == 0
    student, teacher = (ad.read_h5ad(outs[w]) for w in ("student", "teacher"))
    assert student.uns["weights"] == "student" and teacher.uns["weights"] == "teacher"
    # The teacher is the checkpoint's EMA copy of the encoder: its slide embeddings are those of the
    # student's architecture with the teacher's tensors, and differ from the student's after training.
    ck = checkpoints.read(ckpt)
    enc = slidefm.load(ckpt)
    enc.model.aggregator.load_state_dict(checkpoints.teacher_state(ck, ckpt))
    expected = enc.embed_slides(cohort, ExportConfig(progress=False, num_workers=0)).X
    learned = slice(0, enc.dim)
    assert not np.allclose(student.X[:, learned], teacher.X[:, learned], atol=1e-5)
    np.testing.assert_allclose(teacher.X, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(student.X[:, enc.dim:], teacher.X[:, enc.dim:])  # the same mean path

    # A teacher that is not a copy of the encoder (a tensor missing) is a foreign file.
    first = next(k for k in ck["state_dict"] if k.startswith(checkpoints.TEACHER_PREFIX))
    partial = {**ck, "state_dict": {k: v for k, v in ck["state_dict"].items() if k != first}}
    with pytest.raises(checkpoints.CheckpointError, match="EMA teacher does not match its slide encoder"):
        checkpoints.build_model(partial, "partial.ckpt", "teacher")

    # A checkpoint without a teacher is refused in one line before anything is written.
    ck["state_dict"] = {k: v for k, v in ck["state_dict"].items() if not k.startswith(checkpoints.TEACHER_PREFIX)}
    checkpoints.write(ck, tmp_path / "bare.ckpt")
    capsys.readouterr()
    rc = cli(["export", "--checkpoint", str(tmp_path / "bare.ckpt"), "--cohort", str(cohort),
              "--out", str(tmp_path / "bare.h5ad"), "--no-progress", "--weights", "teacher"])
    err = capsys.readouterr().err
    assert rc == 2 and "bare.ckpt has no EMA teacher" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bare.h5ad").exists()


def test_slide_loader_sends_slides_through_a_sized_arena(trained):
    """Export reads whole slides through the shared-memory transport, its arena room for a token budget being
    gathered and as much again read ahead; the slides arrive whole and in order."""
    from slidefm.cohort import Cohort
    from slidefm.data.transport import ShmDataLoader
    from slidefm.export import ExportConfig, slide_loader

    cohort = Cohort.open(trained[0])
    ids = cohort.slide_ids[:6]
    loader = slide_loader(cohort, ids, ExportConfig(num_workers=1, batch_tokens=2_000_000, progress=False))
    assert isinstance(loader, ShmDataLoader) and loader.transport == "shm"
    row = cohort.feature_dim * cohort.feature_dtype.itemsize + 32  # features as handed out, and the grid
    assert loader._arena_bytes >> 20 == -(-2 * 2_000_000 * row // 2**20)
    assert slide_loader(cohort, ids, ExportConfig(num_workers=1, batch_tokens=100))._arena_bytes == 64 << 20
    got = list(loader)
    assert [g[0] for g in got] == ids
    for (sid, feats, pos, _), want in zip(got, (cohort.read_slide(s) for s in ids)):
        assert torch.equal(feats, want.features) and torch.equal(pos, want.positions)


def test_encoder_casts_float16_batches_on_its_device(tmp_path):
    """Export on an accelerator packs float16 slides as float16; the encoder casts them on its device, with
    the same embeddings as a float32 batch (checked here on the CPU)."""
    from omegaconf import OmegaConf

    from slidefm.api import Encoder
    from slidefm.data.batch import pack_slides
    from slidefm.models.model import SlideFM

    cfg = OmegaConf.create({"aggregator": {"name": "vit", "dim": 16, "depth": 1, "heads": 2, "pos": "none", "peg": 0},
                            "case": None, "report": None, "expression": None, "omics": {}, "input_norm": "center",
                            "embed_dim": 8, "patient_pool": "mean", "mean_path": True, "learned_pcs": 0})
    torch.manual_seed(0)
    enc = Encoder(SlideFM(cfg, in_dim=8), {"config": cfg}, "x", "", torch.device("cpu"))
    rng = np.random.default_rng(1)
    feats = [rng.standard_normal((n, 8)).astype(np.float16) for n in (5, 9)]
    pos = [np.stack([np.arange(n) % 3, np.arange(n) // 3], 1) for n in (5, 9)]
    half, full = pack_slides(feats, pos, dtype=None), pack_slides(feats, pos)
    assert half.tokens.dtype == torch.float16 and full.tokens.dtype == torch.float32
    a, b = enc.encode_packed(half, True), enc.encode_packed(full, True)
    assert np.array_equal(a[0], b[0]) and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))

