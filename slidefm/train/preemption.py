"""Preemption-safe training: save ``last.ckpt`` on SIGUSR2/SIGTERM, hand over to submitit, resume exactly.

:class:`PreemptionCheckpoint` is a Lightning callback:

* its signal handlers only set a flag (no I/O, no collectives inside a handler);
* at the next optimizer-step boundary (``on_train_batch_end``) all ranks agree on the flag
  (all-reduce max) and every rank calls ``trainer.save_checkpoint`` on ``last.ckpt``;
* then it hands over: the handler that was installed before it (submitit's, which on rank 0
  dumps the job and runs ``scontrol requeue``, then exits) is called. Outside submitit, a
  SIGUSR2 inside a SLURM job is answered with ``scontrol requeue`` by rank 0. The trainer is
  then stopped; under submitit every rank exits instead, because a normal return would be
  recorded by submitit as a successful, finished job.
* It stores Python/NumPy/torch(/CUDA) RNG states in every checkpoint and restores them when
  training starts from one. Validation runs with the training RNG stream saved and restored
  around it, so a resumed run (which does not repeat the validation at the save step) draws
  the same random numbers as an uninterrupted one.

The data position is saved by :class:`slidefm.data.sampler.ResumableDataLoader` through
Lightning's stateful-dataloader protocol.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

from slidefm.checkpoint import LAST_CHECKPOINT, resume_checkpoint
from slidefm.train.checkpoint_io import save_full_state
from slidefm.train.slurm import in_slurm_job, in_submitit_job, requeue_job

__all__ = ["PreemptionCheckpoint", "get_rng_state", "set_rng_state", "resume_checkpoint"]

log = logging.getLogger(__name__)


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when initialised) CUDA generator states."""
    # Plain ints/lists/tensors only, so checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_submitit_handler(handler: Any) -> bool:
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit")


class PreemptionCheckpoint(Callback):
    """Checkpoint to ``dirpath/last.ckpt`` at the first step boundary after SIGUSR2 (or SIGTERM in
    a SLURM job), hand over to the previous handler, stop; keep RNG state in checkpoints.

    Args:
        dirpath: checkpoint folder; default ``<trainer.default_root_dir>/checkpoints`` (the
            folder :func:`resume_checkpoint` looks in).
        signals: signals to catch; default SIGUSR2, plus SIGTERM inside a SLURM job
            (``scontrol requeue``, preemption and the time limit send SIGTERM, then SIGKILL
            after ``KillWait``).
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, signals: list[int] | None = None) -> None:
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self._signals = signals
        self._previous: dict[int, Any] = {}
        self._received: int = 0
        self._last_global_step: int | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._rng_outside_validation: dict[str, Any] | None = None
        #: signal number that stopped the run (0 when it was not preempted)
        self.preempted_by: int = 0
        #: path of the checkpoint written on preemption
        self.saved_path: Path | None = None

    # -- signals ------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only record: saving from inside a handler could interleave with a half-done step
        # or a collective on another rank.
        self._received = max(self._received, signum)

    def _wanted_signals(self) -> list[int]:
        if self._signals is not None:
            return list(self._signals)
        sigs = [signal.SIGUSR2]
        if in_slurm_job():
            sigs.append(signal.SIGTERM)
        return sigs

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionCheckpoint: not in the main thread, cannot install signal handlers")
            return
        for sig in self._wanted_signals():
            current = signal.getsignal(sig)
            if current == self._on_signal:  # bound methods: equal, never identical
                continue
            # Remember the handler from before Lightning's run (e.g. submitit's) only once:
            # Lightning replaces SIGTERM after `setup` with its own handler, which raises at the
            # next batch without our checkpoint, so we take SIGTERM back in on_train_start.
            self._previous.setdefault(sig, current)
            signal.signal(sig, self._on_signal)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._received = 0
            self.preempted_by = 0
            self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()
        self._last_global_step = trainer.global_step
        if self._rng_to_restore is not None:
            # Restored here, after the dataloader iterator and sanity check exist, so that the
            # first resumed step sees the RNG exactly as the interrupted run left it.
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    # -- the step boundary ---------------------------------------------------------------
    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        dirpath = self.dirpath if self.dirpath is not None else Path(trainer.default_root_dir) / "checkpoints"
        return dirpath / LAST_CHECKPOINT

    def _agreed_signal(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        flag = self._received
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = torch.tensor([flag], dtype=torch.int64, device=trainer.strategy.root_device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return flag

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Act only right after an optimizer step (not between accumulated micro-batches); every
        # rank sees the same global_step sequence, so all reach the all-reduce together.
        if trainer.global_step == self._last_global_step:
            return
        self._last_global_step = trainer.global_step
        signum = self._agreed_signal(trainer, pl_module)
        if not signum:
            return
        if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
            return  # the run is complete at this step: nothing to resume, let fit end normally
        self.preempted_by = signum
        path = self.checkpoint_path(trainer)
        tmp = path.with_name(path.name + ".tmp")
        # Every rank must call save_checkpoint (it ends in a barrier; rank 0 writes). Write to
        # a temporary name and rename so a SIGKILL during the write never leaves a torn last.ckpt.
        save_full_state(trainer, tmp)
        if trainer.is_global_zero:
            os.replace(tmp, path)
        trainer.strategy.barrier("PreemptionCheckpoint.saved")
        self.saved_path = path
        name = signal.Signals(signum).name
        log.warning("rank %d: %s received, saved %s at step %d", trainer.global_rank, name, path, trainer.global_step)
        self._hand_over(trainer, signum)

    def _hand_over(self, trainer: pl.Trainer, signum: int) -> None:
        # Our handlers stay installed until teardown: the SIGTERM that follows a requeue only
        # sets the flag again instead of killing a process that is shutting down cleanly.
        previous = self._previous.get(signum)
        if callable(previous):
            # submitit's USR2 handler: on rank 0 it dumps the job, requeues and raises
            # SystemExit; on other ranks it returns. Its SIGTERM handler only logs.
            previous(signum, None)
        elif signum == signal.SIGUSR2 and in_slurm_job() and trainer.is_global_zero:
            requeue_job()
        if in_submitit_job() or _is_submitit_handler(previous):
            # The job has been requeued or is being killed; returning would make submitit write
            # a "success" result and the launcher would report the sweep finished.
            raise SystemExit(-1)
        trainer.should_stop = True

    # -- RNG in checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = self._rng_outside_validation if self._rng_outside_validation is not None else get_rng_state()
        return {"rng": rng}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._rng_outside_validation = get_rng_state()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rng_outside_validation is not None:
            set_rng_state(self._rng_outside_validation)
            self._rng_outside_validation = None
