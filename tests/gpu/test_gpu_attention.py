"""Every attention backend on CUDA against an SDPA reference: forward and backward, fp32 and bf16.

Reference: per slide, ``F.scaled_dot_product_attention`` in float32 on the same (dtype-rounded) inputs,
with the ALiBi bias given explicitly as a float mask (``alibi_bias``) when the case has one. Errors are
measured relative to the reference's largest magnitude (``max|out - ref| / max|ref|``), per tensor:

    dtype     forward   backward (dq, dk, dv)
    float32   1e-4      5e-4      (TF32 off for the comparison)
    bfloat16  2e-2      4e-2      (8-bit mantissa: ~4e-3 per element, softmax and sums accumulate)

A backend that cannot run here (xformers not installed, varlen/flex missing in this torch, bf16-only
kernels asked for fp32) is skipped with its own reason, so the JSON report names what was not covered.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import importlib

from slidefm.models.attention import _MODULES, BACKENDS, alibi_bias, alibi_slopes, backend_unavailable_reason, packed_attention

TOL = {torch.float32: (1e-4, 5e-4), torch.bfloat16: (2e-2, 4e-2)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
H, DH = 4, 64
ALIBI_BACKENDS = [b for b in BACKENDS if importlib.import_module(_MODULES[b]).SUPPORTS_ALIBI]
pytestmark = pytest.mark.usefixtures("no_tf32")  # fp32 comparisons without TF32


def offsets(lens, device="cuda"):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.long, device=device)


def positions(n, seed, nan_every=None, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, 40, (n, 2), generator=g).float()
    if nan_every:
        p[::nan_every] = float("nan")  # CLS/register-like rows without a position
    return p.to(device)


def reference(q, k, v, qo, ko, qpos=None, kpos=None, slopes=None):
    """Per-slide SDPA in float32 with an explicit ALiBi float mask; empty key sets give zeros."""
    q, k, v = q.float(), k.float(), v.float()
    out = []
    for i in range(len(qo) - 1):
        a, b, c, d = int(qo[i]), int(qo[i + 1]), int(ko[i]), int(ko[i + 1])
        if b == a:
            continue
        if d == c:
            out.append(q.new_zeros(b - a, q.shape[1], v.shape[2]))
            continue
        mask = None
        if slopes is not None:
            mask = alibi_bias(qpos[a:b], kpos[c:d], slopes, torch.float32)[None]
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], k[c:d].transpose(0, 1)[None],
                                           v[c:d].transpose(0, 1)[None], attn_mask=mask)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out) if out else q.new_zeros(0, q.shape[1], v.shape[2])


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.detach().float().abs().max().clamp_min(1e-6)
    return float((a.detach().float() - ref.detach().float()).abs().max() / scale)


def run_case(backend, dtype, q_lens, kv_lens=None, alibi=False, seed=0):
    why = backend_unavailable_reason(backend, "cuda", dtype, alibi=alibi)
    if why is not None:
        pytest.skip(why)
    cross = kv_lens is not None
    kv_lens = q_lens if kv_lens is None else kv_lens
    g = torch.Generator(device="cuda").manual_seed(seed)
    tq, tk = sum(q_lens), sum(kv_lens)
    q, k, v = (torch.randn(t, H, DH, generator=g, device="cuda").to(dtype).requires_grad_() for t in (tq, tk, tk))
    qo = offsets(q_lens)
    ko = offsets(kv_lens) if cross else None
    kw = {}
    if alibi:
        kw = {"q_positions": positions(tq, seed, nan_every=17), "alibi_slopes": alibi_slopes(H).cuda()}
        if cross:
            kw["kv_positions"] = positions(tk, seed + 1, nan_every=13)
    out = packed_attention(q, k, v, qo, ko, backend=backend, **kw)
    assert out.shape == (tq, H, DH) and out.dtype == dtype
    grad = torch.randn(out.shape, generator=g, device="cuda").to(dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    # reference on the same rounded inputs, float32
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference(qr, kr, vr, qo, ko if cross else qo, kw.get("q_positions"),
                    kw.get("kv_positions", kw.get("q_positions")), kw.get("alibi_slopes"))
    rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), grad.float())
    f_tol, b_tol = TOL[dtype]
    errs = {"out": rel_err(out, ref), "dq": rel_err(dq, rq), "dk": rel_err(dk, rk), "dv": rel_err(dv, rv)}
    assert errs["out"] <= f_tol, f"{backend} {dtype} forward: rel err {errs['out']:.2e} > {f_tol:.0e}"
    for name in ("dq", "dk", "dv"):
        assert errs[name] <= b_tol, f"{backend} {dtype} {name}: rel err {errs[name]:.2e} > {b_tol:.0e} ({errs})"
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    return errs


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_self_attention_matches_sdpa(backend, dtype):
    run_case(backend, DTYPES[dtype], [1, 37, 300, 1029, 64])


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("backend", ALIBI_BACKENDS)
def test_alibi_matches_explicit_bias(backend, dtype):
    run_case(backend, DTYPES[dtype], [1, 37, 300, 1029, 64], alibi=True)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_with_separate_offsets(backend, dtype):
    """Latents/CLS attending to patch tokens (Perceiver, pooling): Tq != Tk per slide."""
    run_case(backend, DTYPES[dtype], [8, 8, 8], kv_lens=[500, 3, 77])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_single_token_slides(backend):
    run_case(backend, torch.bfloat16, [0, 1, 0, 129, 0])


@pytest.mark.parametrize("backend", ALIBI_BACKENDS)
def test_long_slide_alibi_bf16(backend):
    """One 16k-token slide: the ALiBi backends never build an N x N bias (flex: in-kernel; chunked: per chunk)."""
    run_case(backend, torch.bfloat16, [16384], alibi=True)


def test_auto_picks_a_fused_kernel_on_cuda():
    from slidefm.models.attention import available_backends, resolve_backend

    have = available_backends("cuda", torch.bfloat16)
    fused = [b for b in ("xformers", "varlen") if b in have]
    chosen = resolve_backend("auto", "cuda", torch.bfloat16)
    assert chosen == (fused[0] if fused else "sdpa")
    alibi = resolve_backend("auto", "cuda", torch.bfloat16, alibi=True)
    assert alibi == ("flex" if "flex" in available_backends("cuda", torch.bfloat16, alibi=True) else "alibi_chunked")
    if not fused:
        pytest.skip(f"no fused varlen kernel here (auto -> sdpa); torch {torch.__version__}, xformers missing")


def test_vit_block_backends_agree_on_cuda():
    """A whole ViT (RoPE and ALiBi) gives the same slide embeddings with every backend that can run it."""
    from slidefm.data.batch import pack_slides
    from slidefm.models.aggregators.vit import ViTAggregator, ViTConfig

    g = torch.Generator().manual_seed(0)
    lens = [50, 333, 7]
    side = 20
    feats = [torch.randn(n, 48, generator=g) for n in lens]
    cells = [torch.randperm(side * side, generator=g)[:n] for n in lens]
    pos = [torch.stack([c % side, c // side], 1) for c in cells]
    x = pack_slides(feats, pos).to("cuda")
    for pe in ("rope", "alibi"):
        torch.manual_seed(0)
        ref_model = ViTAggregator(ViTConfig(dim=64, depth=2, heads=4, pos=pe, backend="sdpa" if pe == "rope" else "alibi_chunked"),
                                  in_dim=48)
        ref_model = ref_model.cuda().eval()
        with torch.no_grad():
            ref = ref_model(x).slide
        for backend in BACKENDS:
            if backend_unavailable_reason(backend, "cuda", torch.float32, alibi=pe == "alibi") is not None:
                continue
            m = ViTAggregator(ViTConfig(dim=64, depth=2, heads=4, pos=pe, backend=backend), in_dim=48).cuda().eval()
            m.load_state_dict(ref_model.state_dict())
            with torch.no_grad():
                out = m(x).slide
            assert rel_err(out, ref) < 1e-3, f"ViT {pe} backend {backend}: {rel_err(out, ref):.2e}"
