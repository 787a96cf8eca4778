"""Worker -> main-process transfer of batches through one reused shared-memory arena per worker.

Torch's DataLoader moves every tensor of a worker's batch into a fresh shared-memory segment, which the
main process then maps: a segment, an fd, and a page fault per 4 KiB page on both sides, for every tensor
of every batch. On a 2-core machine that caps 1.5 MB slides at ~600/s from two workers, below what the
packed store reads (benchmarks/io.py). :class:`ShmDataLoader` gives each worker an anonymous shared
mapping made once, before the workers fork: a worker copies the arrays of its collated batch into its
arena and sends small :class:`ArenaRef` records instead; the main process hands out tensors that are views
of the arena (no copy) and frees their space when their storage is freed. Pages are faulted once per run, not per batch.
Each worker also routes :func:`slidefm.buffers.empty` to its arena, so slides read and batches packed there are
born in it: such a tensor is sent as a record of where it lies, and the transfer copies nothing at all.

Flow control needs no locks between processes. A worker allocates its arena as a ring in the order it
produces batches, and the DataLoader hands one worker's batches out in that same order, so the main process
only publishes how far the space is free (``tail``, in the arena's header): up to the end of the oldest
tensor still alive. A batch that does not fit (larger than the arena, or while batches a consumer holds
fill it) goes the ordinary torch way, so nothing ever waits, and batches an abandoned iterator never read
are reclaimed when a later one is released. Fork start method only
(Linux's default): other contexts, ``num_workers=0`` and ``transport="torch"`` use torch's path.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import mmap
import multiprocessing as mp
import threading
import weakref
from collections import deque
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from slidefm import buffers

__all__ = ["ArenaRef", "ShmDataLoader", "ShmCollate"]

log = logging.getLogger(__name__)

_HEADER = 64  # bytes: the main process's read position (int64) at offset 0, cache-line padded
_ALIGN = 64
MIN_BYTES = 64 * 1024  # smaller numpy arrays are cheap to pickle
# Batches that fall back to torch's path while fewer than this many of their size fit an arena: the arena is too
# small for them, not momentarily full (slidefm.data.transport.ShmDataLoader warns once).
BATCHES_PER_ARENA = 3
_NO_NUMPY = {torch.bfloat16, *(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32",
                                                           "uint64") if hasattr(torch, n))}  # go torch's way


class ArenaRef(NamedTuple):
    """Where one array of a batch lies in a worker's arena, and the allocation it lies in (arrays born in the
    arena may share one, as a slide's features and grid do). A named tuple: made, pickled and read for every
    array of every item, it costs a fraction of a dataclass's microseconds."""

    worker: int
    offset: int  # from the start of the arena's data area
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name
    torch: bool  # rebuild as a torch tensor (else a numpy array)
    end: int  # the worker's ring position after its allocation (bytes ever allocated): names the allocation
    start: int  # the allocation's first byte (from the start of the data area)
    nbytes: int  # the allocation's size


