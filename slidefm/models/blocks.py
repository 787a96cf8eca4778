"""Pre-norm transformer blocks over packed tokens (one row per token, slides delimited by offsets).

``Block``: self-attention within each slide (2-D RoPE, 2-D ALiBi or no position) + MLP.
``CrossAttentionBlock``: queries with their own offsets (Perceiver latents, [CASE] tokens)
attend to the tokens of the same slide/case + MLP.

Example (Perceiver cross-attention, L latents per slide)::

    blk = CrossAttentionBlock(dim=512, heads=8, kv_dim=768)
    lat = latents.repeat(B, 1)                                   # (B*L, 512)
    q_off = torch.arange(B + 1) * L
    lat = blk(lat, q_off, tokens, x.offsets)                     # (B*L, 512)
"""

from __future__ import annotations

import torch
from timm.layers import DropPath, LayerScale, Mlp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from slidefm.models.attention import alibi_slopes, apply_rope, packed_attention, rope_angles

POS_KINDS = ("rope", "alibi", "none")


class SlideDropPath(nn.Module):
    """Stochastic depth with one keep/drop draw per slide.

    timm's DropPath treats dim 0 as the batch, which on packed (T, D) tokens would drop single
    tokens; here timm draws the per-slide factors and they are broadcast to each slide's tokens.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)
        self.drop = DropPath(self.p) if self.p > 0 else nn.Identity()

    def forward(self, x: Tensor, offsets: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        lens = (offsets[1:] - offsets[:-1]).to(x.device)
        keep = self.drop(x.new_ones(lens.numel(), 1))  # (B, 1): 0 or 1/keep_prob
        return x * keep.repeat_interleave(lens, dim=0, output_size=x.shape[0])


def _layerscale(dim: int, init: float | None) -> nn.Module:
    return LayerScale(dim, init_values=init) if init is not None else nn.Identity()


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention within each slide of a packed (T, dim) sequence.

    ``positions`` is a float (T, 2) grid position per token, NaN for position-less tokens.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, pos: str = "rope",
                 rope_base: float = 10000.0, backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        if pos not in POS_KINDS:
            raise ValueError(f"pos must be one of {POS_KINDS}, got '{pos}'")
        self.heads, self.head_dim, self.pos, self.rope_base, self.backend = heads, dim // heads, pos, rope_base, backend
        if pos == "rope" and self.head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if pos == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(heads), persistent=False)

    def _qkv(self, x: Tensor, positions: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        T = x.shape[0]
        q, k, v = self.qkv(x).view(T, 3, self.heads, self.head_dim).unbind(1)
        if self.pos == "rope":
            cos, sin = rope_angles(positions, self.head_dim, self.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(self, x: Tensor, offsets: Tensor, positions: Tensor | None = None, norm: nn.Module | None = None,
                token_chunk: int | None = None) -> Tensor:
        """``norm`` is applied to ``x`` first (the block's pre-norm). With ``token_chunk`` (inference only),
        the norm, projections and rotations run over that many tokens at a time into preallocated q/k/v:
        a 100k-token slide then never holds its (T, 3 * dim) qkv activation or full-length temporaries.
        """
        T = x.shape[0]
        if self.pos != "none" and positions is None:
            raise ValueError(f"pos='{self.pos}' needs token positions")
        slopes = self.alibi_slopes if self.pos == "alibi" else None
        if token_chunk is None or T <= token_chunk:
            q, k, v = self._qkv(norm(x) if norm is not None else x, positions)
        else:
            # head-major storage: the attention backends then read each head contiguously, without copies
            q, k, v = (x.new_empty(self.heads, T, self.head_dim).transpose(0, 1) for _ in range(3))
            for s in range(0, T, token_chunk):
                part = x[s : s + token_chunk]
                pos = positions[s : s + token_chunk] if positions is not None else None
                qc, kc, vc = self._qkv(norm(part) if norm is not None else part, pos)
                q[s : s + token_chunk], k[s : s + token_chunk], v[s : s + token_chunk] = qc, kc, vc
        out = packed_attention(q, k, v, offsets, q_positions=positions if slopes is not None else None,
                               alibi_slopes=slopes, backend=self.backend)
        if token_chunk is None or T <= token_chunk:
            return self.proj(out.reshape(T, -1))
        del q, k, v
        res = x.new_empty(T, self.proj.out_features)
        for s in range(0, T, token_chunk):
            part = out[s : s + token_chunk]
            res[s : s + token_chunk] = self.proj(part.reshape(part.shape[0], -1))
        return res


class PackedCrossAttention(nn.Module):
    """Queries (Tq, dim) attend to context (Tk, kv_dim) of the same segment; no positions."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads, self.head_dim, self.backend = heads, dim // heads, backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, q_offsets: Tensor, context: Tensor, kv_offsets: Tensor) -> Tensor:
        q = self.q(x).view(x.shape[0], self.heads, self.head_dim)
        k, v = self.kv(context).view(context.shape[0], 2, self.heads, self.head_dim).unbind(1)
        out = packed_attention(q, k, v, q_offsets, kv_offsets, backend=self.backend)
        return self.proj(out.reshape(x.shape[0], -1))


class _BlockBase(nn.Module):
    """Shared MLP half: pre-norm MLP with LayerScale and per-slide DropPath, activation checkpointing."""

    # In inference the projections and the MLP run over this many tokens at a time: their 3x- and
    # 4x-wide activations would otherwise dominate peak memory on 100k-token slides.
    token_chunk = 16384

    def _init_mlp(self, dim, mlp_ratio, drop_path, layerscale, grad_checkpointing):
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = _layerscale(dim, layerscale)
        self.drop_path1 = SlideDropPath(drop_path)
        self.drop_path2 = SlideDropPath(drop_path)
        self.grad_checkpointing = grad_checkpointing

    def _chunked(self, x: Tensor) -> bool:
        return not torch.is_grad_enabled() and not self.training and x.shape[0] > self.token_chunk

    def _mlp_residual(self, x: Tensor, offsets: Tensor) -> Tensor:
        if self._chunked(x):
            # x is the fresh sum from the attention residual, so updating it in place is safe.
            for part in x.split(self.token_chunk):
                part += self.ls2(self.mlp(self.norm2(part)))
            return x
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))), offsets)

    def forward(self, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class Block(_BlockBase):
    """Pre-norm self-attention block: ``forward(x (T, dim), offsets (B+1,), positions (T, 2) float | None)``.

    pos: "rope" (2-D RoPE on q/k), "alibi" (2-D ALiBi, distance only) or "none". Positions are
    float grid cells with NaN rows for tokens without a position (they are not rotated/biased).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, pos: str = "rope",
                 rope_base: float = 10000.0, drop_path: float = 0.0, layerscale: float | None = None,
                 backend: str = "auto", grad_checkpointing: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PackedSelfAttention(dim, heads, qkv_bias, pos, rope_base, backend)
        self.ls1 = _layerscale(dim, layerscale)
        self._init_mlp(dim, mlp_ratio, drop_path, layerscale, grad_checkpointing)

    def _forward(self, x: Tensor, offsets: Tensor, positions: Tensor | None = None) -> Tensor:
        if self._chunked(x):  # the attention output is fresh, so the residual can land in it
            return self._mlp_residual(
                self.ls1(self.attn(x, offsets, positions, norm=self.norm1, token_chunk=self.token_chunk)).add_(x),
                offsets)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), offsets, positions)), offsets)
        return self._mlp_residual(x, offsets)


class CrossAttentionBlock(_BlockBase):
    """Pre-norm cross-attention block.

    ``forward(q (Tq, dim), q_offsets (B+1,), kv (Tk, kv_dim), kv_offsets (B+1,)) -> (Tq, dim)``:
    the queries of segment i attend to ``kv[kv_offsets[i]:kv_offsets[i+1]]`` (no position terms),
    then an MLP; both with residuals. The context is normalised by its own LayerNorm.
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0, layerscale: float | None = None,
                 backend: str = "auto", grad_checkpointing: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(kv_dim or dim)
        self.attn = PackedCrossAttention(dim, heads, kv_dim, qkv_bias, backend)
        self.ls1 = _layerscale(dim, layerscale)
        self._init_mlp(dim, mlp_ratio, drop_path, layerscale, grad_checkpointing)

    def _forward(self, q: Tensor, q_offsets: Tensor, kv: Tensor, kv_offsets: Tensor) -> Tensor:
        q = q + self.drop_path1(self.ls1(self.attn(self.norm1(q), q_offsets, self.norm_kv(kv), kv_offsets)), q_offsets)
        return self._mlp_residual(q, q_offsets)


def set_grad_checkpointing(module: nn.Module, enabled: bool = True) -> int:
    """Turn activation checkpointing on/off for every block inside ``module``; returns how many blocks.

    A checkpointed block keeps only its input and recomputes its activations in backward
    (``torch.utils.checkpoint``, non-reentrant, RNG state preserved so dropout/DropPath draw the same);
    it applies only in training with grad enabled, so inference and no-grad teachers are unaffected.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, _BlockBase):
            m.grad_checkpointing = bool(enabled)
            n += 1
    return n


__all__ = ["Block", "CrossAttentionBlock", "PackedSelfAttention", "PackedCrossAttention", "SlideDropPath",
           "set_grad_checkpointing"]
