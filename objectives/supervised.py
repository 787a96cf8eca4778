"""Multi-task supervision of the patient embedding: classification and survival heads.

Labels follow the data contract: ``labels[name]`` long class index with -1 = missing for
classification; ``labels[f"{name}/time"]`` and ``labels[f"{name}/event"]`` float with NaN =
missing for survival. Class weights and survival bins are fitted once on the training labels
(:meth:`MultiTaskLoss.fit`) and stored as buffers, so checkpoints carry them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidefm.errors import SlidefmError
from slidefm.objectives.survival import DiscreteTimeSurvival, cox_ph_loss, quantile_cuts
from slidefm.registry import check_choices


@dataclass
class SupervisedConfig:
    name: str = "supervised"
    weight: float = field(default=1.0, metadata={"help": "weight of this objective in the total loss"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing of the classification losses"})
    class_weighting: Optional[Literal["balanced", "none"]] = field(default="balanced", metadata={
        "help": "classification class weights: balanced (n / (C * count), fitted on training labels) or none/null"})
    survival_loss: Literal["discrete", "cox"] = field(default="discrete", metadata={
        "help": "discrete-time hazards on quantile bins of the event times, or the Cox partial likelihood"})
    n_bins: int = field(default=4, metadata={"help": "discrete-time survival bins (quantiles of event times)"})
    hidden_dim: int = field(default=0, metadata={"help": "0: linear heads; >0: one hidden layer"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in the heads"})
    task_weights: Dict[str, float] = field(default_factory=dict, metadata={"help": "task name -> loss weight (default 1; 0 drops a task)"})


@dataclass
class SupervisedTask:
    """One head. ``n_classes`` (or ``classes``) is needed for classification."""

    name: str
    kind: str  # "classification" | "survival"
    n_classes: int = 0
    classes: Optional[list] = None
    class_weights: Optional[list] = None  # precomputed; otherwise from fit()
    cuts: Optional[list] = None  # precomputed survival bin cut points; otherwise from fit()

    @classmethod
    def from_any(cls, t: Any) -> "SupervisedTask":
        if isinstance(t, SupervisedTask):
            return t
        d = dict(t) if isinstance(t, dict) else {k: getattr(t, k) for k in ("name", "kind") if hasattr(t, k)}
        if not isinstance(t, dict):
            for k in ("n_classes", "classes"):
                if hasattr(t, k):
                    d[k] = getattr(t, k)
        known = {"name", "kind", "n_classes", "classes", "class_weights", "cuts"}
        task = cls(**{k: v for k, v in d.items() if k in known})  # other TaskSpec fields (label, time...) are data-side
        if task.kind == "classification" and not task.n_classes:
            task.n_classes = len(task.classes or [])
        return task


def balanced_class_weights(labels: Tensor, n_classes: int) -> Tensor:
    """n / (C * count_c) over the labelled rows (sklearn's 'balanced'); unseen classes get 1."""
    y = labels[labels >= 0].long()
    counts = torch.bincount(y, minlength=n_classes).double()
    w = torch.ones(n_classes, dtype=torch.float64)
    seen = counts > 0
    w[seen] = y.numel() / (n_classes * counts[seen])
    return w.float()


class _Head(nn.Module):
    def __init__(self, dim: int, out: int, hidden_dim: int, dropout: float):
        super().__init__()
        if hidden_dim > 0:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, hidden_dim), nn.GELU(),
                                     nn.Dropout(dropout), nn.Linear(hidden_dim, out))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MultiTaskLoss(nn.Module):
    """Heads on the patient embedding and the weighted sum of their losses.

    Classification: cross-entropy with label smoothing and (optionally 'balanced') class weights
    over the rows with a label (torch semantics: weighted mean, normalised by the weights of the
    targets). Survival: discrete-time hazard NLL over quantile bins, or Cox partial likelihood.
    A task without labels in the batch contributes 0 with its head still in the graph (DDP needs
    every parameter used). ``forward`` returns ``loss``, ``loss/<task>`` and ``n/<task>``.
    """

    def __init__(self, cfg: SupervisedConfig, *, dim: int, tasks: Sequence[Any]):
        super().__init__()
        check_choices(cfg)
        self.cfg = cfg
        survival_loss, n_bins = cfg.survival_loss, cfg.n_bins
        self.tasks = [SupervisedTask.from_any(t) for t in tasks]
        if not self.tasks:
            raise SlidefmError("the supervised objective needs at least one task (cohort.yaml tasks)")
        self.label_smoothing = cfg.label_smoothing
        self.balanced = cfg.class_weighting == "balanced"
        self.survival_loss = survival_loss
        self.task_weights = {t.name: float((cfg.task_weights or {}).get(t.name, 1.0)) for t in self.tasks}
        self.heads = nn.ModuleList()
        self.survival = nn.ModuleList()  # one DiscreteTimeSurvival per task (identity slot otherwise)
        self._class_weight_names: list[str] = []
        for i, t in enumerate(self.tasks):
            if t.kind == "classification":
                if t.n_classes < 2:
                    raise ValueError(f"classification task '{t.name}' needs n_classes >= 2 (or classes)")
                out = t.n_classes
                cw = torch.ones(t.n_classes) if t.class_weights is None else torch.as_tensor(t.class_weights, dtype=torch.float32)
                self.register_buffer(f"class_weights_{i}", cw)
                self.register_buffer(f"class_weights_fitted_{i}", torch.tensor(t.class_weights is not None))
                self.survival.append(nn.Identity())
            elif t.kind == "survival":
                out = n_bins if survival_loss == "discrete" else 1
                self.survival.append(DiscreteTimeSurvival(n_bins, t.cuts) if survival_loss == "discrete" else nn.Identity())
            else:
                raise ValueError(f"task '{t.name}': unknown kind {t.kind!r}")
            self.heads.append(_Head(dim, out, cfg.hidden_dim, cfg.dropout))

    @torch.no_grad()
    def fit(self, labels: dict[str, Tensor]) -> "MultiTaskLoss":
        """Class weights ('balanced') and survival bins from the *training* labels."""
        for i, t in enumerate(self.tasks):
            if t.kind == "classification":
                if t.name in labels and self.balanced:
                    y = torch.as_tensor(labels[t.name]).long().cpu()
                    getattr(self, f"class_weights_{i}").copy_(balanced_class_weights(y, t.n_classes))
                    getattr(self, f"class_weights_fitted_{i}").fill_(True)
            elif self.survival_loss == "discrete" and f"{t.name}/time" in labels:
                sv: DiscreteTimeSurvival = self.survival[i]  # type: ignore[assignment]
                times = torch.as_tensor(labels[f"{t.name}/time"]).cpu().numpy()
                events = torch.as_tensor(labels[f"{t.name}/event"]).cpu().numpy()
                sv.set_cuts(quantile_cuts(times, events, sv.n_bins))
        return self

    def predict(self, embedding: Tensor) -> dict[str, Tensor]:
        """Per task: class probabilities (B, C), or a survival risk score (B,) (higher = worse)."""
        out = {}
        for i, t in enumerate(self.tasks):
            z = self.heads[i](embedding)
            if t.kind == "classification":
                out[t.name] = z.softmax(-1)
            elif self.survival_loss == "discrete":
                out[t.name] = DiscreteTimeSurvival.risk(z)
            else:
                out[t.name] = z[:, 0]
        return out

    def forward(self, embedding: Tensor, labels: dict[str, Tensor]) -> dict:
        out: dict = {}
        total = embedding.new_zeros((), dtype=torch.float32)
        for i, t in enumerate(self.tasks):
            z = self.heads[i](embedding)
            zero = z.sum() * 0.0
            if t.kind == "classification":
                y = labels.get(t.name)
                if y is None:
                    loss, n = zero, 0
                else:
                    ok = y >= 0
                    n = int(ok.sum())
                    if n == 0:
                        loss = zero
                    else:
                        if self.balanced and not bool(getattr(self, f"class_weights_fitted_{i}")):
                            raise RuntimeError("MultiTaskLoss.fit(train_labels) must run before training with "
                                               "class_weighting='balanced'")
                        w = getattr(self, f"class_weights_{i}") if self.balanced else None
                        loss = F.cross_entropy(z[ok].float(), y[ok].long(), weight=w,
                                               label_smoothing=self.label_smoothing) + zero
            else:
                time, event = labels.get(f"{t.name}/time"), labels.get(f"{t.name}/event")
                if time is None or event is None:
                    loss, n = zero, 0
                else:
                    n = int((torch.isfinite(time) & torch.isfinite(event)).sum())
                    if self.survival_loss == "discrete":
                        loss = self.survival[i](z, time, event) + zero
                    else:
                        loss = cox_ph_loss(z[:, 0], time, event) + zero
            total = total + self.task_weights[t.name] * loss
            out[f"loss/{t.name}"] = loss.detach()
            out[f"n/{t.name}"] = n
        out["loss"] = total
        return out


def build_supervised(cfg: SupervisedConfig, *, dim: int, tasks: Sequence[Any] = ()) -> MultiTaskLoss:
    """Registry builder: ``dim`` is the patient-embedding width.

    ``tasks`` may be cohort TaskSpecs (or their dicts) with ``classes``/``n_classes`` added for
    classification; tasks whose ``level`` is not 'patient' are skipped (no patient labels exist).
    """
    def level(t):
        return t.get("level", "patient") if isinstance(t, dict) else getattr(t, "level", "patient")

    return MultiTaskLoss(cfg, dim=dim, tasks=[t for t in tasks if level(t) in (None, "patient")])


__all__ = ["MultiTaskLoss", "SupervisedConfig", "SupervisedTask", "balanced_class_weights", "build_supervised"]
