"""Resumable data order: a seeded per-epoch sampler and a DataLoader that checkpoints its position.

Exact resume after preemption needs the data position, not only the step count. For a
map-style dataset the order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so the
position is ``(epoch, samples consumed)``. :class:`ResumableDataLoader` counts the batches it
hands out and exposes ``state_dict``/``load_state_dict``; Lightning saves that state in every
checkpoint and loads it before it creates the iterator (its "stateful dataloader" protocol), so
the resumed run continues with exactly the batches the interrupted run had not trained on.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from itertools import islice
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from slidefm.data.transport import ShmDataLoader

__all__ = ["ResumableSampler", "ResumableDataLoader", "ReadAheadSampler", "read_ahead"]

K = TypeVar("K")


def read_ahead(keys: Iterable[K], hint: Callable[[K], None] | None, depth: int) -> Iterator[K]:
    """``keys`` in their order, calling ``hint(key)`` ``depth`` keys before each is yielded.

    A reader told early (``SlideReader.will_need``) fetches from disk while the items before run, so
    a cold read of a random slide no longer waits out its own disk latency (about 2x slides/s from a
    cold packed store, `benchmarks/io.py`). ``depth`` 0 or no hint: the keys, untouched.
    """
    if hint is None or depth <= 0:
        yield from keys
        return
    it = iter(keys)
    ahead: deque = deque()
    for k in islice(it, depth):
        hint(k)
        ahead.append(k)
    for k in it:
        hint(k)
        ahead.append(k)
        yield ahead.popleft()
    yield from ahead


class ReadAheadSampler(Sampler):
    """``keys`` in order (a list of dataset keys) with :func:`read_ahead` hints."""

    def __init__(self, keys: list, hint: Callable[[Any], None] | None, depth: int) -> None:
        self.keys, self.hint, self.depth = keys, hint, depth

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[Any]:
        return read_ahead(self.keys, self.hint, self.depth)


def _default_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
    return num_replicas, rank


class ResumableSampler(DistributedSampler):
    """Seeded permutation per epoch, sharded over replicas, resumable mid-epoch.

    Epoch ``e`` visits ``randperm(n, seed + e)`` (or ``range(n)`` when ``shuffle=False``),
    padded by wrapping (or truncated with ``drop_last``) to a multiple of ``num_replicas``;
    replica ``r`` takes every ``num_replicas``-th index starting at ``r``, like
    ``DistributedSampler`` (which it subclasses, so Lightning does not wrap it again).

    ``consumed`` counts samples of the current epoch already trained on, over all replicas;
    iteration starts after them. ``len()`` stays the full per-replica epoch length so that
    Lightning's batches-per-epoch does not change when a run resumes mid-epoch.
    """

    def __init__(
        self,
        data_source: Sized,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        num_replicas, rank = _default_replicas(num_replicas, rank)
        super().__init__(
            data_source, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.consumed = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch than the current one starts from its beginning."""
        if epoch != self.epoch:
            self.consumed = 0
        self.epoch = epoch

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """The global (all-replica) order of ``epoch``, padded or truncated to ``total_size``."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if self.drop_last:
            return indices[: self.total_size]
        pad = self.total_size - len(indices)
        if pad > 0:
            indices += (indices * math.ceil(pad / max(len(indices), 1)))[:pad]
        return indices

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        # A finished epoch that nobody advanced (no set_epoch call) is iterated again from its
        # start, as DistributedSampler would.
        start = self.consumed if 0 < self.consumed < self.total_size else 0
        # Shard what is left: with `start` a multiple of num_replicas this is exactly the tail
        # of the uninterrupted shard, and it still splits evenly if the world size changed.
        rest = indices[start:]
        return iter(rest[self.rank :: self.num_replicas])

    def advance(self, num_samples: int) -> None:
        """Record ``num_samples`` (over all replicas) as trained on; a full epoch moves to the next."""
        self.consumed = min(self.consumed + num_samples, self.total_size)
        if self.consumed >= self.total_size:
            self.epoch += 1
            self.consumed = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples_total": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = len(self.dataset)
        if state["num_samples_total"] != n:
            raise ValueError(
                f"sampler state is for a dataset of {state['num_samples_total']} samples, this one has {n}"
            )
        if state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise ValueError(
                f"sampler state has seed={state['seed']} shuffle={state['shuffle']}, "
                f"this sampler seed={self.seed} shuffle={self.shuffle}: the resumed order would differ"
            )
        self.epoch = int(state["epoch"])
        self.consumed = 0
        self.advance(int(state["consumed"]))


class ResumableDataLoader(ShmDataLoader):
    """DataLoader over a :class:`ResumableSampler` whose position is saved in checkpoints.

    Each batch handed out advances the sampler by ``batch_size * num_replicas`` samples before
    the batch is returned, so a checkpoint written after the batch's optimizer step (Lightning's
    ``on_train_batch_end``) records it as consumed. After the last batch of an epoch the sampler
    moves to the next epoch. Worker seeds come from a generator seeded by ``(seed, epoch)``
    rather than from the global torch RNG, so creating the iterator does not perturb the
    training RNG stream and worker seeds do not depend on when a run was resumed.
    """

    def __init__(self, dataset: Any, *, sampler: ResumableSampler, batch_size: int = 1, **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError("ResumableDataLoader needs a ResumableSampler")
        for bad in ("shuffle", "batch_sampler"):
            if kwargs.get(bad):
                raise ValueError(f"ResumableDataLoader: `{bad}` conflicts with the resumable sampler")
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        self.generator.manual_seed(hash((sampler.seed, sampler.epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
        # Batches left in this epoch, from the sampler position when iteration starts.
        start = sampler.consumed if 0 < sampler.consumed < sampler.total_size else 0
        sampler.consumed = start
        remaining = math.ceil((sampler.total_size - start) / sampler.num_replicas)
        n_batches = remaining // self.batch_size if self.drop_last else math.ceil(remaining / self.batch_size)
        step = self.batch_size * sampler.num_replicas
        for i, batch in enumerate(super().__iter__()):
            if i + 1 == n_batches:
                sampler.advance(sampler.total_size - sampler.consumed)
            else:
                sampler.advance(step)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}  # type: ignore[union-attr]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])  # type: ignore[union-attr]
