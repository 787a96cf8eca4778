"""Packed batches: every slide's tokens concatenated, no padding.

A batch of B slides with n_i patches each is ``tokens`` (T = sum n_i, D), ``positions`` (T, 2)
integer grid cells, ``offsets`` (B + 1,) with slide i at ``tokens[offsets[i]:offsets[i+1]]``,
and an optional boolean ``token_mask`` (T,) marking tokens hidden from the student in masked
self-distillation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from slidefm import buffers


@dataclass
class PackedSlides:
    tokens: Tensor  # (T, D) float
    positions: Tensor  # (T, 2) long
    offsets: Tensor  # (B + 1,) long
    token_mask: Tensor | None = None  # (T,) bool, True = masked
    slide_ids: list[str] = field(default_factory=list)
    # False when a slide of the batch is a features-only bag: its positions are zeros, meaningless.
    # Configs that read positions refuse such cohorts up front (slidefm.models.positions).
    has_positions: bool = True

    @property
    def num_slides(self) -> int:
        return int(self.offsets.numel() - 1)

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def max_len(self) -> int:
        return int(self.lengths.max()) if self.num_slides else 0

    def slide_index(self) -> Tensor:
        """(T,) index of the slide each token belongs to."""
        # inlined (not slidefm.models.segments): data sits below models
        lengths = self.lengths
        return torch.repeat_interleave(torch.arange(lengths.numel(), device=self.offsets.device), lengths)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PackedSlides":
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        tokens = self.tokens.to(device, non_blocking=True)
        if dtype is not None:
            tokens = tokens.to(dtype)
        return PackedSlides(tokens, mv(self.positions), mv(self.offsets), mv(self.token_mask), list(self.slide_ids),
                            self.has_positions)

    def select(self, i: int) -> "PackedSlides":
        """Slide ``i`` alone as a one-slide batch."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        m = None if self.token_mask is None else self.token_mask[a:b]
        return PackedSlides(
            self.tokens[a:b], self.positions[a:b], torch.tensor([0, b - a], dtype=self.offsets.dtype), m,
            self.slide_ids[i : i + 1], self.has_positions,
        )


def pack_slides(
    features: Sequence[np.ndarray | Tensor],
    positions: Sequence[np.ndarray | Tensor],
    slide_ids: Sequence[str] | None = None,
    token_masks: Sequence[np.ndarray | Tensor] | None = None,
    has_positions: bool = True,
    dtype: torch.dtype | None = torch.float32,
) -> PackedSlides:
    """Concatenate per-slide (n_i, D) features and (n_i, 2) positions into one packed batch of ``dtype``
    tokens (float16 features are cast as they are copied in). ``dtype=None``: float16 when every slide is
    float16 (half the bytes to move to an accelerator, cast there), else float32.

    ``has_positions=False``: some slide is a features-only bag (its positions are zeros).
    """
    lens = [len(f) for f in features]
    offsets = torch.zeros(len(lens) + 1, dtype=torch.long)
    if lens:
        offsets[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.long), 0)
        feats = [torch.as_tensor(f) for f in features]
        if dtype is None:
            dtype = torch.float16 if all(f.dtype == torch.float16 for f in feats) else torch.float32
        tokens, pos = _cat_tokens(feats, [torch.as_tensor(p, dtype=torch.long) for p in positions], dtype)
    else:
        tokens, pos = torch.zeros(0, 0), torch.zeros(0, 2, dtype=torch.long)
    mask = None
    if token_masks is not None:
        mask = torch.cat([torch.as_tensor(m, dtype=torch.bool) for m in token_masks])
    return PackedSlides(tokens, pos, offsets, mask, list(slide_ids or [str(i) for i in range(len(lens))]),
                        has_positions)


def _cat_tokens(feats: list[Tensor], pos: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(T, D) ``dtype`` tokens and (T, 2) positions, concatenated into one storage from
    :func:`slidefm.buffers.empty` (in a transport worker: its arena, so the batch is not copied again to reach
    the main process)."""
    parts = feats + pos
    if feats[0].dim() != 2 or any(p.shape[1:] != (2,) for p in pos) or any(
            t.device.type != "cpu" or t.requires_grad for t in parts):
        # autograd or another device: torch's own allocation
        return torch.cat([f.to(dtype) for f in feats]), torch.cat(pos)
    n, dim = sum(len(f) for f in feats), feats[0].shape[1]
    buf = buffers.empty(n * 16 + n * dim * dtype.itemsize)  # positions first: both views aligned for their dtypes
    out_pos, tokens = buf[: n * 16].view(torch.long).view(n, 2), buf[n * 16:].view(dtype).view(n, dim)
    torch.cat(feats, out=tokens)  # other dtypes are cast on the way in: one pass, no converted copy of each
    torch.cat(pos, out=out_pos)
    return tokens, out_pos


def unpack(x: Tensor, offsets: Tensor) -> list[Tensor]:
    """Split a packed (T, ...) tensor back into per-slide tensors."""
    return list(torch.split(x, (offsets[1:] - offsets[:-1]).tolist()))


@dataclass
class Modality:
    """One non-slide modality for a batch: ``data`` has one row per item, ``present`` says which are real.

    Rows where ``present`` is False hold zeros and must never reach a loss.
    """

    data: Any  # Tensor (B, ...) or dict of tensors (e.g. tokenised text)
    present: Tensor  # (B,) bool

    def to(self, device):
        d = {k: v.to(device) for k, v in self.data.items()} if isinstance(self.data, dict) else self.data.to(device)
        return Modality(d, self.present.to(device))


__all__ = ["PackedSlides", "pack_slides", "unpack", "Modality"]
