"""2-D rotary position embedding over grid positions (x, y).

The head dimension is split into Dh/2 rotation pairs (first half of the channels paired with the
second half); the first Dh/4 pairs rotate with the x coordinate, the last Dh/4 with y, each with
the standard RoPE frequencies ``base ** (-2i / (Dh/2))``. Because q and k are rotated by their own
positions, q.k depends only on the difference of positions. Tokens without a position (NaN row or
``no_pos`` mask: CLS, registers, latents) get the identity rotation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_frequencies(head_dim: int, base: float = 10000.0) -> Tensor:
    """(Dh/4,) angular frequencies for one axis."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    return base ** (-torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim)


def rope_angles(positions: Tensor, head_dim: int, base: float = 10000.0, no_pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin, each (T, Dh/2), for float (T, 2) positions; NaN rows or ``no_pos`` -> identity."""
    pos = positions.to(torch.float32)
    missing = pos.isnan().any(-1)
    if no_pos is not None:
        missing = missing | no_pos.to(missing.device)
    pos = torch.where(missing[:, None], torch.zeros_like(pos), pos)
    f = rope_frequencies(head_dim, base).to(pos.device)
    ang = torch.cat([pos[:, :1] * f, pos[:, 1:2] * f], dim=-1)  # (T, Dh/2)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (T, H, Dh) by per-token angles (T, Dh/2); computed in float32, returned in x.dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)


__all__ = ["rope_frequencies", "rope_angles", "apply_rope"]
