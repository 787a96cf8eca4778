"""Training DataLoaders: resumable, rank-aware sampling with per-item seeds."""

from __future__ import annotations

from typing import Callable, Iterator

import pytorch_lightning as pl
import torch

from slidefm.data.config import DataConfig
from slidefm.data.dataset import item_seed
from slidefm.data.sampler import ResumableDataLoader, ResumableSampler, read_ahead


class KeyedSampler(ResumableSampler):
    """Yields ``(index, seed)`` so an item's crops and draws depend only on (data seed, epoch, index),
    whichever worker loads it and whether or not the run was resumed. ``hint``/``read_ahead``: each key
    is announced that many keys early (:func:`slidefm.data.sampler.read_ahead`); the order is unchanged."""

    def __init__(self, dataset, *, hint: Callable[[tuple[int, int]], None] | None = None, read_ahead: int = 0,
                 **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.hint, self.read_ahead = hint, read_ahead

    def _keys(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for i in super().__iter__():
            yield (int(i), item_seed(self.seed, epoch, int(i)))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return read_ahead(self._keys(), self.hint, self.read_ahead)


def _worker_init(_):
    # Workers run numpy/torch kernels on small arrays: extra BLAS threads only contend.
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def make_loader(dataset, cfg: DataConfig, collate, train: bool) -> ResumableDataLoader:
    """Build inside the running strategy (e.g. a DataModule hook) so the sampler sees the DDP rank.

    Training drops the last incomplete batch: contrastive losses are only comparable (and their
    negatives only as hard) at a fixed batch size. Training workers persist across epochs (restarting
    them cost 0.7-2.3 s per epoch on a TCGA-shaped cohort); items are keyed by (seed, epoch, index) in
    the main process, so which worker loads an item never changes it. Validation workers do not
    persist: they would hold memory for the whole run to save one start per validation.
    """
    sampler = KeyedSampler(dataset, seed=cfg.seed, shuffle=train, hint=getattr(dataset, "will_need", None),
                           read_ahead=cfg.read_ahead)
    drop_last = train and len(dataset) >= cfg.batch_size
    return ResumableDataLoader(
        dataset, sampler=sampler, batch_size=cfg.batch_size, collate_fn=collate, num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if cfg.num_workers else None,
        persistent_workers=bool(train and cfg.persistent_workers and cfg.num_workers),
        drop_last=drop_last, worker_init_fn=_worker_init if cfg.num_workers else None,
        transport=cfg.transport, arena_mb=cfg.arena_mb, arena_setting="data.arena_mb",
    )


class CohortDataModule(pl.LightningDataModule):
    def __init__(self, train_set, val_set, cfg: DataConfig, collate):
        super().__init__()
        self.train_set, self.val_set, self.cfg, self.collate = train_set, val_set, cfg, collate

    def train_dataloader(self):
        return make_loader(self.train_set, self.cfg, self.collate, train=True)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        return make_loader(self.val_set, self.cfg, self.collate, train=False)
