"""Checkpoint writing: atomic files, and the final save at the last step boundary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write under a temporary name and rename, so a kill mid-write never corrupts last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


class FinalCheckpoint(Callback):
    """Save ``last.ckpt`` at the boundary of the final step, inside the loop.

    After ``fit`` returns, the loop has already prefetched the next batch, so a checkpoint written
    then records a data position one batch ahead and a run extended with a larger ``max_steps``
    would skip it. Saving here records exactly what was trained on, like the periodic saves.
    """

    def __init__(self, path):
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps is not None and trainer.global_step >= trainer.max_steps > 0:
            trainer.save_checkpoint(self.path)
