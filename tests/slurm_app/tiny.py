"""A tiny Lightning model and data for the preemption/SLURM tests (dropout + shuffled data, so an
inexact resume of RNG or data position changes the final parameters)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from slidefm.data.sampler import ResumableDataLoader, ResumableSampler


class TinyData(Dataset):
    def __init__(self, n: int = 20, dim: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, generator=g) + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return i, self.x[i], self.y[i]


class TinyModule(pl.LightningModule):
    def __init__(self, dim: int = 8, step_sleep: float = 0.0, on_step=None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
        self.step_sleep = step_sleep
        self.on_step = on_step
        self.seen: list[tuple[int, list[int]]] = []  # (global_step, sample indices)

    def training_step(self, batch, batch_idx):
        idx, x, y = batch
        self.seen.append((self.global_step, idx.tolist()))
        if self.on_step is not None:
            self.on_step(self)
        if self.step_sleep:
            time.sleep(self.step_sleep)
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_loader(n: int = 20, batch_size: int = 4, seed: int = 0) -> ResumableDataLoader:
    data = TinyData(n)
    return ResumableDataLoader(data, sampler=ResumableSampler(data, seed=seed), batch_size=batch_size)


def log_event(run_dir: Path, **event) -> None:
    """Append one JSON line to run_dir/events.jsonl (the tests read the resume history from it)."""
    event["t"] = round(time.time(), 1)
    event["pid"] = os.getpid()
    event["job"] = os.environ.get("SLURM_JOB_ID")
    event["restart"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    with open(run_dir / "events.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")
