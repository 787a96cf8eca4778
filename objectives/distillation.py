"""Masked self-distillation (DINO + iBOT) for slide aggregators, on packed grid crops.

The student aggregator sees the global crops with their ``token_mask`` applied plus the local
crops; a frozen EMA copy of it (the teacher) sees the global crops unmasked. DINO matches the
student's slide-level prototype distribution of every view to the teacher's of every *other*
global view; iBOT matches the student's token-level distribution at masked tokens to the
teacher's at the same tokens (aligned through the packing). Written after the DINO/iBOT/DINOv2
papers; the Sinkhorn-Knopp step is guarded so it runs without a process group.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from slidefm.data.batch import PackedSlides
from slidefm.models.segments import segment_mean
from slidefm.objectives import distributed as D
from slidefm.registry import check_choices


@dataclass
class DistillationConfig:
    name: str = "distillation"
    weight: float = field(default=1.0, metadata={"help": "weight of this objective in the total loss"})
    out_dim: int = field(default=8192, metadata={"help": "number of DINO prototypes"})
    patch_out_dim: Optional[int] = field(default=None, metadata={"help": "iBOT prototypes (default out_dim)"})
    hidden_dim: int = field(default=2048, metadata={"help": "hidden width of the DINO/iBOT head MLPs"})
    bottleneck_dim: int = field(default=256, metadata={"help": "width before the prototype layer"})
    nlayers: int = field(default=3, metadata={"help": "linear layers of the head MLP, >= 1"})
    separate_ibot_head: bool = field(default=True, metadata={
        "help": "iBOT has its own head (else it shares the DINO head, which needs patch_out_dim == out_dim)"})
    freeze_prototype_norm: bool = field(default=True, metadata={"help": "unit-norm prototypes (weight_norm g = 1)"})
    student_temp: float = field(default=0.1, metadata={"help": "student softmax temperature"})
    teacher_temp: float = field(default=0.07, metadata={"help": "teacher softmax temperature after the warm-up"})
    warmup_teacher_temp: float = field(default=0.04, metadata={"help": "teacher temperature at step 0"})
    warmup_teacher_temp_steps: int = field(default=0, metadata={"help": "cosine ramp of the teacher temperature"})
    centering: Literal["centering", "sinkhorn_knopp"] = field(default="centering", metadata={
        "help": "how teacher outputs are kept from collapsing: an EMA centre, or Sinkhorn-Knopp balancing"})
    center_momentum: float = field(default=0.9, metadata={"help": "EMA momentum of the teacher centre"})
    sinkhorn_iters: int = field(default=3, metadata={"help": "Sinkhorn-Knopp iterations"})
    momentum_start: float = field(default=0.996, metadata={"help": "teacher EMA momentum at step 0 (cosine to end)"})
    momentum_end: float = field(default=1.0, metadata={"help": "teacher EMA momentum at the last step"})
    dino_weight: float = field(default=1.0, metadata={"help": "weight of the slide-level DINO loss"})
    ibot_weight: float = field(default=1.0, metadata={"help": "weight of the masked-token iBOT loss"})
    koleo_weight: float = field(default=0.0, metadata={"help": "weight of the KoLeo spread regulariser"})
    feature_weight: float = field(default=0.0, metadata={
        "help": "masked feature modelling: regress the input features at masked tokens (MAE-style, as "
                "Prov-GigaPath); a target that is informative from the first step, unlike the EMA teacher's"})
    feature_hidden_dim: int = field(default=0, metadata={"help": "masked-feature decoder hidden width (0: linear)"})
    n_global: int = field(default=2, metadata={"help": "global views per slide, when Views does not say"})


# --------------------------------------------------------------------------------- schedules


def cosine_schedule(
    step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0, warmup_start: float | None = None
) -> float:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup_steps``, then a half-cosine
    from ``start`` to ``end`` reaching ``end`` at ``total_steps``; constant ``end`` afterwards."""
    step = max(int(step), 0)
    if step < warmup_steps:
        w0 = start if warmup_start is None else warmup_start
        return w0 + (start - w0) * step / warmup_steps
    span = total_steps - warmup_steps
    if span <= 0:
        return end
    progress = min((step - warmup_steps) / span, 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (by name).

    Buffers are not averaged: the aggregators keep no running statistics.
    """
    tp = dict(teacher.named_parameters())
    sp = dict(student.named_parameters())
    if tp.keys() != sp.keys():
        raise ValueError("teacher and student have different parameters")
    names = list(tp)
    t = [tp[n] for n in names]
    s = [sp[n].detach().to(tp[n].dtype) for n in names]
    if not t:
        return
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


# --------------------------------------------------------------------------------- heads / losses


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2 norm -> weight-normalised linear layer onto ``out_dim`` prototypes."""

    def __init__(self, cfg: DistillationConfig, *, in_dim: int, out_dim: int):
        super().__init__()
        hidden_dim, bottleneck_dim, nlayers = cfg.hidden_dim, cfg.bottleneck_dim, cfg.nlayers
        if nlayers < 1:
            raise ValueError("DINOHead needs nlayers >= 1")
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        self.last_layer = weight_norm(last)
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        # g = 1 frozen: logits are cosine similarities to unit prototypes (bounded), which keeps
        # the low-temperature teacher softmax and Sinkhorn exponentials finite.
        g.requires_grad_(not cfg.freeze_prototype_norm)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return self.last_layer(x)


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, n_iter: int = 3) -> Tensor:
    """Balanced soft assignment of N samples (over all ranks) to K prototypes.

    ``scores`` (N, K) are teacher logits already divided by the temperature. Returns (N, K)
    whose rows sum to 1 and whose columns each sum to about N_total / K (exactly after enough
    iterations). Works in one process; under DDP the sums run over all ranks, so every rank
    must call it (N may be 0 on some ranks).
    """
    scores = scores.float()
    n_local, k = scores.shape
    local_max = scores.max() if scores.numel() else scores.new_tensor(float("-inf"))
    # A shared constant shift leaves the normalised result unchanged and keeps exp() finite.
    gmax = D.all_reduce_max(local_max.clone().reshape(1))
    q = torch.exp(scores - gmax).T  # (K, N)
    n_total = D.all_reduce_sum(torch.tensor([float(n_local)], device=scores.device))
    tiny = torch.finfo(q.dtype).tiny
    q /= D.all_reduce_sum(q.sum().reshape(1)).clamp_min(tiny)
    for _ in range(n_iter):
        rows = D.all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= rows.clamp_min(tiny)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
        q /= n_total
    q *= n_total
    return q.T


