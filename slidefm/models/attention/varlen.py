"""``torch.nn.attention.varlen.varlen_attn`` (flash attention over cumulative offsets; CUDA, fp16/bf16)."""

from __future__ import annotations

import torch
from torch import Tensor

NAME = "varlen"
SUPPORTS_ALIBI = False


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return "torch varlen attention runs on CUDA only"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"torch varlen attention needs float16/bfloat16 inputs, got {dtype}"
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


def attention(q, k, v, q_offsets, kv_offsets, q_positions=None, kv_positions=None, alibi_slopes=None) -> Tensor:
    if alibi_slopes is not None:
        raise ValueError("the varlen backend has no 2-D ALiBi; use 'flex' or 'alibi_chunked'")
    from torch.nn.attention.varlen import varlen_attn

    q_lens = q_offsets[1:] - q_offsets[:-1]
    kv_lens = kv_offsets[1:] - kv_offsets[:-1]
    return varlen_attn(
        q, k, v,
        q_offsets.to(device=q.device, dtype=torch.int32),
        kv_offsets.to(device=q.device, dtype=torch.int32),
        int(q_lens.max()) if q_lens.numel() else 0,
        int(kv_lens.max()) if kv_lens.numel() else 0,
    )
