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
from slidefm.models.aggregators.input_norm import InputNorm
from slidefm.models.case import SlidePooling
from slidefm.registry import omegaconf_schema


@dataclass
class OptimConfig:
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms/biases/tokens)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps"})
    min_lr_ratio: float = field(default=0.01, metadata={"help": "final lr as a fraction of the peak"})
    total_steps: Optional[int] = field(default=None, metadata={
        "help": "schedule length (default: trainer.max_steps)", "resume": True})


@dataclass
class ModelConfig:
    aggregator: Any = field(default=MISSING, metadata={"help": "slide aggregator (group model/aggregator)"})
    case: Any = field(default=None, metadata={
        "help": "patient (case) transformer over a patient's slides (group model/case); null: patient_pool"})
    report: Any = field(default=None, metadata={"help": "report-text encoder (group model/report)"})
    expression: Any = field(default=None, metadata={"help": "expression encoder (group model/expression)"})
    omics: Any = field(default_factory=dict, metadata={
        "help": "name -> tabular encoder config, for the other omics tables of cohort.yaml"})
    input_norm: InputNorm = field(default="none", metadata={
        "help": "per-slide feature normalisation before the aggregator: none, subtract the slide's mean feature, "
                "or also divide by its per-dimension spread"})
    mean_path: bool = field(default=False, metadata={
        "help": "exported slide/patient embeddings end with the slide's mean input feature (mean pooling), so a "
                "probe can always recover the mean-pooling baseline; training objectives never see it"})
    learned_pcs: int = field(default=0, metadata={
        "help": "export the learned part as its top-k principal components (running statistics of the slide "
                "embeddings seen in training, kept in the checkpoint); 0: all of the aggregator's columns"})
    embed_dim: int = field(default=256, metadata={"help": "shared embedding width of the contrastive space"})
    patient_pool: SlidePooling = field(default="mean", metadata={
        "help": "slide->patient pooling without a case model: mean or max over the patient's slides"})
    init_from: Optional[str] = field(default=None, metadata={"help": "checkpoint whose slide encoder initialises this one"})
    freeze_slide_encoder: bool = field(default=False, metadata={"help": "train only the patient stage and heads"})


@dataclass
class ObjectivesConfig:
    contrastive: Any = field(default=None, metadata={"help": "patient-level InfoNCE between modalities (group)"})
    distillation: Any = field(default=None, metadata={"help": "masked self-distillation on grid crops (group)"})
    supervised: Any = field(default=None, metadata={"help": "multi-task classification + survival heads (group)"})
    expert: Any = field(default=None, metadata={"help": "regression onto expert slide embeddings (group)"})


@dataclass
class TrainerConfig:
    max_steps: int = field(default=200, metadata={"help": "optimizer steps", "resume": True})
    accelerator: str = field(default="auto", metadata={
        "help": "auto | cpu | gpu (Lightning accelerator)", "resume": True})
    devices: Any = field(default=1, metadata={"help": "devices per node (int, list of ids or 'auto')", "resume": True})
    num_nodes: int = field(default=1, metadata={"help": "nodes (multi-node DDP, e.g. on SLURM)", "resume": True})
    strategy: str = field(default="auto", metadata={"help": "Lightning strategy: auto | ddp | ...", "resume": True})
    precision: Optional[str] = field(default=None, metadata={
        "help": "None: 32 on CPU, bf16-mixed on GPU", "resume": True})
    gradient_clip_val: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    accumulate_grad_batches: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    log_every_n_steps: int = field(default=5, metadata={"help": "metrics.csv logging interval", "resume": True})
    val_every_n_steps: Optional[int] = field(default=None, metadata={
        "help": "validation interval (default: end)", "resume": True})
    checkpoint_every_n_steps: int = field(default=25, metadata={
        "help": "periodic last.ckpt for resume", "resume": True})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "recompute transformer-block activations in backward (ViT, TransMIL, Perceiver, case transformer): "
                "less activation memory for one more forward pass per block; same gradients", "resume": True})
    deterministic: bool = field(default=False, metadata={"help": "deterministic algorithms (slower)"})
    progress_bar: bool = field(default=True, metadata={"help": "show a progress bar over steps", "resume": True})
    seed: int = field(default=0, metadata={"help": "seed of model initialisation and training randomness"})


