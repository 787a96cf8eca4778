"""Per-slide (segment) reductions over packed tensors, with scatter/index ops only (no loop over slides).

Rows of a packed (T, ...) tensor belong to segments given by (B+1,) offsets; ``segment_index`` maps
each row to its segment, the others reduce per segment.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["segment_index", "segment_max", "segment_mean", "segment_softmax", "segment_sum"]


def segment_index(offsets: Tensor) -> Tensor:
    """(T,) segment id of every row for (B+1,) offsets."""
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths)


def segment_sum(x: Tensor, seg: Tensor, n: int) -> Tensor:
    """(n, ...) sums of the rows of ``x`` (T, ...) per segment."""
    return x.new_zeros((n, *x.shape[1:])).index_add_(0, seg, x)


def segment_mean(x: Tensor, seg: Tensor, n: int) -> Tensor:
    """(n, ...) means per segment; empty segments give zeros."""
    counts = torch.bincount(seg, minlength=n).clamp_min(1).to(x.dtype)
    return segment_sum(x, seg, n) / counts.view(-1, *([1] * (x.dim() - 1)))


def segment_max(x: Tensor, seg: Tensor, n: int) -> Tensor:
    """(n, ...) elementwise max per segment; empty segments give zeros."""
    idx = seg.view(-1, *([1] * (x.dim() - 1))).expand_as(x)
    out = x.new_zeros((n, *x.shape[1:]))
    return out.scatter_reduce(0, idx, x, reduce="amax", include_self=False)


def segment_softmax(scores: Tensor, seg: Tensor, n: int) -> Tensor:
    """Softmax of ``scores`` (T, ...) over the rows of each segment, independently per trailing index."""
    # Subtracting the per-segment max keeps exp() finite; it is a constant within the segment.
    m = segment_max(scores.detach(), seg, n)
    e = torch.exp(scores - m[seg])
    return e / segment_sum(e, seg, n)[seg]
