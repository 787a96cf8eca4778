"""Survival losses: Cox partial likelihood and discrete-time hazards over quantile bins.

Both take (prediction, time, event, valid) with one row per patient; rows with ``valid`` False
or a non-finite time/event are ignored, and a batch without usable rows gives 0 with the graph
intact. Losses are batch-local (under DDP each rank's risk sets / means cover its own batch).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _usable(time: Tensor, event: Tensor, valid: Tensor | None) -> Tensor:
    ok = torch.isfinite(time) & torch.isfinite(event)
    if valid is not None:
        ok = ok & valid.to(device=ok.device, dtype=torch.bool)
    return ok


def _zero(pred: Tensor, ok: Tensor) -> Tensor:
    # Missing rows may hold NaN predictions' inputs; where() keeps them out of the zero term.
    p = pred if pred.dim() == 1 else pred.flatten(1).sum(1)
    return torch.where(ok, p, 0.0).sum() * 0.0


def cox_ph_loss(risk: Tensor, time: Tensor, event: Tensor, valid: Tensor | None = None) -> Tensor:
    """Negative Cox partial log-likelihood with Breslow ties, divided by the number of events.

    -1/n_events * sum_{i: event} [ r_i - log sum_{j: t_j >= t_i} exp(r_j) ]; subjects censored at
    an event time stay in that time's risk set. ``risk`` (B,) or (B, 1): higher = earlier event.
    """
    risk = risk.reshape(risk.shape[0], -1)[:, 0] if risk.dim() > 1 else risk
    ok = _usable(time, event, valid)
    r, t, e = risk.float()[ok], time.float()[ok], event[ok] > 0.5
    n_events = int(e.sum())
    if n_events == 0:
        return _zero(risk, ok)
    at_risk = t[None, :] >= t[:, None]  # row i: who is still at risk at t_i
    log_risk_set = torch.logsumexp(torch.where(at_risk, r[None, :], float("-inf")), dim=1)
    return -(r - log_risk_set)[e].sum() / n_events


def quantile_cuts(times, events, n_bins: int) -> Tensor:
    """n_bins - 1 cut points at the quantiles of the event times (all times if there are no events)."""
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events, dtype=np.float64)
    ok = np.isfinite(t) & np.isfinite(e)
    t, e = t[ok], e[ok]
    if t.size == 0:
        raise ValueError("no finite survival times to fit bins on")
    ref = t[e > 0.5] if (e > 0.5).any() else t
    q = np.quantile(ref, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    return torch.tensor(q, dtype=torch.float32)


class DiscreteTimeSurvival(nn.Module):
    """Discrete-time hazard NLL over ``n_bins`` time bins (Zadeh & Schmid 2020 formulation).

    Bins: k = number of cut points <= t, so bin 0 is [0, c_1), bin n_bins - 1 is [c_last, inf).
    Logits (B, n_bins) give hazards h_k = sigmoid(logit_k) and survival S_k = prod_{j<=k}(1 - h_j).
    NLL: an event in bin y costs -log S_{y-1} - log h_y; a subject censored in bin y is counted as
    having survived bin y, costing -log S_y. The loss is the mean over usable rows.
    Risk score (:meth:`risk`): -sum_k S_k, the negative expected number of bins survived
    (higher = worse prognosis), as used for the c-index.
    """

    def __init__(self, n_bins: int, cuts: Tensor | None = None):
        super().__init__()
        if n_bins < 1:
            raise ValueError("n_bins must be >= 1")
        self.n_bins = n_bins
        self.register_buffer("cuts", torch.zeros(n_bins - 1))
        self.register_buffer("fitted", torch.tensor(False))
        if cuts is not None:
            self.set_cuts(cuts)

    @classmethod
    def fit_bins(cls, times, events, n_bins: int) -> "DiscreteTimeSurvival":
        """A loss whose bins are the quantiles of the training event times."""
        return cls(n_bins, quantile_cuts(times, events, n_bins))

    def set_cuts(self, cuts) -> None:
        cuts = torch.as_tensor(cuts, dtype=torch.float32).flatten()
        if cuts.numel() != self.n_bins - 1:
            raise ValueError(f"{cuts.numel()} cut points for {self.n_bins} bins")
        if cuts.numel() > 1 and bool((cuts[1:] < cuts[:-1]).any()):
            raise ValueError("survival bin cut points must be non-decreasing")
        self.cuts.copy_(cuts)
        self.fitted.fill_(True)

    def bin_index(self, time: Tensor) -> Tensor:
        return torch.bucketize(time.float().contiguous(), self.cuts.to(time.device), right=True)

    def forward(self, logits: Tensor, time: Tensor, event: Tensor, valid: Tensor | None = None) -> Tensor:
        if not bool(self.fitted):
            raise RuntimeError("DiscreteTimeSurvival has no bins: use fit_bins()/set_cuts() on training labels")
        ok = _usable(time, event, valid)
        if not bool(ok.any()):
            return _zero(logits, ok)
        lg = logits.float()[ok]
        y = self.bin_index(time[ok]).unsqueeze(1)
        e = event[ok] > 0.5
        log_s = torch.cumsum(F.logsigmoid(-lg), dim=1)  # log S_k
        log_s_prev = F.pad(log_s[:, :-1], (1, 0))  # log S_{k-1}, S_{-1} = 1
        ev = -(log_s_prev.gather(1, y) + F.logsigmoid(lg).gather(1, y)).squeeze(1)
        cens = -log_s.gather(1, y).squeeze(1)
        return torch.where(e, ev, cens).mean()

    @staticmethod
    def survival(logits: Tensor) -> Tensor:
        return torch.exp(torch.cumsum(F.logsigmoid(-logits.float()), dim=-1))

    @staticmethod
    def risk(logits: Tensor) -> Tensor:
        return -DiscreteTimeSurvival.survival(logits).sum(-1)


__all__ = ["DiscreteTimeSurvival", "cox_ph_loss", "quantile_cuts"]
