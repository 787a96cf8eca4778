"""A training progress bar over optimizer steps (``train 37/100``), not epochs.

Runs are bounded by ``trainer.max_steps`` with no epoch limit, so Lightning's bars read
``Epoch 7/-2`` (max_epochs = -1). This one counts global steps, starts a resumed run at its step,
and shows the logged metrics (loss, ...) as postfix.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    def _set_step(self, trainer, pl_module=None) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        bar.n = trainer.global_step
        if pl_module is not None:
            bar.set_postfix(self.get_metrics(trainer, pl_module))
        bar.refresh()

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if bar.total != total:
            bar.reset(total=total)
            bar.initial = trainer.global_step  # a resumed run: its rate counts the steps it runs
        bar.set_description("train", refresh=False)
        self._set_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = trainer.global_step
        if self._should_update(n, self.train_progress_bar.total):
            self._set_step(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._set_step(trainer, pl_module)  # one bar for the whole run: not closed between epochs
