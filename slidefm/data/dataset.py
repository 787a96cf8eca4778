"""Patient-level training dataset and its collate function.

One item is one patient: up to ``max_slides_per_patient`` of its slides (tokens chosen by the
``tokens`` strategy) plus, for masked self-distillation, grid-crop views of each slide. Randomness
comes from a per-item seed derived from (data seed, epoch, index), so an item is the same whichever
worker loads it and a resumed run sees exactly the data the uninterrupted one would have.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from slidefm.data.batch import Modality, PackedSlides, pack_slides
from slidefm.data.config import DataConfig
from slidefm.data.tables import PatientTables
from slidefm.data.types import Batch, Views, segment_offsets
from slidefm.registry import check_choices


def item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def select_tokens(n: int, positions: np.ndarray, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray | None:
    """Indices of the tokens the slide branch sees (None = whole slide)."""
    if cfg.tokens == "whole":
        return None
    if cfg.tokens == "subsample":
        if cfg.max_tokens is None or n <= cfg.max_tokens:
            return None
        return np.sort(rng.choice(n, cfg.max_tokens, replace=False))
    if cfg.tokens == "crop":
        from slidefm.data.views import ViewConfig, random_crop

        # crop windows follow the views' tissue rule (data.views.min_tissue's default)
        return random_crop(positions, cfg.crop_size, rng, ViewConfig.min_tissue)
    check_choices(cfg, "data.", DataConfig)
    raise AssertionError(cfg.tokens)  # every allowed value is handled above


class PatientDataset(Dataset):
    def __init__(self, reader, patient_ids: list[str], slides_of: dict[str, list[str]], cfg: DataConfig,
                 train: bool = True):
        self.reader = reader
        self.patient_ids = list(patient_ids)
        self.slides_of = slides_of
        self.cfg = cfg
        self.train = train

    def __len__(self) -> int:
        return len(self.patient_ids)

    def __getitem__(self, key) -> dict[str, Any]:
        if isinstance(key, (tuple, list)):
            index, seed = int(key[0]), int(key[1])
        else:
            index, seed = int(key), item_seed(self.cfg.seed, 0, int(key))  # direct indexing: epoch 0
        if not self.train:
            # Validation sees the same views and tokens every epoch.
            seed = item_seed(self.cfg.seed, 2**31 - 1, index)
        rng = np.random.default_rng(seed)
        pid = self.patient_ids[index]
        sids = list(self.slides_of[pid])
        k = self.cfg.max_slides_per_patient
        if k and len(sids) > k:
            sids = sorted(rng.choice(sids, k, replace=False).tolist(), key=sids.index) if self.train else sids[:k]
        slides, views = [], []
        has_positions = True
        for sid in sids:
            sd = self.reader.read_slide(sid)
            f, p = sd.features, sd.positions
            has_positions &= sd.has_positions
            idx = select_tokens(len(f), p, self.cfg, rng)
            if idx is None:
                slides.append((sid, f, p))
            else:
                slides.append((sid, f[idx], p[idx]))
            if self.cfg.views is not None:
                from slidefm.data.views import make_views

                views.append(make_views(f, p, self.cfg.views, rng))
        return {"patient_id": pid, "slides": slides, "views": views, "has_positions": has_positions}


def _pack_views(items: list[dict], attr: str) -> tuple[PackedSlides | None, int]:
    feats, pos, masks, ids = [], [], [], []
    n_per = 0
    for it in items:
        for (sid, f, _), vs in zip(it["slides"], it["views"]):
            vlist = getattr(vs, attr)
            n_per = len(vlist)
            for v in vlist:
                feats.append(f[v.indices] if v.features is None else v.features)
                pos.append(v.positions)
                masks.append(v.token_mask if v.token_mask is not None else np.zeros(len(v.indices), bool))
                ids.append(sid)
    if not feats:
        return None, 0
    return pack_slides(feats, pos, ids, masks), n_per


class Collate:
    """Items -> :class:`Batch`, looking modality rows and labels up in the prepared tables."""

    def __init__(self, tables: PatientTables, text_tokenizer=None):
        self.tables = tables
        self.text_tokenizer = text_tokenizer
        self.report_present = tables.report_present if tables.report_texts is not None else None

    def __call__(self, items: list[dict]) -> Batch:
        t = self.tables
        pids = [it["patient_id"] for it in items]
        flat = [s for it in items for s in it["slides"]]
        slides = pack_slides([s[1] for s in flat], [s[2] for s in flat], [s[0] for s in flat],
                             has_positions=all(it.get("has_positions", True) for it in items))
        poff = segment_offsets([len(it["slides"]) for it in items])
        rows = t.rows(pids)
        mods: dict[str, Modality] = {}
        if t.report_texts is not None:
            present = self.report_present[rows]
            if t.report_embeddings is not None:
                mods["report"] = Modality(t.report_embeddings[rows], present)
            elif self.text_tokenizer is not None:
                texts = [t.report_texts[int(r)] or "" for r in rows]
                mods["report"] = Modality(self.text_tokenizer(texts), present)
        for name, (x, present) in t.tabular.items():
            mods[name] = Modality(x[rows], present[rows])
        labels = {k: v[rows] for k, v in t.labels.items()}
        experts = {}
        for name, (x, present, index) in t.experts.items():
            srows = torch.tensor([index[s[0]] for s in flat], dtype=torch.long)
            experts[name] = Modality(x[srows], present[srows])
        views = None
        if items and items[0]["views"]:
            g, n_g = _pack_views(items, "global_views")
            l, n_l = _pack_views(items, "local_views")
            views = Views(g, l, n_g, n_l)
        return Batch(slides, poff, pids, mods, labels, experts, views)
