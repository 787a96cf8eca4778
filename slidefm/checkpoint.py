"""Checkpoints: the one place that writes, reads and interprets them.

A checkpoint is a Lightning checkpoint plus ``ckpt["slidefm"]`` (see :func:`metadata`). Every read goes
through :func:`read`, which unpickles with ``torch.load(weights_only=True)`` (tensors, containers and
primitives only: a file whose pickle would run code is refused) and checks the format. Training
(``slidefm.train``: writing, resume through :class:`slidefm.train.checkpoint_io.AtomicCheckpointIO`,
``model.init_from``) and inference (``slidefm.api``, export) both use this module; it imports the
config schema and the model, never ``slidefm.train``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Iterable

import torch

import slidefm
from slidefm.errors import SlidefmError
from slidefm.io_utils import atomic_path

#: version of the ``ckpt["slidefm"]`` section this code writes; it reads this one and older ones
FORMAT = 1
SECTION = "slidefm"
LAST_CHECKPOINT = "last.ckpt"
ENCODER_PREFIX = "model.aggregator."
MODEL_PREFIX = "model."
#: masked self-distillation's EMA teacher: a copy of the slide encoder, keyed as the aggregator below this
TEACHER_PREFIX = "distillation.teacher.backbone."
WEIGHTS = ("student", "teacher")  # which slide encoder build_model loads (ExportConfig.weights' choices)

__all__ = [
    "FORMAT", "LAST_CHECKPOINT", "CheckpointError", "code_version", "metadata", "write", "read", "load_raw",
    "check_format", "to_config", "encoder_state", "teacher_state", "model_state", "build_model", "resume_checkpoint",
]


class CheckpointError(SlidefmError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe, foreign or of an unknown format."""


def code_version() -> dict[str, str]:
    """slidefm and torch versions, and the git commit when running from a checkout."""
    v = {"slidefm": slidefm.__version__, "torch": str(torch.__version__)}
    try:
        root = Path(slidefm.__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            v["git"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return v


def metadata(config: Any, in_dim: int, modality_dims: dict[str, int] | None = None,
             preprocessing: dict | None = None, tasks: list[dict] | None = None) -> dict[str, Any]:
    """The ``ckpt["slidefm"]`` section: everything needed to rebuild the model without the training code."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    return {
        "format": FORMAT,
        "config": config,
        "in_dim": int(in_dim),
        "modality_dims": dict(modality_dims or {}),
        "preprocessing": preprocessing or {},
        "tasks": list(tasks or []),
        "version": code_version(),
    }


def write(checkpoint: dict[str, Any], path: str | os.PathLike) -> Path:
    """Save atomically: a kill mid-write never leaves a torn file under ``path``."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def load_raw(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Unpickle with ``weights_only=True``; any failure (including a refused payload) is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file cannot be used
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refusing to load checkpoint {path}: it is corrupt or holds objects other than "
                              f"tensors and plain data ({first})") from e
    if not isinstance(ck, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ck).__name__}, not a checkpoint dictionary")
    return ck


