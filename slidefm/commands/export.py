"""`slidefm export`: slide or patient embeddings of a whole cohort to an .h5ad file."""

from __future__ import annotations

from pathlib import Path

from slidefm.config_cli import add_dataclass_arguments, dataclass_from_args
from slidefm.export import ExportConfig, write_h5ad


def add_parser(sub):
    p = sub.add_parser("export", help="write slide or patient embeddings of a cohort to AnnData (.h5ad)")
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (.ckpt)")
    p.add_argument("--cohort", required=True, help="cohort directory")
    p.add_argument("--out", required=True, help="output .h5ad file")
    p.add_argument("--store", default=None, help="packed store (default: the cohort's, if packed)")
    add_dataclass_arguments(p, ExportConfig)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import slidefm
    from slidefm.cohort import Cohort
    from slidefm.errors import SlidefmError

    cfg = dataclass_from_args(ExportConfig, args)
    if cfg.level not in ("slide", "patient"):
        raise SlidefmError(f"--level must be slide or patient, got '{cfg.level}'")
    out = Path(args.out)
    cohort = Cohort.open(args.cohort, store=args.store)
    enc = slidefm.load(args.checkpoint, device=cfg.device)
    partial = out.with_name(out.name + ".partial")
    if cfg.tokens and cfg.level != "slide":
        raise SlidefmError("--tokens writes per-patch embeddings of slides: use it with --level slide")
    tokens_path = out.with_name(out.stem + ".tokens.h5") if cfg.tokens else None
    if cfg.level == "slide":
        adata = enc.embed_slides(cohort, cfg, partial_dir=partial, tokens_path=tokens_path)
    else:
        adata = enc.embed_patients(cohort, cfg, partial_dir=partial)
    write_h5ad(adata, out)
    import shutil

    shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {out}: {adata.n_obs} {cfg.level}s x {adata.n_vars} dims"
          + (f"; token embeddings in {tokens_path}" if tokens_path else ""))
    return 0
