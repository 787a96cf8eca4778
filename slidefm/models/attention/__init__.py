"""Packed multi-slide attention: one (T, H, Dh) + offsets interface, backends chosen at run time.

Tokens attend only within their own slide: query slide i is ``q[q_offsets[i]:q_offsets[i+1]]``
and attends to ``k/v[kv_offsets[i]:kv_offsets[i+1]]`` (kv_offsets defaults to q_offsets, i.e.
self-attention; separate offsets let latents or CLS tokens attend to patch tokens).

Backends (one module each): ``sdpa`` (per-slide SDPA loop, any device), ``alibi_chunked``
(query-chunked 2-D ALiBi, any device), ``xformers`` / ``varlen`` / ``flex`` (CUDA only, imported
lazily). ``backend="auto"`` picks: ALiBi -> flex on CUDA, else alibi_chunked; no ALiBi -> xformers,
then varlen, then sdpa on CUDA; sdpa on CPU.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from slidefm.errors import SlidefmError
from slidefm.models.attention._common import alibi_bias, alibi_slopes
from slidefm.models.attention.rope import apply_rope, rope_angles

_MODULES = {
    "sdpa": "slidefm.models.attention.sdpa",
    "alibi_chunked": "slidefm.models.attention.alibi_chunked",
    "xformers": "slidefm.models.attention.xformers_backend",
    "varlen": "slidefm.models.attention.varlen",
    "flex": "slidefm.models.attention.flex",
}
BACKENDS = tuple(_MODULES)
_AUTO_PLAIN_CUDA = ("xformers", "varlen", "sdpa")
_AUTO_ALIBI_CUDA = ("flex", "alibi_chunked")


class AttentionBackendError(SlidefmError):
    """The requested attention backend cannot run here (not installed, wrong device or dtype, no ALiBi)."""


def _module(name: str) -> ModuleType:
    if name not in _MODULES:
        raise AttentionBackendError(f"unknown attention backend '{name}'; known: auto, {', '.join(BACKENDS)}")
    return importlib.import_module(_MODULES[name])


def backend_unavailable_reason(name: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
                               alibi: bool = False) -> str | None:
    """None when ``name`` can run on ``device``/``dtype`` (with ALiBi if asked), else why not."""
    mod = _module(name)
    if alibi and not mod.SUPPORTS_ALIBI:
        return f"backend '{name}' has no 2-D ALiBi (use 'alibi_chunked' or 'flex')"
    return mod.unavailable_reason(torch.device(device), dtype)


def available_backends(device: torch.device | str, dtype: torch.dtype = torch.float32, alibi: bool = False) -> list[str]:
    return [b for b in BACKENDS if backend_unavailable_reason(b, device, dtype, alibi) is None]


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
                    alibi: bool = False) -> str:
    """Concrete backend name for ``backend`` (``"auto"`` or a name); raises if it cannot run."""
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            order = _AUTO_ALIBI_CUDA if alibi else _AUTO_PLAIN_CUDA
        else:
            order = ("alibi_chunked",) if alibi else ("sdpa",)
        for name in order:
            if backend_unavailable_reason(name, device, dtype, alibi) is None:
                return name
        raise AttentionBackendError(f"no attention backend for device={device} dtype={dtype} alibi={alibi}")
    why = backend_unavailable_reason(backend, device, dtype, alibi)
    if why is not None:
        raise AttentionBackendError(f"attention backend '{backend}' unavailable: {why}")
    return backend


def _check_offsets(offsets: Tensor, total: int, what: str) -> None:
    if offsets.ndim != 1 or offsets.numel() < 1:
        raise ValueError(f"{what} must be a 1-D (B+1,) tensor")
    o = offsets.tolist()  # one host sync; B is small
    if o[0] != 0 or o[-1] != total or any(b < a for a, b in zip(o[:-1], o[1:])):
        raise ValueError(f"{what} must be non-decreasing from 0 to {total}, got {o[:4]}...{o[-1]}")


def packed_attention(q: Tensor, k: Tensor, v: Tensor, q_offsets: Tensor, kv_offsets: Tensor | None = None, *,
                     q_positions: Tensor | None = None, kv_positions: Tensor | None = None,
                     alibi_slopes: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Softmax attention within each slide of a packed batch; returns (Tq, H, Dh).

    q (Tq, H, Dh), k/v (Tk, H, Dh), offsets (B+1,). With ``alibi_slopes`` (H,), scores get
    ``-slope_h * ||pos_q - pos_k||`` over float (T, 2) grid positions; NaN rows (CLS, registers)
    get zero bias. Scale is 1/sqrt(Dh).
    """
    if q.ndim != 3 or k.ndim != 3 or v.shape[:2] != k.shape[:2] or q.shape[1] != k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q (Tq,H,Dh), k/v (Tk,H,Dh); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    self_attn = kv_offsets is None
    kv_offsets = q_offsets if self_attn else kv_offsets
    _check_offsets(q_offsets, q.shape[0], "q_offsets")
    _check_offsets(kv_offsets, k.shape[0], "kv_offsets")
    if q_offsets.numel() != kv_offsets.numel():
        raise ValueError("q_offsets and kv_offsets must describe the same number of slides")
    if alibi_slopes is not None:
        if kv_positions is None and self_attn:
            kv_positions = q_positions
        if q_positions is None or kv_positions is None:
            raise ValueError("ALiBi needs q_positions and kv_positions (float (T, 2), NaN for no position)")
        if q_positions.shape != (q.shape[0], 2) or kv_positions.shape != (k.shape[0], 2):
            raise ValueError("positions must be (T, 2) and match q / k")
        if alibi_slopes.shape != (q.shape[1],):
            raise ValueError(f"alibi_slopes must be ({q.shape[1]},), got {tuple(alibi_slopes.shape)}")
    name = resolve_backend(backend, q.device, q.dtype, alibi=alibi_slopes is not None)
    return _module(name).attention(q, k, v, q_offsets, kv_offsets, q_positions, kv_positions, alibi_slopes)


__all__ = [
    "BACKENDS", "AttentionBackendError", "packed_attention", "resolve_backend", "available_backends",
    "backend_unavailable_reason", "alibi_slopes", "alibi_bias", "rope_angles", "apply_rope",
]
