"""FlexAttention (CUDA): block-diagonal ``mask_mod`` plus 2-D ALiBi as a ``score_mod``.

The distance bias is computed inside the fused kernel from the (T, 2) positions, so no bias
tensor is ever materialised. Imported and compiled lazily; FlexAttention has no CPU backward,
so it is offered on CUDA only.
"""

from __future__ import annotations

import torch
from torch import Tensor

NAME = "flex"
SUPPORTS_ALIBI = True
_COMPILED = None


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return "FlexAttention is offered on CUDA only (no CPU backward)"
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FlexAttention"
    return None


def _flex():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=True)
    return _COMPILED


def _segment_ids(offsets: Tensor, device: torch.device) -> Tensor:
    lens = (offsets[1:] - offsets[:-1]).to(device)
    return torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens)


def attention(q, k, v, q_offsets, kv_offsets, q_positions=None, kv_positions=None, alibi_slopes=None) -> Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    dev = q.device
    q_seg, kv_seg = _segment_ids(q_offsets, dev), _segment_ids(kv_offsets, dev)

    def same_slide(b, h, qi, ki):
        return q_seg[qi] == kv_seg[ki]

    block_mask = create_block_mask(same_slide, None, None, q.shape[0], k.shape[0], device=dev)
    score_mod = None
    if alibi_slopes is not None:
        qp, kp = q_positions.to(dev, torch.float32), kv_positions.to(dev, torch.float32)
        q_has, kv_has = ~qp.isnan().any(-1), ~kp.isnan().any(-1)
        qp, kp = qp.nan_to_num(0.0), kp.nan_to_num(0.0)
        slopes = alibi_slopes.to(dev, torch.float32)

        def score_mod(score, b, h, qi, ki):
            dx = qp[qi, 0] - kp[ki, 0]
            dy = qp[qi, 1] - kp[ki, 1]
            dist = torch.where(q_has[qi] & kv_has[ki], torch.sqrt(dx * dx + dy * dy), 0.0)
            return score - slopes[h] * dist

    out = _flex()(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                  score_mod=score_mod, block_mask=block_mask)
    return out[0].transpose(0, 1)