def check_format(ck: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The ``slidefm`` section, after checking that this version can read it."""
    meta = ck.get(SECTION)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a slidefm checkpoint (no '{SECTION}' section)")
    fmt = meta.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise CheckpointError(f"{path}: the '{SECTION}' section has no valid format number (got {fmt!r})")
    if fmt > FORMAT:
        written = (meta.get("version") or {}).get("slidefm", "a newer version")
        raise CheckpointError(f"{path} has checkpoint format {fmt}, written by slidefm {written}; this slidefm "
                              f"({slidefm.__version__}) reads format {FORMAT} and older: upgrade slidefm")
    if fmt < 1:
        raise CheckpointError(f"{path}: unknown checkpoint format {fmt}")
    for key in ("config", "in_dim"):
        if key not in meta:
            raise CheckpointError(f"{path}: the '{SECTION}' section lacks '{key}'")
    return meta


def read(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A whole slidefm checkpoint, safely unpickled and format-checked."""
    ck = load_raw(path, map_location)
    check_format(ck, path)
    return ck


def to_config(config: Any):
    """Plain dict / DictConfig -> typed TrainConfig DictConfig (validates field names)."""
    from omegaconf import OmegaConf

    from slidefm.config import TrainConfig, register_configs
    from slidefm.registry import omegaconf_schema

    register_configs()
    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    # Merging onto the schema rejects unknown keys and fills options added after the checkpoint was written.
    return OmegaConf.merge(OmegaConf.structured(omegaconf_schema(TrainConfig)), config)


def _state(ck: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in ck["state_dict"].items() if k.startswith(prefix)}


def encoder_state(ck: dict[str, Any], path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """The slide encoder's (aggregator's) weights, keyed as in the aggregator: what ``model.init_from`` loads."""
    state = _state(ck, ENCODER_PREFIX)
    if not state:
        raise CheckpointError(f"{path} holds no slide encoder weights")
    return state


def teacher_state(ck: dict[str, Any], path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """The EMA teacher's slide encoder, keyed as the aggregator (only runs with self-distillation have one)."""
    state = _state(ck, TEACHER_PREFIX)
    if not state:
        raise CheckpointError(f"{path} has no EMA teacher (it was trained without self-distillation): "
                              "export its student weights instead")
    return state


def model_state(ck: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole :class:`slidefm.models.model.SlideFM` state (aggregator, case model, towers, projections)."""
    return _state(ck, MODEL_PREFIX)


def text_precomputed(cfg) -> bool:
    """Whether the report tower reads cached embeddings of a frozen text encoder (else it holds the encoder)."""
    rep = cfg.model.report
    return rep is None or str(rep.get("trainable", "frozen")) == "frozen"


def build_model(ck: dict[str, Any], path: str | os.PathLike = "checkpoint", weights: str = "student"):
    """Rebuild the trained :class:`SlideFM` from the checkpoint alone; returns ``(model, cfg)``.

    ``weights="teacher"``: the slide encoder is masked self-distillation's EMA teacher (the network DINO-style
    methods evaluate) instead of the trained student; every other part is the checkpoint's own."""
    from slidefm.models.model import SlideFM

    if weights not in WEIGHTS:
        raise CheckpointError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    meta = ck[SECTION]
    cfg = to_config(meta["config"])
    model = SlideFM(cfg.model, int(meta["in_dim"]), meta.get("modality_dims") or {},
                    text_precomputed=text_precomputed(cfg), preprocessing=meta.get("preprocessing"))
    state = model_state(ck)
    if weights == "teacher":
        teacher, encoder = teacher_state(ck, path), encoder_state(ck, path)
        if teacher.keys() != encoder.keys():  # the teacher is a copy of the encoder: anything else is a foreign file
            raise CheckpointError(f"{path}: its EMA teacher does not match its slide encoder "
                                  f"({len(teacher)} tensors against {len(encoder)})")
        within_model = ENCODER_PREFIX[len(MODEL_PREFIX):]  # the encoder's keys inside model_state
        state.update({within_model + k: v for k, v in teacher.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match its own config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model, cfg


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_settings(run_dir: str | os.PathLike, config: dict, may_change: Iterable[str]) -> None:
    """SlidefmError (one line) when ``run_dir`` holds a checkpoint trained with settings other than ``config``
    (resolved, as written to config.yaml) beyond the keys ``may_change`` (``config_docs.resumable_keys()``): the
    same command in the same directory resumes (a requeued job), a changed one must not silently continue the
    old run."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    old_file = run_dir / "config.yaml"
    if resume_checkpoint(run_dir) is None or not old_file.is_file():
        return
    old = _flat(OmegaConf.to_container(OmegaConf.load(old_file), resolve=True))
    new = _flat(config)
    missing = object()
    diff = sorted(k for k in set(old) | set(new) if old.get(k, missing) != new.get(k, missing)
                  and not any(k == a or k.startswith(a + ".") for a in may_change))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise SlidefmError(
            f"{run_dir} holds a run trained with other settings ({shown}{more}); resuming would continue it under "
            f"settings it was not trained with: use a new hydra.run.dir, or remove {run_dir / 'checkpoints'} to "
            "start over")


def resume_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """``run_dir/checkpoints/last.ckpt`` when it exists, else None.

    Always resume from it when present: a requeued job re-runs the same command in the same
    run directory and must continue, not restart.
    """
    path = Path(run_dir) / "checkpoints" / LAST_CHECKPOINT
    return path if path.is_file() else None
