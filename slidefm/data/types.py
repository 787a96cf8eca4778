"""What the data pipeline hands to the model: one training step's patients, slides and modalities."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from slidefm.data.batch import Modality, PackedSlides


@dataclass
class Views:
    """Grid crops for masked self-distillation, slide-major: slide b, view g at ``b * n_global + g``."""

    global_views: PackedSlides
    local_views: PackedSlides | None
    n_global: int
    n_local: int

    def to(self, device) -> "Views":
        lv = None if self.local_views is None else self.local_views.to(device)
        return Views(self.global_views.to(device), lv, self.n_global, self.n_local)


@dataclass
class Batch:
    """P patients owning S slides; modalities and labels have one row per patient."""

    slides: PackedSlides  # S slides, grouped by patient
    patient_offsets: Tensor  # (P + 1,) slides of patient p are slides[patient_offsets[p]:patient_offsets[p+1]]
    patient_ids: list[str]
    modalities: dict[str, Modality] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)
    experts: dict[str, Modality] = field(default_factory=dict)  # one row per slide
    views: Views | None = None

    @property
    def num_patients(self) -> int:
        return len(self.patient_ids)

    def to(self, device) -> "Batch":
        return Batch(
            self.slides.to(device),
            self.patient_offsets.to(device),
            list(self.patient_ids),
            {k: m.to(device) for k, m in self.modalities.items()},
            {k: v.to(device) for k, v in self.labels.items()},
            {k: m.to(device) for k, m in self.experts.items()},
            None if self.views is None else self.views.to(device),
        )


def segment_offsets(lengths: list[int]) -> Tensor:
    off = torch.zeros(len(lengths) + 1, dtype=torch.long)
    if lengths:
        off[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
    return off
