"""Per-slide normalisation of patch features in front of any aggregator.

Scanner, stain and site effects move every patch embedding of a slide coherently; subtracting the
slide's mean feature (``center``), and optionally dividing by its per-dimension spread
(``standardize``), removes that shared shift so the aggregator sees how patches differ from their
own slide. It is part of the aggregator, so the EMA teacher, export and ``embed_slide`` apply it too.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from slidefm.data.batch import PackedSlides
from slidefm.errors import OptionError
from slidefm.models.aggregators.base import Aggregator, AggregatorOutput
from slidefm.models.segments import segment_index, segment_mean

#: ``model.input_norm``: the allowed values, declared here once (slidefm.config.ModelConfig uses this type).
InputNorm = Literal["none", "center", "standardize"]


class SlideInputNorm(Aggregator):
    def __init__(self, inner: Aggregator, mode: str, eps: float = 1e-6):
        super().__init__()
        if mode not in get_args(InputNorm)[1:]:  # "none" means no wrapper at all
            raise OptionError(f"input_norm must be one of {', '.join(map(repr, get_args(InputNorm)))}, got {mode!r}")
        self.inner = inner
        self.mode = mode
        self.eps = eps
        self.in_dim = inner.in_dim
        self.dim = inner.dim

    def forward(self, x: PackedSlides) -> AggregatorOutput:
        seg = segment_index(x.offsets)
        n = x.num_slides
        t = x.tokens - segment_mean(x.tokens, seg, n)[seg]
        if self.mode == "standardize":
            t = t * torch.rsqrt(segment_mean(t * t, seg, n) + self.eps)[seg]
        return self.inner(PackedSlides(t, x.positions, x.offsets, x.token_mask, x.slide_ids))
