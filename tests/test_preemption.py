"""PreemptionCheckpoint + ResumableSampler: signal -> last.ckpt at the next step -> exact resume."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).parent / "slurm_app"))
from tiny import TinyData, TinyModule, make_loader  # noqa: E402

from slidefm.data.sampler import ResumableDataLoader, ResumableSampler  # noqa: E402
from slidefm.train.preemption import PreemptionCheckpoint, resume_checkpoint  # noqa: E402

MAX_STEPS = 13  # 5 batches per epoch: crosses two epoch boundaries


def _trainer(root: Path, callback: PreemptionCheckpoint, max_steps: int = MAX_STEPS) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[callback],
    )


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _uninterrupted(root: Path) -> tuple[dict, list]:
    pl.seed_everything(0)
    module = TinyModule()
    _trainer(root, PreemptionCheckpoint()).fit(module, make_loader())
    return _params(module), module.seen


@pytest.fixture
def fake_previous_handler():
    """Stands in for submitit's SIGUSR2 handler; records that it was handed over to."""
    calls: list[int] = []
    old = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR2, old)


def _interrupted(root: Path, signal_at: int) -> tuple[PreemptionCheckpoint, TinyModule, pl.Trainer]:
    def send(module: TinyModule) -> None:
        # Mid-step (inside training_step): the checkpoint must come at the end of this step.
        if module.global_step == signal_at and not getattr(module, "_sent", False):
            module._sent = True
            os.kill(os.getpid(), signal.SIGUSR2)

    pl.seed_everything(0)
    module = TinyModule(on_step=send)
    callback = PreemptionCheckpoint()
    trainer = _trainer(root, callback)
    trainer.fit(module, make_loader())
    return callback, module, trainer


def test_signal_saves_last_ckpt_at_next_step_and_hands_over(tmp_path, fake_previous_handler):
    callback, module, trainer = _interrupted(tmp_path, signal_at=6)
    assert fake_previous_handler == [signal.SIGUSR2]
    assert callback.preempted_by == signal.SIGUSR2
    assert trainer.global_step == 7, "the trainer must stop right after the step that saw the signal"
    ckpt = resume_checkpoint(tmp_path)
    assert ckpt == tmp_path / "checkpoints" / "last.ckpt" and callback.saved_path == ckpt
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 7
    assert not (tmp_path / "checkpoints" / "last.ckpt.tmp").exists()
    # Our handler is gone again after fit: the previous one is back.
    assert signal.getsignal(signal.SIGUSR2) is not None
    os.kill(os.getpid(), signal.SIGUSR2)
    assert fake_previous_handler == [signal.SIGUSR2, signal.SIGUSR2]


@pytest.mark.parametrize("signal_at", [1, 4, 6])  # 4 -> saved at step 5, the epoch boundary
def test_resume_is_exact(tmp_path, fake_previous_handler, signal_at):
    ref_params, ref_seen = _uninterrupted(tmp_path / "ref")

    _, first, _ = _interrupted(tmp_path / "run", signal_at)
    ckpt = resume_checkpoint(tmp_path / "run")
    assert ckpt is not None and torch.load(ckpt, weights_only=True)["global_step"] == signal_at + 1

    # A fresh process state: different seed and init, so only the checkpoint can make it match.
    pl.seed_everything(1234)
    second = TinyModule()
    trainer = _trainer(tmp_path / "run", PreemptionCheckpoint())
    trainer.fit(second, make_loader(), ckpt_path=ckpt)

    assert trainer.global_step == MAX_STEPS
    assert first.seen + second.seen == ref_seen, "data position not restored"
    params = _params(second)
    for k, v in ref_params.items():
        assert torch.equal(params[k], v), f"{k} differs after resume"


def test_without_signal_nothing_is_saved(tmp_path, fake_previous_handler):
    _uninterrupted(tmp_path)
    assert resume_checkpoint(tmp_path) is None
    assert fake_previous_handler == []


def test_resumable_sampler_shards_and_resumes():
    data = TinyData(10)
    full = [list(ResumableSampler(data, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(full[0] + full[1]) == list(range(10))
    ref = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1, seed=3)
    assert full[1] == list(ref), "same order as DistributedSampler"

    s = ResumableSampler(data, seed=3, num_replicas=2, rank=1)
    s.advance(4)
    assert list(s) == full[1][2:]
    state = s.state_dict()
    t = ResumableSampler(data, seed=3, num_replicas=2, rank=1)
    t.load_state_dict(state)
    assert list(t) == full[1][2:]
    t.set_epoch(0)  # same epoch: position kept
    assert list(t) == full[1][2:]
    t.set_epoch(1)
    assert t.consumed == 0 and list(t) != full[1]
    with pytest.raises(ValueError, match="sampler state has seed=.*the resumed order would differ"):
        ResumableSampler(data, seed=4).load_state_dict(state)


def test_resumable_loader_moves_to_next_epoch_after_last_batch():
    loader = make_loader(n=10, batch_size=4)
    batches = [b[0].tolist() for b in loader]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert loader.sampler.epoch == 1 and loader.sampler.consumed == 0
    loader.sampler.set_epoch(0)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state["sampler"] == {**state["sampler"], "epoch": 0, "consumed": 4}
    other = make_loader(n=10, batch_size=4)
    other.load_state_dict(state)
    assert [b[0].tolist() for b in other] == batches[1:]
    with pytest.raises(TypeError, match="needs a ResumableSampler"):
        ResumableDataLoader(TinyData(4), sampler=None)


class _KeyedItems(torch.utils.data.Dataset):
    """Items keyed (index, seed) as the training sampler yields them; also reports the loading process."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key):
        i, seed = key
        return torch.tensor([i, seed % 1000, os.getpid()])


def _epochs(loader, n: int) -> list[list[list[int]]]:
    return [[b.tolist() for b in loader] for _ in range(n)]


def test_persistent_training_workers_keep_order_and_resume():
    from slidefm.data.config import DataConfig
    from slidefm.data.loader import make_loader as make_train_loader

    def loader(workers: int):
        cfg = DataConfig(cohort="unused", batch_size=3, num_workers=workers, seed=5)
        return make_train_loader(_KeyedItems(), cfg, torch.utils.data.default_collate, train=True)

    ref = _epochs(loader(0), 2)
    persistent = loader(1)
    assert persistent.persistent_workers
    got = _epochs(persistent, 2)
    strip = lambda epochs: [[row[:2] for row in batch] for ep in epochs for batch in ep]  # noqa: E731
    assert strip(got) == strip(ref), "worker processes change which items or draws a batch holds"
    assert strip(ref)[:3] != strip(ref)[3:6], "two epochs draw the same order"
    pids = {row[2] for ep in got for batch in ep for row in batch}
    assert len(pids) == 1 and os.getpid() not in pids, "the worker was restarted between epochs"

    # Resume mid-epoch into a fresh persistent loader: the rest of that epoch, then the next one.
    first = loader(1)
    it = iter(first)
    next(it)
    state = first.state_dict()
    del it
    resumed = loader(1)
    resumed.load_state_dict(state)
    after = [[b.tolist() for b in resumed], [b.tolist() for b in resumed]]
    assert strip(after) == strip(ref)[1:], "a resumed persistent loader does not continue where the run stopped"
    assert not loader(0).persistent_workers
    cfg = DataConfig(cohort="unused", batch_size=3, num_workers=1)
    assert not make_train_loader(_KeyedItems(), cfg, torch.utils.data.default_collate, train=False).persistent_workers
