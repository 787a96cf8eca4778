"""The modality-encoder registry shared by text and tabular (expression, other omics) encoders."""

from __future__ import annotations

from typing import Any

from torch import nn

from slidefm.registry import Registry

#: name -> encoder builder. Every encoder is an ``nn.Module`` with an ``out_dim`` attribute whose
#: ``forward`` returns (B, out_dim). Tabular encoders take ``in_dim`` (number of features) at build.
MODALITY_ENCODERS = Registry("modality encoder")


def build_modality_encoder(cfg: Any, **extra: Any) -> nn.Module:
    """Build an encoder from a config (dataclass, DictConfig or dict with ``name``) plus extra kwargs."""
    return MODALITY_ENCODERS.build(cfg, **extra)
