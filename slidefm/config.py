"""Structured configs for `slidefm train`: the single source of truth for every training option.

Component options live in the dataclasses registered with each component (aggregators,
modality encoders, objectives, views, case transformer); this module assembles them into
Hydra's ConfigStore so that the YAML recipes in ``slidefm.recipes`` and every command-line
override are type-checked before anything runs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from slidefm.data.config import DataConfig


@dataclass
class OptimConfig:
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms/biases/tokens)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps"})
    min_lr_ratio: float = field(default=0.01, metadata={"help": "final lr as a fraction of the peak"})
    total_steps: Optional[int] = field(default=None, metadata={"help": "schedule length (default: trainer.max_steps)"})


@dataclass
class ModelConfig:
    aggregator: Any = MISSING  # group model/aggregator: one of the registered aggregators
    case: Any = None  # group model/case: a patient (case) transformer over a patient's slides
    report: Any = None  # group model/report: text encoder for reports
    expression: Any = None  # group model/expression: tabular encoder for expression
    omics: Any = field(default_factory=dict)  # name -> tabular encoder config, for cohort.yaml omics
    input_norm: str = field(
        default="none", metadata={"help": "per-slide feature normalisation before the aggregator: none | center | standardize"}
    )
    embed_dim: int = field(default=256, metadata={"help": "shared embedding width of the contrastive space"})
    patient_pool: str = field(default="mean", metadata={"help": "slide->patient pooling without a case model"})
    init_from: Optional[str] = field(default=None, metadata={"help": "checkpoint whose slide encoder initialises this one"})
    freeze_slide_encoder: bool = field(default=False, metadata={"help": "train only the patient stage and heads"})


@dataclass
class ObjectivesConfig:
    contrastive: Any = None
    distillation: Any = None
    supervised: Any = None
    expert: Any = None


@dataclass
class TrainerConfig:
    max_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Optional[str] = field(default=None, metadata={"help": "None: 32 on CPU, bf16-mixed on GPU"})
    gradient_clip_val: float = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 5
    val_every_n_steps: Optional[int] = field(default=None, metadata={"help": "validation interval (default: end)"})
    checkpoint_every_n_steps: int = field(default=25, metadata={"help": "periodic last.ckpt for resume"})
    grad_checkpointing: bool = False
    deterministic: bool = False
    progress_bar: bool = True
    seed: int = 0


@dataclass
class TrainConfig:
    recipe: str = field(default="custom", metadata={"help": "name of the recipe this config came from"})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run_dir: str = field(default="${hydra:runtime.output_dir}", metadata={"help": "where checkpoints/ goes"})
    tags: List[str] = field(default_factory=list)


_registered = False


def register_configs() -> None:
    """Put the schema and every registered component's config into Hydra's ConfigStore."""
    global _registered
    if _registered:
        return
    from slidefm.data.views import ViewConfig
    from slidefm.modalities import MODALITY_ENCODERS
    from slidefm.models.aggregators import AGGREGATORS
    from slidefm.models.case import CaseConfig
    from slidefm.objectives import OBJECTIVES

    # Runs started in the same second must not share a directory.
    OmegaConf.register_new_resolver("slidefm_uid", lambda: uuid.uuid4().hex[:6], use_cache=True, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, cls in AGGREGATORS.configs().items():
        cs.store(group="model/aggregator", name=name, node=cls)
    cs.store(group="model/case", name="transformer", node=CaseConfig)
    for name, cls in MODALITY_ENCODERS.configs().items():
        group = "model/report" if name == "text" else "model/expression"
        cs.store(group=group, name=name, node=cls)
    for name, cls in OBJECTIVES.configs().items():
        cs.store(group=f"objectives/{name}", name="default", node=cls)
    cs.store(group="data/views", name="default", node=ViewConfig)
    _registered = True
