"""Multi-modal contrastive alignment (slide <-> report / expression / mutations ...).

One loss per configured modality pair, computed over the rows where both modalities exist.
Under DDP the embeddings of every rank are gathered (fixed shape: padded to the largest local
batch, with validity masks; differentiable) so each pair sees global negatives, and every rank
runs the same collectives even when it has no valid row.

Gradient scaling under DDP. With ``local_loss=False`` (default) every rank computes the loss of
the *global* batch (the mean over all valid pairs of all ranks), so the returned loss is the same
on every rank and equals the single-process loss on the concatenated batch. The gather's backward
sums the gradients of all ranks' (identical) losses into each rank's rows, i.e. world_size times
the gradient of the global loss; DDP's gradient averaging divides by world_size again, so the
parameter gradients equal the single-process gradients of the global batch. With
``local_loss=True`` each rank only computes the logits of its own rows against all columns
(O(B * N) instead of O(N^2)) and returns world_size * (its share of the global loss): the mean of
the returned losses over ranks is the global loss, and the gradients after DDP averaging are again
those of the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidefm.objectives import distributed as D
from slidefm.registry import check_choices


@dataclass
class ContrastiveConfig:
    name: str = "contrastive"
    weight: float = field(default=1.0, metadata={"help": "weight of this objective in the total loss"})
    pairs: List[List[str]] = field(
        default_factory=lambda: [["slide", "report"]], metadata={"help": "modality pairs, e.g. [[slide, report]]"}
    )
    kind: Literal["infonce", "siglip"] = field(default="infonce", metadata={
        "help": "symmetric CLIP cross-entropy (infonce) or the pairwise sigmoid loss (siglip)"})
    init_logit_scale: float = field(default=math.log(1 / 0.07), metadata={"help": "initial log logit scale"})
    max_logit_scale: float = field(default=math.log(100.0), metadata={"help": "log logit scale is clamped to this"})
    learn_logit_scale: bool = field(default=True, metadata={"help": "train the logit scale (else keep it fixed)"})
    shared_logit_scale: bool = field(default=False, metadata={"help": "one logit scale for all pairs"})
    pair_weights: Optional[List[float]] = field(default=None, metadata={"help": "one weight per pair (default 1)"})
    init_bias: float = field(default=-10.0, metadata={"help": "siglip: initial learnable bias"})
    local_loss: bool = field(default=False, metadata={"help": "rank-local rows x global columns (see docs)"})
    gather: bool = field(default=True, metadata={"help": "global negatives across DDP ranks"})


def _key(a: str, b: str) -> str:
    return f"{a}-{b}"


class MultiModalContrastive(nn.Module):
    """Weighted sum of per-pair contrastive losses over L2-normalised embeddings.

    ``forward(embeddings, present)`` takes ``embeddings[m]`` (B, d) and ``present[m]`` (B,) bool for
    every modality named in ``pairs`` (all with the same B rows; a missing ``present`` entry means
    all rows present). Rows whose ``present`` is False never reach a loss (their values may be
    anything, NaN included). Returns ``loss`` (sum over pairs of weight * pair loss) and, per pair
    ``a-b``: ``loss/a-b``, ``n/a-b`` (number of valid pairs in the global batch),
    ``logit_scale/a-b`` (and ``bias/a-b`` for siglip). A pair without any valid row contributes 0
    with the autograd graph intact.

    InfoNCE: mean over valid pairs of (CE(rows a->b) + CE(rows b->a)) / 2.
    SigLIP: sum over all (i, j) of -log sigmoid(y_ij (s * a_i . b_j + bias)), divided by the number
    of valid pairs (y = +1 on the diagonal, -1 elsewhere), as in Zhai et al. (2023).
    The log logit scale is clamped in place to ``max_logit_scale`` before each forward, so it can
    move back below the cap (a functional clamp would zero its gradient for good).
    """

    def __init__(self, cfg: ContrastiveConfig):
        super().__init__()
        check_choices(cfg, "contrastive ")
        self.cfg = cfg
        self.pairs = [tuple(str(m) for m in p) for p in cfg.pairs]
        if not self.pairs:
            raise ValueError("contrastive objective needs at least one modality pair")
        for p in self.pairs:
            if len(p) != 2 or p[0] == p[1]:
                raise ValueError(f"a contrastive pair names two different modalities, got {list(p)}")
        keys = [_key(*p) for p in self.pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate contrastive pairs: {keys}")
        weights = [1.0] * len(self.pairs) if cfg.pair_weights is None else [float(w) for w in cfg.pair_weights]
        if len(weights) != len(self.pairs):
            raise ValueError(f"{len(weights)} pair_weights for {len(self.pairs)} pairs")
        self.kind = cfg.kind
        self.pair_weights = weights
        self.max_logit_scale = float(cfg.max_logit_scale)
        self.shared_logit_scale = cfg.shared_logit_scale
        self.local_loss = cfg.local_loss
        self.gather = cfg.gather
        self.modalities = sorted({m for p in self.pairs for m in p})  # fixed order = same collectives on every rank

        init = min(float(cfg.init_logit_scale), self.max_logit_scale)
        names = ["shared"] if cfg.shared_logit_scale else [f"{a}__{b}" for a, b in self.pairs]
        scales = {n: torch.tensor(init) for n in names}
        if cfg.learn_logit_scale:
            self.log_scales = nn.ParameterDict({n: nn.Parameter(v) for n, v in scales.items()})
        else:
            self.log_scales = nn.ParameterDict({n: nn.Parameter(v, requires_grad=False) for n, v in scales.items()})
        self.biases = (
            nn.ParameterDict({f"{a}__{b}": nn.Parameter(torch.tensor(float(cfg.init_bias))) for a, b in self.pairs})
            if cfg.kind == "siglip"
            else None
        )

    def _log_scale(self, a: str, b: str) -> nn.Parameter:
        return self.log_scales["shared" if self.shared_logit_scale else f"{a}__{b}"]

    def forward(self, embeddings: dict[str, Tensor], present: dict[str, Tensor] | None = None) -> dict:
        missing = [m for m in self.modalities if m not in embeddings]
        if missing:
            # Every rank must gather every modality, so an absent key cannot be skipped locally.
            raise KeyError(f"contrastive objective needs embeddings for {missing}; got {sorted(embeddings)}")
        present = present or {}
        n_rows = {int(embeddings[m].shape[0]) for m in self.modalities}
        if len(n_rows) != 1:
            raise ValueError(f"contrastive embeddings have different row counts: {sorted(n_rows)}")
        ref = embeddings[self.modalities[0]]
        device, B = ref.device, int(ref.shape[0])

        with torch.no_grad():
            for p in self.log_scales.values():
                p.clamp_(max=self.max_logit_scale)

        distributed = self.gather and D.is_distributed()
        W = D.world_size() if distributed else 1
        sizes = D.gather_sizes(B, device) if distributed else [B]
        real = D.padded_row_mask(sizes, device) if distributed else torch.ones(B, dtype=torch.bool, device=device)
        mine = D.local_rows(sizes, device) if distributed else real

        z_all: dict[str, Tensor] = {}
        p_all: dict[str, Tensor] = {}
        for m in self.modalities:
            p = present.get(m)
            p = torch.ones(B, dtype=torch.bool, device=device) if p is None else p.to(device=device, dtype=torch.bool)
            # Zero absent rows before normalising: garbage (even NaN) must not leak into values or gradients.
            z = torch.where(p[:, None], embeddings[m].float(), 0.0)
            z = F.normalize(z, dim=-1)
            if distributed:
                z = D.gather_padded(z, sizes, grad=True)
                # gloo cannot gather bool tensors.
                p = D.gather_padded(p.to(torch.uint8), sizes, grad=False).bool() & real
            z_all[m], p_all[m] = z, p

        out: dict = {}
        total = None
        for (a, b), w in zip(self.pairs, self.pair_weights):
            key = _key(a, b)
            log_scale = self._log_scale(a, b)
            scale = log_scale.exp()
            bias = self.biases[f"{a}__{b}"] if self.biases is not None else None
            idx = torch.nonzero(p_all[a] & p_all[b]).squeeze(1)
            n = int(idx.numel())
            za, zb = z_all[a][idx], z_all[b][idx]
            rows = torch.nonzero(mine[idx]).squeeze(1) if self.local_loss else torch.arange(n, device=device)
            factor = W if self.local_loss else 1
            # Zero-valued terms keep every gathered tensor and parameter in the graph on every rank,
            # so all ranks run the gather's backward collective even without valid pairs.
            anchor = 0.0 * (z_all[a].sum() + z_all[b].sum() + log_scale + (0.0 if bias is None else bias))
            if n == 0:
                loss = anchor
            elif self.kind == "infonce":
                la = scale * za[rows] @ zb.T
                lb = scale * zb[rows] @ za.T
                s = F.cross_entropy(la, rows, reduction="sum") + F.cross_entropy(lb, rows, reduction="sum")
                loss = factor * 0.5 * s / n + anchor
            else:
                logits = scale * za[rows] @ zb.T + bias
                y = -torch.ones_like(logits)
                y[torch.arange(len(rows), device=device), rows] = 1.0
                loss = factor * -F.logsigmoid(y * logits).sum() / n + anchor
            total = w * loss if total is None else total + w * loss
            out[f"loss/{key}"] = loss.detach()
            out[f"n/{key}"] = n
            out[f"logit_scale/{key}"] = scale.detach()
            if bias is not None:
                out[f"bias/{key}"] = bias.detach()
        out["loss"] = total
        return out


__all__ = ["ContrastiveConfig", "MultiModalContrastive"]