class _Arena:
    """An anonymous shared mapping: header + ``size`` data bytes, inherited by forked workers.

    Worker side: ``alloc`` (a ring over the data bytes). Main side: ``hand_out``/``release`` keep the refs
    read from this worker in arrival order (= allocation order) and move ``tail`` over the released prefix.
    """

    def __init__(self, size: int):
        self.size = size
        self.buf = mmap.mmap(-1, _HEADER + size, flags=mmap.MAP_SHARED)
        self.tail = np.ndarray((1,), np.int64, self.buf, 0)  # written by the main process only
        self.data = np.ndarray((size,), np.uint8, self.buf, _HEADER)
        self.view = memoryview(self.buf)[_HEADER:]  # main side: each handed-out allocation is an array over a slice
        # The data area's address, read once (numpy's ``.ctypes`` costs microseconds a call); forked workers
        # inherit the mapping at the same address.
        self.base = _address(self.data)
        self.head = 0  # worker-side ring position (each worker process has its own copy)
        # worker side: (start, nbytes, end) of the buffers handed to readers/collates since the last batch was sent
        self.born: list[tuple[int, int, int]] = []
        self._out: deque[int] = deque()  # main side: ends of the refs handed out, oldest first
        self._done: set[int] = set()
        self._lock = threading.Lock()  # finalizers run in whichever thread drops a batch

    def alloc(self, nbytes: int) -> tuple[int, int] | None:
        """(offset, end) for ``nbytes`` contiguous bytes, or None when they do not fit now."""
        n = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)  # > 0: every ref has its own end
        pos = self.head % self.size
        skip = self.size - pos if pos + n > self.size else 0  # never split an array across the wrap
        if n > self.size or self.head + skip + n - int(self.tail[0]) > self.size:
            return None
        self.head += skip + n
        return (0 if skip else pos), self.head

    def empty(self, nbytes: int) -> torch.Tensor | None:
        """Worker side, :func:`slidefm.buffers.empty`'s allocator: ``nbytes`` of the ring as a uint8 tensor,
        or None when they do not fit now. Unsent, the space is reclaimed with the next batch read after it."""
        got = self.alloc(nbytes)
        if got is None:
            return None
        start, end = got
        # a buffer whose space the ring has just reused is stale: never match a tensor against it
        self.born = [b for b in self.born if b[0] + b[1] <= start or b[0] >= start + max(nbytes, 1)]
        self.born.append((start, nbytes, end))
        return torch.from_numpy(self.data[start: start + nbytes])

    def born_in(self, ptr: int, nbytes: int) -> tuple[int, int, int] | None:
        """The buffer of this batch that holds bytes [ptr, ptr + nbytes) of this process's memory, if any."""
        off = ptr - self.base
        for b in reversed(self.born):
            if b[0] <= off and off + nbytes <= b[0] + b[1]:
                return b
        return None

    def hand_out(self, end: int) -> None:
        with self._lock:
            self._out.append(end)

    def release(self, end: int) -> None:
        with self._lock:
            self._done.add(end)
            tail = None
            while self._out and self._out[0] in self._done:
                tail = self._out.popleft()
                self._done.discard(tail)
            if tail is not None and tail > int(self.tail[0]):
                self.tail[0] = tail


def _never_in_arena(t: torch.Tensor) -> bool:
    """Tensors that always go torch's way (tensor attributes only: .numpy() alone costs microseconds, and this
    runs for every array of every item)."""
    return t.requires_grad or not t.is_cpu or t.layout != torch.strided or t.dtype in _NO_NUMPY


class ShmCollate:
    """Wraps a collate function: in a worker, large arrays of its output go into the worker's arena."""

    def __init__(self, collate, arenas: list[_Arena], min_bytes: int = MIN_BYTES):
        self.collate, self.arenas, self.min_bytes = collate, arenas, min_bytes

    def __call__(self, items):
        out = self.collate(items)
        info = get_worker_info()
        if info is None or info.id >= len(self.arenas):
            return out
        arena = self.arenas[info.id]
        try:
            return _walk(out, lambda a: self._put(info.id, arena, a))
        finally:
            arena.born.clear()  # this batch's buffers are sent or dropped

    def _put(self, worker: int, arena: _Arena, a):
        if isinstance(a, ArenaRef):
            return a
        if isinstance(a, torch.Tensor):
            if _never_in_arena(a):
                return a
            ptr, nbytes, contiguous = a.data_ptr(), a.nbytes, a.is_contiguous()
            dtype, is_torch = _numpy_str(a.dtype), True
        else:
            if a.dtype.hasobject:
                return a
            ptr, nbytes, contiguous, dtype, is_torch = _address(a), a.nbytes, a.flags.c_contiguous, a.dtype.str, False
        if contiguous and (b := arena.born_in(ptr, nbytes)) is not None:
            # born in the arena (slidefm.buffers): send where it lies, copy nothing
            return ArenaRef(worker, ptr - arena.base, tuple(a.shape), dtype, is_torch, b[2], b[0], b[1])
        # Every tensor goes in (torch's path costs a segment per tensor, and shares the whole storage of
        # a small view); small numpy arrays are cheaper to pickle.
        if not is_torch and nbytes < self.min_bytes:
            return a
        got = arena.alloc(nbytes)
        if got is None:
            return a  # does not fit: torch's own path
        offset, end = got
        arr = a.numpy() if is_torch else a
        dst = arena.data[offset: offset + nbytes].view(arr.dtype).reshape(arr.shape)
        np.copyto(dst, arr, casting="no")
        return ArenaRef(worker, offset, tuple(arr.shape), dtype, is_torch, end, offset, nbytes)


