"""The training job behind `slidefm train`: validate the cohort, prepare tables, fit, checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from slidefm.errors import CohortError, SlidefmError
from slidefm.io_utils import atomic_path

log = logging.getLogger("slidefm.train")


def cache_dir() -> Path:
    """Shared cache (frozen report embeddings, keyed by model and text hash): $SLIDEFM_CACHE or ~/.cache/slidefm."""
    base = os.environ.get("SLIDEFM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "slidefm")
    return Path(base).expanduser()


def modality_needs(cfg) -> set[str]:
    needs = set()
    if cfg.model.report is not None:
        needs.add("report")
    if cfg.model.expression is not None:
        needs.add("expression")
    needs.update((cfg.model.omics or {}).keys())
    return needs


def text_embeddings(cfg, texts: list[str | None], cache_dir: Path) -> torch.Tensor:
    """Frozen report tower: embed each patient's report once, through the on-disk cache."""
    from slidefm.modalities import MODALITY_ENCODERS, TextEmbeddingCache

    enc = MODALITY_ENCODERS.build(cfg.model.report).eval()
    present = [t for t in texts if t]
    emb = TextEmbeddingCache(cache_dir).get_or_compute(enc, present) if present else torch.zeros(0, enc.width)
    out = torch.zeros(len(texts), emb.shape[1] if len(present) else enc.width)
    j = 0
    for i, t in enumerate(texts):
        if t:
            out[i] = emb[j]
            j += 1
    return out


def build_everything(cfg: DictConfig):
    """Cohort -> tables -> LightningModule + DataModule (no training)."""
    from slidefm.cohort import Cohort, validate_cohort
    from slidefm.data.dataset import Collate, PatientDataset
    from slidefm.data.tables import build_tables
    from slidefm.train.module import SlideFMModule
    from slidefm.data.loader import CohortDataModule

    cohort = Cohort.open(cfg.data.cohort, store=cfg.data.store)
    problems = validate_cohort(cohort).problems
    errors = [p for p in problems if p.level == "error"]
    if errors:
        raise CohortError(errors)
    for p in problems:
        log.warning(str(p))
    from slidefm.models.positions import require_positions

    require_positions(cfg, cohort)  # features-only bags: refuse position-needing options in one line
    from slidefm.train.modality_check import fit_to_cohort

    fit_to_cohort(cfg, cohort)  # towers/pairs of modalities the cohort lacks are dropped, with one line each
    tasks = list(cohort.tasks) if cfg.objectives.supervised is not None else []
    needs = modality_needs(cfg)
    tables = build_tables(cohort, cfg.data, tasks=tasks, needs=needs)
    text_pre = cfg.model.report is None or str(cfg.model.report.get("trainable", "frozen")) == "frozen"
    modality_dims = {k: int(x.shape[1]) for k, (x, _) in tables.tabular.items()}
    if cfg.model.report is not None and text_pre:
        tables.report_embeddings = text_embeddings(cfg, tables.report_texts or [], cache_dir() / "text")
        modality_dims["report"] = int(tables.report_embeddings.shape[1])
    expert_dims = {k: int(v[0].shape[1]) for k, v in tables.experts.items()}
    config = OmegaConf.to_container(cfg, resolve=True)
    classes = tables.preprocessing.get("labels", {})
    task_dicts = [{**dataclasses.asdict(t), **({"classes": classes[t.name]} if t.name in classes else {})}
                  for t in tasks]
    module = SlideFMModule(
        config, in_dim=cohort.feature_dim, modality_dims=modality_dims, preprocessing=tables.preprocessing,
        tasks=task_dicts, text_precomputed=text_pre, expert_dims=expert_dims,
    )
    if module.supervised is not None:
        # Class weights and survival bins come from training patients only.
        train_rows = tables.rows(tables.train_ids)
        module.supervised.fit({k: v[train_rows] for k, v in tables.labels.items()})
    if cfg.model.init_from:
        load_slide_encoder(module, cfg.model.init_from)
    slides_of = {p: list(cohort.slides_of(p)) for p in cohort.patient_ids}
    tokenizer = None
    if cfg.model.report is not None and not text_pre:
        tokenizer = module.model.towers["report"].tokenize
    collate = Collate(tables, tokenizer)
    # Without an objective on the slide branch, items carry only the views' crops (and read only their rows).
    slide_tokens = module.reads_slides or cfg.data.views is None
    train_ds = PatientDataset(cohort, tables.train_ids, slides_of, cfg.data, train=True, slide_tokens=slide_tokens)
    val_ds = (PatientDataset(cohort, tables.val_ids, slides_of, cfg.data, train=False, slide_tokens=slide_tokens)
              if tables.val_ids else None)
    return module, CohortDataModule(train_ds, val_ds, cfg.data, collate), cohort


def load_slide_encoder(module, path: str) -> None:
    from slidefm import checkpoint

    state = checkpoint.encoder_state(checkpoint.read(path), path)
    try:
        module.model.aggregator.load_state_dict(state)
    except RuntimeError as e:
        raise SlidefmError(f"slide encoder in {path} does not match model.aggregator: {e}") from e
    if module.distillation is not None:
        module.distillation.reset_teacher(module.model.aggregator)