@dataclass
class TrainConfig:
    recipe: str = field(default="custom", metadata={"help": "name of the recipe this config came from"})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run_dir: str = field(default="${hydra:runtime.output_dir}", metadata={
        "help": "where checkpoints/ goes", "resume": True})
    tags: List[str] = field(default_factory=list, metadata={
        "help": "free-form labels recorded in the run config", "resume": True})


def resumable_keys() -> frozenset[str]:
    """Options a resumed run may change (paths, data loading, length, hardware, logging): the fields declared
    with ``metadata={"resume": True}`` (``slidefm.checkpoint.check_resume_settings`` refuses any other change;
    ``slidefm train --help`` marks them). Walks the run config's nested dataclasses and the aggregators'
    configs, the one component group with such options (tests/test_config_docs.py checks none is missed)."""
    import dataclasses

    from slidefm.models.aggregators import AGGREGATORS

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            if f.metadata.get("resume"):
                yield prefix + f.name
            factory = f.default_factory
            if isinstance(factory, type) and dataclasses.is_dataclass(factory):  # a nested config node
                yield from walk(factory, f"{prefix}{f.name}.")

    keys = set(walk(TrainConfig, ""))
    for cls in AGGREGATORS.configs().values():
        keys.update(walk(cls, "model.aggregator."))
    return frozenset(keys)


_registered = False


def register_configs() -> None:
    """Put the schema and every registered component's config into Hydra's ConfigStore."""
    global _registered
    if _registered:
        return
    from slidefm.data.views import ViewConfig
    from slidefm.modalities import MODALITY_ENCODERS
    from slidefm.models.aggregators import AGGREGATORS
    from slidefm.models.case import CASE_MODELS
    from slidefm.objectives import OBJECTIVES

    # Runs started in the same second must not share a directory.
    OmegaConf.register_new_resolver("slidefm_uid", lambda: uuid.uuid4().hex[:6], use_cache=True, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=omegaconf_schema(TrainConfig))
    for name, cls in AGGREGATORS.configs().items():
        cs.store(group="model/aggregator", name=name, node=omegaconf_schema(cls))
    for name, cls in CASE_MODELS.configs().items():
        cs.store(group="model/case", name=name, node=omegaconf_schema(cls))
    for name, cls in MODALITY_ENCODERS.configs().items():
        group = "model/report" if name == "text" else "model/expression"
        cs.store(group=group, name=name, node=omegaconf_schema(cls))
    for name, cls in OBJECTIVES.configs().items():
        cs.store(group=f"objectives/{name}", name="default", node=omegaconf_schema(cls))
    cs.store(group="data/views", name="default", node=omegaconf_schema(ViewConfig))
    _registered = True


def _walk(node, prefix: str = ""):
    """(dotted key, parent node, key) of every entry of a DictConfig, without resolving interpolations."""
    from omegaconf import DictConfig

    for key in node.keys():
        full = f"{prefix}{key}"
        yield full, node, key
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from _walk(child, full + ".")


def unknown_keys(cfg) -> list[str]:
    """Keys of a composed config that its typed schema does not declare (e.g. added with Hydra's ``+key=``)."""
    import dataclasses

    from omegaconf import DictConfig

    out = []
    for full, parent, key in _walk(cfg):
        schema = OmegaConf.get_type(parent)
        if isinstance(parent, DictConfig) and dataclasses.is_dataclass(schema):
            if key not in {f.name for f in dataclasses.fields(schema)}:
                out.append(full)
    return out


def missing_keys(cfg) -> list[str]:
    """Required options (``???``) still unset in a composed config."""
    return [full for full, parent, key in _walk(cfg) if OmegaConf.is_missing(parent, key)]


def all_keys(cfg) -> list[str]:
    """Every dotted key of a composed config (for "did you mean" suggestions)."""
    return [full for full, _, _ in _walk(cfg)]
