"""Training objectives and their registry.

``OBJECTIVES.build(cfg, **extra)`` builds one objective from its config dataclass; the names
match the fields of ``slidefm.config.ObjectivesConfig``. Extras passed by the training module:
``distillation`` (student aggregator), ``supervised`` (dim, tasks), ``expert`` (dim, expert_dims).
Every config has a ``weight`` that the training module applies (``objective.cfg.weight``).
"""

from __future__ import annotations

from slidefm.registry import Registry
from slidefm.objectives.contrastive import ContrastiveConfig, MultiModalContrastive
from slidefm.objectives.distillation import (
    DINOHead,
    DINOLoss,
    DistillationConfig,
    IBOTPatchLoss,
    KoLeoLoss,
    MaskedSelfDistillation,
    cosine_schedule,
    ema_update,
    sinkhorn_knopp,
)
from slidefm.objectives.expert import ExpertConfig, ExpertDistillation
from slidefm.objectives.supervised import (
    MultiTaskLoss,
    SupervisedConfig,
    SupervisedTask,
    balanced_class_weights,
    build_supervised,
)
from slidefm.objectives.survival import DiscreteTimeSurvival, cox_ph_loss, quantile_cuts

OBJECTIVES = Registry("objective")
OBJECTIVES.register("contrastive", config=ContrastiveConfig)(MultiModalContrastive)
OBJECTIVES.register("distillation", config=DistillationConfig)(MaskedSelfDistillation)
OBJECTIVES.register("supervised", config=SupervisedConfig)(build_supervised)
OBJECTIVES.register("expert", config=ExpertConfig)(ExpertDistillation)

__all__ = [
    "OBJECTIVES",
    "ContrastiveConfig",
    "DINOHead",
    "DINOLoss",
    "DiscreteTimeSurvival",
    "DistillationConfig",
    "ExpertConfig",
    "ExpertDistillation",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "MaskedSelfDistillation",
    "MultiModalContrastive",
    "MultiTaskLoss",
    "SupervisedConfig",
    "SupervisedTask",
    "balanced_class_weights",
    "cosine_schedule",
    "cox_ph_loss",
    "ema_update",
    "quantile_cuts",
    "sinkhorn_knopp",
]
