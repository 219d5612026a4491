#!/usr/bin/env bash
# Stop the daemons that tests/slurm/start_cluster.sh started (by their pid files), and
# cancel any jobs left on the test cluster. Does nothing to a cluster it did not set up.
set -euo pipefail
MARK="# written by tests/slurm/start_cluster.sh"
CONF=/etc/slurm/slurm.conf
if [ ! -f "$CONF" ] || ! grep -qxF "$MARK" "$CONF"; then
  echo "slurm: no test cluster configured here; nothing to stop"
  exit 0
fi
if command -v scancel >/dev/null && scontrol ping >/dev/null 2>&1; then
  scancel --user="$(id -un)" 2>/dev/null || true
fi
stop() {  # stop one daemon by its pid file, waiting up to 10 s for it to exit
  local pidfile=$1 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$pidfile"
}
stop /run/slurmd.pid
stop /run/slurmctld.pid
stop /run/munge/munged.pid
echo "slurm: stopped"
