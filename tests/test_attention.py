"""packed_attention backends vs an explicit dense reference (block-diagonal mask + ALiBi bias matrix)."""

from __future__ import annotations

import math

import pytest
import torch

from slidefm.models import blocks as blocks_mod
from slidefm.models.attention import (
    AttentionBackendError, alibi_chunked, alibi_slopes, apply_rope, backend_unavailable_reason, packed_attention,
    resolve_backend, rope_angles,
)
from slidefm.models.attention import alibi_chunked as chunked_mod
from slidefm.models.attention.rope import rope_frequencies

CPU_BACKENDS = ["sdpa", "alibi_chunked"]


def offsets_of(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.long)


def dense_reference(q, k, v, qo, ko, qpos=None, kpos=None, slopes=None):
    """Full (Tq, Tk) attention with an explicit block-diagonal mask and explicit ALiBi bias."""
    seg_q = torch.repeat_interleave(torch.arange(len(qo) - 1), qo[1:] - qo[:-1])
    seg_k = torch.repeat_interleave(torch.arange(len(ko) - 1), ko[1:] - ko[:-1])
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    if slopes is not None:
        diff = qpos.double()[:, None, :] - kpos.double()[None, :, :]  # full (Tq, Tk, 2)
        dist = torch.linalg.vector_norm(diff, dim=-1).nan_to_num(0.0)
        bias = -slopes.double()[:, None, None] * dist[None]
        scores = scores + bias.to(q.dtype)
    allowed = seg_q[:, None] == seg_k[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    attn = torch.softmax(scores, -1).nan_to_num(0.0)  # queries with no keys -> zero output
    return torch.einsum("hqk,khd->qhd", attn, v)


def make_qkv(tq, tk, h=2, dh=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, h, dh, generator=g, dtype=dtype, requires_grad=True) for t in (tq, tk, tk)]


def grid_positions(n, seed=0, nan_rows=()):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 12, (n, 2), generator=g).double()
    for r in nan_rows:
        pos[r] = float("nan")
    return pos


def compare(fn_a, fn_b, tensors, atol=1e-10):
    """Forward outputs and grads w.r.t. every input agree."""
    outs = []
    for fn in (fn_a, fn_b):
        for t in tensors:
            t.grad = None
        out = fn()
        # randn_like follows the memory layout, so draw by shape to get the same logical tensor.
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        (out * g).sum().backward()
        outs.append((out.detach().clone(), [t.grad.clone() for t in tensors]))
    (oa, ga), (ob, gb) = outs
    torch.testing.assert_close(oa, ob, atol=atol, rtol=1e-7)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pos", ["none", "rope"])
def test_self_attention_matches_dense_and_per_slide(backend, pos):
    lens = [5, 1, 9, 0, 3]  # includes a 1-token and an empty slide
    off = offsets_of(lens)
    q, k, v = make_qkv(sum(lens), sum(lens))
    positions = grid_positions(sum(lens), nan_rows=(0, 6))

    def prep(a, b, p):
        if pos == "rope":
            cos, sin = rope_angles(p, a.shape[-1])
            return apply_rope(a, cos, sin), apply_rope(b, cos, sin)
        return a, b

    def packed():
        qq, kk = prep(q, k, positions)
        return packed_attention(qq, kk, v, off, backend=backend)

    def dense():
        qq, kk = prep(q, k, positions)
        return dense_reference(qq, kk, v, off, off)

    def one_at_a_time():
        outs = []
        for a, b in zip(off[:-1].tolist(), off[1:].tolist()):
            qq, kk = prep(q[a:b], k[a:b], positions[a:b])
            outs.append(packed_attention(qq, kk, v[a:b], torch.tensor([0, b - a]), backend=backend))
        return torch.cat(outs)

    compare(packed, dense, [q, k, v])
    compare(packed, one_at_a_time, [q, k, v])