def _numpy_str(dtype: torch.dtype) -> str:
    """The numpy dtype string of a torch dtype that numpy has (cached: a dict lookup per array)."""
    got = _NUMPY_STR.get(dtype)
    if got is None:
        got = _NUMPY_STR[dtype] = torch.empty(0, dtype=dtype).numpy().dtype.str
    return got


_NUMPY_STR: dict[torch.dtype, str] = {}


def _address(arr: np.ndarray) -> int:
    """Address of an array's first byte."""
    return arr.__array_interface__["data"][0]


_LEAVES = frozenset({str, int, float, bool, bytes, type(None)})
_UNSET = object()
_FIELDS: dict[type, tuple[str, ...] | None] = {}


def _dataclass_fields(cls: type) -> tuple[str, ...] | None:
    """Names of a dataclass type's fields (init or not), None for other types; cached per type."""
    try:
        return _FIELDS[cls]
    except KeyError:
        names = tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else None
        _FIELDS[cls] = names
        return names


def _walk(obj, fn):
    """``obj`` with every tensor / numeric ndarray replaced by ``fn(it)`` (dataclasses, dicts, lists, tuples).

    A dataclass is copied with only the changed fields set, without running ``__init__``/``__post_init__``
    (it is the same object with its arrays moved, and a field may hold an :class:`ArenaRef` on the way); one
    with nothing to change is returned as is."""
    cls = type(obj)
    if cls in _LEAVES:
        return obj
    if isinstance(obj, (torch.Tensor, ArenaRef)) or (isinstance(obj, np.ndarray) and obj.dtype != object):
        return fn(obj)
    names = _dataclass_fields(cls)
    if names is not None:
        changes = {}
        for name in names:
            v = getattr(obj, name, _UNSET)
            if v is _UNSET:  # an init=False field never assigned
                continue
            w = _walk(v, fn)
            if w is not v:
                changes[name] = w
        if not changes:
            return obj
        new = copy.copy(obj)
        for name, w in changes.items():
            object.__setattr__(new, name, w)  # frozen dataclasses too
        return new
    if isinstance(obj, dict):
        new = {k: _walk(v, fn) for k, v in obj.items()}
        if cls is dict:
            return new
        out = copy.copy(obj)  # OrderedDict, defaultdict, ...: same type and settings
        out.update(new)
        return out
    if isinstance(obj, list):
        return [_walk(v, fn) for v in obj]
    if isinstance(obj, tuple):
        items = [_walk(v, fn) for v in obj]
        return cls(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


class _ArenaWorkerInit:
    """Wraps a worker_init_fn: first routes :func:`slidefm.buffers.empty` in the worker to its arena."""

    def __init__(self, init, arenas: list[_Arena]):
        self.init, self.arenas = init, arenas

    def __call__(self, worker_id: int) -> None:
        if worker_id < len(self.arenas):
            buffers.install(self.arenas[worker_id].empty)
        if self.init is not None:
            self.init(worker_id)


class ShmDataLoader(DataLoader):
    """A DataLoader whose workers send large arrays through per-worker shared-memory arenas.

    ``transport``: ``"shm"`` (the arenas, ``arena_mb`` MiB per worker) or ``"torch"`` (torch's path).
    Same batches either way; only how they cross the process boundary differs. Batches too large for the
    arenas (fewer than ``BATCHES_PER_ARENA`` fit one) go torch's way, which costs far more CPU per batch: the
    loader says so once, with the ``arena_mb`` that would hold them (named as ``arena_setting``).
    """

    def __init__(self, *args: Any, transport: str = "shm", arena_mb: int = 256,
                 arena_setting: str | None = "arena_mb", **kwargs: Any) -> None:
        if transport not in ("shm", "torch"):
            raise ValueError(f"transport must be 'shm' or 'torch', got {transport!r}")
        if isinstance(kwargs.get("collate_fn"), ShmCollate):  # rebuilt from a built loader's attributes
            kwargs["collate_fn"] = kwargs["collate_fn"].collate
        if isinstance(kwargs.get("worker_init_fn"), _ArenaWorkerInit):
            kwargs["worker_init_fn"] = kwargs["worker_init_fn"].init
        super().__init__(*args, **kwargs)
        ctx = self.multiprocessing_context or mp.get_context()
        method = ctx if isinstance(ctx, str) else ctx.get_start_method()
        self._arenas: list[_Arena] = []  # shared with the collate wrapper, which forked workers inherit
        self._arena_bytes = arena_mb << 20
        # how the user sets arena_mb, named in the warning below; None once it was given, or when there is none
        self._arena_setting = arena_setting
        self.transport = transport if (self.num_workers > 0 and method == "fork" and arena_mb > 0) else "torch"
        if self.transport == "shm":
            self.collate_fn = ShmCollate(self.collate_fn, self._arenas)
            self.worker_init_fn = _ArenaWorkerInit(self.worker_init_fn, self._arenas)

    def __iter__(self) -> Iterator[Any]:
        if self.transport != "shm":
            yield from super().__iter__()
            return
        if not (self.persistent_workers and self._iterator is not None):
            # Fresh workers get fresh arenas: workers of an abandoned iterator may still be filling the old ones.
            # (The old mappings go when nothing refers to them.)
            self._arenas[:] = [_Arena(self._arena_bytes) for _ in range(self.num_workers)]
        for batch in super().__iter__():
            yield self._take(batch)

    def _take(self, batch):
        """Rebuild a worker's batch. Tensors are views of the arena (no copy) whose space is released when
        their storage is freed; numpy arrays are copies, released at once. (Torch's pin-memory thread, when
        on, runs before this: it pins tensors in dicts/lists/tuples and rebuilds the ``ArenaRef`` named tuples it
        meets there unchanged, since they hold no tensor; slidefm's batches are dataclasses, which it passes as
        they are.)"""
        allocs: dict[tuple[int, int], np.ndarray] = {}  # (worker, end) -> the allocation's bytes
        sizes = [0, 0]  # bytes of the batch's large arrays: through an arena, and through torch's path

        def rebuild(ref):
            if not isinstance(ref, ArenaRef):
                if isinstance(ref, torch.Tensor) and ref.nbytes >= MIN_BYTES and not _never_in_arena(ref):
                    sizes[1] += ref.nbytes  # a tensor the worker could not place in its arena
                return ref
            src = allocs.get((ref.worker, ref.end))
            if src is None:
                arena = self._arenas[ref.worker]
                # An array over its own memoryview slice: numpy views of it keep it (their base stops at an
                # array whose base is not an array), and so do the tensors made from them; ``src`` dying is the
                # moment nothing reads this allocation any more.
                src = allocs[ref.worker, ref.end] = np.frombuffer(arena.view[ref.start: ref.start + ref.nbytes],
                                                                  np.uint8)
                weakref.finalize(src, arena.release, ref.end)
            dt = np.dtype(ref.dtype)
            a = ref.offset - ref.start
            n = math.prod(ref.shape) * dt.itemsize
            sizes[0] += n
            arr = src[a: a + n].view(dt).reshape(ref.shape)
            return torch.from_numpy(arr) if ref.torch else arr.copy()  # a numpy view would outlive the release

        out = _walk(batch, rebuild)
        if sizes[1] and self._arena_setting is not None:
            self._warn_if_too_small(sum(sizes))
        # Released in allocation order per worker (the ring's tail only moves over a released prefix); an
        # allocation only numpy arrays came from is released when ``allocs`` goes, at return.
        for worker, end in sorted(allocs):
            self._arenas[worker].hand_out(end)
        return out

    def _warn_if_too_small(self, batch_bytes: int) -> None:
        """Once per loader: say that batches of this size do not fit the arenas. A batch that meets a ring
        momentarily full (a consumer holding batches) falls back too, and needs no word."""
        if batch_bytes * BATCHES_PER_ARENA <= self._arena_bytes:
            return
        setting, self._arena_setting = self._arena_setting, None  # once per loader
        need = -(-batch_bytes * BATCHES_PER_ARENA // (64 << 20)) * 64  # MiB, a multiple of 64
        log.warning("a %d MiB batch did not fit its worker's %d MiB shared-memory arena and went through torch's "
                    "path, a new shared-memory segment per tensor (about 3x the loading time for TCGA-sized slides, "
                    "docs/benchmarks.md); set %s=%d (%d such batches) to keep batches in the arena",
                    -(-batch_bytes >> 20), self._arena_bytes >> 20, setting, need, BATCHES_PER_ARENA)
