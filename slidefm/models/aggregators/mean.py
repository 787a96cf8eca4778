"""Mean pooling, the baseline aggregator, and the segment (per-slide) reductions other modules share.

The segment helpers reduce a packed (T, ...) tensor over the rows of each slide given the (T,)
slide index of every row, with scatter/index ops only (no Python loop over slides).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from slidefm.data.batch import PackedSlides
from slidefm.models.aggregators.base import AGGREGATORS, Aggregator, AggregatorOutput

__all__ = ["MeanConfig", "MeanPool", "segment_index", "segment_max", "segment_mean", "segment_softmax", "segment_sum"]


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


@dataclass
class MeanConfig:
    name: str = "mean"
    dim: int | None = None  # None: no projection, dim = in_dim


@AGGREGATORS.register("mean", config=MeanConfig)
class MeanPool(Aggregator):
    """Slide embedding = mean of the (optionally linearly projected) patch features.

    Masked tokens are replaced by a learned mask embedding after the projection, as for every
    aggregator, so a masked view pools the mask embedding in their place.
    """

    def __init__(self, in_dim: int, dim: int | None = None):
        super().__init__()
        self.in_dim = in_dim
        self.dim = in_dim if dim is None else dim
        self.proj = nn.Identity() if dim is None else nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(self.dim))
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x: PackedSlides) -> AggregatorOutput:
        h = self.proj(x.tokens)
        if x.token_mask is not None:
            h = torch.where(x.token_mask[:, None], self.mask_token.to(h.dtype), h)
        seg = segment_index(x.offsets)
        return AggregatorOutput(slide=segment_mean(h, seg, x.num_slides), tokens=h)
