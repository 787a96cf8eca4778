"""Lightning's side of checkpoints: atomic writes, safe reads on resume, the final save at the last step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback

from slidefm import checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes through :func:`slidefm.checkpoint.write` (temporary name, then rename: a kill mid-write never
    corrupts last.ckpt) and reads through :func:`slidefm.checkpoint.read`, so resuming unpickles with
    ``weights_only=True`` and checks the format whatever Lightning asks for."""

    def save_checkpoint(self, checkpoint_: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        checkpoint.write(checkpoint_, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is ignored on purpose: a checkpoint is never unpickled with code execution.
        return checkpoint.read(path, map_location=map_location if map_location is not None else "cpu")


def save_full_state(trainer, path) -> None:
    """``trainer.save_checkpoint`` with optimizer, scheduler, loop and callback state, for exact resume.

    The positional flag is Lightning's *save-side* "weights only" switch (False: keep the full training
    state); it has nothing to do with how the file is later unpickled. Passing it also keeps Lightning
    from logging that it defaulted it.
    """
    trainer.save_checkpoint(path, False)


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
            save_full_state(trainer, self.path)
