"""Slide aggregators: ``build_aggregator(cfg, in_dim=D)`` over the registry."""

from __future__ import annotations

import importlib

from slidefm.models.aggregators.base import AGGREGATORS, Aggregator, AggregatorOutput

for _m in ("mean", "abmil", "transmil", "vit", "perceiver"):
    try:
        importlib.import_module(f"slidefm.models.aggregators.{_m}")
    except ModuleNotFoundError as _e:  # module not written yet in this checkout
        if _e.name != f"slidefm.models.aggregators.{_m}":
            raise


def build_aggregator(cfg, **extra) -> Aggregator:
    return AGGREGATORS.build(cfg, **extra)


__all__ = ["AGGREGATORS", "Aggregator", "AggregatorOutput", "build_aggregator"]
