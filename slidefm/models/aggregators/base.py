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

    Subclasses take their registered config dataclass and the patch-feature width:
    ``__init__(self, cfg, *, in_dim)``; they set ``in_dim`` (patch-feature width D) and ``dim`` (output
    width), and honour ``x.token_mask`` by replacing masked tokens with a learned mask embedding after
    the input projection (masked self-distillation); aggregators without token mixing may ignore it.
    ``uses_positions`` says whether ``x.positions`` matter (features-only cohorts have none):
    it defaults to True, since refusing such a cohort is safer than feeding it zeros.
    """

    in_dim: int
    dim: int
    uses_positions: bool = True
    positions_for: str | None = None  # what reads them, for the refusal message

    @classmethod
    def needs_positions(cls, cfg) -> bool:
        """Whether this aggregator reads positions under ``cfg`` (its config node); options may switch them off."""
        return cls.uses_positions

    def forward(self, x: PackedSlides) -> AggregatorOutput:  # pragma: no cover - interface
        raise NotImplementedError
