#!/usr/bin/env bash
# GPU check (issue 16): tests/gpu + the GPU benchmark sections, in under 8 minutes, as ONE JSON object on
# stdout, also written to benchmarks/results/gpu_check.json (after every part: a killed run keeps what it had).
#
#   benchmarks/gpu_check.sh               # on a CUDA machine
#   benchmarks/gpu_check.sh --dry-run     # anywhere: canned benchmark numbers, real (skipped) tests
#
# slidefm runs from this checkout (the repository root goes on PYTHONPATH; nothing is pip-installed, so the
# machine's own torch is used). Wheels in .whl/ (benchmarks/gpu_wheels.py: what a GPU image without a package
# index lacks) are installed first into a scratch directory that also goes on PYTHONPATH.
#
# Each part runs in its own process with its own timeout (see benchmarks/gpu_check.py); a failing or
# hanging part is recorded and the rest still run. Progress lines go to stderr.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WHEELS="${GPU_CHECK_WHEELS:-.whl}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/slidefm-gpu-site.XXXXXX")"
  trap 'rm -rf "$SITE"' EXIT
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl >&2; then
    echo "[gpu_check] could not install the wheels in $WHEELS" >&2
    exit 3
  fi
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH#"$PWD"}" GPU_CHECK_SITE="$SITE"
  echo "[gpu_check] $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS on PYTHONPATH ($SITE)" >&2
fi
# Hard stop a little past the python part's own budget (450 s): the whole script stays under 8 minutes.
timeout -k 5 "${GPU_CHECK_HARD_LIMIT_S:-470}" "$PY" benchmarks/gpu_check.py "$@"
exit $?  # through the trap: the wheels' scratch directory goes too
