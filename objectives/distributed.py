"""Process-group helpers that degrade to no-ops in a single process.

Every collective here is called by every rank in the same order whatever its local data
(ranks with an empty or fully masked batch still take part); callers rely on that to avoid
deadlocks when some rank has nothing valid.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over ranks, in place (no gradient); identity without a process group."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: Tensor) -> Tensor:
    """Max over ranks, in place (no gradient); identity without a process group."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice.

    The gradient of an all_gather is a reduce-scatter(sum). It is written as all_reduce + slice
    because every backend has all_reduce (gloo has no reduce_scatter), and
    ``torch.distributed.nn.functional.all_gather`` emits a FutureWarning on every call.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.n = x.shape[0]
        ctx.rank = dist.get_rank()
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Local batch size of every rank ([n] in one process)."""
    if not is_distributed():
        return [n]
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(v) for v in out]


def gather_padded(x: Tensor, sizes: list[int], *, grad: bool) -> Tensor:
    """Concatenate every rank's ``x`` (n_r, ...) after padding each to max(sizes) rows.

    Returns (world * max(sizes), ...): rank r's rows start at ``r * max(sizes)``; padding rows
    are zeros. With ``grad`` the gather is differentiable (gradients reach the local rows).
    """
    if not is_distributed():
        return x
    pad = max(sizes) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))], 0)
    if grad:
        return _GatherWithGrad.apply(x)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, 0)


def padded_row_mask(sizes: list[int], device: torch.device) -> Tensor:
    """(world * max(sizes),) bool: True for real rows, False for padding."""
    m = max(sizes)
    ar = torch.arange(m, device=device)
    return torch.cat([ar < s for s in sizes])


def local_rows(sizes: list[int], device: torch.device) -> Tensor:
    """(world * max(sizes),) bool: True for this rank's real rows."""
    m = max(sizes)
    r = rank()
    out = torch.zeros(len(sizes) * m, dtype=torch.bool, device=device)
    out[r * m : r * m + sizes[r]] = True
    return out


__all__ = [
    "all_reduce_max",
    "all_reduce_sum",
    "gather_padded",
    "gather_sizes",
    "is_distributed",
    "local_rows",
    "padded_row_mask",
    "rank",
    "world_size",
]
