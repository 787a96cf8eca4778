"""ViT slide aggregator over the packed tokens of whole slides (no token cap, no subsampling).

Input projection D_in -> dim, learned mask token for ``x.token_mask``, one CLS (+ optional
registers) per slide inserted in front of its patch tokens, relative positions only (2-D RoPE or
2-D ALiBi on grid cells; CLS/registers have none), optionally a depthwise-conv position
encoding on the true grid before the blocks (``peg``), pre-norm blocks, final LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from timm.layers import trunc_normal_
from torch import nn

from slidefm.data.batch import PackedSlides
from slidefm.models.aggregators.base import AGGREGATORS, Aggregator, AggregatorOutput
from slidefm.models.blocks import Block
from slidefm.models.grid_conv import GridPEG
from slidefm.models.segments import segment_softmax, segment_sum
from slidefm.registry import check_choices, config_get


@dataclass
class ViTConfig:
    name: str = "vit"
    dim: int = field(default=384, metadata={"help": "token width"})
    depth: int = field(default=6, metadata={"help": "transformer blocks"})
    heads: int = field(default=6, metadata={"help": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden width as a multiple of dim"})
    pos: Literal["rope", "alibi", "none"] = field(default="rope", metadata={
        "help": "relative position term of attention on grid cells: 2-D RoPE (signed offsets), 2-D ALiBi "
                "(distance only) or none (a set model: with peg=0 it needs no positions)"})
    num_registers: int = field(default=0, metadata={"help": "register tokens per slide beside the CLS"})
    drop_path: float = field(default=0.0, metadata={
        "help": "max stochastic-depth rate (linear over depth), drawn per slide"})
    layerscale: Optional[float] = field(default=None, metadata={
        "help": "initial LayerScale of every residual branch; None: no LayerScale"})
    backend: str = field(default="auto", metadata={
        "help": "attention backend (slidefm.models.attention)", "resume": True})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "recompute block activations in backward (trainer.grad_checkpointing turns it on for every model)",
        "resume": True})
    pool: Literal["cls", "mean", "mean_attn"] = field(default="cls", metadata={
        "help": "slide readout: the CLS output, the mean of the patch-token outputs, or that mean plus a "
                "multi-head gated-attention pool over the token outputs (so a small focus is not averaged away)"})
    readout_heads: int = field(default=4, metadata={"help": "attention heads of the mean_attn readout (divide dim)"})
    pool_norm: bool = field(default=False, metadata={
        "help": "LayerNorm on the pooled slide embedding (timm's fc_norm): a mean of N token outputs otherwise "
                "carries the slide's size in its scale"})
    peg: int = field(default=0, metadata={
        "help": "kernel of a depthwise-conv position encoding on the slide grid before the blocks (0: off; 3, 5, ..)"})


@AGGREGATORS.register("vit", config=ViTConfig)
class ViTAggregator(Aggregator):
    positions_for = "2-D RoPE/ALiBi and grid PEG"

    @classmethod
    def needs_positions(cls, cfg) -> bool:
        return config_get(cfg, "pos", default="rope") != "none" or bool(config_get(cfg, "peg", default=0))

    def __init__(self, cfg: ViTConfig, *, in_dim: int):
        super().__init__()
        check_choices(cfg)
        self.cfg = cfg
        dim, depth, drop_path, num_registers = cfg.dim, cfg.depth, cfg.drop_path, cfg.num_registers
        self.in_dim, self.dim, self.pool, self.num_prefix = in_dim, dim, cfg.pool, 1 + num_registers
        self.proj = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.peg = GridPEG(dim, cfg.peg) if cfg.peg else None
        self.cls_token = nn.Parameter(torch.zeros(1, dim))
        self.registers = nn.Parameter(torch.zeros(num_registers, dim))
        rates = torch.linspace(0, drop_path, depth).tolist() if depth > 1 else [drop_path] * depth
        self.blocks = nn.ModuleList(
            Block(dim, cfg.heads, cfg.mlp_ratio, pos=cfg.pos, drop_path=r, layerscale=cfg.layerscale,
                  backend=cfg.backend, grad_checkpointing=cfg.grad_checkpointing)
            for r in rates
        )
        self.norm = nn.LayerNorm(dim)
        self.readout = AttentionReadout(dim, cfg.readout_heads) if cfg.pool == "mean_attn" else None
        self.pool_norm = nn.LayerNorm(dim) if cfg.pool_norm else None
        self.apply(self._init_weights)
        for p in (self.mask_token, self.cls_token, self.registers):
            trunc_normal_(p, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for b in self.blocks:
            b.grad_checkpointing = enabled

    def forward(self, x: PackedSlides) -> AggregatorOutput:
        h = self.proj(x.tokens)
        if x.token_mask is not None:
            h = torch.where(x.token_mask.to(h.device)[:, None], self.mask_token.to(h.dtype), h)
        dev, B, P, T = h.device, x.num_slides, self.num_prefix, h.shape[0]
        offsets = x.offsets.to(dev)
        lens = offsets[1:] - offsets[:-1]
        seq_offsets = offsets + P * torch.arange(B + 1, device=dev)
        slide_of = torch.repeat_interleave(torch.arange(B, device=dev), lens, output_size=T)
        if self.peg is not None:
            # masked tokens see their neighbours here: that is what masked prediction asks of them
            h = self.peg(h, x.positions.to(dev), slide_of)
        patch_idx = torch.arange(T, device=dev) + P * (slide_of + 1)  # where each patch lands
        prefix_idx = (seq_offsets[:-1, None] + torch.arange(P, device=dev)).reshape(-1)  # CLS at 0, then registers

        prefix = torch.cat([self.cls_token, self.registers]).to(h.dtype).repeat(B, 1)
        seq = h.new_zeros(T + B * P, self.dim).index_copy(0, patch_idx, h).index_copy(0, prefix_idx, prefix)
        del h  # a whole (T, dim) copy on 100k-token slides
        pos = torch.full((T + B * P, 2), float("nan"), device=dev)
        p = x.positions.to(dev, torch.float32)
        # Centre each slide's grid on its centroid: CLS/register tokens carry no rotation, so with
        # RoPE their attention to patches would otherwise depend on where the grid happens to start
        # (crops start at 0, whole slides anywhere). ALiBi only sees distances and is unaffected.
        centroid = p.new_zeros(B, 2).index_add_(0, slide_of, p) / lens.clamp(min=1).to(p.dtype)[:, None]
        pos[patch_idx] = p - centroid[slide_of]

        for blk in self.blocks:
            seq = blk(seq, seq_offsets, pos)
        seq = self.norm(seq)
        tokens = seq[patch_idx]
        if self.pool == "cls":
            slide = seq[seq_offsets[:-1]]
        else:
            sums = tokens.new_zeros(B, self.dim).index_add(0, slide_of, tokens)
            slide = sums / lens.clamp(min=1).to(tokens.dtype)[:, None]
            if self.readout is not None:
                slide = slide + self.readout(tokens, slide_of, B)
        if self.pool_norm is not None:
            slide = self.pool_norm(slide)
        return AggregatorOutput(slide=slide, tokens=tokens)


class AttentionReadout(nn.Module):
    """Multi-head gated attention pooling of token outputs (ABMIL-style gate, one softmax per slide and head;
    head h pools channel block h). Added to the mean of the tokens: the mean keeps the slide's overall
    state, attention lets a few tokens (a 2% focus) dominate some channels instead of being averaged away."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"readout_heads={heads} must divide dim={dim}")
        self.heads = heads
        hidden = max(dim // 2, heads)
        self.v = nn.Linear(dim, hidden)
        self.u = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, heads)

    def forward(self, tokens: torch.Tensor, slide_of: torch.Tensor, n: int) -> torch.Tensor:
        scores = self.w(torch.tanh(self.v(tokens)) * torch.sigmoid(self.u(tokens)))  # (T, heads)
        a = segment_softmax(scores, slide_of, n)
        T, d = tokens.shape
        pooled = segment_sum((a[:, :, None] * tokens.view(T, self.heads, d // self.heads)).reshape(T, d), slide_of, n)
        return pooled


__all__ = ["ViTConfig", "ViTAggregator"]
