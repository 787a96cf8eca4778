"""Helpers shared by the attention backends: offsets, ALiBi slopes and 2-D distance bias."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def alibi_slopes(num_heads: int) -> Tensor:
    """Geometric per-head ALiBi slopes (Press et al.): 2^(-8/n * i) for i = 1..n.

    For head counts that are not a power of two, the slopes of the next power of two are
    interleaved in, as in the ALiBi paper, so the sequence stays monotone.
    """

    def geometric(n: int) -> list[float]:
        ratio = 2.0 ** (-8.0 / n)
        return [ratio ** (i + 1) for i in range(n)]

    if num_heads <= 0:
        raise ValueError("num_heads must be positive")
    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(p)
    if p < num_heads:
        slopes += geometric(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def split_segments(x: Tensor, offsets: Tensor) -> tuple[Tensor, ...]:
    """Per-segment views of a packed (T, ...) tensor.

    ``torch.split`` has one backward that concatenates the segment gradients; indexing
    ``x[a:b]`` per segment instead gives each slice a backward that zero-fills a full (T, ...)
    gradient, which made a batch of B slides cost O(B * T) in the backward pass.
    """
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    if sum(lengths) != x.shape[0]:
        raise ValueError(f"offsets cover {sum(lengths)} rows, the tensor has {x.shape[0]}")
    return torch.split(x, lengths)


def alibi_bias(q_pos: Tensor, k_pos: Tensor, slopes: Tensor, dtype: torch.dtype, out: Tensor | None = None,
               scratch: Tensor | None = None) -> Tensor:
    """(H, Nq, Nk) additive bias ``-slope_h * ||q_pos - k_pos||``; rows/cols with NaN positions get 0.

    Distances are accumulated per axis to keep the intermediates at (Nq, Nk), never (Nq, Nk, 2).
    ``out`` (H, Nq, Nk) of ``dtype`` and ``scratch`` (2, Nq, Nk) of the working dtype (float32, or float64
    for float64) are reused buffers: writing a fresh multi-hundred-MB bias costs more in page faults
    than in arithmetic, so inference loops over query chunks pass the same buffers every time.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32  # float32 at least, for half inputs
    qp = q_pos.to(work)
    kp = k_pos.to(work)
    shape = (qp.shape[0], kp.shape[0])
    if scratch is None:
        scratch = torch.empty((2, *shape), dtype=work, device=qp.device)
    dist, dy = scratch[0], scratch[1]
    torch.sub(qp[:, None, 0], kp[None, :, 0], out=dist).square_()
    torch.sub(qp[:, None, 1], kp[None, :, 1], out=dy).square_()
    dist.add_(dy)
    del dy
    dist.sqrt_()
    # NaN marks tokens without a position (CLS, registers): spatially neutral.
    dist.nan_to_num_(nan=0.0)
    neg = slopes.to(device=dist.device, dtype=work).neg().view(-1, 1, 1)
    if out is None:
        return (neg * dist).to(dtype)
    return torch.mul(neg, dist[None], out=out)
