"""2-D ALiBi without an N x N bias: per slide, a chunk of queries attends to all keys.

Exact: each query's softmax runs over all keys of its slide; a 100k-token slide never materialises
the 40 GB full bias.

- With autograd (training): SDPA with a (heads, chunk, N) additive bias per chunk, the chunk sized to
  ``max_bias_bytes`` (default 256 MiB); with more than one chunk each is checkpointed so backward
  recomputes its bias instead of keeping every chunk's bias alive (which would add up to N x N again).
- Without autograd (export, whole-slide inference) in float32/float64: the chunk's (chunk, N) distance
  is computed once and shared by all heads, each head folding its slope in as the ``beta`` of the
  ``addmm`` that produces its logits, followed by an in-place softmax. SDPA instead needs the bias
  per head written out and read back: 2 x heads x N^2 floats of memory traffic per layer, which
  profiled as most of ALiBi's cost over plain attention on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch.utils.checkpoint import checkpoint

from slidefm.models.attention._common import alibi_bias, pair_distance, split_segments
from slidefm.models.attention.sdpa import _attend

NAME = "alibi_chunked"
SUPPORTS_ALIBI = True
DEFAULT_MAX_BIAS_BYTES = 256 * 2**20
MIN_CHUNK = 16
# Inference (no autograd): a (chunk, keys) logits buffer per head. 128 queries keep a 10k-token slide's
# buffers in a few MB of cache; past INFERENCE_SINGLE_BLOCK_MAX keys they would spill to memory, so keys
# stream in blocks (measured at 25k tokens, 1 thread: 61 s per layer of attention with blocks of 4096
# against 75 s unblocked; plain SDPA without bias 28 s).
INFERENCE_CHUNK = 128
INFERENCE_SINGLE_BLOCK_MAX = 16384
INFERENCE_BLOCK = 4096


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def pick_chunk(num_heads: int, num_keys: int, itemsize: int, max_bias_bytes: int = DEFAULT_MAX_BIAS_BYTES) -> int:
    """Largest query chunk whose (heads, chunk, keys) bias fits in ``max_bias_bytes``."""
    # +2: the two float32 distance intermediates live alongside the per-head bias.
    per_query = max(1, (num_heads + 2) * num_keys * max(itemsize, 4))
    return max(MIN_CHUNK, max_bias_bytes // per_query)


def _chunk(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, slopes: Tensor,
           buffers: tuple[Tensor, Tensor] | None = None) -> Tensor:
    if buffers is None:
        bias = alibi_bias(q_pos, k_pos, slopes, q.dtype)
    else:
        h, n, m = slopes.numel(), q_pos.shape[0], k_pos.shape[0]
        bias = alibi_bias(q_pos, k_pos, slopes, q.dtype, out=buffers[0][: h * n * m].view(h, n, m),
                          scratch=buffers[1][: 2 * n * m].view(2, n, m))
    return _attend(q, k, v, attn_mask=bias[None])


def _segment_inference(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, slopes: Tensor,
                       chunk: int | None = None, block: int | None = None) -> Tensor:
    """(n, H, Dh) x (m, H, Dh) -> (n, H, Dv) without autograd: logits = scale q k^T - slope_h * dist.

    Keys up to ``block`` are one softmax; longer slides stream key blocks with an online softmax
    (running max and sum per query), so the (chunk, block) logits stay cache-sized at any N.
    """
    n, h, dh = q.shape
    m, dv = k.shape[0], v.shape[2]
    streamed = m > (block or INFERENCE_SINGLE_BLOCK_MAX)
    b = min(block or (INFERENCE_BLOCK if streamed else m), m)
    # Streaming re-reads every head's K/V once per query chunk: a larger chunk halves that traffic.
    c = min(chunk or (2 * INFERENCE_CHUNK if streamed else INFERENCE_CHUNK), n)
    # Head-major K/V: no copy when the caller already stores them so (the chunked inference block does);
    # per-head GEMMs on token-major strided rows measured ~15% slower than copying.
    q_h = q.transpose(0, 1)
    k_h, v_h = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()  # (H, m, Dh), (H, m, Dv)
    out = q.new_empty(h, n, dv)
    dist, dy, logits = (q.new_empty(c * b) for _ in range(3))
    run_max, run_sum = q.new_empty(h, c, 1), q.new_empty(h, c, 1)
    blk_max, rescale, blk_sum = (q.new_empty(c, 1) for _ in range(3))
    neg = slopes.neg().tolist()
    scale = dh ** -0.5
    q_pos, k_pos = q_pos.to(q.dtype), k_pos.to(q.dtype)
    for s in range(0, n, c):
        e = min(n, s + c)
        r = e - s
        for t in range(0, m, b):
            u = min(m, t + b)
            w = u - t
            d = pair_distance(q_pos[s:e], k_pos[t:u], out=dist[: r * w].view(r, w), scratch=dy[: r * w].view(r, w))
            x = logits[: r * w].view(r, w)
            for j in range(h):
                torch.addmm(d, q_h[j, s:e], k_h[j, t:u].T, beta=neg[j], alpha=scale, out=x)
                acc, mx, z = out[j, s:e], run_max[j, :r], run_sum[j, :r]
                if t == 0:
                    torch.amax(x, dim=-1, keepdim=True, out=mx)
                    x.sub_(mx).exp_()
                    torch.sum(x, dim=-1, keepdim=True, out=z)
                    torch.mm(x, v_h[j, t:u], out=acc)
                else:
                    new_max, corr = blk_max[:r], rescale[:r]
                    torch.maximum(torch.amax(x, dim=-1, keepdim=True, out=new_max), mx, out=new_max)
                    x.sub_(new_max).exp_()
                    torch.sub(mx, new_max, out=corr).exp_()
                    mx.copy_(new_max)
                    acc.mul_(corr).addmm_(x, v_h[j, t:u])
                    z.mul_(corr).add_(torch.sum(x, dim=-1, keepdim=True, out=blk_sum[:r]))
        out[:, s:e].div_(run_sum[:, :r])
    return out.transpose(0, 1)


def attention(
    q, k, v, q_offsets, kv_offsets, q_positions=None, kv_positions=None, alibi_slopes=None,
    *, chunk_size: int | None = None, block_size: int | None = None, max_bias_bytes: int = DEFAULT_MAX_BIAS_BYTES,
) -> Tensor:
    """``chunk_size`` (queries, either path) and ``block_size`` (keys, inference) override the defaults."""
    outs = []
    segs = zip(split_segments(q, q_offsets), split_segments(k, kv_offsets), split_segments(v, kv_offsets))
    qpos = split_segments(q_positions, q_offsets) if alibi_slopes is not None else None
    kpos = split_segments(kv_positions, kv_offsets) if alibi_slopes is not None else None
    for i, (qs, ks, vs) in enumerate(segs):
        n, m = qs.shape[0], ks.shape[0]
        if n == 0:
            continue
        if alibi_slopes is None or m == 0:
            outs.append(_attend(qs, ks, vs))
            continue
        qp, kp = qpos[i], kpos[i]
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if not grad and q.dtype in (torch.float32, torch.float64):
            outs.append(_segment_inference(qs, ks, vs, qp, kp, alibi_slopes, chunk_size, block_size))
            continue
        c = chunk_size or pick_chunk(q.shape[1], m, q.element_size(), max_bias_bytes)
        recompute = grad and c < n
        buffers = None
        if not grad and c < n:
            # Without autograd nothing keeps a chunk's bias alive: one buffer serves every chunk.
            work = torch.float64 if q.dtype == torch.float64 else torch.float32
            buffers = (q.new_empty(alibi_slopes.numel() * c * m), torch.empty(2 * c * m, dtype=work, device=q.device))
        # split (not slicing) keeps the backward one concatenation per segment
        for qc, pc in zip(qs.split(c), qp.split(c)):
            if recompute:
                outs.append(checkpoint(_chunk, qc, ks, vs, pc, kp, alibi_slopes, use_reentrant=False))
            else:
                outs.append(_chunk(qc, ks, vs, pc, kp, alibi_slopes, buffers))
    if not outs:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    return outs[0] if len(outs) == 1 else torch.cat(outs)
