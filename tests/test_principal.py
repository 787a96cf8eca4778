"""model.learned_pcs: running principal components of the learned part, fed in training, used by export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from slidefm.errors import SlidefmError
from slidefm.models.principal import RunningPCA


def test_running_pca_finds_the_top_directions():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    scales = torch.tensor([5.0, 3.0, 1.0, 0.3, 0.2, 0.1], dtype=torch.float64)
    pca = RunningPCA(6, 2, momentum=0.9)
    for _ in range(200):
        z = torch.randn(64, 6, generator=g, dtype=torch.float64) * scales
        pca.update((z @ q.T + 2.0).float())
    mean, vecs = pca.basis()
    assert torch.allclose(mean, torch.full((6,), 2.0, dtype=torch.float64), atol=0.2)
    # each found direction is (up to sign, fixed by the rule below) one of the two largest true axes
    assert torch.allclose((vecs.T @ q[:, :2]).abs(), torch.eye(2, dtype=torch.float64), atol=0.05)
    assert (vecs.gather(0, vecs.abs().argmax(0, keepdim=True)) > 0).all()
    x = torch.randn(10, 6)
    assert pca.project(x).shape == (10, 2) and pca.project(x).dtype == torch.float32


def test_running_pca_is_bias_corrected_and_needs_data():
    pca = RunningPCA(3, 1, momentum=0.99)
    with pytest.raises(SlidefmError, match="no statistics"):
        pca.basis()
    x = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    pca.update(x)
    mean, vecs = pca.basis()
    assert torch.allclose(mean, torch.tensor([2.0, 0, 0], dtype=torch.float64))  # one batch: its own mean
    assert torch.allclose(vecs[:, 0], torch.tensor([1.0, 0, 0], dtype=torch.float64))
    assert torch.allclose(pca.project(x)[:, 0], torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="k must be"):
        RunningPCA(3, 4)


def test_state_dict_round_trip_gives_the_same_projection():
    a = RunningPCA(4, 2)
    a.update(torch.randn(50, 4) * torch.tensor([3.0, 2.0, 1.0, 0.5]))
    b = RunningPCA(4, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 4)
    assert torch.allclose(a.project(x), b.project(x))


def _model(k: int, mean_path: bool = True):
    from slidefm.models.model import SlideFM

    cfg = OmegaConf.create({"aggregator": {"name": "vit", "dim": 16, "depth": 1, "heads": 2, "pos": "none", "peg": 0},
                            "case": None, "report": None, "expression": None, "omics": {}, "input_norm": "center",
                            "embed_dim": 8, "patient_pool": "mean", "mean_path": mean_path, "learned_pcs": k})
    torch.manual_seed(0)
    return SlideFM(cfg, in_dim=6).eval()


def test_finish_export_narrows_only_the_learned_part():
    from slidefm.data.batch import pack_slides

    m = _model(4)
    assert m.encoded_dim == 16 + 6 and m.export_dim == 4 + 6
    feats = [torch.randn(5, 6) + 3, torch.randn(9, 6) - 1, torch.randn(4, 6)]
    x = pack_slides(feats, [torch.zeros(len(f), 2, dtype=torch.long) for f in feats], has_positions=False)
    with torch.no_grad():
        m.learned_pcs.update(torch.randn(40, 16))
        enc = m.export_slides(x).slide
        out = m.finish_export(enc)
        assert out.shape == (3, 10)
        assert torch.allclose(out[:, :4], m.learned_pcs.project(enc[:, :16]))
        assert torch.allclose(out[:, 4:], torch.stack([f.mean(0) for f in feats]), atol=1e-6)
        # pooling patients then narrowing = narrowing slides then pooling (the projection is affine)
        off = torch.tensor([0, 2, 3])
        pat = m.finish_export(m.export_patients(enc, off))
        assert torch.allclose(pat[0], out[:2].mean(0), atol=1e-5)
    with pytest.raises(SlidefmError, match="learned_pcs must be in 0..16"):
        _model(17)


@pytest.mark.parametrize("recipe", ["slidefm_bags", "slidefm"])
def test_trained_model_exports_principal_components(recipe, make_synth_cohort, tmp_path):
    """A tiny run with model.learned_pcs fills the statistics in training; the checkpoint carries them and
    the exports (slide and patient level) have k learned columns before the mean input."""
    from slidefm.api import Encoder
    from slidefm.train.run import train
    from tests.test_train import compose_cfg

    cohort = make_synth_cohort(tmp_path / "c")
    run = tmp_path / "run"
    drop = ("objectives.contrastive",)
    cfg = compose_cfg(recipe, cohort, run, "trainer.max_steps=3", "model.learned_pcs=5",
                      "objectives.contrastive=null", "model.report=null", "model.expression=null",
                      "model.case=null", drop=drop)
    train(cfg)
    enc = Encoder.load(run / "checkpoints" / "last.ckpt", device="cpu")
    pcs = enc.model.learned_pcs
    assert pcs is not None and pcs.k == 5 and float(pcs.weight) > 0
    slides = enc.embed_slides(cohort)
    patients = enc.embed_patients(cohort)
    d_in = enc.in_dim
    assert slides.X.shape[1] == 5 + d_in and patients.X.shape[1] == 5 + d_in
    assert slides.uns["embedding_layout"] == f"learned[0:5] + mean_input[5:{5 + d_in}]"
    assert "principal components" in slides.uns["learned_part"]
    # principal coordinates are centred on the training statistics: near zero mean over the cohort
    assert np.all(np.isfinite(slides.X))
    one = enc.embed_slide(*_first_slide(cohort))
    assert np.allclose(one.numpy(), slides.X[0], atol=1e-4)


def _first_slide(cohort_dir):
    from slidefm.cohort import Cohort

    c = Cohort.open(cohort_dir)
    s = c.read_slide(c.slide_ids[0])
    return s.features.numpy(), s.coords.numpy(), s.patch_size_level0


def test_basis_follows_the_statistics_after_the_weight_saturates():
    """After a few thousand updates at momentum 0.99 the accumulated weight stops changing in float64; the
    basis must still follow later updates (it is computed from the moments, never cached on the weight)."""
    pca = RunningPCA(2, 1, momentum=0.99)
    for _ in range(4000):
        pca.update(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    saturated = float(pca.weight)
    assert torch.allclose(pca.basis()[1][:, 0].abs(), torch.tensor([1.0, 0.0], dtype=torch.float64))
    for _ in range(2000):
        pca.update(torch.tensor([[0.0, 3.0], [0.0, -3.0]]))
    assert float(pca.weight) == saturated
    assert torch.allclose(pca.basis()[1][:, 0].abs(), torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-6)


def test_out_of_range_learned_pcs_is_refused_before_training(make_synth_cohort, tmp_path):
    from slidefm.train.run import train
    from tests.test_train import compose_cfg

    cohort = make_synth_cohort(tmp_path / "c")
    cfg = compose_cfg("slidefm_bags", cohort, tmp_path / "run", "model.learned_pcs=33", "objectives.contrastive=null",
                      "model.report=null", "model.expression=null", "model.case=null",
                      drop=("objectives.contrastive",))
    with pytest.raises(SlidefmError) as e:
        train(cfg)
    assert "\n" not in str(e.value) and "model.learned_pcs must be in 0..32" in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
