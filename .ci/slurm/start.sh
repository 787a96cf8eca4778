#!/usr/bin/env bash
# Start a one-node SLURM cluster (munged, slurmctld, slurmd) on this host for the SLURM tests.
# Idempotent: installs slurm-wlm/munge when missing, (re)writes /etc/slurm/slurm.conf from
# slurm.conf.in, creates a munge key when missing, starts only the daemons that are not
# already running and records their PIDs in $SLIDEFM_SLURM_STATE/started.pids so that
# stop.sh stops exactly those. Needs root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${SLIDEFM_SLURM_STATE:-/var/spool/slidefm-slurm}"
PIDS="$STATE/started.pids"
CONF=/etc/slurm/slurm.conf
host="$(hostname -s)"
t0=$(date +%s)

if [ "$(id -u)" != 0 ]; then
  echo "start.sh: must run as root" >&2
  exit 1
fi

# --- install ---------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v munged >/dev/null || ! command -v sinfo >/dev/null; then
  echo "start.sh: installing slurm-wlm and munge"
  # Keep the packages' init scripts from starting daemons we would then not own.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
t1=$(date +%s)
echo "start.sh: install phase $((t1 - t0)) s"

mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
touch "$PIDS"

running() {  # running NAME PIDFILE: true when the pid in PIDFILE is alive and is NAME
  local pid
  [ -s "$2" ] || return 1
  pid="$(cat "$2")"
  [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

record() {  # record NAME PIDFILE
  echo "$1 $(cat "$2")" >>"$PIDS"
}

# --- munge -----------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if ! running munged /run/munge/munged.pid && ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  record munged /run/munge/munged.pid
fi

# --- config ----------------------------------------------------------------------------
cpus="$(nproc --all)"
# RealMemory must not exceed what slurmd measures, or the node is drained as invalid.
mem="$(free -m | awk '/^Mem:/ {print int($2 * 0.95)}')"
new_conf="$(sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$STATE|g" -e "s|@CPUS@|$cpus|g" \
  -e "s|@MEM@|$mem|g" -e "s|@CTLD_PORT@|${SLIDEFM_SLURMCTLD_PORT:-6817}|g" \
  -e "s|@SLURMD_PORT@|${SLIDEFM_SLURMD_PORT:-6818}|g" "$here/slurm.conf.in")"
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
  if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -q 'start.sh'; then
    cp "$CONF" "$CONF.bak.$(date +%s)"  # someone else's config: keep it
  fi
  printf '%s\n' "$new_conf" >"$CONF"
  conf_changed=1
else
  conf_changed=0
fi

# --- daemons ---------------------------------------------------------------------------
if running slurmctld "$STATE/slurmctld.pid"; then
  [ "$conf_changed" = 1 ] && scontrol reconfigure
else
  slurmctld
  for _ in $(seq 100); do [ -s "$STATE/slurmctld.pid" ] && break; sleep 0.1; done
  record slurmctld "$STATE/slurmctld.pid"
fi
if ! running slurmd "$STATE/slurmd.pid"; then
  slurmd
  for _ in $(seq 100); do [ -s "$STATE/slurmd.pid" ] && break; sleep 0.1; done
  record slurmd "$STATE/slurmd.pid"
fi

# --- wait for the node ----------------------------------------------------------------
for i in $(seq 120); do
  st="$(sinfo -h -n "$host" -o '%T' 2>/dev/null | head -1 || true)"
  case "$st" in
    idle|mixed|allocated) break ;;
    down*|drain*)
      # A leftover DOWN state from an earlier run: return the node to service.
      scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
if [ "$st" != idle ] && [ "$st" != mixed ] && [ "$st" != allocated ]; then
  echo "start.sh: node $host not up (state '$st'); logs in $STATE" >&2
  tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
  exit 1
fi
t2=$(date +%s)
echo "start.sh: daemons up in $((t2 - t1)) s; node $host $st"
sinfo
