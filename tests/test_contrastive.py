"""MultiModalContrastive against hand-written references (single process)."""

import math

import pytest
import torch

from slidefm.objectives import OBJECTIVES, ContrastiveConfig, MultiModalContrastive


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def ref_infonce(a, b, scale):
    """Symmetric CLIP loss written out row by row."""
    a, b = _unit(a.double()), _unit(b.double())
    n = len(a)
    logits = scale * a @ b.T
    total = 0.0
    for i in range(n):
        row = logits[i]
        col = logits[:, i]
        total += -(row[i] - torch.log(torch.exp(row).sum()))
        total += -(col[i] - torch.log(torch.exp(col).sum()))
    return total / (2 * n)


def ref_siglip(a, b, scale, bias):
    a, b = _unit(a.double()), _unit(b.double())
    n = len(a)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = scale * float(a[i] @ b[j]) + bias
            y = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-y * z))
    return total / n


@pytest.fixture
def emb():
    g = torch.Generator().manual_seed(0)
    return {"slide": torch.randn(6, 8, generator=g), "report": torch.randn(6, 8, generator=g)}


def test_infonce_matches_reference_and_is_symmetric(emb):
    obj = MultiModalContrastive(ContrastiveConfig(pairs=[["slide", "report"]]))
    out = obj(emb)
    scale = 1 / 0.07
    assert float(out["logit_scale/slide-report"]) == pytest.approx(scale, rel=1e-6)
    assert float(out["loss"].detach()) == pytest.approx(float(ref_infonce(emb["slide"], emb["report"], scale)), rel=1e-5)
    assert out["n/slide-report"] == 6
    swapped = MultiModalContrastive(ContrastiveConfig(pairs=[["report", "slide"]]))(emb)
    assert float(swapped["loss"].detach()) == pytest.approx(float(out["loss"].detach()), rel=1e-6)


def test_siglip_matches_reference(emb):
    obj = MultiModalContrastive(ContrastiveConfig(pairs=[["slide", "report"]], kind="siglip",
                                                  init_logit_scale=math.log(10.0), init_bias=-2.0))
    out = obj(emb)
    ref = ref_siglip(emb["slide"], emb["report"], 10.0, -2.0)
    assert float(out["loss"].detach()) == pytest.approx(ref, rel=1e-5)
    out["loss"].backward()
    assert obj.biases["slide__report"].grad is not None and obj.biases["slide__report"].grad.abs() > 0


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_rows_with_a_missing_modality_are_excluded(emb, kind):
    present = {"report": torch.tensor([True, True, False, True, False, True])}
    keep = present["report"]
    obj = MultiModalContrastive(ContrastiveConfig(pairs=[["slide", "report"]], kind=kind))
    ref = obj({k: v[keep] for k, v in emb.items()})["loss"]

    slide = emb["slide"].clone().requires_grad_(True)
    report = emb["report"].clone()
    report[2] = 1e6
    report[4] = float("nan")
    report.requires_grad_(True)
    out = obj({"slide": slide, "report": report}, present)
    assert out["n/slide-report"] == 4
    assert float(out["loss"].detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    out["loss"].backward()
    assert torch.isfinite(report.grad).all() and torch.isfinite(slide.grad).all()
    assert report.grad[~keep].abs().sum() == 0 and slide.grad[~keep].abs().sum() == 0
    assert report.grad[keep].abs().sum() > 0


def test_logit_scale_is_clamped_and_can_come_back(emb):
    obj = MultiModalContrastive(ContrastiveConfig(pairs=[["slide", "report"]], init_logit_scale=math.log(1000.0)))
    p = obj.log_scales["slide__report"]
    with torch.no_grad():
        p.fill_(math.log(1000.0))
    out = obj(emb)
    assert float(out["logit_scale/slide-report"]) == pytest.approx(100.0, rel=1e-6)
    assert float(p.detach()) == pytest.approx(math.log(100.0), rel=1e-7)
    assert float(out["loss"].detach()) == pytest.approx(float(ref_infonce(emb["slide"], emb["report"], 100.0)), rel=1e-5)
    out["loss"].backward()
    assert p.grad is not None and p.grad.abs() > 0  # not a dead functional clamp


def test_no_valid_pair_gives_zero_with_graph(emb):
    slide = emb["slide"].clone().requires_grad_(True)
    obj = MultiModalContrastive(ContrastiveConfig(pairs=[["slide", "report"]]))
    out = obj({"slide": slide, "report": emb["report"]}, {"report": torch.zeros(6, dtype=torch.bool)})
    assert float(out["loss"].detach()) == 0.0 and out["n/slide-report"] == 0
    out["loss"].backward()
    assert slide.grad is not None and slide.grad.abs().sum() == 0
    assert obj.log_scales["slide__report"].grad is not None


def test_weighted_pairs_shared_scale_and_local_loss_in_one_process(emb):
    g = torch.Generator().manual_seed(1)
    e = dict(emb, expression=torch.randn(6, 8, generator=g))
    pairs = [["slide", "report"], ["slide", "expression"]]
    obj = MultiModalContrastive(ContrastiveConfig(pairs=pairs, pair_weights=[1.0, 0.25], shared_logit_scale=True))
    assert len(list(obj.parameters())) == 1
    out = obj(e)
    want = ref_infonce(e["slide"], e["report"], 1 / 0.07) + 0.25 * ref_infonce(e["slide"], e["expression"], 1 / 0.07)
    assert float(out["loss"].detach()) == pytest.approx(float(want), rel=1e-5)
    local = MultiModalContrastive(ContrastiveConfig(pairs=pairs, pair_weights=[1.0, 0.25], local_loss=True))(e)
    assert float(local["loss"].detach()) == pytest.approx(float(out["loss"].detach()), rel=1e-6)
    with pytest.raises(KeyError, match="contrastive objective needs embeddings for"):
        obj({"slide": e["slide"], "report": e["report"]})


def test_registry_builds_from_config(emb):
    cfg = ContrastiveConfig(pairs=[["slide", "report"]], kind="siglip")
    obj = OBJECTIVES.build(cfg)
    assert isinstance(obj, MultiModalContrastive) and obj.kind == "siglip"
    with pytest.raises(ValueError, match="a contrastive pair names two different modalities"):
        MultiModalContrastive(ContrastiveConfig(pairs=[["slide", "slide"]]))
