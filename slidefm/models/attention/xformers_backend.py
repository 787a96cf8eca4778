"""xformers ``memory_efficient_attention`` with a block-diagonal mask (CUDA; imported lazily)."""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

NAME = "xformers"
SUPPORTS_ALIBI = False


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return "xformers has no CPU kernels"
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install 'slidefm[gpu]')"
    return None


def attention(q, k, v, q_offsets, kv_offsets, q_positions=None, kv_positions=None, alibi_slopes=None) -> Tensor:
    if alibi_slopes is not None:
        raise ValueError("the xformers backend has no 2-D ALiBi; use 'flex' or 'alibi_chunked'")
    from xformers.ops import fmha  # lazy: importing xformers initialises CUDA extensions

    q_lens = (q_offsets[1:] - q_offsets[:-1]).tolist()
    kv_lens = (kv_offsets[1:] - kv_offsets[:-1]).tolist()
    bias = fmha.BlockDiagonalMask.from_seqlens(q_seqlen=q_lens, kv_seqlen=kv_lens)
    out = fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)
    return out[0]
