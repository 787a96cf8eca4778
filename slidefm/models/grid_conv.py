"""Depthwise convolution over each slide's true patch grid, evaluated at tissue tokens only.

Packed tokens carry integer grid cells; a neighbour table maps every token to the token at each
kernel offset in its own slide (-1 for an empty cell, which reads as zero, exactly like a
zero-filled dense grid). Used by TransMIL's PPEG and by the ViT's conditional position encoding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GridPEG", "grid_neighbours", "sparse_depthwise_conv"]


def grid_neighbours(positions: Tensor, seg: Tensor, radius: int) -> Tensor:
    """(K, T) row of the token at offset (dy, dx) from each token in its own slide, -1 where the cell is empty.

    K = (2r+1)^2 offsets in row-major kernel order: k = (dy + r) * (2r+1) + (dx + r), matching a
    conv2d weight ``w[c, 0, dy + r, dx + r]`` over an image indexed [y, x]. Positions are (x, y)
    grid cells and must be unique within a slide (``slidefm.grid`` guarantees it).
    """
    t = positions.shape[0]
    k = 2 * radius + 1
    if t == 0:
        return torch.empty(k * k, 0, dtype=torch.long, device=positions.device)
    p = positions.long()
    px = p[:, 0] - p[:, 0].min() + radius
    py = p[:, 1] - p[:, 1].min() + radius
    # Padding each axis by the radius keeps every queried cell inside its own slide's key range.
    w = int(px.max()) + radius + 1
    h = int(py.max()) + radius + 1
    key = (seg.long() * h + py) * w + px
    sk, order = torch.sort(key)
    d = torch.arange(-radius, radius + 1, device=p.device)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    q = key[None, :] + (dy.reshape(-1, 1) * w + dx.reshape(-1, 1))  # (K, T)
    j = torch.searchsorted(sk, q).clamp_max(t - 1)
    return torch.where(sk[j] == q, order[j], torch.full_like(j, -1))


class _SparseDepthwise(torch.autograd.Function):
    """out[t] = sum_k w[k] * x[nbr[k, t]] (missing neighbours contribute 0).

    Gathers only, no scatter: the input gradient is the same correlation with the point-reflected
    kernel (the token at offset -d from u is the one that sees u at offset +d), which keeps it
    deterministic on GPU and avoids CPU index_add_. The custom backward recomputes the gathers
    instead of letting autograd keep K (T, C) copies.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, nbr: Tensor) -> Tensor:
        idx = torch.where(nbr >= 0, nbr, x.shape[0])  # empty cells read an appended zero row
        xp = torch.cat([x, x.new_zeros(1, x.shape[1])])
        out = torch.zeros_like(x)
        for k in range(idx.shape[0]):
            out.addcmul_(xp[idx[k]], weight[k])
        ctx.save_for_backward(x, weight, idx)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, idx = ctx.saved_tensors
        n_off = idx.shape[0]
        gp = torch.cat([g, g.new_zeros(1, g.shape[1])])
        xp = torch.cat([x, x.new_zeros(1, x.shape[1])])
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for k in range(n_off):
            if gw is not None:
                gw[k] = (g * xp[idx[k]]).sum(0)
            if gx is not None:
                gx.addcmul_(gp[idx[n_off - 1 - k]], weight[k])
        return gx, gw, None


def sparse_depthwise_conv(x: Tensor, weight: Tensor, nbr: Tensor) -> Tensor:
    """Depthwise conv of packed tokens ``x`` (T, C) with ``weight`` (K, C) over neighbour table ``nbr`` (K, T)."""
    return _SparseDepthwise.apply(x, weight, nbr)


class GridPEG(nn.Module):
    """Conditional position encoding (CPVT, Chu et al. 2021) on the slide grid: x + dwconv_k(x).

    Gives every token its immediate neighbourhood before attention, which relative attention
    positions alone learn slowly: on grids where *arrangement* carries the signal (what sits next
    to tumour nests), this is what makes it visible to the first block. Kernel ``k`` odd.
    """

    def __init__(self, dim: int, kernel: int = 3):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {kernel}")
        self.radius = kernel // 2
        self.weight = nn.Parameter(torch.empty(kernel * kernel, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        # As nn.Conv2d(groups=dim) initialises: uniform(+-1/sqrt(fan_in)), fan_in = k*k.
        bound = 1.0 / kernel
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor, positions: Tensor, seg: Tensor, nbr: Tensor | None = None) -> Tensor:
        if nbr is None:
            nbr = grid_neighbours(positions, seg, self.radius)
        return x + sparse_depthwise_conv(x, self.weight.to(x.dtype), nbr) + self.bias.to(x.dtype)
