"""Gated multi-head attention MIL (Ilse et al. 2018 gating; Threads/MADELEINE-style multi-head)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from slidefm.data.batch import PackedSlides
from slidefm.models.aggregators.base import AGGREGATORS, Aggregator, AggregatorOutput
from slidefm.models.segments import segment_index, segment_softmax, segment_sum

__all__ = ["ABMILConfig", "GatedABMIL"]


@dataclass
class ABMILConfig:
    name: str = "abmil"
    dim: int = field(default=1024, metadata={"help": "output width (Threads: 1024)"})
    hidden: int = field(default=512, metadata={"help": "width of the input MLP"})
    attn_dim: int = field(default=256, metadata={"help": "width of each head's gated attention branch"})
    heads: int = field(default=4, metadata={"help": "attention heads, each pooling the slide with its own weights"})
    dropout: float = field(default=0.25, metadata={"help": "dropout after the input MLP, on the gates and the pooled vector"})


@AGGREGATORS.register("abmil", config=ABMILConfig)
class GatedABMIL(Aggregator):
    """Input MLP -> per-head gated attention tanh(Va h) * sigmoid(Ua h) -> softmax over each slide's tokens.

    Each head pools the hidden tokens with its own weights; the ``heads`` pooled vectors are
    concatenated and projected to ``dim``. The token output applies that same projection to each
    token as if every head had attended to it alone (the weight blocks summed), so tokens live in the
    slide embedding's space: with identical head weights the slide is their attention-weighted mean.
    """

    uses_positions = False

    def __init__(self, cfg: ABMILConfig, *, in_dim: int):
        super().__init__()
        self.cfg = cfg
        dim, hidden, attn_dim, heads, dropout = cfg.dim, cfg.hidden, cfg.attn_dim, cfg.heads, cfg.dropout
        self.in_dim, self.dim, self.heads, self.hidden = in_dim, dim, heads, hidden
        self.inp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.mask_token = nn.Parameter(torch.zeros(hidden))
        self.attn_a = nn.Linear(hidden, heads * attn_dim)
        self.attn_b = nn.Linear(hidden, heads * attn_dim)
        self.attn_drop = nn.Dropout(dropout)
        # One score vector per head, applied as a grouped product over the head's gate branch.
        self.attn_w = nn.Parameter(torch.empty(heads, attn_dim))
        self.attn_bias = nn.Parameter(torch.zeros(heads))
        self.out_drop = nn.Dropout(dropout)
        self.out = nn.Linear(heads * hidden, dim)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.attn_w, std=attn_dim**-0.5)

    def attention(self, h: Tensor, seg: Tensor, n: int) -> Tensor:
        """(T, heads) attention weights over the hidden tokens ``h``; each slide's column sums to 1."""
        gate = torch.tanh(self.attn_a(h)) * torch.sigmoid(self.attn_b(h))
        gate = self.attn_drop(gate).view(h.shape[0], self.heads, -1)
        scores = torch.einsum("thd,hd->th", gate, self.attn_w) + self.attn_bias
        return segment_softmax(scores, seg, n)

    def forward_with_attention(self, x: PackedSlides) -> tuple[AggregatorOutput, Tensor]:
        h = self.inp(x.tokens)
        if x.token_mask is not None:
            h = torch.where(x.token_mask[:, None], self.mask_token.to(h.dtype), h)
        seg = segment_index(x.offsets)
        n = x.num_slides
        a = self.attention(h, seg, n)  # (T, H)
        pooled = segment_sum(a[:, :, None] * h[:, None, :], seg, n)  # (B, H, hidden)
        slide = self.out(self.out_drop(pooled.reshape(n, -1)))
        w_tok = self.out.weight.view(self.dim, self.heads, self.hidden).sum(1)
        tokens = nn.functional.linear(h, w_tok, self.out.bias)
        return AggregatorOutput(slide=slide, tokens=tokens), a

    def forward(self, x: PackedSlides) -> AggregatorOutput:
        return self.forward_with_attention(x)[0]
