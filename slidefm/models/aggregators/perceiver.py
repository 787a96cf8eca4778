"""PRISM-style Perceiver aggregator: learned latents cross-attend to a slide's tokens, then self-attend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from timm.layers import trunc_normal_
from torch import nn

from slidefm.data.batch import PackedSlides
from slidefm.models.aggregators.base import AGGREGATORS, Aggregator, AggregatorOutput
from slidefm.models.blocks import Block, CrossAttentionBlock
from slidefm.registry import check_choices

__all__ = ["PerceiverConfig", "PerceiverAggregator"]


@dataclass
class PerceiverConfig:
    name: str = "perceiver"
    dim: int = field(default=512, metadata={"help": "latent and output width"})
    n_latents: int = field(default=64, metadata={"help": "learned latents per slide (PRISM: 512)"})
    heads: int = field(default=8, metadata={"help": "attention heads"})
    n_cross: int = field(default=1, metadata={"help": "cross-attention blocks (latents <- tokens), >= 1"})
    depth: int = field(default=2, metadata={"help": "latent self-attention blocks"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden width as a multiple of dim"})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic-depth rate of every block"})
    pool: Literal["mean", "first"] = field(default="mean", metadata={
        "help": "slide embedding: the mean of the final latents, or the first latent"})
    backend: str = field(default="auto", metadata={
        "help": "attention backend (slidefm.models.attention)", "resume": True})


@AGGREGATORS.register("perceiver", config=PerceiverConfig)
class PerceiverAggregator(Aggregator):
    """``n_latents`` learned latents per slide; every cross block lets them read the slide's tokens.

    No positions are used (as PRISM): latents have none, so attention between them and the tokens
    carries no spatial term. Outputs: ``slide`` pools the final latents (``pool``); ``tokens`` are
    the input-projected patch tokens (mask embedding substituted), since the tokens themselves are
    never updated by the latent blocks. ``forward_latents`` returns the (B * n_latents, dim) latents.
    Every slide needs at least one token.
    """

    uses_positions = False

    def __init__(self, cfg: PerceiverConfig, *, in_dim: int):
        super().__init__()
        check_choices(cfg)
        if cfg.n_cross < 1:
            raise ValueError(f"n_cross must be >= 1, got {cfg.n_cross}")
        self.cfg = cfg
        dim, heads, mlp_ratio, drop_path, backend = cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.drop_path, cfg.backend
        n_latents = cfg.n_latents
        self.in_dim, self.dim, self.n_latents, self.pool = in_dim, dim, n_latents, cfg.pool
        self.proj = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.latents = nn.Parameter(torch.zeros(n_latents, dim))
        self.cross = nn.ModuleList(
            CrossAttentionBlock(dim, heads, mlp_ratio=mlp_ratio, drop_path=drop_path, backend=backend)
            for _ in range(cfg.n_cross)
        )
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, pos="none", drop_path=drop_path, backend=backend) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.latents, std=0.02)

    def forward_latents(self, x: PackedSlides) -> tuple[torch.Tensor, torch.Tensor]:
        """(final latents (B * n_latents, dim), projected tokens (T, dim))."""
        h = self.proj(x.tokens)
        if x.token_mask is not None:
            h = torch.where(x.token_mask[:, None], self.mask_token.to(h.dtype), h)
        b, dev = x.num_slides, h.device
        kv_offsets = x.offsets.to(dev)
        if bool((kv_offsets[1:] == kv_offsets[:-1]).any()):
            raise ValueError("perceiver: every slide needs at least one token")
        q_offsets = torch.arange(b + 1, device=dev) * self.n_latents
        lat = self.latents.to(h.dtype).repeat(b, 1)
        for blk in self.cross:
            lat = blk(lat, q_offsets, h, kv_offsets)
        for blk in self.blocks:
            lat = blk(lat, q_offsets)
        return self.norm(lat), h

    def forward(self, x: PackedSlides) -> AggregatorOutput:
        lat, h = self.forward_latents(x)
        lat = lat.view(x.num_slides, self.n_latents, self.dim)
        slide = lat.mean(1) if self.pool == "mean" else lat[:, 0]
        return AggregatorOutput(slide=slide, tokens=h)