class _TeacherTargets(nn.Module):
    """Teacher distribution with either an EMA centre or Sinkhorn-Knopp, plus the student CE."""

    def __init__(self, cfg: DistillationConfig, *, out_dim: int):
        super().__init__()
        check_choices(cfg)
        self.student_temp = cfg.student_temp
        self.center_momentum = cfg.center_momentum
        self.centering = cfg.centering
        self.sinkhorn_iters = cfg.sinkhorn_iters
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        t = teacher_logits.float()
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(t / teacher_temp, self.sinkhorn_iters)
        return F.softmax((t - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """center <- m * center + (1 - m) * mean of the teacher logits over all ranks' rows."""
        t = teacher_logits.float()
        s = D.all_reduce_sum(t.sum(dim=0, keepdim=True))
        n = D.all_reduce_sum(torch.tensor([float(t.shape[0])], device=t.device))
        if float(n) > 0:
            self.center.mul_(self.center_momentum).add_(s / n, alpha=1.0 - self.center_momentum)

    def _log_student(self, student_logits: Tensor) -> Tensor:
        return F.log_softmax(student_logits.float() / self.student_temp, dim=-1)


class DINOLoss(_TeacherTargets):
    """Cross-view CE between teacher global views and student views, excluding the same view.

    Views are slide-major: row ``b * n_views + v``. The loss is the mean over slides and over the
    G * (G - 1) global-global plus G * L global-local (teacher view, student view) pairs.
    """

    def forward(self, student_global: Tensor, student_local: Tensor | None, teacher_probs: Tensor, n_global: int) -> Tensor:
        k = teacher_probs.shape[-1]
        b = student_global.shape[0] // n_global
        n_local = 0 if student_local is None or b == 0 else student_local.shape[0] // b
        n_terms = n_global * (n_global - 1) + n_global * n_local
        if b == 0 or n_terms == 0:
            return student_global.sum() * 0.0
        t = teacher_probs.view(b, n_global, k)
        sg = self._log_student(student_global).view(b, n_global, k)
        gg = torch.einsum("bgk,bhk->bgh", t, sg)
        off = ~torch.eye(n_global, dtype=torch.bool, device=gg.device)
        total = -(gg * off).sum()
        if n_local:
            sl = self._log_student(student_local).view(b, n_local, k)
            total = total - torch.einsum("bgk,blk->", t, sl)
        return total / (b * n_terms)


class IBOTPatchLoss(_TeacherTargets):
    """CE at masked tokens only, averaged within each view first, then over views with masked tokens."""

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, view_index: Tensor, n_views: int) -> Tensor:
        """``student_logits``/``teacher_probs`` (M, K) for the M masked tokens; ``view_index`` (M,)."""
        if student_logits.shape[0] == 0:
            return student_logits.sum() * 0.0
        per_token = -(teacher_probs * self._log_student(student_logits)).sum(-1)
        counts = torch.bincount(view_index, minlength=n_views).to(per_token.dtype)
        n_masked_views = (counts > 0).sum()
        return (per_token / counts[view_index]).sum() / n_masked_views


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator: -mean log distance to the nearest neighbour (L2-normalised)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] < 2:
            return x.sum() * 0.0
        x = F.normalize(x.float(), dim=-1, eps=self.eps)
        with torch.no_grad():
            dots = x @ x.T
            dots.fill_diagonal_(-3.0)
            nn_idx = dots.argmax(dim=1)
        dist = (x - x[nn_idx]).norm(dim=-1)
        return -torch.log(dist + self.eps).mean()


