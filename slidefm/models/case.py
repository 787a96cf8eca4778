"""Patient (case) level: a transformer over a patient's slide embeddings, and plain pooling.

Slides of P patients arrive packed: ``emb`` (S, d) with patient i owning
``emb[offsets[i]:offsets[i+1]]``. Both paths are invariant to the order of a patient's slides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from slidefm.errors import SlidefmError
from slidefm.models.segments import segment_index, segment_max, segment_mean
from slidefm.models.blocks import Block, set_grad_checkpointing
from slidefm.registry import Registry, config_to_dict

__all__ = ["CASE_MODELS", "CaseConfig", "CaseTransformer", "build_case_transformer", "pool_slides"]

CASE_MODELS = Registry("case model")


#: ``model.patient_pool``: the allowed values, declared here once (slidefm.config.ModelConfig uses this type).
SlidePooling = Literal["mean", "max"]


def pool_slides(emb: Tensor, offsets: Tensor, how: SlidePooling) -> Tensor:
    """(P, d) patient embeddings from packed (S, d) slide embeddings by ``how`` = "mean" | "max".

    For checkpoints without a case transformer. A patient without slides gets zeros.
    """
    seg = segment_index(offsets.to(emb.device))
    n = int(offsets.numel() - 1)
    if how == "mean":
        return segment_mean(emb, seg, n)
    if how == "max":
        return segment_max(emb, seg, n)
    raise SlidefmError(f"unknown slide pooling '{how}'; known: {', '.join(get_args(SlidePooling))}")


@dataclass
class CaseConfig:
    name: str = "transformer"
    dim: int | None = field(default=None, metadata={
        "help": "width of the slide embeddings; None: the aggregator's output width"})
    depth: int = field(default=3, metadata={"help": "transformer blocks"})
    heads: int = field(default=8, metadata={"help": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden width as a multiple of dim"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the input slide embeddings"})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic-depth rate of every block"})


@CASE_MODELS.register("transformer", config=CaseConfig)
class CaseTransformer(nn.Module):
    """[CASE] token + a patient's slide embeddings -> ``depth`` pre-norm blocks -> LayerNorm(CASE).

    No positional encoding of any kind (not even a slide index), so self-attention is
    permutation-equivariant over the slides and the [CASE] output is invariant to their order.
    ``forward(emb (S, d), offsets (P+1,)) -> (P, d)``; ``cfg.dim`` is set (see :func:`build_case_transformer`).
    """

    def __init__(self, cfg: CaseConfig):
        super().__init__()
        if cfg.dim is None:
            raise SlidefmError("case transformer needs dim (the slide embedding width)")
        self.cfg = cfg
        dim = int(cfg.dim)
        self.dim = dim
        self.case_token = nn.Parameter(torch.zeros(dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.heads, cfg.mlp_ratio, pos="none", drop_path=cfg.drop_path) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        trunc_normal_(self.case_token, std=0.02)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        set_grad_checkpointing(self, enabled)

    def forward(self, emb: Tensor, offsets: Tensor) -> Tensor:
        dev, s = emb.device, emb.shape[0]
        offsets = offsets.to(dev)
        p = int(offsets.numel() - 1)
        seg = segment_index(offsets)
        seq_offsets = offsets + torch.arange(p + 1, device=dev)
        slide_idx = torch.arange(s, device=dev) + seg + 1
        case_idx = seq_offsets[:-1]
        seq = emb.new_zeros(s + p, self.dim).index_copy(0, slide_idx, self.drop(emb))
        seq = seq.index_copy(0, case_idx, self.case_token.to(emb.dtype).expand(p, -1))
        for blk in self.blocks:
            seq = blk(seq, seq_offsets)
        return self.norm(seq[case_idx])


def build_case_transformer(cfg, slide_dim: int | None = None) -> nn.Module:
    """Build from a :class:`CaseConfig` (or dict/DictConfig with ``name``) for slide embeddings of width
    ``slide_dim`` (the aggregator's ``dim``), which must agree with ``cfg.dim`` when both are set."""
    kw = config_to_dict(cfg)
    want = kw.pop("dim", None)
    dim = want if slide_dim is None else slide_dim
    if slide_dim is not None and want is not None and int(want) != int(slide_dim):
        raise SlidefmError(f"case transformer dim {want} does not match the slide embedding width {slide_dim}")
    if dim is None:
        raise SlidefmError("case transformer needs dim (the slide embedding width)")
    return CASE_MODELS.build(kw, dim=int(dim))
