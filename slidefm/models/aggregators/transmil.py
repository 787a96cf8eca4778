"""TransMIL-style aggregator (Shao et al. 2021; mSTAR uses 2 layers) with PPEG on the true 2-D grid.

TransMIL reshapes the token sequence into the smallest square, so a patch's conv neighbours are
arbitrary other patches. Here the pyramid position encoding generator (depthwise 7x7 + 5x5 + 3x3
convolutions plus identity) runs on each slide's real grid: empty cells are zeros, exactly as a
dense zero-filled grid would be, but only tissue cells are computed, via a neighbour table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from slidefm.data.batch import PackedSlides
from slidefm.models.aggregators.base import AGGREGATORS, Aggregator, AggregatorOutput
from slidefm.models.segments import segment_index
from slidefm.models.blocks import Block, set_grad_checkpointing
from slidefm.models.grid_conv import grid_neighbours, sparse_depthwise_conv
from slidefm.registry import check_choices

__all__ = ["PPEG", "TransMIL", "TransMILConfig", "grid_neighbours", "sparse_depthwise_conv"]


class PPEG(nn.Module):
    """x + dwconv7(x) + dwconv5(x) + dwconv3(x) over each slide's grid, evaluated at its tokens only."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def kernel(self) -> tuple[Tensor, Tensor]:
        """The three convs and the identity folded into one 7x7 depthwise kernel (49, C) and bias (C,)."""
        w = self.proj7.weight[:, 0] + F.pad(self.proj5.weight[:, 0], (1, 1, 1, 1))
        w = w + F.pad(self.proj3.weight[:, 0], (2, 2, 2, 2))
        eye = torch.zeros(7, 7, device=w.device, dtype=w.dtype)
        eye[3, 3] = 1.0
        w = w + eye
        b = self.proj7.bias + self.proj5.bias + self.proj3.bias
        return w.reshape(w.shape[0], 49).t(), b

    def forward(self, x: Tensor, positions: Tensor, seg: Tensor, nbr: Tensor | None = None) -> Tensor:
        """``x`` (T, C) packed tokens, ``positions`` (T, 2) grid cells, ``seg`` (T,) slide index."""
        if nbr is None:
            nbr = grid_neighbours(positions, seg, 3)
        w, b = self.kernel()
        return sparse_depthwise_conv(x, w.to(x.dtype), nbr) + b.to(x.dtype)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@dataclass
class TransMILConfig:
    name: str = "transmil"
    dim: int = field(default=512, metadata={"help": "token width"})
    depth: int = field(default=2, metadata={"help": "transformer layers, >= 1; PPEG runs after the first"})
    heads: int = field(default=8, metadata={"help": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden width as a multiple of dim"})
    dropout: float = field(default=0.0, metadata={"help": "dropout after the input projection"})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic-depth rate of every layer"})
    pos: Literal["none", "rope", "alibi"] = field(default="none", metadata={
        "help": "attention position term on top of PPEG: none, 2-D RoPE or 2-D ALiBi on grid cells"})
    backend: str = field(default="auto", metadata={
        "help": "attention backend (slidefm.models.attention)", "resume": True})


@AGGREGATORS.register("transmil", config=TransMILConfig)
class TransMIL(Aggregator):
    """Input projection -> [CLS] + tokens -> layer 1 -> PPEG (true grid) -> layers 2.. -> LayerNorm; slide = CLS.

    Exact packed attention replaces TransMIL's Nystrom approximation. PPEG sees only patch tokens
    (the CLS has no grid cell), so moving one token on the grid changes the output while shifting a
    whole slide does not.
    """

    positions_for = "PPEG on the grid"

    def __init__(self, cfg: TransMILConfig, *, in_dim: int):
        super().__init__()
        check_choices(cfg)
        if cfg.depth < 1:
            raise ValueError(f"depth must be >= 1, got {cfg.depth}")
        self.cfg = cfg
        dim = cfg.dim
        self.in_dim, self.dim = in_dim, dim
        self.proj = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(cfg.dropout))
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.cls_token = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList(
            Block(dim, cfg.heads, cfg.mlp_ratio, pos=cfg.pos, drop_path=cfg.drop_path, backend=cfg.backend)
            for _ in range(cfg.depth)
        )
        self.ppeg = PPEG(dim)
        self.norm = nn.LayerNorm(dim)
        self.apply(_init_linear)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        set_grad_checkpointing(self, enabled)

    def forward(self, x: PackedSlides) -> AggregatorOutput:
        h = self.proj(x.tokens)
        if x.token_mask is not None:
            h = torch.where(x.token_mask[:, None], self.mask_token.to(h.dtype), h)
        dev, b, t = h.device, x.num_slides, h.shape[0]
        offsets = x.offsets.to(dev)
        seg = segment_index(offsets)
        seq_offsets = offsets + torch.arange(b + 1, device=dev)
        tok_idx = torch.arange(t, device=dev) + seg + 1  # each slide's CLS sits just before its tokens
        cls_idx = seq_offsets[:-1]
        seq = h.new_zeros(t + b, self.dim).index_copy(0, tok_idx, h)
        seq = seq.index_copy(0, cls_idx, self.cls_token.to(h.dtype).expand(b, -1))
        pos = torch.full((t + b, 2), float("nan"), device=dev)
        pos[tok_idx] = x.positions.to(dev, torch.float32)
        nbr = grid_neighbours(x.positions.to(dev), seg, 3)
        for i, blk in enumerate(self.blocks):
            seq = blk(seq, seq_offsets, pos)
            if i == 0:
                seq = seq.index_copy(0, tok_idx, self.ppeg(seq[tok_idx], x.positions, seg, nbr))
        seq = self.norm(seq)
        return AggregatorOutput(slide=seq[cls_idx], tokens=seq[tok_idx])
