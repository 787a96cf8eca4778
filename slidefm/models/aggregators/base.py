"""The one interface every slide aggregator implements."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from slidefm.data.batch import PackedSlides
from slidefm.registry import Registry

AGGREGATORS = Registry("aggregator")


@dataclass
class AggregatorOutput:
    slide: Tensor  # (B, dim) slide embeddings
    tokens: Tensor  # (T, dim) per-patch embeddings, aligned with the input packing


class Aggregator(nn.Module):
    """Packed slides in, slide and token embeddings out.

    Subclasses set ``in_dim`` (patch-feature width D) and ``dim`` (output width), and honour
    ``x.token_mask`` by replacing masked tokens with a learned mask embedding after the input
    projection (masked self-distillation); aggregators without token mixing may ignore it.
    """

    in_dim: int
    dim: int

    def forward(self, x: PackedSlides) -> AggregatorOutput:  # pragma: no cover - interface
        raise NotImplementedError
