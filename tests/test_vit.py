"""ViTAggregator: packing equivalence, relative positions, mask token, gradients, grid symmetries."""

from __future__ import annotations

import pytest
import torch

from slidefm.data.batch import PackedSlides, pack_slides
from slidefm.models.aggregators import AGGREGATORS, build_aggregator
from slidefm.models.aggregators.vit import ViTAggregator, ViTConfig

IN_DIM = 12


def make_model(pos="rope", **kw):
    torch.manual_seed(0)
    cfg = dict(dim=32, depth=2, heads=4, pos=pos, num_registers=2) | kw
    return ViTAggregator(ViTConfig(**cfg), in_dim=IN_DIM).double().eval()


def slides(lens=(7, 1, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, IN_DIM, generator=g, dtype=torch.float64) for n in lens]
    # distinct cells per slide, on a 6 x 6 grid
    pos = [torch.randperm(36, generator=g)[:n] for n in lens]
    pos = [torch.stack([p % 6, p // 6], 1) for p in pos]
    x = pack_slides(feats, pos)
    x.tokens = x.tokens.double()
    return x


def run(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("peg", [0, 3])
def test_packed_equals_per_slide(pos, pool, peg):
    m, x = make_model(pos, pool=pool, peg=peg), slides()
    out = run(m, x)
    assert out.slide.shape == (3, 32) and out.tokens.shape == (x.tokens.shape[0], 32)
    for i in range(x.num_slides):
        one = run(m, x.select(i))
        torch.testing.assert_close(out.slide[i : i + 1], one.slide)
        a, b = int(x.offsets[i]), int(x.offsets[i + 1])
        torch.testing.assert_close(out.tokens[a:b], one.tokens)


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@pytest.mark.parametrize("peg", [0, 3])
def test_token_order_inside_slide_is_irrelevant(pos, peg):
    m, x = make_model(pos, peg=peg), slides((9, 5))
    perm = torch.cat([torch.randperm(9, generator=torch.Generator().manual_seed(3)),
                      9 + torch.randperm(5, generator=torch.Generator().manual_seed(4))])
    y = PackedSlides(x.tokens[perm], x.positions[perm], x.offsets)
    ox, oy = run(m, x), run(m, y)
    torch.testing.assert_close(oy.slide, ox.slide)
    torch.testing.assert_close(oy.tokens, ox.tokens[perm])


def test_mask_token_replaces_masked_features():
    m, x = make_model(), slides()
    mask = torch.zeros(x.tokens.shape[0], dtype=torch.bool)
    mask[[0, 3, 9]] = True
    masked = PackedSlides(x.tokens, x.positions, x.offsets, mask)
    scrambled = PackedSlides(x.tokens.clone(), x.positions, x.offsets, mask)
    scrambled.tokens[mask] = 100.0  # masked features must not matter
    a, b, plain = run(m, masked), run(m, scrambled), run(m, x)
    torch.testing.assert_close(a.slide, b.slide)
    torch.testing.assert_close(a.tokens, b.tokens)
    assert not torch.allclose(a.slide, plain.slide)
    with torch.no_grad():  # ...the learned mask embedding does
        # (a constant shift would be invisible: every LayerNorm removes it)
        m.mask_token.add_(torch.randn(m.mask_token.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert not torch.allclose(run(m, masked).slide, a.slide)


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_gradients_reach_every_parameter(pos):
    m, x = make_model(pos, drop_path=0.1, layerscale=0.1).train(), slides()
    x.token_mask = torch.zeros(x.tokens.shape[0], dtype=torch.bool)
    x.token_mask[[1, 10]] = True
    out = m(x)
    (out.slide.square().sum() + out.tokens.square().sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grad_checkpointing_same_gradients():
    x = slides()
    grads = []
    for ckpt in (False, True):
        m = make_model(grad_checkpointing=ckpt).train()
        out = m(x)
        out.slide.sum().backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def _rot90(pos):  # (x, y) -> (y, 5 - x) on the 6 x 6 grid
    return torch.stack([pos[:, 1], 5 - pos[:, 0]], 1)


def _flip(pos):  # mirror x
    return torch.stack([5 - pos[:, 0], pos[:, 1]], 1)


@pytest.mark.parametrize("transform", [_rot90, _flip])
def test_grid_symmetries_are_noops_for_alibi_not_rope(transform):
    """Documents a property augmentations must respect: ALiBi sees distances only.

    Rotating or flipping the grid leaves an ALiBi ViT's output exactly unchanged, so such
    augmentations do nothing for it; with 2-D RoPE (axis-aware) they change the output.
    """
    x = slides()
    y = PackedSlides(x.tokens, transform(x.positions), x.offsets)
    alibi = make_model("alibi")
    torch.testing.assert_close(run(alibi, y).slide, run(alibi, x).slide)
    torch.testing.assert_close(run(alibi, y).tokens, run(alibi, x).tokens)
    rope = make_model("rope")
    assert (run(rope, y).slide - run(rope, x).slide).abs().max() > 1e-6


def test_registry_and_config():
    assert AGGREGATORS.config_class("vit") is ViTConfig
    m = build_aggregator({"name": "vit", "dim": 16, "depth": 1, "heads": 2, "pos": "alibi", "pool": "mean"}, in_dim=8)
    assert isinstance(m, ViTAggregator) and m.in_dim == 8 and m.dim == 16
    x = pack_slides([torch.randn(3, 8)], [torch.tensor([[0, 0], [1, 0], [0, 1]])])
    assert m(x).slide.shape == (1, 16)
    with pytest.raises(ValueError, match="pos must be one of 'rope', 'alibi', 'none', got 'absolute'"):
        ViTAggregator(ViTConfig(dim=16, heads=2, pos="absolute"), in_dim=8)


def test_set_vit_ignores_positions_and_order():
    """pos=none without PEG (recipe slidefm_bags): a set model; positions may be anything (zeros for
    features-only bags) and a permutation of the tokens changes neither the slide embedding nor the tokens'."""
    from slidefm.models.positions import position_options

    torch.manual_seed(0)
    vit = ViTAggregator(ViTConfig(dim=16, depth=2, heads=2, pos="none", peg=0, pool="mean", num_registers=1),
                        in_dim=8).eval()
    f = torch.randn(9, 8)
    perm = torch.randperm(9)
    with torch.no_grad():
        a = vit(pack_slides([f], [torch.randint(0, 50, (9, 2))]))
        b = vit(pack_slides([f[perm]], [torch.zeros(9, 2, dtype=torch.long)]))
    torch.testing.assert_close(a.slide, b.slide, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.tokens[perm], b.tokens, rtol=1e-5, atol=1e-6)
    assert position_options({"model": {"aggregator": {"name": "vit", "pos": "none", "peg": 0}}}) == []


def test_rope_vit_is_translation_invariant_per_slide():
    """Shifting one slide's whole grid (a crop vs the same tissue in a whole slide) changes nothing."""
    torch.manual_seed(0)
    vit = ViTAggregator(ViTConfig(dim=16, depth=2, heads=2, pos="rope", num_registers=2), in_dim=8).eval()
    f = [torch.randn(12, 8), torch.randn(7, 8)]
    p = [torch.randint(0, 6, (12, 2)), torch.randint(0, 6, (7, 2))]
    a = vit(pack_slides(f, p))
    b = vit(pack_slides(f, [p[0] + torch.tensor([37, 5]), p[1] - 3]))
    torch.testing.assert_close(b.slide, a.slide, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.tokens, a.tokens, rtol=1e-4, atol=1e-5)


def test_peg_is_a_depthwise_conv_on_the_true_grid():
    """GridPEG == x + zero-padded depthwise conv2d over each slide's dense grid, forward and backward."""
    from slidefm.models.grid_conv import GridPEG
    from slidefm.models.segments import segment_index

    torch.manual_seed(0)
    c = 6
    peg = GridPEG(c, 3).double()
    x = slides((14, 1, 20))
    x.positions[15:] += torch.tensor([9, -4])  # slides sit anywhere on their own grid
    feats = torch.randn(x.tokens.shape[0], c, dtype=torch.double, requires_grad=True)
    out = peg(feats, x.positions, segment_index(x.offsets))
    conv = torch.nn.Conv2d(c, c, 3, padding=1, groups=c, bias=True).double()
    with torch.no_grad():
        conv.weight.copy_(peg.weight.t().reshape(c, 1, 3, 3))
        conv.bias.copy_(peg.bias)
    ref = []
    for i in range(x.num_slides):
        a, b = int(x.offsets[i]), int(x.offsets[i + 1])
        p = x.positions[a:b] - x.positions[a:b].min(0).values
        w, h = (p.max(0).values + 1).tolist()
        grid = torch.zeros(h * w, c, dtype=torch.double).index_add(0, p[:, 1] * w + p[:, 0], feats[a:b])
        img = grid.t().reshape(1, c, h, w)
        y = img + conv(img)
        ref.append(y[0].reshape(c, h * w).t()[p[:, 1] * w + p[:, 0]])
    ref = torch.cat(ref)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (feats, peg.weight), g)
    want = torch.autograd.grad(ref, (feats, conv.weight), g)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1].reshape(c, 9).t())


def test_peg_makes_arrangement_visible_to_an_alibi_vit():
    """With ALiBi alone a grid flip is an exact no-op; the conv position encoding is axis-aware."""
    x = slides()
    y = PackedSlides(x.tokens, _flip(x.positions), x.offsets)
    m = make_model("alibi", peg=3)
    assert (run(m, y).slide - run(m, x).slide).abs().max() > 1e-6
    with pytest.raises(ValueError, match="odd"):
        make_model("rope", peg=2)
