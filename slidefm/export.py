"""Batch export of slide and patient embeddings to AnnData: packed, resumable, atomic, deterministic.

Slides are encoded whole (no token cap) in fixed chunks of ``chunk_slides``; each finished chunk is
saved under ``OUT.partial/`` so a killed export continues where it stopped. Within a chunk, slides
are packed into batches of at most ``batch_tokens`` tokens (a slide larger than that is a batch of
its own), and the final ``.h5ad`` is written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from slidefm.checkpoint import WEIGHTS
from slidefm.data.batch import pack_slides
from slidefm.data.sampler import ReadAheadSampler
from slidefm.data.transport import ShmDataLoader
from slidefm.errors import SlidefmError
from slidefm.io_utils import atomic_path


@dataclass
class ExportConfig:
    level: str = field(default="slide", metadata={"help": "slide | patient"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:i]"})
    weights: Literal[WEIGHTS] = field(default="student", metadata={
        "help": "slide encoder to export: the trained student, or the EMA teacher of masked self-distillation "
                "(what DINO-style methods evaluate; only runs with self-distillation have one)"})
    batch_tokens: int = field(default=65536, metadata={"help": "max tokens packed into one forward pass"})
    chunk_slides: int = field(default=256, metadata={"help": "slides per resumable chunk"})
    num_workers: int = field(default=1, metadata={"help": "background slide-reading processes"})
    read_ahead: int = field(default=16, metadata={
        "help": "slides requested from disk (posix_fadvise WILLNEED) this many slides before they are read; 0: off"})
    tokens: bool = field(default=False, metadata={
        "help": "also write per-patch token embeddings (slide level) to OUT.tokens.h5 next to the .h5ad"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


class _SlideReads(Dataset):
    def __init__(self, cohort, slide_ids):
        self.cohort = cohort
        self.slide_ids = slide_ids

    def __len__(self):
        return len(self.slide_ids)

    def __getitem__(self, i):
        sd = self.cohort.read_slide(self.slide_ids[i])
        return self.slide_ids[i], sd.features, sd.positions, sd.has_positions

    def will_need(self, i):
        """The read-ahead hint (``SlideReader.will_need``); a cohort-like object without a reader gets none."""
        hint = getattr(getattr(self.cohort, "reader", None), "will_need", None)
        if hint is not None:
            hint(self.slide_ids[i])


def slide_loader(cohort, slide_ids: list[str], cfg: ExportConfig) -> ShmDataLoader:
    """Whole slides in order, read ahead, through the shared-memory transport: a worker reads each slide into its
    arena and the main process gets it without a copy. Torch's path costs a new segment per slide, faulted in on
    both sides: for a 10k x 1536 slide about 60 ms of CPU, against 8 (benchmarks/slide_loader.py). The arena holds
    what export keeps at once: a ``batch_tokens`` batch being gathered and as much again read ahead (a slide that
    does not fit goes torch's way)."""
    ds = _SlideReads(cohort, slide_ids)
    sampler = ReadAheadSampler(list(range(len(ds))), ds.will_need, cfg.read_ahead)
    dim = getattr(cohort, "feature_dim", None)
    itemsize = np.dtype(getattr(cohort, "feature_dtype", np.float32)).itemsize  # float16 slides: half the room
    row_bytes = (int(dim) * itemsize + 32) if isinstance(dim, int) else 0  # features as handed out + grid, per patch
    # No larger than that: the ring's pages stay mapped once touched, so the arena is part of export's peak RSS.
    arena_mb = max(64, -(-2 * cfg.batch_tokens * row_bytes // 2**20))
    # An item is one slide, and the arena holds many (no user setting to name if one does not fit: no warning).
    return ShmDataLoader(ds, batch_size=None, sampler=sampler, num_workers=cfg.num_workers,
                         prefetch_factor=4 if cfg.num_workers else None, persistent_workers=False, arena_mb=arena_mb,
                         arena_setting=None)


def _accelerated(encoder) -> bool:
    """Whether the encoder runs off the CPU (an encoder without a ``device`` runs on it)."""
    return torch.device(getattr(encoder, "device", "cpu")).type != "cpu"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_slides_chunked(encoder, cohort, slide_ids: list[str], cfg: ExportConfig, partial_dir: Path | None,
                          fingerprint: str, want_tokens: bool = False):
    """Encode slides in resumable chunks; returns (S, d) embeddings and optional per-slide token arrays."""
    if cfg.read_ahead < 0:
        raise SlidefmError(f"--read-ahead must be >= 0 (0: off), got {cfg.read_ahead}")
    if hasattr(cohort, "slides_without_positions"):
        from slidefm.models.positions import require_positions

        require_positions(encoder.config, cohort, training=False)  # features-only bags: before any work
    chunks = [slide_ids[i : i + cfg.chunk_slides] for i in range(0, len(slide_ids), cfg.chunk_slides)]
    if partial_dir is not None:
        partial_dir.mkdir(parents=True, exist_ok=True)
        meta = partial_dir / "fingerprint.json"
        if meta.exists() and json.loads(meta.read_text()).get("fingerprint") != fingerprint:
            # A different checkpoint/cohort/config left this: never mix its chunks in.
            shutil.rmtree(partial_dir)
            partial_dir.mkdir(parents=True)
        meta.write_text(json.dumps({"fingerprint": fingerprint}))
    todo = [i for i in range(len(chunks)) if partial_dir is None or not (partial_dir / f"chunk{i:06d}.npz").exists()]
    results: dict[int, tuple[np.ndarray, list]] = {}
    pbar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        done = sum(len(chunks[i]) for i in range(len(chunks)) if i not in todo)
        pbar = tqdm(total=len(slide_ids), initial=done, desc="export", unit="slide")
    # On an accelerator float16 slides cross as float16 and are cast there; on the CPU, while packing.
    pack_dtype = None if _accelerated(encoder) else torch.float32
    # One loader for every chunk left: its workers, arenas and read-ahead run on across chunk boundaries (a loader
    # per chunk started its workers again and faulted in fresh arenas every chunk_slides slides).
    todo_ids = [sid for ci in todo for sid in chunks[ci]]
    stream = iter(slide_loader(cohort, todo_ids, cfg)) if todo_ids else iter(())
    for ci in todo:
        embs, toks = [], []
        for batch in _budget_batches_stream(itertools.islice(stream, len(chunks[ci])), cfg.batch_tokens):
            packed = pack_slides([b[1] for b in batch], [b[2] for b in batch], [b[0] for b in batch],
                                 has_positions=all(b[3] for b in batch), dtype=pack_dtype)
            n_batch = len(batch)
            del batch  # copied into `packed`: the slides' arena space is free for the reads ahead
            slide, tokens = encoder.encode_packed(packed, want_tokens)
            embs.append(slide)
            if want_tokens:
                toks.extend(tokens)
            del packed
            _release_freed_memory()
            if pbar is not None:
                pbar.update(n_batch)
        emb = np.concatenate(embs).astype(np.float32)
        if partial_dir is not None:
            with atomic_path(partial_dir / f"chunk{ci:06d}.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, emb=emb, **{f"tok{j}": t for j, t in enumerate(toks)})
        results[ci] = (emb, toks if partial_dir is None else [])  # resumable: the npz files hold the tokens
    del stream  # exhausted: its workers are joined
    if pbar is not None:
        pbar.close()
    all_emb = []
    for ci in range(len(chunks)):
        if ci in results:
            all_emb.append(results[ci][0])
        else:
            with np.load(partial_dir / f"chunk{ci:06d}.npz") as z:
                all_emb.append(z["emb"])
    d = getattr(encoder.model, "encoded_dim", encoder.dim)
    emb = np.concatenate(all_emb) if all_emb else np.zeros((0, d), np.float32)

    def tokens():
        """(slide_id, (n, d) tokens) in slide order; from disk when resumable, one chunk in memory at a time."""
        for ci, ids in enumerate(chunks):
            if ci in results and partial_dir is None:
                yield from zip(ids, results[ci][1])
                continue
            with np.load(partial_dir / f"chunk{ci:06d}.npz") as z:
                for j, sid in enumerate(ids):
                    yield sid, z[f"tok{j}"]

    return emb, (tokens() if want_tokens else iter(()))


def write_tokens_h5(tokens, out: str | os.PathLike, dim: int) -> Path:
    """Per-patch token embeddings to HDF5 (``tokens/{slide_id}``: (n_patches, dim) float32, rows in the
    order of the slide's feature file), streamed one slide at a time and renamed into place when complete."""
    import h5py

    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["dim"] = dim
            f.attrs["row_order"] = "rows of the slide's feature file (features/{slide_id}.h5)"
            g = f.create_group("tokens")
            for sid, t in tokens:
                g.create_dataset(str(sid), data=np.asarray(t, dtype=np.float32), chunks=True)
    return Path(out)


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS between chunks.

    Batches of every size fragment glibc's heap, so resident memory would creep up with the number
    of slides exported although nothing is kept; malloc_trim after each batch (milliseconds, against
    seconds of compute) keeps it flat.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _budget_batches_stream(loader, batch_tokens: int):
    cur, n = [], 0
    for it in loader:
        if cur and n + len(it[1]) > batch_tokens:
            yield cur
            cur, n = [], 0
        cur.append(it)
        n += len(it[1])
    if cur:
        yield cur


def write_h5ad(adata, out: str | os.PathLike) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    return out


def partial_dir_for(out: str | os.PathLike) -> Path:
    """Where the resumable chunks of an export to ``out`` live until the .h5ad is written."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def export_embeddings(encoder, cohort, out: str | os.PathLike, cfg: ExportConfig | None = None):
    """Embed a cohort at ``cfg.level`` and write ``out`` (.h5ad, plus ``OUT.tokens.h5`` with ``cfg.tokens``).

    Resumable through ``OUT.partial/``, which is removed once ``out`` is written: a finished export leaves
    only its outputs. Returns ``(adata, tokens_path or None)``.
    """
    cfg = cfg or ExportConfig()
    if cfg.level not in ("slide", "patient"):
        raise SlidefmError(f"--level must be slide or patient, got '{cfg.level}'")
    if cfg.tokens and cfg.level != "slide":
        raise SlidefmError("--tokens writes per-patch embeddings of slides: use it with --level slide")
    out = Path(out)
    partial = partial_dir_for(out)
    tokens_path = out.with_name(out.stem + ".tokens.h5") if cfg.tokens else None
    if cfg.level == "slide":
        adata = encoder.embed_slides(cohort, cfg, partial_dir=partial, tokens_path=tokens_path)
    else:
        adata = encoder.embed_patients(cohort, cfg, partial_dir=partial)
    write_h5ad(adata, out)
    shutil.rmtree(partial, ignore_errors=True)
    return adata, tokens_path


def check_feature_dim(cohort, in_dim: int, ckpt: str) -> None:
    d = cohort.feature_dim
    if d != in_dim:
        raise SlidefmError(
            f"cohort {cohort.root} has patch features of width D={d}, but checkpoint {ckpt} was trained on "
            f"D={in_dim}: export needs features from the same patch encoder"
        )


__all__ = ["ExportConfig", "export_embeddings", "partial_dir_for", "encode_slides_chunked", "write_h5ad",
           "write_tokens_h5", "check_feature_dim", "file_sha256"]