def log_allocator() -> str:
    """Say which malloc this CPU run uses: glibc's makes long CPU runs slower step by step (slidefm.allocator)."""
    from slidefm.allocator import ENV, active, find_jemalloc

    name = active()
    if name == "jemalloc":
        log.info("allocator: jemalloc (%s=system turns it off)", ENV)
    elif name == "glibc":
        log.info("allocator: glibc malloc with slidefm's GLIBC_TUNABLES (steady step times; jemalloc needs about "
                 "half the memory: apt install libjemalloc2)")
    elif not sys.platform.startswith("linux") or os.environ.get(ENV, "").strip().lower() == "system":
        pass
    elif lib := find_jemalloc():
        log.info("allocator: glibc malloc, which slows long CPU runs down step by step; jemalloc is installed but "
                 "only the `slidefm train` command preloads it (elsewhere: LD_PRELOAD=%s)", lib)
    else:
        log.info("allocator: glibc malloc, which slows long CPU runs down step by step; the `slidefm train` command "
                 "sets GLIBC_TUNABLES against that, or uses jemalloc when installed (apt install libjemalloc2)")
    return name


def make_trainer(cfg: DictConfig, run_dir: Path):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from slidefm.train.checkpoint_io import AtomicCheckpointIO, FinalCheckpoint
    from slidefm.train.memory import memory_callbacks
    from slidefm.train.preemption import PreemptionCheckpoint
    from slidefm.train.progress import StepProgressBar
    from slidefm.train.slurm import check_slurm_layout, cluster_plugins

    t = cfg.trainer
    check_slurm_layout(t.devices, t.num_nodes)
    accel = t.accelerator
    on_gpu = accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())
    precision = t.precision or ("bf16-mixed" if on_gpu else "32-true")
    if not on_gpu:
        log_allocator()
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", save_last=True, save_top_k=0,
                        every_n_train_steps=t.checkpoint_every_n_steps, auto_insert_metric_name=False),
        PreemptionCheckpoint(ckpt_dir),
        FinalCheckpoint(ckpt_dir / "last.ckpt"),
        LearningRateMonitor(logging_interval="step"),
        *([StepProgressBar()] if t.progress_bar else []),
        *memory_callbacks(),  # opt-in glibc heap settings (SLIDEFM_MALLOC_TUNING=1; slidefm.train.memory)
    ]
    val_kw = {"val_check_interval": t.val_every_n_steps, "check_val_every_n_epoch": None} if t.val_every_n_steps else {}
    return pl.Trainer(
        default_root_dir=str(run_dir), max_steps=t.max_steps, accelerator=accel, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy, precision=precision, gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches, log_every_n_steps=t.log_every_n_steps,
        logger=CSVLogger(str(run_dir), name="logs", version=""), callbacks=callbacks, deterministic=t.deterministic,
        enable_progress_bar=t.progress_bar, plugins=[*cluster_plugins(), AtomicCheckpointIO()], num_sanity_val_steps=0,
        **val_kw,
    )


def stash_metrics(log_dir: Path) -> None:
    """Keep the metrics of earlier runs of this directory: Lightning's CSV logger overwrites metrics.csv."""
    current = log_dir / "metrics.csv"
    if current.exists():
        k = len(list(log_dir.glob("metrics.part*.csv")))
        os.replace(current, log_dir / f"metrics.part{k:03d}.csv")


def merge_metrics(log_dir: Path) -> None:
    """One metrics.csv over all runs of a resumed training; a later run supersedes the steps it repeated."""
    import pandas as pd

    parts = sorted(log_dir.glob("metrics.part*.csv"))
    if not parts:
        return
    frames = [pd.read_csv(p) for p in parts]
    if (log_dir / "metrics.csv").exists():
        frames.append(pd.read_csv(log_dir / "metrics.csv"))
    merged = frames[0]
    for f in frames[1:]:
        if len(f) and "step" in f:
            merged = merged[merged["step"] < f["step"].min()]
        merged = pd.concat([merged, f], ignore_index=True)
    with atomic_path(log_dir / "metrics.csv") as tmp:
        merged.to_csv(tmp, index=False)
    for p in parts:
        p.unlink()


def train(cfg: DictConfig) -> dict:
    import pytorch_lightning as pl

    from slidefm.checkpoint import check_resume_settings, resume_checkpoint
    from slidefm.config import resumable_keys

    run_dir = Path(cfg.run_dir).resolve()
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    module, datamodule, _ = build_everything(cfg)  # validates the cohort before anything is written
    # (after build_everything: the run's config.yaml holds the settings as fitted to the cohort, compared alike)
    check_resume_settings(run_dir, OmegaConf.to_container(cfg, resolve=True), resumable_keys())
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    trainer = make_trainer(cfg, run_dir)
    ckpt = resume_checkpoint(run_dir)
    if ckpt:
        log.info("resuming from %s", ckpt)
        if trainer.is_global_zero:
            stash_metrics(run_dir / "logs")
    # AtomicCheckpointIO reads with weights_only=True in any case; saying so keeps Lightning's own default out.
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    if trainer.is_global_zero:
        merge_metrics(run_dir / "logs")
    last = run_dir / "checkpoints" / "last.ckpt"
    preempted = any(getattr(cb, "preempted_by", 0) for cb in trainer.callbacks)
    if preempted:
        # last.ckpt was written at the step boundary after the signal; the job is requeued.
        return {"run_dir": str(run_dir), "checkpoint": str(last), "global_step": trainer.global_step,
                "preempted": True}
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    return {"run_dir": str(run_dir), "checkpoint": str(last), "global_step": trainer.global_step, **metrics}
