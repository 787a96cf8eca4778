"""Per-slide ``scaled_dot_product_attention`` loop: exact, any device, no ALiBi.

On CPU this is the fastest exact option (SDPA's CPU flash kernel is memory-efficient and
close to GEMM speed); it is also the CUDA fallback when no fused varlen kernel is present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slidefm.models.attention._common import split_segments

NAME = "sdpa"
SUPPORTS_ALIBI = False


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """(n, H, Dh) x (m, H, Dh) -> (n, H, Dh) for a single segment."""
    if k.shape[0] == 0:  # a query with nothing to attend to gets a zero update
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=attn_mask
    )
    return out[0].transpose(0, 1)


def attention(q, k, v, q_offsets, kv_offsets, q_positions=None, kv_positions=None, alibi_slopes=None) -> Tensor:
    if alibi_slopes is not None:
        raise ValueError("the sdpa backend has no ALiBi; use 'alibi_chunked' or 'flex'")
    outs = [
        _attend(qs, ks, vs)
        for qs, ks, vs in zip(split_segments(q, q_offsets), split_segments(k, kv_offsets), split_segments(v, kv_offsets))
        if qs.shape[0] > 0
    ]
    if not outs:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    return outs[0] if len(outs) == 1 else torch.cat(outs)
