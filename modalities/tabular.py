"""Encoders for tabular modalities (expression, mutations, proteins): (B, in_dim) -> (B, out_dim).

``in_dim`` (the number of features, ``len(transform.genes)``) is passed at build:
``MODALITY_ENCODERS.build(cfg, in_dim=G)``; ``geneset_transformer`` also takes ``genes``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from slidefm.errors import SlidefmError
from slidefm.modalities.base import MODALITY_ENCODERS


def _check_dims(in_dim: int, out_dim: int) -> None:
    if int(in_dim) < 1 or int(out_dim) < 1:
        raise SlidefmError(f"tabular encoder needs in_dim >= 1 and out_dim >= 1, got {in_dim}, {out_dim}")


@dataclass
class MLPEncoderConfig:
    name: str = "mlp"
    out_dim: int = field(default=256, metadata={"help": "embedding width"})
    hidden_dims: list[int] = field(default_factory=lambda: [512], metadata={"help": "hidden layer widths"})
    dropout: float = field(default=0.1, metadata={"help": "dropout after each hidden layer"})
    input_dropout: float = field(default=0.0, metadata={
        "help": "dropout on the input features (genes) while training: the embedding must rest on signals "
                "many features share (pathways), not on any one gene's noise"})


@MODALITY_ENCODERS.register("mlp", config=MLPEncoderConfig)
class MLPEncoder(nn.Module):
    """(Input dropout), LayerNorm on the input, then (Linear, GELU, Dropout) per hidden width, then Linear to out_dim."""

    def __init__(self, cfg: MLPEncoderConfig, *, in_dim: int):
        super().__init__()
        _check_dims(in_dim, cfg.out_dim)
        self.cfg = cfg
        self.in_dim, self.out_dim = int(in_dim), int(cfg.out_dim)
        layers: list[nn.Module] = [nn.Dropout(cfg.input_dropout)] if cfg.input_dropout > 0 else []
        layers.append(nn.LayerNorm(self.in_dim))
        d = self.in_dim
        for h in cfg.hidden_dims:
            layers += [nn.Linear(d, int(h)), nn.GELU(), nn.Dropout(cfg.dropout)]
            d = int(h)
        layers.append(nn.Linear(d, self.out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@dataclass
class SNNEncoderConfig:
    name: str = "snn"
    out_dim: int = field(default=256, metadata={"help": "embedding width"})
    hidden_dims: list[int] = field(default_factory=lambda: [256, 256], metadata={"help": "hidden layer widths"})
    dropout: float = field(default=0.25, metadata={"help": "alpha-dropout rate"})


@MODALITY_ENCODERS.register("snn", config=SNNEncoderConfig)
class SNNEncoder(nn.Module):
    """Self-normalising network (Klambauer et al.; PORPOISE/Threads omics branch): (Linear, SELU,
    AlphaDropout) blocks with LeCun-normal init, then Linear to out_dim."""

    def __init__(self, cfg: SNNEncoderConfig, *, in_dim: int):
        super().__init__()
        _check_dims(in_dim, cfg.out_dim)
        self.cfg = cfg
        self.in_dim, self.out_dim = int(in_dim), int(cfg.out_dim)
        layers: list[nn.Module] = []
        d = self.in_dim
        for h in cfg.hidden_dims:
            layers += [nn.Linear(d, int(h)), nn.SELU(), nn.AlphaDropout(cfg.dropout)]
            d = int(h)
        layers.append(nn.Linear(d, self.out_dim))
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Linear):
                # SELU keeps activations at zero mean / unit variance only with LeCun-normal weights.
                nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.in_features))
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@dataclass
class GenesetTransformerConfig:
    name: str = "geneset_transformer"
    out_dim: int = field(default=256, metadata={"help": "embedding width"})
    dim: int = field(default=128, metadata={"help": "token width"})
    depth: int = field(default=2, metadata={"help": "transformer layers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in the transformer"})
    chunk_size: int = field(default=64, metadata={
        "help": "genes per token when no gene sets are given (contiguous chunks of the gene list)"})
    gene_sets: Optional[dict[str, list[str]]] = field(default=None, metadata={
        "help": "gene set name -> genes; genes in no set form one extra 'other' token"})


@MODALITY_ENCODERS.register("geneset_transformer", config=GenesetTransformerConfig)
class GenesetTransformerEncoder(nn.Module):
    """Genes grouped into sets, each set linearly embedded to one token, a transformer over the set
    tokens and a CLS token; returns the CLS output projected to out_dim.

    Sets come from ``gene_sets`` (set -> genes, or gene -> set) matched against ``genes`` (the
    column order of the input, i.e. the fitted transform's gene list), or from contiguous chunks
    of ``chunk_size`` columns. A gene may belong to several sets.
    """

    def __init__(self, cfg: GenesetTransformerConfig, *, in_dim: int, genes: Sequence[str] | None = None):
        super().__init__()
        _check_dims(in_dim, cfg.out_dim)
        dim, heads = cfg.dim, cfg.heads
        if dim % heads:
            raise SlidefmError(f"geneset_transformer dim {dim} is not divisible by heads {heads}")
        self.cfg = cfg
        self.in_dim, self.out_dim = int(in_dim), int(cfg.out_dim)
        self.set_names, members = _group_genes(int(in_dim), cfg.gene_sets, genes, int(cfg.chunk_size))
        # One Linear(|set|, dim) per set, stored flat over (set, gene) memberships so that sets of
        # very different sizes cost only their own weights: token_s = sum_g x_g * W[s, g] + b_s.
        set_of = torch.cat([torch.full((len(m),), s, dtype=torch.long) for s, m in enumerate(members)])
        gene_of = torch.cat([torch.as_tensor(m, dtype=torch.long) for m in members])
        self.register_buffer("set_of", set_of, persistent=False)
        self.register_buffer("gene_of", gene_of, persistent=False)
        bound = torch.cat([torch.full((len(m),), 1.0 / math.sqrt(len(m))) for m in members]).unsqueeze(-1)
        self.set_weight = nn.Parameter((torch.rand(len(gene_of), dim) * 2 - 1) * bound)
        self.set_bias = nn.Parameter(torch.zeros(len(members), dim))
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.out_dim)

    @property
    def n_tokens(self) -> int:
        return int(self.set_bias.shape[0])

    def tokens(self, x: Tensor) -> Tensor:
        """(B, G) -> (B, S, dim) set tokens."""
        contrib = x[:, self.gene_of].unsqueeze(-1) * self.set_weight  # (B, E, dim)
        out = x.new_zeros(x.shape[0], self.n_tokens, self.set_weight.shape[1])
        return out.index_add(1, self.set_of, contrib) + self.set_bias

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"expected (B, {self.in_dim}) input, got {tuple(x.shape)}")
        t = self.tokens(x)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        return self.head(self.norm(self.transformer(t))[:, 0])


def _group_genes(in_dim: int, gene_sets, genes, chunk_size: int) -> tuple[list[str], list[list[int]]]:
    if gene_sets is None:
        if chunk_size < 1:
            raise SlidefmError(f"geneset_transformer chunk_size must be >= 1, got {chunk_size}")
        starts = range(0, in_dim, chunk_size)
        return ([f"chunk{i}" for i in range(len(starts))],
                [list(range(s, min(s + chunk_size, in_dim))) for s in starts])
    if genes is None or len(genes) != in_dim:
        raise SlidefmError("geneset_transformer with gene_sets needs genes= (the input's column names, "
                           f"{in_dim} of them; the fitted transform's gene list)")
    sets: dict[str, list[str]] = {}
    for k, v in dict(gene_sets).items():
        if isinstance(v, str):  # gene -> set form
            sets.setdefault(v, []).append(str(k))
        else:
            sets.setdefault(str(k), []).extend(str(g) for g in v)
    col = {str(g): j for j, g in enumerate(genes)}
    names, members, covered = [], [], set()
    empty = 0
    for name, gs in sets.items():
        idx = sorted({col[g] for g in gs if g in col})
        if not idx:
            empty += 1
            continue
        names.append(name)
        members.append(idx)
        covered.update(idx)
    if empty:
        warnings.warn(f"{empty} gene set(s) share no gene with the input and are dropped", stacklevel=3)
    rest = [j for j in range(in_dim) if j not in covered]
    if rest:
        names.append("other")
        members.append(rest)
    return names, members


__all__ = [
    "MLPEncoder", "MLPEncoderConfig", "SNNEncoder", "SNNEncoderConfig",
    "GenesetTransformerEncoder", "GenesetTransformerConfig",
]
