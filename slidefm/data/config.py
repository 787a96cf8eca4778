"""Data options (one source of truth: Hydra's ``data`` node and the docs read these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from omegaconf import MISSING


@dataclass
class ExpressionDataConfig:
    n_top_genes: int = field(default=2000, metadata={"help": "highly variable genes chosen on training patients"})
    genes: Optional[List[str]] = field(default=None, metadata={"help": "explicit gene list (overrides HVG selection)"})


@dataclass
class DataConfig:
    cohort: str = field(default=MISSING, metadata={
        "help": "cohort directory (shared/cohort-format.md)", "resume": True})
    store: Optional[str] = field(default=None, metadata={
        "help": "packed store from `slidefm pack` (default: auto)", "resume": True})
    batch_size: int = field(default=8, metadata={"help": "patients per step (per device)"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes", "resume": True})
    persistent_workers: bool = field(default=True, metadata={
        "help": "keep training workers alive across epochs (with num_workers > 0) instead of restarting them",
        "resume": True})
    transport: Literal["shm", "torch"] = field(default="shm", metadata={
        "help": "how workers send batches: shm (a reused shared-memory arena per worker, handed out without a "
                "copy) or torch (a new shared-memory segment per tensor)", "resume": True})
    arena_mb: int = field(default=256, metadata={
        "help": "MiB of each worker's arena (transport=shm): shared memory that stays mapped for the run (up to "
                "num_workers x arena_mb); make it hold three batches (8 whole TCGA-sized slides are ~330 MB as "
                "float32): a batch that does not fit goes torch's much slower way, and the loader says so once",
        "resume": True})
    read_ahead: int = field(default=16, metadata={
        "help": "items (patients) whose slides are requested from disk this many items before they are read "
                "(posix_fadvise WILLNEED), so cold reads overlap; only where whole slides are read; 0: off",
        "resume": True})
    max_slides_per_patient: int = field(
        default=1, metadata={"help": "slides drawn per patient per step (1 avoids same-patient negatives)"}
    )
    tokens: Literal["whole", "subsample", "crop"] = field(default="whole", metadata={
        "help": "slide tokens for the slide branch: all, a seeded random subset of max_tokens, or a crop_size grid crop"})
    max_tokens: Optional[int] = field(
        default=None, metadata={"help": "explicit, seeded token cap for tokens=subsample (recorded in the run)"}
    )
    crop_size: int = field(default=32, metadata={"help": "grid crop side for tokens=crop"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of patients held out for validation"})
    seed: int = field(default=0, metadata={"help": "seed of splits, sampling and views"})
    views: Any = field(default=None, metadata={"help": "grid-crop views for masked self-distillation"})
    expression: ExpressionDataConfig = field(default_factory=ExpressionDataConfig)
    omics: Dict[str, ExpressionDataConfig] = field(default_factory=dict)
    experts: Dict[str, str] = field(
        default_factory=dict, metadata={"help": "expert slide embeddings: name -> .h5ad (obs_names = slide_id)"}
    )
