"""`slidefm pack COHORT`: write the packed store that makes slide reads one contiguous slice."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

from slidefm.config_cli import add_dataclass_arguments, dataclass_from_args

HELP = "pack a cohort's HDF5 features into memory-mappable shards"


@dataclass
class PackConfig:
    out: str | None = field(default=None, metadata={"help": "store directory (default: COHORT/.slidefm/store, "
                                                    "or `store:` in cohort.yaml; found automatically there)"})
    shard_size_mb: int = field(default=1024, metadata={"help": "largest feature shard in MiB"})
    workers: int | None = field(default=None, metadata={"help": "processes for the pre-pack validation"})


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pack", help=HELP,
                              description="Validate COHORT, then write its packed store atomically.")
    p.add_argument("cohort", help="cohort directory")
    add_dataclass_arguments(p, PackConfig)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from slidefm.cohort import Cohort, PackedStore, pack_cohort

    cfg = dataclass_from_args(PackConfig, args)
    t0 = time.perf_counter()
    cohort = Cohort.open(args.cohort, store=False)
    tty = sys.stderr.isatty()

    def progress(i: int, n: int) -> None:
        if tty and (i == n or i % 100 == 0):
            print(f"\rpacked {i}/{n} slides", end="\n" if i == n else "", file=sys.stderr, flush=True)

    out = pack_cohort(cohort, cfg.out, shard_bytes=cfg.shard_size_mb << 20, workers=cfg.workers, progress=progress)
    store = PackedStore(out)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"packed {len(store.slide_ids)} slides ({store.index['total_patches']} patches, D={store.dim}) into "
          f"{out}: {len(store.index['shards'])} shard(s), {size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s")
    return 0
