"""Tiny Hydra app trained through hydra-submitit-launcher on SLURM (tests/test_slurm.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from slidefm.train.preemption import PreemptionCheckpoint, resume_checkpoint
from slidefm.train.slurm import check_slurm_layout, cluster_plugins
from tiny import TinyModule, log_event, make_loader

log = logging.getLogger(__name__)


@hydra.main(config_path="conf", config_name="tiny", version_base="1.3")
def main(cfg: DictConfig) -> int:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    check_slurm_layout(cfg.trainer.devices, cfg.trainer.num_nodes)
    ckpt = resume_checkpoint(run_dir)
    callback = PreemptionCheckpoint(run_dir / "checkpoints")

    def on_step(module: TinyModule) -> None:
        # The test waits for this file before it interrupts the job.
        (run_dir / "progress").write_text(str(module.global_step))

    pl.seed_everything(0)
    module = TinyModule(step_sleep=cfg.step_sleep, on_step=on_step)
    trainer = pl.Trainer(
        default_root_dir=run_dir, max_steps=cfg.trainer.max_steps, accelerator="cpu",
        devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[callback], plugins=cluster_plugins(),
    )
    start = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] if ckpt else 0
    log_event(run_dir, event="start", resume=str(ckpt) if ckpt else None, step=start)
    try:
        trainer.fit(module, make_loader(), ckpt_path=ckpt)
    except SystemExit:
        log_event(run_dir, event="preempted", step=trainer.global_step, signal=callback.preempted_by,
                  steps_run=len(module.seen))
        raise
    trainer.save_checkpoint(run_dir / "checkpoints" / "final.ckpt")
    log_event(run_dir, event="end", step=trainer.global_step, steps_run=len(module.seen))
    return trainer.global_step


if __name__ == "__main__":
    main()
