"""Mean pooling, the baseline aggregator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.layers import trunc_normal_
from torch import nn

from slidefm.data.batch import PackedSlides
from slidefm.models.aggregators.base import AGGREGATORS, Aggregator, AggregatorOutput
from slidefm.models.segments import segment_index, segment_mean

__all__ = ["MeanConfig", "MeanPool"]


@dataclass
class MeanConfig:
    name: str = "mean"
    dim: int | None = field(default=None, metadata={
        "help": "width of a linear projection before pooling; None: no projection (the patch-feature width)"})


@AGGREGATORS.register("mean", config=MeanConfig)
class MeanPool(Aggregator):
    """Slide embedding = mean of the (optionally linearly projected) patch features.

    Masked tokens are replaced by a learned mask embedding after the projection, as for every
    aggregator, so a masked view pools the mask embedding in their place.
    """

    uses_positions = False

    def __init__(self, cfg: MeanConfig, *, in_dim: int):
        super().__init__()
        self.cfg = cfg
        self.in_dim = in_dim
        self.dim = in_dim if cfg.dim is None else cfg.dim
        self.proj = nn.Identity() if cfg.dim is None else nn.Linear(in_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(self.dim))
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x: PackedSlides) -> AggregatorOutput:
        h = self.proj(x.tokens)
        if x.token_mask is not None:
            h = torch.where(x.token_mask[:, None], self.mask_token.to(h.dtype), h)
        seg = segment_index(x.offsets)
        return AggregatorOutput(slide=segment_mean(h, seg, x.num_slides), tokens=h)
