import pytest
import torch

from slidefm.errors import SlidefmError
from slidefm.models.case import CASE_MODELS, CaseConfig, CaseTransformer, build_case_transformer, pool_slides

DIM = 16
COUNTS = [3, 1, 4, 2]  # slides per patient


def offsets_of(counts):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist())


def model(seed=0):
    torch.manual_seed(seed)
    return build_case_transformer(CaseConfig(depth=2, heads=2), slide_dim=DIM).eval()


def test_build_from_config():
    m = build_case_transformer(CaseConfig(depth=3, heads=4), slide_dim=DIM)
    assert isinstance(m, CaseTransformer) and len(m.blocks) == 3 and m.dim == DIM
    assert CASE_MODELS.config_class("transformer") is CaseConfig
    assert build_case_transformer({"name": "transformer", "dim": DIM, "depth": 1}).dim == DIM
    with pytest.raises(SlidefmError, match="does not match"):
        build_case_transformer(CaseConfig(dim=8), slide_dim=DIM)
    with pytest.raises(SlidefmError, match="needs dim"):
        build_case_transformer(CaseConfig())


def test_invariant_to_slide_order_and_sensitive_to_content():
    m = model()
    emb = torch.randn(sum(COUNTS), DIM)
    off = offsets_of(COUNTS)
    with torch.no_grad():
        base = m(emb, off)
        assert base.shape == (len(COUNTS), DIM)
        g = torch.Generator().manual_seed(1)
        perm = torch.cat([a + torch.randperm(b - a, generator=g) for a, b in zip(off[:-1].tolist(), off[1:].tolist())])
        assert not torch.equal(perm, torch.arange(len(perm)))
        torch.testing.assert_close(m(emb[perm], off), base, atol=1e-5, rtol=1e-5)
        changed = emb.clone()
        changed[0] = torch.randn(DIM)  # a slide of patient 0 (not a constant shift: LayerNorm removes it)
        out = m(changed, off)
    assert (out[0] - base[0]).abs().max() > 1e-4
    torch.testing.assert_close(out[1:], base[1:], atol=1e-5, rtol=1e-5)


def test_packed_over_patients_equals_one_at_a_time():
    m = model()
    emb = torch.randn(sum(COUNTS), DIM)
    off = offsets_of(COUNTS)
    with torch.no_grad():
        packed = m(emb, off)
        for i in range(len(COUNTS)):
            one = m(emb[off[i] : off[i + 1]], torch.tensor([0, COUNTS[i]]))
            torch.testing.assert_close(one[0], packed[i], atol=1e-5, rtol=1e-5)


def test_case_gradients_flow():
    m = model().train()
    emb = torch.randn(sum(COUNTS), DIM, requires_grad=True)
    m(emb, offsets_of(COUNTS)).square().sum().backward()
    assert emb.grad.abs().sum(1).gt(0).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_pool_slides():
    emb = torch.randn(6, DIM)
    off = torch.tensor([0, 2, 2, 6])  # middle patient has no slides
    mean = pool_slides(emb, off, "mean")
    torch.testing.assert_close(mean[0], emb[:2].mean(0))
    torch.testing.assert_close(mean[2], emb[2:].mean(0))
    assert mean[1].eq(0).all()
    mx = pool_slides(emb, off, how="max")
    torch.testing.assert_close(mx[2], emb[2:].max(0).values)
    perm = torch.tensor([1, 0, 5, 3, 2, 4])
    torch.testing.assert_close(pool_slides(emb[perm], off, "max"), mx)
    with pytest.raises(SlidefmError, match="unknown slide pooling"):
        pool_slides(emb, off, "median")
