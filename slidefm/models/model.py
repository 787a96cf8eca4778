"""The composite model: slide aggregator, optional case transformer, modality towers, projections."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from slidefm.data.batch import Modality, PackedSlides
from slidefm.errors import SlidefmError
from slidefm.models.aggregators import AggregatorOutput, build_aggregator
from slidefm.models.principal import RunningPCA
from slidefm.models.segments import segment_index, segment_mean
from slidefm.registry import config_to_dict


class SlideFM(nn.Module):
    """Slides -> slide embeddings -> patient embeddings; modality rows -> embeddings in one shared space.

    ``modality_dims`` gives each tabular modality's input width and, for a precomputed (frozen)
    text tower, the width of its cached embeddings under the key ``report``; ``preprocessing`` holds
    the fitted transforms (their gene order feeds gene-set tokenisation).
    """

    def __init__(self, cfg: Any, in_dim: int, modality_dims: dict[str, int] | None = None,
                 text_precomputed: bool = True, preprocessing: dict | None = None):
        super().__init__()
        from slidefm.modalities import MODALITY_ENCODERS

        modality_dims = dict(modality_dims or {})
        self.in_dim = in_dim
        self.embed_dim = int(cfg.embed_dim)
        self.patient_pool = cfg.patient_pool
        self.mean_path = bool(getattr(cfg, "mean_path", False))
        self.aggregator = build_aggregator(cfg.aggregator, in_dim=in_dim)
        if cfg.input_norm != "none":
            from slidefm.models.aggregators.input_norm import SlideInputNorm

            self.aggregator = SlideInputNorm(self.aggregator, cfg.input_norm)
        d = self.aggregator.dim
        self.case = None
        if cfg.case is not None:
            from slidefm.models.case import build_case_transformer

            self.case = build_case_transformer(cfg.case, slide_dim=d)
        self.slide_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, self.embed_dim))
        k = int(getattr(cfg, "learned_pcs", 0) or 0)
        if k < 0 or k > d:
            raise SlidefmError(f"model.learned_pcs must be in 0..{d} (the aggregator's width), got {k}")
        # Fed in training (SlideFMModule); only export reads it.
        self.learned_pcs = RunningPCA(d, k) if k else None
        self.towers = nn.ModuleDict()
        self.text_precomputed = text_precomputed
        if cfg.report is not None:
            if text_precomputed:
                width = modality_dims["report"]
                self.towers["report"] = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, self.embed_dim))
            else:
                self.towers["report"] = MODALITY_ENCODERS.build(cfg.report, out_dim=self.embed_dim)
        tab = {}
        if cfg.expression is not None:
            tab["expression"] = cfg.expression
        tab.update(config_to_dict(cfg.omics) if cfg.omics else {})
        for name, ecfg in tab.items():
            if name not in modality_dims:
                continue
            extra = {}
            if config_to_dict(ecfg).get("name") == "geneset_transformer":
                # gene sets are matched against the fitted transform's gene order
                extra["genes"] = list((preprocessing or {}).get(name, {}).get("genes") or [])
            self.towers[name] = MODALITY_ENCODERS.build(ecfg, in_dim=modality_dims[name], out_dim=self.embed_dim,
                                                        **extra)

    @property
    def dim(self) -> int:
        return self.aggregator.dim

    def encode_slides(self, slides: PackedSlides) -> AggregatorOutput:
        return self.aggregator(slides)

    def encode_patients(self, slide_emb: Tensor, patient_offsets: Tensor) -> Tensor:
        """(S, d) slide embeddings grouped by ``patient_offsets`` -> (P, d)."""
        if self.case is not None:
            return self.case(slide_emb, patient_offsets)
        from slidefm.models.case import pool_slides

        return pool_slides(slide_emb, patient_offsets, how=self.patient_pool)

    @property
    def encoded_dim(self) -> int:
        """Width of ``export_slides``/``export_patients`` outputs: the aggregator's, plus D with ``mean_path``."""
        return self.dim + (self.in_dim if self.mean_path else 0)

    @property
    def export_dim(self) -> int:
        """Width of exported embeddings: ``encoded_dim``, the learned part narrowed to ``learned_pcs``."""
        return self.encoded_dim - (self.dim - self.learned_pcs.k if self.learned_pcs is not None else 0)

    def export_slides(self, slides: PackedSlides) -> AggregatorOutput:
        """Slide embeddings as encoded for export: the learned embedding, then (``mean_path``) the slide's
        mean input. ``finish_export`` narrows them (``learned_pcs``) once patients are formed.

        The mean is of the raw input features, so a linear probe on the export can always do what
        mean pooling does; the learned part is free to carry what the mean cannot (arrangement, foci).
        """
        out = self.encode_slides(slides)
        if not self.mean_path:
            return out
        seg = segment_index(slides.offsets.to(slides.tokens.device))
        mean = segment_mean(slides.tokens.to(out.slide.dtype), seg, slides.num_slides)
        return AggregatorOutput(slide=torch.cat([out.slide, mean], dim=1), tokens=out.tokens)

    def finish_export(self, emb: Tensor) -> Tensor:
        """Encoded slide or patient embeddings (``encoded_dim``) -> exported ones (``export_dim``): with
        ``learned_pcs``, the learned part becomes its principal coordinates; the mean input stays."""
        if self.learned_pcs is None:
            return emb
        return torch.cat([self.learned_pcs.project(emb[:, : self.dim]), emb[:, self.dim:]], dim=1)

    def export_patients(self, slide_emb: Tensor, patient_offsets: Tensor) -> Tensor:
        """Patient embeddings from exported slide embeddings: the case model (or pooling) on the learned
        part, then (``mean_path``) the mean over the patient's slides of their mean inputs."""
        if not self.mean_path:
            return self.encode_patients(slide_emb, patient_offsets)
        learned, mean = slide_emb[:, : self.dim], slide_emb[:, self.dim:]
        seg = segment_index(patient_offsets)
        pmean = segment_mean(mean, seg, len(patient_offsets) - 1)
        return torch.cat([self.encode_patients(learned, patient_offsets), pmean], dim=1)

    def encode_modality(self, name: str, m: Modality) -> Tensor:
        return self.towers[name](m.data)

    def project_patients(self, patient_emb: Tensor) -> Tensor:
        return self.slide_proj(patient_emb)
