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


def pair_distance(q_pos: Tensor, k_pos: Tensor, out: Tensor | None = None, scratch: Tensor | None = None) -> Tensor:
    """(Nq, Nk) Euclidean grid distance in the working dtype (float32, or float64 for float64 positions).

    Rows/cols with NaN positions (CLS, registers) get 0: spatially neutral. Accumulated per axis so the
    intermediates stay (Nq, Nk), never (Nq, Nk, 2); ``out``/``scratch`` are reusable (Nq, Nk) buffers.
    """
    work = torch.float64 if q_pos.dtype == torch.float64 else torch.float32
    qp, kp = q_pos.to(work), k_pos.to(work)
    shape = (qp.shape[0], kp.shape[0])
    dist = torch.empty(shape, dtype=work, device=qp.device) if out is None else out
    dy = torch.empty_like(dist) if scratch is None else scratch
    torch.sub(qp[:, None, 0], kp[None, :, 0], out=dist).square_()
    torch.sub(qp[:, None, 1], kp[None, :, 1], out=dy).square_()
    return dist.add_(dy).sqrt_().nan_to_num_(nan=0.0)


def alibi_bias(q_pos: Tensor, k_pos: Tensor, slopes: Tensor, dtype: torch.dtype, out: Tensor | None = None,
               scratch: Tensor | None = None) -> Tensor:
    """(H, Nq, Nk) additive bias ``-slope_h * ||q_pos - k_pos||``; rows/cols with NaN positions get 0.

    ``out`` (H, Nq, Nk) of ``dtype`` and ``scratch`` (2, Nq, Nk) of the working dtype (float32, or float64
    for float64) are reused buffers: writing a fresh multi-hundred-MB bias costs more in page faults
    than in arithmetic, so loops over query chunks pass the same buffers every time.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32  # float32 at least, for half inputs
    if scratch is None:
        scratch = torch.empty((2, q_pos.shape[0], k_pos.shape[0]), dtype=work, device=q_pos.device)
    dist = pair_distance(q_pos.to(work), k_pos.to(work), out=scratch[0], scratch=scratch[1])
    neg = slopes.to(device=dist.device, dtype=work).neg().view(-1, 1, 1)
    if out is None:
        return (neg * dist).to(dtype)
    return torch.mul(neg, dist[None], out=out)
