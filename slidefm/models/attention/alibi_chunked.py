"""2-D ALiBi without an N x N bias: per slide, a chunk of queries attends to all keys.

Memory is O(heads * chunk * N) for the bias of one chunk; the chunk size is picked so that this
stays under ``max_bias_bytes`` (default 256 MiB), so a 100k-token slide never materialises the
40 GB full bias. Exact: each query's softmax runs over all keys of its slide.
With autograd on and more than one chunk, each chunk is checkpointed so backward recomputes its
bias instead of keeping every chunk's bias alive (which would add up to the full N x N again).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch.utils.checkpoint import checkpoint

from slidefm.models.attention._common import alibi_bias, split_segments
from slidefm.models.attention.sdpa import _attend

NAME = "alibi_chunked"
SUPPORTS_ALIBI = True
DEFAULT_MAX_BIAS_BYTES = 256 * 2**20
MIN_CHUNK = 16


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


def attention(
    q, k, v, q_offsets, kv_offsets, q_positions=None, kv_positions=None, alibi_slopes=None,
    *, chunk_size: int | None = None, max_bias_bytes: int = DEFAULT_MAX_BIAS_BYTES,
) -> Tensor:
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
        c = chunk_size or pick_chunk(q.shape[1], m, q.element_size(), max_bias_bytes)
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
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
