#!/usr/bin/env bash
# Stop the daemons that start.sh started (PIDs in $SLIDEFM_SLURM_STATE/started.pids), and
# nothing else. Safe to call when nothing was started.
set -euo pipefail

STATE="${SLIDEFM_SLURM_STATE:-/var/spool/slidefm-slurm}"
PIDS="$STATE/started.pids"
[ -s "$PIDS" ] || { echo "stop.sh: nothing to stop"; exit 0; }

# slurmd first, then slurmctld, then munged: reverse start order.
tac "$PIDS" | while read -r name pid; do
  if [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
    kill -TERM "$pid"
    for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then kill -KILL "$pid" || true; fi
    echo "stop.sh: stopped $name ($pid)"
  fi
done
rm -f "$PIDS"
