"""Where readers and collates allocate their large outputs: a slide's tensors, a packed batch's tokens.

:func:`empty` is ``torch.empty`` unless a DataLoader worker installed an allocator. slidefm's shared-memory
transport (:mod:`slidefm.data.transport`) installs its arena's in each worker, so a slide read or a batch
packed there is written straight into the memory the main process reads, and crossing the process
boundary copies nothing. The contract for code that runs in such a worker: a tensor from :func:`empty` is
either returned in the batch or dropped; kept past its batch (in a cache, say), its bytes may be reused
once the main process has freed that batch.
"""

from __future__ import annotations

from typing import Callable

import torch

import numpy as np

__all__ = ["empty", "install", "torch_dtype"]

_allocator: Callable[[int], torch.Tensor | None] | None = None


def empty(nbytes: int) -> torch.Tensor:
    """``nbytes`` uninitialised bytes as a 1-D uint8 CPU tensor, 64-byte aligned."""
    if _allocator is not None:
        t = _allocator(nbytes)
        if t is not None:  # None: the installed allocator has no room now
            return t
    return torch.empty(nbytes, dtype=torch.uint8)


def torch_dtype(dt: np.dtype) -> torch.dtype:
    """The torch dtype of a numpy dtype, for typed views of a buffer."""
    got = _TORCH_DTYPES.get(dt)
    if got is None:
        got = _TORCH_DTYPES[dt] = torch.from_numpy(np.empty(0, dt)).dtype
    return got


_TORCH_DTYPES: dict[np.dtype, torch.dtype] = {}


def install(allocator: Callable[[int], torch.Tensor | None] | None) -> None:
    """Route :func:`empty` in this process through ``allocator`` (None: back to ``torch.empty``)."""
    global _allocator
    _allocator = allocator
