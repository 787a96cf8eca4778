"""LightningModule composing the model with any weighted set of objectives."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch

from slidefm import checkpoint as checkpoints
from slidefm.data.types import Batch
from slidefm.models.blocks import set_grad_checkpointing
from slidefm.models.model import SlideFM
from slidefm.train.optim import build_optimizer
from slidefm.train.rankme import rankme


class SlideFMModule(pl.LightningModule):
    """Pretraining (contrastive, masked self-distillation, expert distillation) and the patient stage
    (case transformer with multi-task supervision) in one module: the objectives present in the
    config decide which branches run."""

    def __init__(self, config: dict, in_dim: int, modality_dims: dict[str, int] | None = None,
                 preprocessing: dict | None = None, tasks: list[dict] | None = None,
                 text_precomputed: bool = True, expert_dims: dict[str, int] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = cfg = checkpoints.to_config(config)
        self.model = SlideFM(cfg.model, in_dim, modality_dims, text_precomputed=text_precomputed,
                             preprocessing=preprocessing)
        if cfg.trainer.grad_checkpointing:
            # Blocks recompute activations in backward only while training with grad enabled:
            # validation, export and the EMA teacher (no grad) run as before.
            set_grad_checkpointing(self.model, True)
        from slidefm.objectives import OBJECTIVES

        obj = cfg.objectives
        self.contrastive = OBJECTIVES.build(obj.contrastive) if obj.contrastive else None
        self.distillation = (
            OBJECTIVES.build(obj.distillation, student=self.model.aggregator) if obj.distillation else None
        )
        self.supervised = (
            OBJECTIVES.build(obj.supervised, dim=self.model.dim, tasks=tasks or []) if obj.supervised else None
        )
        self.expert = (
            OBJECTIVES.build(obj.expert, dim=self.model.dim, expert_dims=expert_dims or {}) if obj.expert else None
        )
        if cfg.model.freeze_slide_encoder:
            for p in self.model.aggregator.parameters():
                p.requires_grad_(False)
        self.preprocessing = preprocessing or {}
        self._rank_buf: list[torch.Tensor] = []
        self._val_emb: list[torch.Tensor] = []
        self._t_last: float | None = None

    @property
    def reads_slides(self) -> bool:
        """Whether a step encodes ``batch.slides`` (the slide branch); when not, the data pipeline
        leaves the slide tokens out and reads only the views' rows (PatientDataset(slide_tokens=...))."""
        return self.contrastive is not None or self.supervised is not None or self.expert is not None

    # -- steps ---------------------------------------------------------------------------------
    def _weight(self, name: str) -> float:
        obj = getattr(self, name)
        return float(obj.cfg.weight) if obj is not None else 0.0

    def _losses(self, batch: Batch, train: bool) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None]:
        terms: dict[str, torch.Tensor] = {}
        logs: dict[str, float] = {}
        patient_z = None
        seen = None  # slide embeddings for model.learned_pcs' running statistics
        if self.distillation is not None and batch.views is not None:
            out = self.distillation(self.model.aggregator, batch.views, step=self.global_step)
            seen = out.get("teacher_slide")
            terms["distillation"] = out["loss"]
            logs.update({f"distillation/{k}": float(v) for k, v in out.items() if k != "loss" and _scalar(v)})
        if self.reads_slides:
            agg = self.model.encode_slides(batch.slides)
            seen = agg.slide  # whole slides, as export encodes them
            patient = self.model.encode_patients(agg.slide, batch.patient_offsets)
            patient_z = self.model.project_patients(patient)
            if self.contrastive is not None:
                emb = {"slide": patient_z}
                present = {"slide": torch.ones(len(patient_z), dtype=torch.bool, device=patient_z.device)}
                for name, m in batch.modalities.items():
                    if name in self.model.towers:
                        emb[name] = self.model.encode_modality(name, m)
                        present[name] = m.present
                out = self.contrastive(emb, present)
                terms["contrastive"] = out["loss"]
                logs.update({f"contrastive/{k}": float(v) for k, v in out.items() if k != "loss" and _scalar(v)})
            if self.supervised is not None:
                out = self.supervised(patient, batch.labels)
                terms["supervised"] = out["loss"]
                logs.update({f"supervised/{k}": float(v) for k, v in out.items() if k != "loss" and _scalar(v)})
            if self.expert is not None and batch.experts:
                out = self.expert(agg.slide, {k: m.data for k, m in batch.experts.items()},
                                  {k: m.present for k, m in batch.experts.items()})
                terms["expert"] = out["loss"]
                logs.update({f"expert/{k}": float(v) for k, v in out.items() if k != "loss" and _scalar(v)})
        if not terms:
            raise RuntimeError("no objective produced a loss: check objectives.* and data.views in the config")
        if train and seen is not None and self.model.learned_pcs is not None:
            self.model.learned_pcs.update(seen)
        total = sum(self._weight(k) * v for k, v in terms.items())
        logs.update({f"{k}/loss": float(v.detach()) for k, v in terms.items()})
        return total, logs, patient_z

    def training_step(self, batch: Batch, batch_idx: int):
        loss, logs, z = self._losses(batch, train=True)
        bs = batch.num_patients
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in logs.items():
            self.log(f"train/{k}", v, batch_size=bs)
        now = time.perf_counter()
        if self._t_last is not None:
            dt = max(now - self._t_last, 1e-9)
            self.log("train/slides_per_s", batch.slides.num_slides / dt, batch_size=bs)
            self.log("train/tokens_per_s", batch_tokens(batch) / dt, batch_size=bs)
        self._t_last = now
        if z is not None:
            self._rank_buf.append(z.detach().float().cpu())
            n = sum(len(b) for b in self._rank_buf)
            if n >= 64:
                self.log("train/rankme", rankme(torch.cat(self._rank_buf)), batch_size=bs)
                self._rank_buf = []
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # The EMA teacher follows every optimizer step here, before any callback's
        # on_train_batch_end: a checkpoint saved at a step boundary then holds a teacher that has
        # seen that step, and resuming from it reproduces the uninterrupted run.
        if self.distillation is not None:
            self.distillation.update_teacher(self.distillation.momentum(self.global_step, self._total_steps()))

    def validation_step(self, batch: Batch, batch_idx: int):
        loss, logs, z = self._losses(batch, train=False)
        bs = batch.num_patients
        self.log("val/loss", loss, batch_size=bs, sync_dist=True)
        for k, v in logs.items():
            self.log(f"val/{k}", v, batch_size=bs, sync_dist=True)
        if z is not None:
            self._val_emb.append(z.detach().float().cpu())

    def on_validation_epoch_end(self):
        if self._val_emb:
            self.log("val/rankme", rankme(torch.cat(self._val_emb)))
        self._val_emb = []

    # -- optimisation --------------------------------------------------------------------------
    def _total_steps(self) -> int:
        return int(self.cfg.optim.total_steps or self.cfg.trainer.max_steps)

    def configure_optimizers(self):
        opt, sched = build_optimizer(self, self.cfg.optim, self._total_steps())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[checkpoints.SECTION] = checkpoints.metadata(
            self.cfg, in_dim=self.hparams["in_dim"], modality_dims=self.hparams.get("modality_dims"),
            preprocessing=self.preprocessing, tasks=self.hparams.get("tasks"))


def batch_tokens(batch: Batch) -> int:
    """Tokens a training step encodes: the slide branch's plus every student view's."""
    n = int(batch.slides.tokens.shape[0])
    if batch.views is not None:
        n += int(batch.views.global_views.tokens.shape[0])
        if batch.views.local_views is not None:
            n += int(batch.views.local_views.tokens.shape[0])
    return n


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)