@pytest.mark.parametrize("chunk", [None, 1, 4, 7])
def test_alibi_chunked_matches_dense(chunk):
    lens = [11, 1, 6]  # 11 and 6 are not multiples of 3, 4 or 7
    off = offsets_of(lens)
    q, k, v = make_qkv(sum(lens), sum(lens), h=4)
    pos = grid_positions(sum(lens), nan_rows=(0, 12))  # CLS-like tokens without a position
    slopes = alibi_slopes(4)

    def chunked():
        return alibi_chunked.attention(q, k, v, off, off, pos, pos, slopes, chunk_size=chunk)

    compare(chunked, lambda: dense_reference(q, k, v, off, off, pos, pos, slopes), [q, k, v])
    compare(lambda: packed_attention(q, k, v, off, q_positions=pos, alibi_slopes=slopes),
            lambda: dense_reference(q, k, v, off, off, pos, pos, slopes), [q, k, v])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cross_attention_separate_offsets(backend):
    q_lens, kv_lens = [2, 3, 1], [7, 1, 4]
    qo, ko = offsets_of(q_lens), offsets_of(kv_lens)
    q, k, v = make_qkv(sum(q_lens), sum(kv_lens))
    compare(lambda: packed_attention(q, k, v, qo, ko, backend=backend),
            lambda: dense_reference(q, k, v, qo, ko), [q, k, v])
    if backend == "alibi_chunked":  # different query and key positions, some without position
        qp, kp = grid_positions(sum(q_lens), 1, nan_rows=(0,)), grid_positions(sum(kv_lens), 2)
        s = alibi_slopes(2)
        compare(lambda: packed_attention(q, k, v, qo, ko, q_positions=qp, kv_positions=kp, alibi_slopes=s,
                                         backend=backend),
                lambda: dense_reference(q, k, v, qo, ko, qp, kp, s), [q, k, v])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    lens = [3, 1, 4]
    off = offsets_of(lens)
    q, k, v = make_qkv(8, 8, h=2, dh=4)
    if backend == "sdpa":
        fn = lambda a, b, c: packed_attention(a, b, c, off, backend="sdpa")  # noqa: E731
    else:  # chunk 2 with grad on -> the checkpointed (recomputed-bias) path
        pos, s = grid_positions(8, nan_rows=(4,)), alibi_slopes(2)
        fn = lambda a, b, c: alibi_chunked.attention(a, b, c, off, off, pos, pos, s, chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_float32_flash_path_matches_dense():
    lens = [300, 17, 130]
    off = offsets_of(lens)
    q, k, v = make_qkv(sum(lens), sum(lens), h=3, dh=16, dtype=torch.float32)
    pos = grid_positions(sum(lens)).float()
    s = alibi_slopes(3)
    ref = dense_reference(q.double(), k.double(), v.double(), off, off)
    torch.testing.assert_close(packed_attention(q, k, v, off).double(), ref, atol=2e-5, rtol=1e-4)
    ref = dense_reference(q.double(), k.double(), v.double(), off, off, pos, pos, s)
    out = alibi_chunked.attention(q, k, v, off, off, pos, pos, s, chunk_size=64)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # the addmm inference path, one key block and streamed blocks
        for block in (None, 100):
            out = alibi_chunked.attention(q, k, v, off, off, pos, pos, s, block_size=block)
            torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk,block", [(None, None), (1, None), (5, None), (5, 4), (None, 7)])
def test_alibi_inference_path_matches_dense(chunk, block, monkeypatch):
    """No autograd, float: per-chunk (chunk, N) distance shared by heads, never an (H, N, N) bias."""
    lens, h = [23, 1, 9], 3
    off = offsets_of(lens)
    q, k, v = (t.detach() for t in make_qkv(sum(lens), sum(lens), h=h))
    pos = grid_positions(sum(lens), nan_rows=(0, 23))
    shapes = []
    real = chunked_mod.pair_distance

    def spy(qp, kp, **kw):
        shapes.append((qp.shape[0], kp.shape[0]))
        return real(qp, kp, **kw)

    monkeypatch.setattr(chunked_mod, "pair_distance", spy)
    monkeypatch.setattr(chunked_mod, "_chunk", None)  # the SDPA-with-bias path must not run
    with torch.no_grad():
        out = alibi_chunked.attention(q, k, v, off, off, pos, pos, alibi_slopes(h), chunk_size=chunk,
                                      block_size=block)
    torch.testing.assert_close(out, dense_reference(q, k, v, off, off, pos, pos, alibi_slopes(h)), atol=1e-10, rtol=0)
    c = chunk or chunked_mod.INFERENCE_CHUNK
    assert all(r <= c for r, _ in shapes)
    if block is None:  # one key block: each query chunk sees exactly its own slide's keys
        assert sum(r for r, _ in shapes) == sum(lens) and {m for _, m in shapes} == set(lens)
    else:  # streamed: every (query chunk, key block) pair of each slide, blocks at most `block` keys
        expect = sum(math.ceil(n / c) * math.ceil(n / block) for n in lens)
        assert len(shapes) == expect and max(m for _, m in shapes) <= block


def test_alibi_half_inference_reuses_one_bias_buffer(monkeypatch):
    """Half-precision inference keeps SDPA with a chunked bias, one buffer for every chunk."""
    n, h = 200, 4
    q, k, v = (t.detach().to(torch.bfloat16) for t in make_qkv(n, n, h=h))
    pos = grid_positions(n).float()
    shapes, ptrs = [], set()
    real = chunked_mod.alibi_bias

    def spy(qp, kp, slopes, dtype, **kw):
        shapes.append((qp.shape[0], kp.shape[0]))
        out = real(qp, kp, slopes, dtype, **kw)
        ptrs.add(out.data_ptr())
        return out

    monkeypatch.setattr(chunked_mod, "alibi_bias", spy)
    budget = 256 * 1024
    chunk = chunked_mod.pick_chunk(h, n, 2, budget)
    with torch.no_grad():
        out = alibi_chunked.attention(q, k, v, offsets_of([n]), offsets_of([n]), pos, pos, alibi_slopes(h),
                                      max_bias_bytes=budget)
    assert 1 < chunk < n and max(r for r, _ in shapes) == chunk and sum(r for r, _ in shapes) == n
    assert (h + 2) * chunk * n * 4 <= budget
    assert len(shapes) > 1 and len(ptrs) == 1
    ref = dense_reference(q.double(), k.double(), v.double(), offsets_of([n]), offsets_of([n]), pos, pos, alibi_slopes(h))
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


def test_alibi_slopes_geometric():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s = alibi_slopes(12)
    assert s.shape == (12,) and bool((s > 0).all()) and len(set(s.tolist())) == 12
    assert s[:8].tolist() == alibi_slopes(8).tolist()


def test_rope_relative_and_identity():
    g = torch.Generator().manual_seed(0)
    dh = 16
    q = torch.randn(6, 2, dh, dtype=torch.float64, generator=g)
    k = torch.randn(6, 2, dh, dtype=torch.float64, generator=g)
    pos = torch.randint(0, 50, (6, 2), generator=g).double()

    def scores(p):
        cos, sin = rope_angles(p, dh)
        cos, sin = cos.double(), sin.double()
        return torch.einsum("qhd,khd->hqk", apply_rope(q, cos, sin), apply_rope(k, cos, sin))

    base = scores(pos)
    torch.testing.assert_close(scores(pos + torch.tensor([7.0, -3.0], dtype=torch.float64)), base, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(scores(pos * 2), base, atol=1e-3)  # ...but not invariant to scaling
    cos, sin = rope_angles(torch.tensor([[float("nan"), float("nan")], [3.0, 4.0]]), dh,
                           no_pos=torch.tensor([False, True]))
    torch.testing.assert_close(apply_rope(q[:2].float(), cos, sin), q[:2].float())
    assert rope_frequencies(dh).shape == (dh // 4,)
    with pytest.raises(ValueError, match="head_dim divisible by 4, got 6"):
        rope_frequencies(6)


def test_backend_resolution_and_errors():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("auto", "cpu", alibi=True) == "alibi_chunked"
    with pytest.raises(AttentionBackendError, match="CPU"):
        resolve_backend("xformers", "cpu")
    with pytest.raises(AttentionBackendError, match="CUDA"):
        resolve_backend("flex", "cpu", alibi=True)
    with pytest.raises(AttentionBackendError, match="CUDA"):
        resolve_backend("varlen", "cpu")
    with pytest.raises(AttentionBackendError, match="no 2-D ALiBi"):
        resolve_backend("sdpa", "cpu", alibi=True)
    with pytest.raises(AttentionBackendError, match="unknown"):
        resolve_backend("nope", "cpu")
    q, k, v = make_qkv(4, 4)
    with pytest.raises(ValueError, match="offsets"):
        packed_attention(q, k, v, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="positions"):
        packed_attention(q, k, v, torch.tensor([0, 4]), alibi_slopes=alibi_slopes(2))


@pytest.mark.parametrize("pos", ["rope", "alibi", "none"])
def test_block_packed_equals_per_slide(pos):
    torch.manual_seed(0)
    blk = blocks_mod.Block(32, 4, pos=pos, layerscale=0.5).double().eval()
    lens = [6, 1, 9]
    off = offsets_of(lens)
    x = torch.randn(sum(lens), 32, dtype=torch.float64)
    p = grid_positions(sum(lens), nan_rows=(0, 7)) if pos != "none" else None
    packed = blk(x, off, p)
    per = torch.cat([blk(x[a:b], torch.tensor([0, b - a]), None if p is None else p[a:b])
                     for a, b in zip(off[:-1].tolist(), off[1:].tolist())])
    torch.testing.assert_close(packed, per)


def test_block_inference_chunking_and_checkpointing(monkeypatch):
    torch.manual_seed(0)
    blk = blocks_mod.Block(16, 2, pos="rope").double()
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    off, p = offsets_of([25, 15]), grid_positions(40)
    ref = blk(x, off, p)
    ref.sum().backward()
    g_ref = [t.grad.clone() for t in (x, *blk.parameters())]
    blk.grad_checkpointing = True
    x.grad = None
    blk.zero_grad()
    blk(x, off, p).sum().backward()
    for a, b in zip(g_ref, (x.grad, *[t.grad for t in blk.parameters()])):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(blocks_mod.Block, "token_chunk", 7)
    with torch.inference_mode():  # token-chunked norm/qkv/rope/proj/MLP
        torch.testing.assert_close(blk.eval()(x.detach(), off, p), ref.detach())
    torch.manual_seed(0)
    blk = blocks_mod.Block(16, 2, pos="alibi", layerscale=0.5).double()
    with torch.no_grad():
        ref = blk(x, off, p)
        torch.testing.assert_close(blk.eval()(x.detach(), off, p), ref)


def test_slide_drop_path_is_per_slide():
    torch.manual_seed(0)
    dp = blocks_mod.SlideDropPath(0.5).train()
    lens = [3, 5, 2, 4] * 8
    out = dp(torch.ones(sum(lens), 4), offsets_of(lens))
    factors = set()
    for part in torch.split(out, lens):
        assert bool((part == part[0, 0]).all())  # one draw per slide
        factors.add(part[0, 0].item())
    assert factors == {0.0, 2.0}


def test_cross_attention_block_segments():
    torch.manual_seed(0)
    blk = blocks_mod.CrossAttentionBlock(16, 2, kv_dim=8).double().eval()
    lq, lk = [2, 2, 2], [5, 1, 7]
    qo, ko = offsets_of(lq), offsets_of(lk)
    lat = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    out = blk(lat, qo, ctx, ko)
    per = torch.cat([blk(lat[qo[i]:qo[i + 1]], torch.tensor([0, 2]), ctx[ko[i]:ko[i + 1]], torch.tensor([0, lk[i]]))
                     for i in range(3)])
    torch.testing.assert_close(out, per)
    out.sum().backward()
    assert ctx.grad.abs().sum() > 0 and all(p.grad is not None for p in blk.parameters())


def _fake_xformers(monkeypatch, works: bool):
    """An xformers whose kernels run (a plain SDPA) or, as a build for another torch, are missing."""
    import importlib.util
    import sys
    import types

    import torch.nn.functional as F

    class BlockDiagonalMask:
        @staticmethod
        def from_seqlens(q_seqlen, kv_seqlen):
            return (q_seqlen, kv_seqlen)

    def memory_efficient_attention(q, k, v, attn_bias=None):
        if not works:
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n...")
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    fmha = types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask,
                                 memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", types.SimpleNamespace(fmha=fmha))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "xformers" else real(name, *a))
    from slidefm.models.attention import xformers_backend

    xformers_backend._probe.cache_clear()  # answers cached for another (fake or real) install


def test_an_xformers_without_kernels_is_passed_by(monkeypatch):
    """An xformers built for another torch imports fine but has no kernels: the backend says why, and auto takes
    the next fused kernel instead of failing at the first forward."""
    from slidefm.models.attention import xformers_backend

    _fake_xformers(monkeypatch, works=False)
    why = xformers_backend._probe("cpu", torch.float32)  # the probe itself, where this machine can run it
    assert why.startswith("xformers is installed but cannot run here (NotImplementedError: No operator found")
    _fake_xformers(monkeypatch, works=True)
    with torch.inference_mode():  # as in an export's forward: the probe still runs its backward
        assert xformers_backend._probe("cpu", torch.float32) is None
    xformers_backend._probe.cache_clear()
    # resolution on a CUDA device (the probe's answer stood in: this machine has none)
    monkeypatch.setattr(xformers_backend, "_probe", lambda device, dtype: why)
    assert backend_unavailable_reason("xformers", "cuda", torch.bfloat16) == why
    next_best = "varlen" if backend_unavailable_reason("varlen", "cuda", torch.bfloat16) is None else "sdpa"
    assert resolve_backend("auto", "cuda", torch.bfloat16) == next_best
    monkeypatch.setattr(xformers_backend, "_probe", lambda device, dtype: None)
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "xformers"
