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
from slidefm.errors import OptionError
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


_BLAS: dict[int, Any] = {}  # pid -> threadpoolctl controller (built once per process: it scans loaded libraries)


def one_blas_thread():
    """Context that runs BLAS on one thread: views are many tiny GEMMs ((~256, D) @ (D, 8)) where waking a
    thread pool costs several times the arithmetic (8x measured on 2 cores), and with ``num_workers=0``
    the pool would also contend with the training threads. DataLoader workers are limited already."""
    import os

    from threadpoolctl import ThreadpoolController

    pid = os.getpid()
    if pid not in _BLAS:
        _BLAS.clear()  # a forked worker does not reuse its parent's controller
        _BLAS[pid] = ThreadpoolController()
    return _BLAS[pid].limit(limits=1, user_api="blas")


class PatientDataset(Dataset):
    """``reader``: a Cohort (its picklable ``reader`` is used) or a SlideReader.

    ``slide_tokens=False``: no objective reads the slide branch (``Batch.slides``), e.g. masked
    self-distillation alone on a features-only cohort. Items then carry no slide tokens (the batch's
    ``slides`` hold zero tokens per slide) and only the rows the views crop are read from each file:
    a few hundred of a TCGA-sized slide's ~10k x 1024, instead of the whole slide converted to float32.
    """

    def __init__(self, reader, patient_ids: list[str], slides_of: dict[str, list[str]], cfg: DataConfig,
                 train: bool = True, slide_tokens: bool = True):
        self.reader = getattr(reader, "reader", reader)  # a Cohort's SlideReader: what workers need
        self.patient_ids = list(patient_ids)
        self.slides_of = slides_of
        self.cfg = cfg
        self.train = train
        self.slide_tokens = slide_tokens
        if cfg.read_ahead < 0:
            raise OptionError(f"data.read_ahead must be >= 0 (0: off), got {cfg.read_ahead}")
        if not slide_tokens and cfg.views is None:
            raise ValueError("slide_tokens=False needs data.views: the items would hold no tokens at all")
        if cfg.views is not None:
            from slidefm.data.views import check_views

            check_views(cfg.views)

    def __len__(self) -> int:
        return len(self.patient_ids)

    def __getitem__(self, key) -> dict[str, Any]:
        with one_blas_thread():
            return self._item(key)

    def _draw(self, key) -> tuple[str, list[str], np.random.Generator]:
        """(patient, the slides this item reads, the item's generator after choosing them)."""
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
        return pid, sids, rng

    def will_need(self, key) -> None:
        """Tell the reader which slides item ``key`` will read (see ``data.read_ahead``). Only where items
        read whole slides: a hint fetches a whole slide, and a crop of a large slide reads a small part."""
        if self.slide_tokens and self.cfg.tokens == "whole":
            for sid in self._draw(key)[1]:
                self.reader.will_need(sid)

    def _item(self, key) -> dict[str, Any]:
        pid, sids, rng = self._draw(key)
        slides, views = [], []
        has_positions = True
        for sid in sids:
            plan: dict[str, Any] = {}

            def select(positions: np.ndarray) -> np.ndarray | None:
                # Token choice, then view geometry, from positions alone; the reader then reads the rows
                # these need (None: every row, for the whole slide branch).
                idx = select_tokens(len(positions), positions, self.cfg, rng) if self.slide_tokens else None
                vplans = None
                if self.cfg.views is not None:
                    from slidefm.data.views import plan_rows, plan_views

                    vplans = plan_views(positions, self.cfg.views, rng)
                plan.update(idx=idx, views=vplans)
                if self.slide_tokens and idx is None:
                    return None
                parts = [plan_rows(vplans)] if vplans is not None else []
                if self.slide_tokens:
                    parts.append(idx)
                return np.concatenate(parts)

            part = self.reader.read_rows(sid, select)
            has_positions &= part.has_positions
            idx = plan["idx"]
            if not self.slide_tokens:
                dim = part.features.shape[1]
                slides.append((sid, np.zeros((0, dim), np.float32), np.zeros((0, 2), np.int64)))
            elif idx is None:
                slides.append((sid, part.features, part.positions))  # rows is None: every row, in order
            else:
                slides.append((sid, part.take(idx), part.positions[idx]))
            if plan["views"] is not None:
                from slidefm.data.views import finish_views

                views.append(finish_views(part.take, plan["views"], self.cfg.views, rng))
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
