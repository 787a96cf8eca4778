"""xformers ``memory_efficient_attention`` with a block-diagonal mask (CUDA; imported lazily)."""

from __future__ import annotations

import functools
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
    return _probe(str(device), dtype)


@functools.lru_cache(maxsize=None)
def _probe(device: str, dtype: torch.dtype) -> str | None:
    """Why xformers cannot run a packed forward and backward here, or None. An install built for another torch
    or CUDA imports without complaint but has no kernels ("No operator found"); ``auto`` must then pass it by.
    The first call comes from inside a forward (maybe under no_grad, inference mode or autocast): the probe sets
    its own grad and autocast state."""
    try:
        from xformers.ops import fmha

        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
            q = torch.randn(1, 8, 2, 64, device=device, dtype=dtype, requires_grad=True)
            bias = fmha.BlockDiagonalMask.from_seqlens(q_seqlen=[3, 5], kv_seqlen=[3, 5])
            fmha.memory_efficient_attention(q, q, q, attn_bias=bias).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means: not usable here
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return f"xformers is installed but cannot run here ({type(e).__name__}: {first})"
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