# --------------------------------------------------------------------------------- objective


def _concat_packed(a: PackedSlides, b: PackedSlides | None) -> PackedSlides:
    """Globals then locals in one packed batch (one aggregator call; locals unmasked unless they carry a mask)."""
    ma = a.token_mask if a.token_mask is not None else torch.zeros(len(a.tokens), dtype=torch.bool, device=a.tokens.device)
    if b is None:
        return PackedSlides(a.tokens, a.positions, a.offsets, ma, list(a.slide_ids))
    mb = b.token_mask if b.token_mask is not None else torch.zeros(len(b.tokens), dtype=torch.bool, device=b.tokens.device)
    offsets = torch.cat([a.offsets, b.offsets[1:] - b.offsets[0] + a.offsets[-1]])
    return PackedSlides(
        torch.cat([a.tokens, b.tokens.to(a.tokens.dtype)]),
        torch.cat([a.positions, b.positions]),
        offsets,
        torch.cat([ma, mb]),
        list(a.slide_ids) + list(b.slide_ids),
    )


def _unwrap(m: nn.Module) -> nn.Module:
    # DDP / FSDP-style wrappers keep the real module in ``.module``; parameter names must match the teacher's.
    while hasattr(m, "module") and isinstance(getattr(m, "module"), nn.Module):
        m = m.module
    return m


