"""DINO / iBOT masked self-distillation: heads, Sinkhorn, centring, masking, EMA teacher."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from slidefm.data.batch import PackedSlides, pack_slides
from slidefm.data.types import Views
from slidefm.models.aggregators.base import Aggregator, AggregatorOutput
from slidefm.objectives import (
    OBJECTIVES,
    DINOHead,
    DINOLoss,
    DistillationConfig,
    IBOTPatchLoss,
    KoLeoLoss,
    MaskedSelfDistillation,
    cosine_schedule,
    ema_update,
    sinkhorn_knopp,
)


class TinyAggregator(Aggregator):
    """Per-token linear projection, mask embedding, mean pooling; no token mixing, no positions."""

    def __init__(self, in_dim=8, dim=16):
        super().__init__()
        self.in_dim, self.dim = in_dim, dim
        self.proj = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.1)
        self.last_tokens = None

    def forward(self, x: PackedSlides) -> AggregatorOutput:
        h = self.proj(x.tokens)
        if x.token_mask is not None:
            h = torch.where(x.token_mask[:, None], self.mask_token, h)
        if h.requires_grad:
            h.retain_grad()
            self.last_tokens = h
        seg = x.slide_index()
        slide = torch.zeros(x.num_slides, self.dim).index_add(0, seg, h) / x.lengths[:, None]
        return AggregatorOutput(slide=slide, tokens=h)


def make_views(seed=0, n_slides=2, n_global=2, n_local=2):
    g = torch.Generator().manual_seed(seed)
    feats, pos, masks = [], [], []
    for b in range(n_slides):
        for v in range(n_global):
            n = 5 + b + v
            feats.append(torch.randn(n, 8, generator=g))
            pos.append(torch.randint(0, 10, (n, 2), generator=g))
            m = torch.zeros(n, dtype=torch.bool)
            if (b, v) != (1, 1):  # one view without masked tokens
                m[torch.randperm(n, generator=g)[: 1 + v]] = True
            masks.append(m)
    glob = pack_slides(feats, pos, token_masks=masks)
    lf = [torch.randn(3 + i % 2, 8, generator=g) for i in range(n_slides * n_local)]
    loc = pack_slides(lf, [torch.zeros(len(f), 2, dtype=torch.long) for f in lf]) if n_local else None
    return Views(glob, loc, n_global, n_local)


def small_objective(**kw):
    torch.manual_seed(0)
    agg = TinyAggregator()
    args = dict(out_dim=32, hidden_dim=32, bottleneck_dim=8)
    args.update(kw)
    return agg, MaskedSelfDistillation(DistillationConfig(**args), student=agg)


def test_dino_head_uses_parametrized_weight_norm():
    head = DINOHead(DistillationConfig(hidden_dim=32, bottleneck_dim=8), in_dim=16, out_dim=32)
    assert parametrize.is_parametrized(head.last_layer, "weight")
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(32))
    out = head(torch.randn(4, 16))
    assert out.shape == (4, 32) and out.abs().max() <= 1 + 1e-5  # cosine to unit prototypes
    copy.deepcopy(head)(torch.randn(2, 16))


def test_sinkhorn_without_process_group_is_balanced():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    n, k = 64, 8
    scores = torch.randn(n, k) * 3
    q = sinkhorn_knopp(scores, n_iter=3)
    torch.testing.assert_close(q.sum(1), torch.ones(n))  # every sample is a distribution
    soft_dev = (scores.softmax(-1).sum(0) - n / k).abs().max()
    assert (q.sum(0) - n / k).abs().max() < soft_dev
    q = sinkhorn_knopp(scores, n_iter=200)
    torch.testing.assert_close(q.sum(0), torch.full((k,), n / k), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(q.sum(1), torch.ones(n))


def test_dino_centering_update_and_teacher_probs():
    loss = DINOLoss(DistillationConfig(center_momentum=0.8), out_dim=5)
    with torch.no_grad():
        loss.center.copy_(torch.arange(5.0)[None])
    t = torch.randn(6, 5)
    probs = loss.teacher_probs(t, 0.04)
    torch.testing.assert_close(probs, F.softmax((t - torch.arange(5.0)) / 0.04, -1))
    loss.update_center(t)
    torch.testing.assert_close(loss.center, 0.8 * torch.arange(5.0)[None] + 0.2 * t.mean(0, keepdim=True))


def test_dino_loss_cross_view_pairs_exclude_same_view():
    torch.manual_seed(0)
    b, ng, nl, k = 3, 2, 2, 7
    sg, sl = torch.randn(b * ng, k), torch.randn(b * nl, k)
    t = torch.randn(b * ng, k).softmax(-1)
    got = DINOLoss(DistillationConfig(student_temp=0.1), out_dim=k)(sg, sl, t, ng)
    terms = []
    for i in range(b):
        for g in range(ng):
            tp = t[i * ng + g]
            for h in range(ng):
                if h != g:
                    terms.append(-(tp * F.log_softmax(sg[i * ng + h] / 0.1, -1)).sum())
            for l in range(nl):
                terms.append(-(tp * F.log_softmax(sl[i * nl + l] / 0.1, -1)).sum())
    torch.testing.assert_close(got, torch.stack(terms).mean())


def test_ibot_patch_loss_averages_per_view():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4).softmax(-1)
    view = torch.tensor([0, 0, 0, 2, 2])  # view 1 has no masked token
    got = IBOTPatchLoss(DistillationConfig(student_temp=0.1), out_dim=4)(s, t, view, 3)
    ce = -(t * F.log_softmax(s / 0.1, -1)).sum(-1)
    torch.testing.assert_close(got, (ce[:3].mean() + ce[3:].mean()) / 2)


def test_ibot_only_uses_masked_tokens():
    agg, obj = small_objective(dino_weight=0.0)
    views = make_views()
    out = obj(agg, views)
    mask = views.global_views.token_mask
    out["loss"].backward()
    n_glob = len(mask)
    grads = agg.last_tokens.grad
    assert grads[:n_glob][mask].abs().sum() > 0
    assert grads[:n_glob][~mask].abs().sum() == 0  # unmasked global tokens carry no iBOT gradient
    assert grads[n_glob:].abs().sum() == 0  # nor do local crops
    # New features at unmasked tokens change teacher/student outputs there, but not the iBOT loss.
    g = views.global_views
    tokens = torch.where(mask[:, None], g.tokens, torch.randn_like(g.tokens) * 5)
    perturbed = Views(PackedSlides(tokens, g.positions, g.offsets, mask, g.slide_ids), views.local_views, 2, 2)
    obj.eval()  # freeze the centre so both calls see the same teacher targets
    a, b = obj(agg, views), obj(agg, perturbed)
    torch.testing.assert_close(a["ibot"], b["ibot"])
    assert not torch.allclose(a["dino"], b["dino"])
    assert out["n_masked"] == int(mask.sum())


def test_teacher_is_frozen_and_ema_is_exact():
    agg, obj = small_objective(koleo_weight=0.1)
    teacher0 = {n: p.clone() for n, p in obj.teacher.named_parameters()}
    assert all(not p.requires_grad for p in obj.teacher.parameters())
    assert not any(p is q for p in obj.teacher.parameters() for q in agg.parameters())
    # The student aggregator is not an objective submodule (the model owns it).
    assert not any(p is q for p in obj.parameters() for q in agg.parameters())
    obj.train()
    assert not obj.teacher.training
    out = obj(agg, make_views())
    assert {"loss", "dino", "ibot", "koleo"} <= out.keys() and torch.isfinite(out["loss"])
    out["loss"].backward()
    for n, p in obj.teacher.named_parameters():
        assert p.grad is None and torch.equal(p, teacher0[n])
    params = list(agg.parameters()) + [p for p in obj.parameters() if p.requires_grad]
    torch.optim.SGD(params, lr=0.5).step()
    student = dict(agg.named_parameters())
    student.update({f"dino_head.{n}": p for n, p in obj.dino_head.named_parameters()})
    student.update({f"ibot_head.{n}": p for n, p in obj.ibot_head.named_parameters()})
    m = 0.9
    obj.update_teacher(m)
    for n, p in obj.teacher.named_parameters():
        sname = n.removeprefix("backbone.")
        want = m * teacher0[n] + (1 - m) * student[sname].detach()
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)
    assert int(obj.step) == 1


def test_ema_update_formula():
    t, s = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = {n: p.detach().clone() for n, p in t.named_parameters()}
    ema_update(t, s, 0.996)
    for n, p in t.named_parameters():
        torch.testing.assert_close(p.detach(), 0.996 * t0[n] + 0.004 * dict(s.named_parameters())[n].detach())


def test_schedules():
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_schedule(100, 100, 0.996, 1.0) == 1.0 and cosine_schedule(500, 100, 0.996, 1.0) == 1.0
    assert cosine_schedule(5, 100, 1.0, 0.0, warmup_steps=10, warmup_start=0.0) == pytest.approx(0.5)
    _, obj = small_objective(warmup_teacher_temp_steps=10)
    assert obj.teacher_temp(0) == pytest.approx(0.04) and obj.teacher_temp(10) == pytest.approx(0.07)
    assert obj.teacher_temp(5) == pytest.approx(0.055)
    assert obj.momentum(0, 10) == pytest.approx(0.996) and obj.momentum(10, 10) == 1.0


def test_sinkhorn_objective_and_registry():
    agg = TinyAggregator()
    cfg = DistillationConfig(out_dim=16, patch_out_dim=24, hidden_dim=16, bottleneck_dim=8,
                             centering="sinkhorn_knopp", koleo_weight=0.1)
    obj = OBJECTIVES.build(cfg, student=agg)
    assert isinstance(obj, MaskedSelfDistillation)
    views = make_views(n_local=0)
    views = Views(views.global_views, None, 2, 0)
    out = obj(agg, views)
    assert torch.isfinite(out["loss"]) and out["dino"] > 0
    out["loss"].backward()
    assert agg.proj.weight.grad is not None
    with pytest.raises(ValueError, match="global views with token_mask set"):
        g = views.global_views
        obj(agg, Views(PackedSlides(g.tokens, g.positions, g.offsets, None, g.slide_ids), None, 2, 0))


def test_koleo_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    d01 = math.dist([1.0, 0.0], [0.8, 0.6])
    d12 = math.dist([0.8, 0.6], [0.0, 1.0])
    want = -(math.log(d01) + math.log(min(d01, d12)) + math.log(d12)) / 3
    assert float(KoLeoLoss()(x)) == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------ expert distillation


def test_expert_distillation_cosine_and_smooth_l1_with_missing_rows():
    from slidefm.objectives import ExpertConfig, ExpertDistillation

    torch.manual_seed(0)
    obj = OBJECTIVES.build(ExpertConfig(expert_weights={"titan": 2.0}), dim=6,
                           expert_dims={"titan": 4, "prism.v1": 3})
    assert isinstance(obj, ExpertDistillation)
    z = torch.randn(5, 6, requires_grad=True)
    titan = torch.randn(5, 4)
    present = torch.tensor([True, False, True, True, False])
    titan[1] = float("nan")
    out = obj(z, {"titan": titan}, {"titan": present})
    head = obj.heads[obj.names.index("titan")]
    pred = head(z)
    ref = (1 - F.cosine_similarity(pred[present], titan[present], dim=-1)).mean()
    torch.testing.assert_close(out["loss/titan"], ref.detach())
    torch.testing.assert_close(out["loss"], 2.0 * ref)
    assert out["n/titan"] == 3 and out["n/prism.v1"] == 0 and float(out["loss/prism.v1"]) == 0.0
    out["loss"].backward()
    assert torch.isfinite(z.grad).all() and z.grad[~present].abs().sum() == 0
    other = obj.heads[obj.names.index("prism.v1")].weight
    assert other.grad is not None and other.grad.abs().sum() == 0

    sl = ExpertDistillation(ExpertConfig(loss="smooth_l1", smooth_l1_beta=0.5), dim=6, expert_dims={"titan": 4})
    out = sl(z.detach(), {"titan": titan}, {"titan": present})
    pred = sl.heads[0](z.detach())[present]
    tgt = titan[present]
    tgt = (tgt - tgt.mean(-1, keepdim=True)) / torch.sqrt(tgt.var(-1, unbiased=False, keepdim=True) + 1e-5)
    d = (pred - tgt).abs()
    ref = torch.where(d < 0.5, 0.5 * d**2 / 0.5, d - 0.25).mean()
    torch.testing.assert_close(out["loss"], ref)
    with pytest.raises(KeyError, match="unconfigured experts"):
        sl(z, {"unknown": titan})


def test_masked_feature_modelling_targets_and_gradients():
    agg, obj = small_objective(dino_weight=0.0, ibot_weight=0.0, feature_weight=1.0)
    views = make_views()
    g = views.global_views
    mask = g.token_mask
    out = obj(agg, views)
    # by hand: per-view centred, per-token layer-normalised input features at the masked tokens
    seg = g.slide_index()
    x = g.tokens
    centred = torch.cat([x[seg == v] - x[seg == v].mean(0) for v in range(g.num_slides)])
    target = F.layer_norm(centred[mask], (x.shape[1],))
    with torch.no_grad():  # (keeps agg.last_tokens from the objective's own pass)
        pred = obj.feature_head(agg(g).tokens[mask])
    torch.testing.assert_close(out["features"].detach(), F.mse_loss(pred, target))
    torch.testing.assert_close(out["loss"], out["features"])
    out["loss"].backward()
    grads = agg.last_tokens.grad
    n_glob = len(mask)
    assert grads[:n_glob][mask].abs().sum() > 0 and grads[:n_glob][~mask].abs().sum() == 0
    assert obj.feature_head[-1].weight.grad is not None
    # a shift shared by a whole view (scanner, site) does not change the target
    shifted = Views(PackedSlides(x + torch.randn(g.num_slides, 8)[seg] * 3, g.positions, g.offsets, mask, g.slide_ids),
                    views.local_views, 2, 2)
    with torch.no_grad():
        again = obj._masked_features(shifted.global_views, agg(g).tokens, torch.nonzero(mask)[:, 0], g.num_slides)
    torch.testing.assert_close(again, out["features"])
    # it is learnable: a few steps on one batch reduce it
    opt = torch.optim.Adam(list(agg.parameters()) + list(obj.feature_head.parameters()), lr=1e-2)
    first = float(out["features"])
    for _ in range(30):
        loss = obj(agg, views)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(obj(agg, views)["features"]) < 0.8 * first
    assert small_objective()[1].feature_head is None  # off unless asked for


@pytest.mark.parametrize("name", ["feature_weight", "dino_weight", "feature_hidden_dim"])
def test_negative_weights_are_rejected(name):
    with pytest.raises(ValueError, match=f"objectives.distillation.{name}"):
        small_objective(**{name: -1})
