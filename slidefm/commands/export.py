"""`slidefm export`: slide or patient embeddings of a whole cohort to an .h5ad file."""

from __future__ import annotations

from slidefm.config_cli import add_dataclass_arguments, dataclass_from_args

HELP = "write slide or patient embeddings of a cohort to AnnData (.h5ad)"


def add_parser(sub):
    from slidefm.export import ExportConfig

    p = sub.add_parser("export", help=HELP)
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
    from slidefm.export import ExportConfig, export_embeddings

    cfg = dataclass_from_args(ExportConfig, args)
    cohort = Cohort.open(args.cohort, store=args.store)
    enc = slidefm.load(args.checkpoint, device=cfg.device, weights=cfg.weights)
    adata, tokens_path = export_embeddings(enc, cohort, args.out, cfg)
    print(f"wrote {args.out}: {adata.n_obs} {cfg.level}s x {adata.n_vars} dims"
          + (f"; token embeddings in {tokens_path}" if tokens_path else ""))
    return 0