class MaskedSelfDistillation(nn.Module):
    """DINO + iBOT (+ optional KoLeo) objective owning the student heads and the EMA teacher.

    ``student`` is the aggregator being trained; the teacher is a frozen deep copy of it and of
    the heads. The student itself is *not* registered as a submodule (it belongs to the model);
    ``update_teacher(momentum)`` averages it into the teacher after each optimizer step.
    ``forward(student_aggregator, views)`` returns ``loss`` (weighted DINO + iBOT + KoLeo),
    ``dino``, ``ibot``, ``koleo``, ``teacher_temp`` and ``n_masked``.
    """

    def __init__(self, cfg: DistillationConfig, *, student: nn.Module):
        super().__init__()
        for name in ("dino_weight", "ibot_weight", "koleo_weight", "feature_weight", "feature_hidden_dim"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"objectives.distillation.{name} must be >= 0, got {getattr(cfg, name)}")
        self.cfg = cfg
        out_dim, feature_hidden_dim = cfg.out_dim, cfg.feature_hidden_dim
        student = _unwrap(student)
        dim = int(student.dim)
        self.feature_head = None
        if cfg.feature_weight > 0:
            in_dim = int(student.in_dim)
            layers: list[nn.Module] = [nn.LayerNorm(dim)]
            if feature_hidden_dim:
                layers += [nn.Linear(dim, feature_hidden_dim), nn.GELU()]
            layers.append(nn.Linear(feature_hidden_dim or dim, in_dim))
            self.feature_head = nn.Sequential(*layers)
        patch_out_dim = out_dim if cfg.patch_out_dim is None else cfg.patch_out_dim
        if not cfg.separate_ibot_head and patch_out_dim != out_dim:
            raise ValueError("a shared DINO/iBOT head needs patch_out_dim == out_dim")
        self.dino_head = DINOHead(cfg, in_dim=dim, out_dim=out_dim)
        self.ibot_head = DINOHead(cfg, in_dim=dim, out_dim=patch_out_dim) if cfg.separate_ibot_head else None
        self.dino_loss = DINOLoss(cfg, out_dim=out_dim)
        self.ibot_loss = IBOTPatchLoss(cfg, out_dim=patch_out_dim)
        self.koleo_loss = KoLeoLoss()
        teacher = nn.ModuleDict({"backbone": copy.deepcopy(student), "dino_head": copy.deepcopy(self.dino_head)})
        if self.ibot_head is not None:
            teacher["ibot_head"] = copy.deepcopy(self.ibot_head)
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()
        # Plain attribute, not a submodule: the model owns (and checkpoints, and optimises) the student.
        object.__setattr__(self, "_student", student)
        self.teacher_temp_final = cfg.teacher_temp
        self.warmup_teacher_temp = cfg.warmup_teacher_temp
        self.warmup_teacher_temp_steps = cfg.warmup_teacher_temp_steps
        self.momentum_start, self.momentum_end = cfg.momentum_start, cfg.momentum_end
        self.dino_weight, self.ibot_weight, self.koleo_weight = cfg.dino_weight, cfg.ibot_weight, cfg.koleo_weight
        self.feature_weight = cfg.feature_weight
        self.n_global = cfg.n_global
        # Optimizer steps taken (drives the teacher-temperature schedule; checkpointed for resume).
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    # -- teacher ---------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # no dropout / drop-path in the teacher, ever
        return self

    def _student_modules(self, student: nn.Module | None = None) -> nn.ModuleDict:
        s = nn.ModuleDict({"backbone": _unwrap(student if student is not None else self._student),
                           "dino_head": self.dino_head})
        if self.ibot_head is not None:
            s["ibot_head"] = self.ibot_head
        return s

    @torch.no_grad()
    def update_teacher(self, momentum: float, student: nn.Module | None = None) -> None:
        """EMA step after each optimizer step (``momentum`` e.g. from :meth:`momentum`)."""
        ema_update(self.teacher, self._student_modules(student), float(momentum))
        self.step += 1

    @torch.no_grad()
    def reset_teacher(self, student: nn.Module | None = None) -> None:
        """Copy the student weights into the teacher (e.g. after loading pretrained student weights)."""
        ema_update(self.teacher, self._student_modules(student), 0.0)

    def momentum(self, step: int, total_steps: int) -> float:
        """Teacher EMA momentum: cosine from ``momentum_start`` to ``momentum_end`` over training."""
        return cosine_schedule(step, total_steps, self.momentum_start, self.momentum_end)

    def teacher_temp(self, step: int | None = None) -> float:
        """Cosine ramp from ``warmup_teacher_temp`` to ``teacher_temp`` over the warm-up steps."""
        step = int(self.step) if step is None else step
        if self.warmup_teacher_temp_steps <= 0:
            return self.teacher_temp_final
        return cosine_schedule(step, self.warmup_teacher_temp_steps, self.warmup_teacher_temp, self.teacher_temp_final)

    # -- loss ------------------------------------------------------------------------------------
    def forward(self, student_aggregator: nn.Module, views, step: int | None = None) -> dict:
        g: PackedSlides = views.global_views
        loc: PackedSlides | None = views.local_views
        if g.token_mask is None:
            raise ValueError("masked self-distillation needs global views with token_mask set")
        n_global = int(getattr(views, "n_global", None) or self.n_global)
        n_views = g.num_slides
        if n_views % n_global:
            raise ValueError(f"{n_views} global views is not a multiple of n_global={n_global}")
        n_slides = n_views // n_global
        if loc is not None and n_slides and loc.num_slides % n_slides:
            raise ValueError(f"{loc.num_slides} local views for {n_slides} slides")
        temp = self.teacher_temp(step)
        ibot_head_s = self.ibot_head if self.ibot_head is not None else self.dino_head
        ibot_head_t = self.teacher["ibot_head"] if self.ibot_head is not None else self.teacher["dino_head"]
        masked = torch.nonzero(g.token_mask).squeeze(1)

        with torch.no_grad():
            t_out = self.teacher["backbone"](PackedSlides(g.tokens, g.positions, g.offsets, None, list(g.slide_ids)))
            t_cls = self.teacher["dino_head"](t_out.slide).float()
            t_patch = ibot_head_t(t_out.tokens[masked]).float()
            p_cls = self.dino_loss.teacher_probs(t_cls, temp)
            p_patch = self.ibot_loss.teacher_probs(t_patch, temp)
            if self.training:
                self.dino_loss.update_center(t_cls)
                self.ibot_loss.update_center(t_patch)

        s_out = student_aggregator(_concat_packed(g, loc))
        s_cls = self.dino_head(s_out.slide)
        s_patch = ibot_head_s(s_out.tokens[: g.tokens.shape[0]][masked])
        has_local = loc is not None and loc.num_slides > 0
        dino = self.dino_loss(s_cls[:n_views], s_cls[n_views:] if has_local else None, p_cls, n_global)
        ibot = self.ibot_loss(s_patch, p_patch, g.slide_index()[masked], n_views)
        if self.koleo_weight > 0 and n_slides > 1:
            z = s_out.slide[:n_views].view(n_slides, n_global, -1)
            koleo = sum(self.koleo_loss(z[:, v]) for v in range(n_global)) / n_global
        else:
            koleo = s_out.slide.sum() * 0.0
        feat = self._masked_features(g, s_out.tokens[: g.tokens.shape[0]], masked, n_views)
        loss = (self.dino_weight * dino + self.ibot_weight * ibot + self.koleo_weight * koleo
                + self.feature_weight * feat)
        return {
            "loss": loss,
            "dino": dino.detach(),
            "ibot": ibot.detach(),
            "koleo": koleo.detach(),
            "features": feat.detach(),
            "teacher_temp": temp,
            "n_masked": int(masked.numel()),
            "teacher_slide": t_out.slide.detach(),  # unmasked global views: feeds model.learned_pcs
        }

    def _masked_features(self, g: PackedSlides, tokens: Tensor, masked: Tensor, n_views: int) -> Tensor:
        """MSE between decoded student tokens and the view-centred, per-token normalised input at masked tokens.

        Centring per view matches what a per-slide input normalisation shows the student; the
        per-token normalisation (MAE's normalised-pixel target) keeps the loss scale independent of
        the patch encoder's feature scale.
        """
        if self.feature_head is None or masked.numel() == 0:
            return tokens.sum() * 0.0
        x = g.tokens.float()
        seg = g.slide_index().to(x.device)
        target = F.layer_norm((x - segment_mean(x, seg, n_views)[seg])[masked], (x.shape[1],))
        return F.mse_loss(self.feature_head(tokens[masked]).float(), target)


__all__ = [
    "DINOHead",
    "DINOLoss",
    "DistillationConfig",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "MaskedSelfDistillation",
    "cosine_schedule",
    "ema_update",
    "sinkhorn_knopp",
]
