"""Wheels that let benchmarks/gpu_check.sh run on a GPU machine that cannot reach a package index.

    python benchmarks/gpu_wheels.py                      # -> .whl/ for CPython 3.12, manylinux x86-64
    python benchmarks/gpu_wheels.py --python-version 3.11 --dest /tmp/whl311   # a set to try here

The lent GPU machines run an image with PyTorch, Lightning, timm, h5py, pandas, scikit-learn and transformers
but without the rest of what slidefm imports on the GPU check's path (Hydra for the recipes, AnnData and
Scanpy for the cohort's expression and the export, and their own dependencies), and nothing can be
installed there from an index. This script downloads those (``CARRY``), at the versions installed in the
environment that runs it (the ones this checkout's tests ran with), as binary wheels for the target
Python and platform; a project that publishes no wheel (antlr4-python3-runtime) is built into one here.
gpu_check.sh installs whatever it finds in ``.whl/`` into a scratch directory on ``PYTHONPATH``
(``pip install --no-index --no-deps --target``), so the machine's own torch is used as it is.

``CARRY`` is the set of distributions imported by ``pytest tests/gpu`` plus every recipe's tiny CPU
training and a slide export (traced with ``importlib.metadata.packages_distributions`` over
``sys.modules``), less the packages the GPU image already holds, plus pandas at the version tested here, and
xformers (``--xformers``, the ``gpu`` extra) so that its backend is tested too.
Prints one JSON summary (files, MB) and exits non-zero when a wheel could not be had.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = (
    "hydra-core", "omegaconf", "antlr4-python3-runtime", "hydra-submitit-launcher", "submitit",
    "anndata", "scanpy", "zarr", "numcodecs", "donfig", "google-crc32c", "legacy-api-wrap", "natsort",
    "scverse-misc", "session-info2", "platformdirs",
    # pandas at the tested version, over the image's (anndata 0.12 and lifelines need pandas < 3: under pandas 3
    # anndata refuses to write the cohort's string columns), with what pandas 2 needs beside it
    "pandas", "pytz", "tzdata",
)
# The GPU extra (not installed here: no CPU kernels). 0.0.35's wheel is 3 MB and asks for torch >= 2.10 (the image
# has 2.11); if its kernels do not run there, the xformers backend says why and `auto` passes it by.
XFORMERS = "0.0.35"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
LIMIT_MB = 64  # what travels to the device machine with the working tree, wheels included


def installed_version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        raise SystemExit(f"gpu_wheels: {name} is not installed here; install slidefm's dependencies first") from None


def download(name: str, version: str, dest: Path, python_version: str) -> tuple[bool, str]:
    """(ok, how): a binary wheel for the target, else (pure-python projects only) one built here."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS],
           "-d", str(dest), f"{name}=={version}"]
    got = subprocess.run(cmd, capture_output=True, text=True)
    if got.returncode == 0:
        return True, "downloaded"
    with tempfile.TemporaryDirectory() as tmp:
        build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp,
                                f"{name}=={version}"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if build.returncode != 0 or not wheels:
            lines = (got.stderr + build.stderr).strip().splitlines()
            return False, lines[-1] if lines else f"pip exited {got.returncode} / {build.returncode}"
        if not all(w.name.endswith("-none-any.whl") for w in wheels):
            return False, f"no wheel for the target, and {wheels[0].name} built here is platform-specific"
        for w in wheels:
            (dest / w.name).write_bytes(w.read_bytes())
    return True, "built here (pure python)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", default=str(ROOT / ".whl"), help="where the wheels go (default: .whl/, git-ignored)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (its python3 is 3.12)")
    p.add_argument("--xformers", default=XFORMERS, help="xformers version to carry ('none': leave it out)")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    out: dict = {"dest": str(dest), "python_version": args.python_version, "packages": {}}
    failed = []
    wanted = [(name, installed_version(name)) for name in CARRY]
    if args.xformers != "none":
        wanted.append(("xformers", args.xformers))
    for name, version in wanted:
        ok, how = download(name, version, dest, args.python_version)
        out["packages"][name] = {"version": version, "ok": ok, "how": how}
        if not ok:
            failed.append(name)
    wheels = sorted(dest.glob("*.whl"))
    out["files"] = [w.name for w in wheels]
    out["total_MB"] = round(sum(w.stat().st_size for w in wheels) / 2**20, 1)
    out["under_travel_limit"] = out["total_MB"] < LIMIT_MB
    out["failed"] = failed
    print(json.dumps(out, indent=2))
    return 1 if failed or not out["under_travel_limit"] else 0


if __name__ == "__main__":
    sys.exit(main())
