import dataclasses

import pytest
import torch

from slidefm.data.batch import PackedSlides, pack_slides
from slidefm.models.aggregators import AGGREGATORS, build_aggregator
from slidefm.models.aggregators.abmil import ABMILConfig, GatedABMIL
from slidefm.models.aggregators.mean import MeanConfig, MeanPool
from slidefm.models.segments import segment_index, segment_max, segment_softmax
from slidefm.models.aggregators.perceiver import PerceiverAggregator, PerceiverConfig
from slidefm.models.aggregators.transmil import PPEG, TransMIL, TransMILConfig, grid_neighbours, sparse_depthwise_conv

D = 10
LENGTHS = [7, 1, 13, 5]

CONFIGS = {
    "mean": MeanConfig(),
    "mean_proj": MeanConfig(dim=8),
    "abmil": ABMILConfig(dim=12, hidden=16, attn_dim=8, heads=3, dropout=0.0),
    "transmil": TransMILConfig(dim=16, depth=2, heads=2),
    "transmil_rope": TransMILConfig(dim=16, depth=2, heads=2, pos="rope"),
    "perceiver": PerceiverConfig(dim=16, n_latents=4, heads=2, depth=1),
}
CLASSES = {
    "mean": MeanPool, "mean_proj": MeanPool, "abmil": GatedABMIL, "transmil": TransMIL,
    "transmil_rope": TransMIL, "perceiver": PerceiverAggregator,
}


