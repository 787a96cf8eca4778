"""Python API over a trained checkpoint: ``enc = slidefm.load(ckpt); enc.embed_slides(cohort)``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidefm import checkpoint as checkpoints
from slidefm.data.batch import PackedSlides, pack_slides
from slidefm.errors import SlidefmError
from slidefm.export import ExportConfig, check_feature_dim, encode_slides_chunked, file_sha256, write_tokens_h5
from slidefm.grid import coords_to_grid


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_checkpoint(path: str | Path) -> dict:
    """A slidefm checkpoint, read safely (``weights_only=True``) and format-checked; see :mod:`slidefm.checkpoint`."""
    return checkpoints.read(path)


class Encoder:
    """A trained slide (and patient) encoder with its preprocessing, ready for inference."""

    def __init__(self, model, meta: dict, checkpoint: str, sha256: str, device: torch.device,
                 weights: str = "student"):
        self.model = model.eval().to(device)
        self.meta = meta
        self.config = meta["config"]
        self.checkpoint = checkpoint
        self.sha256 = sha256
        self.device = device
        self.weights = weights  # which slide encoder: "student" or self-distillation's EMA "teacher"
        self._text = None

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "auto", weights: str = "student") -> "Encoder":
        """``weights``: "student" (the trained slide encoder) or "teacher" (self-distillation's EMA teacher)."""
        ck = checkpoints.read(checkpoint)
        model, _ = checkpoints.build_model(ck, checkpoint, weights)
        return cls(model, ck[checkpoints.SECTION], str(checkpoint), file_sha256(checkpoint), resolve_device(device),
                   weights)

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def in_dim(self) -> int:
        return int(self.meta["in_dim"])

    @property
    def name(self) -> str:
        return str(self.config.get("recipe", "custom"))

    # -- slides --------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_packed(self, packed: PackedSlides, want_tokens: bool = False):
        out = self.model.export_slides(packed.to(self.device, torch.float32))
        slide = out.slide.float().cpu().numpy()
        tokens = []
        if want_tokens:
            tokens = [t.float().cpu().numpy() for t in torch.split(out.tokens, packed.lengths.tolist())]
        return slide, tokens

    def embed_slide(self, features, coords=None, patch_size_level0: float | None = None, overlap: float | None = None,
                    patch_size: float | None = None, return_tokens: bool = False):
        """One slide in memory -> (dim,) tensor (and (N, dim) token embeddings if asked).

        ``coords=None`` embeds a features-only bag; models that need positions refuse it."""
        f = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        if f.ndim == 3 and f.shape[0] == 1:
            f = f[0]
        if f.ndim != 2 or f.shape[1] != self.in_dim:
            raise SlidefmError(f"features must be (N, {self.in_dim}), got {tuple(f.shape)}")
        if coords is None:
            from slidefm.models.positions import position_options

            need = position_options(self.config, training=False)
            if need:
                raise SlidefmError(f"{need[0]} needs patch coordinates; embed_slide got coords=None")
            packed = pack_slides([f], [torch.zeros(len(f), 2, dtype=torch.long)], has_positions=False)
        else:
            grid = coords_to_grid(np.asarray(coords), patch_size_level0, overlap, patch_size)
            packed = pack_slides([f], [grid.positions])
        slide, tokens = self.encode_packed(packed, return_tokens)
        s = torch.from_numpy(self._finish(slide[:1])[0])
        return (s, torch.from_numpy(tokens[0])) if return_tokens else s

    @torch.inference_mode()
    def _finish(self, emb: np.ndarray) -> np.ndarray:
        """Encoded slide or patient embeddings -> exported ones (``SlideFM.finish_export``; a no-op without
        ``learned_pcs``, so the common path skips the device round trip)."""
        if self.model.learned_pcs is None:
            return emb
        return self.model.finish_export(torch.from_numpy(emb).to(self.device)).float().cpu().numpy()

    def _open(self, cohort):
        from slidefm.cohort import Cohort

        return cohort if hasattr(cohort, "read_slide") else Cohort.open(cohort)

    def _uns(self, cfg: ExportConfig, level: str, pooling: str | None = None) -> dict[str, Any]:
        pcs = self.model.learned_pcs
        learned = self.model.dim if pcs is None else pcs.k
        return {
            "level": level,
            "model": self.name,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.sha256,
            "weights": self.weights,
            "config": json.dumps(self.config),
            "preprocessing": json.dumps(_jsonable(self.meta.get("preprocessing") or {})),
            "version": json.dumps(self.meta.get("version") or {}),
            "token_cap": "none (whole slides)",
            "patient_pooling": pooling or "",
            # With mean_path the last D columns are the (slide or patient) mean input feature.
            "embedding_layout": (f"learned[0:{learned}] + mean_input[{learned}:{self.model.export_dim}]"
                                 if self.model.mean_path else f"learned[0:{learned}]"),
            "learned_part": (f"top {learned} principal components of the {self.model.dim}-wide learned embedding "
                             "(running statistics of training, model.learned_pcs)" if pcs is not None
                             else f"the {self.model.dim}-wide learned embedding"),
        }

    def _fingerprint(self, cohort, level: str, cfg: ExportConfig) -> str:
        return json.dumps([self.sha256, str(Path(cohort.root).resolve()), level, cfg.chunk_slides, cfg.tokens,
                           list(cohort.slide_ids)[:3], len(cohort.slide_ids)])

    def embed_slides(self, cohort, config: ExportConfig | None = None, partial_dir: str | Path | None = None,
                     tokens_path: str | Path | None = None):
        """AnnData: obs = slides.csv rows (all columns), X = slide embeddings, uns = provenance.

        With ``config.tokens``, per-patch token embeddings go to the HDF5 file ``tokens_path``
        (``uns["tokens_file"]`` names it; see ``write_tokens_h5``), or, without a path, into
        ``uns["tokens"]`` as a dict of arrays (small cohorts, in-memory use only).
        """
        import anndata as ad

        cfg = config or ExportConfig()
        cohort = self._open(cohort)
        check_feature_dim(cohort, self.in_dim, self.checkpoint)
        sids = list(cohort.slide_ids)
        emb, toks = encode_slides_chunked(self, cohort, sids, cfg, Path(partial_dir) if partial_dir else None,
                                          self._fingerprint(cohort, "slide", cfg), want_tokens=cfg.tokens)
        emb = self._finish(emb)
        obs = cohort.slides.loc[sids].copy()
        obs.index = obs.index.astype(str)
        obs.index.name = "slide_id"
        a = ad.AnnData(X=emb, obs=_clean_obs(obs))
        a.uns.update(self._uns(cfg, "slide"))
        if cfg.tokens and tokens_path is not None:
            write_tokens_h5(toks, tokens_path, self.dim)
            a.uns["tokens_file"] = Path(tokens_path).name
        elif cfg.tokens:
            a.uns["tokens"] = dict(toks)
        return a

    @torch.inference_mode()
    def embed_patients(self, cohort, config: ExportConfig | None = None, partial_dir: str | Path | None = None):
        """AnnData at patient level: case transformer when present, else the configured slide pooling."""
        import anndata as ad
        import pandas as pd

        cfg = config or ExportConfig()
        cohort = self._open(cohort)
        check_feature_dim(cohort, self.in_dim, self.checkpoint)
        sids = list(cohort.slide_ids)
        emb, _ = encode_slides_chunked(self, cohort, sids, cfg, Path(partial_dir) if partial_dir else None,
                                       self._fingerprint(cohort, "slide", cfg))
        row = {s: i for i, s in enumerate(sids)}
        pids = list(cohort.patient_ids)
        order = [row[s] for p in pids for s in cohort.slides_of(p)]
        counts = [len(cohort.slides_of(p)) for p in pids]
        from slidefm.data.types import segment_offsets

        off = segment_offsets(counts).to(self.device)
        x = torch.from_numpy(emb[order]).to(self.device)
        patient = self._finish(self.model.export_patients(x, off).float().cpu().numpy())
        pooling = "case_transformer" if self.model.case is not None else f"{self.model.patient_pool} of slide embeddings"
        obs = pd.DataFrame(index=pd.Index([str(p) for p in pids], name="patient_id"))
        obs["n_slides"] = counts
        if "center" in cohort.slides.columns:
            obs["center"] = [str(cohort.slides.loc[cohort.slides_of(p)[0], "center"]) for p in pids]
        clinical = getattr(cohort, "clinical", None)
        if clinical is not None:
            obs = obs.join(clinical.reindex(obs.index), rsuffix="_clinical")
        a = ad.AnnData(X=patient, obs=_clean_obs(obs))
        a.uns.update(self._uns(cfg, "patient", pooling))
        self._add_modalities(a, cohort, pids)
        return a

    def _add_modalities(self, a, cohort, pids) -> None:
        """Patient-level modality embeddings (obsm) with presence flags, using the checkpointed transforms."""
        from slidefm.data.batch import Modality
        from slidefm.data.expression import ExpressionTransform

        prep = self.meta.get("preprocessing") or {}
        sources = {}
        if getattr(cohort, "expression", None) is not None:
            sources["expression"] = cohort.expression
        for name, (adata, _units) in (getattr(cohort, "omics", None) or {}).items():
            sources[name] = adata
        for name, adata in sources.items():
            if name not in self.model.towers or name not in prep:
                continue
            x, present = ExpressionTransform.from_state(prep[name]).transform(adata, pids)
            with torch.inference_mode():
                z = self.model.encode_modality(name, Modality(x.to(self.device), present)).float().cpu().numpy()
            z[~present.numpy()] = np.nan
            a.obsm[f"X_{name}"] = z
            a.obs[f"has_{name}"] = present.numpy()

    # -- text ----------------------------------------------------------------------------------
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Report-text embeddings in the shared space (zero-shot); needs a checkpoint with a text tower."""
        if "report" not in self.model.towers:
            raise SlidefmError(f"checkpoint {self.checkpoint} has no text tower")
        if not self.model.text_precomputed:
            tower = self.model.towers["report"]
            with torch.inference_mode():
                return tower(tower.tokenize(texts)).float().cpu()
        if self._text is None:
            from slidefm.modalities import MODALITY_ENCODERS

            self._text = MODALITY_ENCODERS.build(self.config["model"]["report"]).eval()
        with torch.inference_mode():
            raw = self._text.embed_texts(list(texts)).to(self.device)
            return self.model.towers["report"](raw).float().cpu()

    def embed_slides_shared(self, slide_emb: np.ndarray) -> np.ndarray:
        """Project slide/patient embeddings into the shared (contrastive) space, e.g. for zero-shot."""
        with torch.inference_mode():
            return self.model.project_patients(torch.as_tensor(slide_emb, device=self.device)).float().cpu().numpy()


def _clean_obs(df):
    """h5ad cannot store mixed-type object columns: make them strings."""
    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].astype(str)
    return df


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        if len(x) > 50:
            return f"<{len(x)} items>"
        return [_jsonable(v) for v in x]
    if torch.is_tensor(x):
        return f"<tensor {tuple(x.shape)}>"
    return x
