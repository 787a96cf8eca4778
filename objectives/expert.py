"""Expert distillation (GPFM-style, slide level): regress existing slide encoders' embeddings.

Each expert's precomputed slide embedding (B, d_e) is predicted from the student's slide
embedding by a per-expert projection head; slides the expert did not embed are masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidefm.registry import check_choices


@dataclass
class ExpertConfig:
    name: str = "expert"
    weight: float = field(default=1.0, metadata={"help": "weight of this objective in the total loss"})
    loss: Literal["cosine", "smooth_l1"] = field(default="cosine", metadata={
        "help": "per-slide loss: 1 - cosine similarity, or smooth-L1 on layer-normed targets"})
    hidden_dim: int = field(default=0, metadata={"help": "0: linear projection; >0: one hidden layer"})
    smooth_l1_beta: float = field(default=1.0, metadata={"help": "smooth_l1: where the loss turns from L2 to L1"})
    expert_weights: Dict[str, float] = field(default_factory=dict, metadata={"help": "expert name -> loss weight (default 1)"})


class ExpertDistillation(nn.Module):
    """Sum over experts of weight_e * mean over present slides of the per-slide loss.

    ``cosine``: 1 - cos(head_e(z), target). ``smooth_l1``: smooth-L1 between head_e(z) and the
    target layer-normalised over its features (no affine), so experts with differently scaled
    embeddings weigh alike; averaged over features. An expert with no present slide in the batch
    contributes 0 with its head in the graph. Returns ``loss``, ``loss/<expert>``, ``n/<expert>``.
    """

    def __init__(self, cfg: ExpertConfig, *, dim: int, expert_dims: dict[str, int]):
        super().__init__()
        check_choices(cfg, "expert ")
        if not expert_dims:
            raise ValueError("expert distillation needs at least one expert (data.experts)")
        self.names = sorted(expert_dims)
        self.expert_dims = {n: int(expert_dims[n]) for n in self.names}
        self.cfg = cfg
        self.loss_kind = cfg.loss
        self.beta = cfg.smooth_l1_beta
        self.weights = {n: float((cfg.expert_weights or {}).get(n, 1.0)) for n in self.names}
        hidden_dim = cfg.hidden_dim
        # ModuleList indexed like self.names: expert names may contain '.', which ModuleDict rejects.
        self.heads = nn.ModuleList(
            nn.Linear(dim, d) if hidden_dim <= 0 else nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, d))
            for d in self.expert_dims.values()
        )

    def forward(self, slide: Tensor, targets: dict[str, Tensor], present: dict[str, Tensor] | None = None) -> dict:
        unknown = set(targets) - set(self.names)
        if unknown:
            raise KeyError(f"expert targets for unconfigured experts {sorted(unknown)}; configured: {self.names}")
        present = present or {}
        out: dict = {}
        total = slide.new_zeros((), dtype=torch.float32)
        for name, head in zip(self.names, self.heads):
            pred = head(slide).float()
            zero = pred.sum() * 0.0
            tgt = targets.get(name)
            if tgt is None:
                loss, n = zero, 0
            else:
                p = present.get(name)
                p = torch.ones(len(tgt), dtype=torch.bool, device=tgt.device) if p is None else p.to(torch.bool)
                n = int(p.sum())
                if n == 0:
                    loss = zero
                else:
                    y = tgt[p].float()
                    if self.loss_kind == "cosine":
                        per = 1.0 - F.cosine_similarity(pred[p], y, dim=-1, eps=1e-8)
                    else:
                        y = F.layer_norm(y, (y.shape[-1],))
                        per = F.smooth_l1_loss(pred[p], y, beta=self.beta, reduction="none").mean(-1)
                    loss = per.mean() + zero
            total = total + self.weights[name] * loss
            out[f"loss/{name}"] = loss.detach()
            out[f"n/{name}"] = n
        out["loss"] = total
        return out


__all__ = ["ExpertConfig", "ExpertDistillation"]