def make_batch(lengths=LENGTHS, seed=0, grid=6, mask=False) -> PackedSlides:
    g = torch.Generator().manual_seed(seed)
    feats, pos, masks = [], [], []
    for n in lengths:
        cells = torch.randperm(grid * grid, generator=g)[:n]
        pos.append(torch.stack([cells % grid, cells // grid], 1))
        feats.append(torch.randn(n, D, generator=g))
        masks.append(torch.rand(n, generator=g) < 0.4)
    return pack_slides(feats, pos, token_masks=masks if mask else None)


def build(key, seed=0):
    torch.manual_seed(seed)
    return build_aggregator(CONFIGS[key], in_dim=D).eval()


@pytest.mark.parametrize("key", CONFIGS)
def test_registry_build(key):
    cfg = CONFIGS[key]
    m = build_aggregator(cfg, in_dim=D)
    assert type(m) is CLASSES[key]
    assert m.in_dim == D
    assert AGGREGATORS.config_class(cfg.name) is type(cfg)
    m2 = AGGREGATORS.build(dataclasses.asdict(cfg), in_dim=D)  # plain dict config
    assert m2.dim == m.dim


@pytest.mark.parametrize("key", CONFIGS)
@pytest.mark.parametrize("mask", [False, True])
def test_packed_equals_per_slide(key, mask):
    m = build(key)
    x = make_batch(mask=mask)
    with torch.no_grad():
        out = m(x)
        assert out.slide.shape == (len(LENGTHS), m.dim)
        assert out.tokens.shape == (sum(LENGTHS), m.dim)
        for i in range(x.num_slides):
            one = m(x.select(i))
            a, b = int(x.offsets[i]), int(x.offsets[i + 1])
            torch.testing.assert_close(one.slide[0], out.slide[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(one.tokens, out.tokens[a:b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", CONFIGS)
def test_gradients_flow(key):
    m = build(key).train()
    x = make_batch(mask=True)
    x.tokens.requires_grad_(True)
    out = m(x)
    (out.slide.square().sum() + out.tokens.square().sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert x.tokens.grad is not None
    # unmasked tokens influence the output; masked ones were replaced by the mask embedding
    vis = ~x.token_mask
    assert x.tokens.grad[vis].abs().sum(1).gt(0).all()
    assert x.tokens.grad[x.token_mask].abs().max() == 0


@pytest.mark.parametrize("key", CONFIGS)
def test_token_mask_replaces_features(key):
    m = build(key)
    x = make_batch(mask=True)
    y = PackedSlides(x.tokens + 5 * x.token_mask[:, None], x.positions, x.offsets, x.token_mask)
    with torch.no_grad():
        a, b = m(x), m(y)
        torch.testing.assert_close(a.slide, b.slide)  # masked features are never read
        torch.testing.assert_close(a.tokens, b.tokens)
        plain = m(PackedSlides(x.tokens, x.positions, x.offsets))
    assert (plain.slide - a.slide).abs().max() > 1e-4  # but masking does change the output


def test_mean_is_mean():
    m = build("mean")
    x = make_batch()
    out = m(x)
    assert m.dim == D
    for i, t in enumerate(torch.split(x.tokens, LENGTHS)):
        torch.testing.assert_close(out.slide[i], t.mean(0))
    xm = make_batch(mask=True)
    torch.testing.assert_close(m(xm).tokens[xm.token_mask], m.mask_token.expand(int(xm.token_mask.sum()), -1))


def test_segment_ops():
    offsets = torch.tensor([0, 3, 3, 5])  # an empty middle segment
    seg = segment_index(offsets)
    x = torch.tensor([[1.0, -2.0], [3.0, 0.0], [2.0, 5.0], [-1.0, -1.0], [-3.0, -4.0]])
    torch.testing.assert_close(segment_max(x, seg, 3), torch.tensor([[3.0, 5.0], [0.0, 0.0], [-1.0, -1.0]]))
    s = segment_softmax(x * 100, seg, 3)  # large scores: stable
    torch.testing.assert_close(s[:3], torch.softmax(x[:3] * 100, 0))
    torch.testing.assert_close(s[3:], torch.softmax(x[3:] * 100, 0))


def test_abmil_attention_sums_to_one():
    m = build("abmil")
    x = make_batch(mask=True)
    out, a = m.forward_with_attention(x)
    assert a.shape == (sum(LENGTHS), 3)
    assert (a >= 0).all()
    sums = torch.zeros(len(LENGTHS), 3).index_add_(0, x.slide_index(), a)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert a[x.offsets[1]].eq(1).all()  # the 1-token slide puts all weight on its token
    # heads attend differently
    assert (a[:, 0] - a[:, 1]).abs().max() > 1e-4


def test_ppeg_equals_dense_depthwise_conv():
    torch.manual_seed(0)
    c = 5
    m = PPEG(c).double()
    x = make_batch(lengths=[20, 1, 30], grid=8)
    x.positions[20:] += torch.tensor([11, -3])  # slides may sit anywhere
    feats = torch.randn(51, c, dtype=torch.double)
    seg = segment_index(x.offsets)
    out = m(feats, x.positions, seg)
    for i in range(x.num_slides):
        a, b = int(x.offsets[i]), int(x.offsets[i + 1])
        p = x.positions[a:b] - x.positions[a:b].min(0).values
        w, h = (p.max(0).values + 1).tolist()
        img = torch.zeros(1, c, h, w, dtype=torch.double)
        img[0, :, p[:, 1], p[:, 0]] = feats[a:b].t()
        ref = img + m.proj7(img) + m.proj5(img) + m.proj3(img)
        torch.testing.assert_close(out[a:b], ref[0, :, p[:, 1], p[:, 0]].t())
    # the hand-written backward matches autograd through a plain gather formulation
    nbr = grid_neighbours(x.positions, seg, 3)
    wt = torch.randn(49, c, dtype=torch.double, requires_grad=True)
    xx = torch.randn(51, c, dtype=torch.double, requires_grad=True)
    g = torch.randn(51, c, dtype=torch.double)
    got = torch.autograd.grad(sparse_depthwise_conv(xx, wt, nbr), (xx, wt), g)
    xp = torch.cat([xx, xx.new_zeros(1, c)])
    ref_out = sum(xp[torch.where(nbr[k] >= 0, nbr[k], 51)] * wt[k] for k in range(49))
    ref = torch.autograd.grad(ref_out, (xx, wt), g)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_transmil_uses_true_grid():
    m = build("transmil")
    x = make_batch(lengths=[9, 6], grid=5)
    with torch.no_grad():
        base = m(x).slide
        shifted = m(PackedSlides(x.tokens, x.positions + torch.tensor([7, 3]), x.offsets)).slide
        torch.testing.assert_close(base, shifted, atol=1e-5, rtol=1e-5)
        # token order within a slide is irrelevant, only grid cells matter
        perm = torch.cat([torch.randperm(9), 9 + torch.randperm(6)])
        torch.testing.assert_close(base, m(PackedSlides(x.tokens[perm], x.positions[perm], x.offsets)).slide,
                                   atol=1e-5, rtol=1e-5)
        moved_pos = x.positions.clone()
        moved_pos[0] = torch.tensor([20, 20])  # one token moves far away on the grid
        moved = m(PackedSlides(x.tokens, moved_pos, x.offsets)).slide
    assert (moved[0] - base[0]).abs().max() > 1e-4
    torch.testing.assert_close(moved[1], base[1], atol=1e-5, rtol=1e-5)


def test_perceiver_latents():
    m = build("perceiver")
    x = make_batch()
    lat, h = m.forward_latents(x)
    assert lat.shape == (len(LENGTHS) * 4, 16)
    assert m.latents.shape == (4, 16)
    out = m(x)
    torch.testing.assert_close(out.slide, lat.view(len(LENGTHS), 4, 16).mean(1))
    torch.testing.assert_close(out.tokens, m.proj(x.tokens))  # tokens = input projection (documented)
    first = build_aggregator(dataclasses.replace(CONFIGS["perceiver"], pool="first"), in_dim=D)
    lat, _ = first.forward_latents(x)
    torch.testing.assert_close(first(x).slide, lat[:: 4])
    with pytest.raises(ValueError, match="at least one token"):
        m(make_batch(lengths=[3, 0]))


@pytest.mark.parametrize("mode", ["center", "standardize"])
def test_input_norm_removes_per_slide_shift(mode):
    from slidefm.models.aggregators.input_norm import SlideInputNorm

    torch.manual_seed(0)
    inner = AGGREGATORS.build({"name": "abmil", "dim": 8, "hidden": 16, "attn_dim": 8, "heads": 2, "dropout": 0.0},
                              in_dim=6)
    agg = SlideInputNorm(inner, mode).eval()
    feats = [torch.randn(5, 6), torch.randn(9, 6)]
    pos = [torch.randint(0, 4, (5, 2)), torch.randint(0, 4, (9, 2))]
    base = agg(pack_slides(feats, pos))
    # A different additive (and, for standardize, per-dimension scale) shift per slide: a site/stain effect.
    shifted = [feats[0] + 3.0, feats[1] * (2.0 if mode == "standardize" else 1.0) - torch.arange(6.0)]
    out = agg(pack_slides(shifted, pos))
    torch.testing.assert_close(out.slide, base.slide, rtol=1e-4, atol=1e-4)
    plain = inner(pack_slides(shifted, pos))
    assert not torch.allclose(plain.slide, base.slide, atol=1e-3)  # without the norm the shift shows
