#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests/test_slurm.py and for trying
# launch/slurm/psft.sbatch by hand: Debian's packages, as root, without systemd.
#
#   bash tests/slurm/start_cluster.sh      # installs if needed, starts, waits for the node
#   bash tests/slurm/stop_cluster.sh       # stops the daemons this script started
#
# Idempotent: when `sinfo` already shows the node idle it does nothing. It refuses to
# touch an /etc/slurm/slurm.conf that it did not write (a real cluster's).
# No slurmdbd, so no `sacct`: finished jobs stay visible to `scontrol show job` for
# MinJobAge seconds, and one line per finished job goes to /var/log/slurm/jobcomp.log.
set -euo pipefail
t0=$(date +%s%N)
elapsed() { local ms=$((($(date +%s%N) - t0) / 1000000)); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }

MARK="# written by tests/slurm/start_cluster.sh"
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm

if [ "$(id -u)" != 0 ]; then
  echo "error: run as root: this installs packages and starts the munge and Slurm daemons" >&2
  exit 2
fi
if [ -f "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
  echo "error: $CONF was not written by this script (a real cluster?); not touching it" >&2
  exit 2
fi
if command -v sinfo >/dev/null && [ -f "$CONF" ] && [ "$(sinfo -h -N -o %T 2>/dev/null)" = idle ]; then
  echo "slurm: already up ($(sinfo -h -N -o '%N %c CPUs %T')); $(elapsed) s"
  exit 0
fi

# 1. Packages (about 15 s with a warm apt cache on a 2-core machine).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  echo "slurm: installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# 2. munge: Slurm's authentication. The package's postinst makes the key; make one if absent.
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --force
  chown munge:munge /etc/munge/munge.key
  chmod 600 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
if ! { [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; }; then
  # munged refuses to run as root; Debian's service runs it as the munge user too.
  runuser -u munge -- /usr/sbin/munged
fi

# 3. slurm.conf: this host as the controller and the one compute node, sized by `slurmd -C`.
host=$(hostname -s)
node_line=$(slurmd -C | head -n 1)   # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
install -d -m 755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
cat > "$CONF" <<EOF
$MARK
# A one-node test cluster; regenerated on every start. Not for production.
ClusterName=psftdev
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
# No systemd or cgroup v2 delegation here: track processes by parent id, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# No slurmdbd (no sacct): keep finished jobs in scontrol for an hour, and a completion log.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGDIR/jobcomp.log
MinJobAge=3600
ReturnToService=2
SlurmdTimeout=60
KillWait=30
$node_line State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

# 4. Daemons (they fork into the background themselves). A controller still running
#    rereads this configuration. A new one starts with no saved jobs (-c): jobs of an
#    earlier, killed session must not be requeued here and compete with the tests.
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if running /run/slurmctld.pid; then
  scontrol reconfigure >/dev/null 2>&1 || true
else
  slurmctld -c
fi
if ! running /run/slurmd.pid; then
  slurmd
fi

# 5. Wait for the node to register as idle.
for _ in $(seq 120); do
  state=$(sinfo -h -N -o %T 2>/dev/null || true)
  case "$state" in
    idle) echo "slurm: up ($(sinfo -h -N -o '%N %c CPUs %m MB %T')); $(elapsed) s"; exit 0 ;;
    down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
echo "error: the Slurm node did not become idle within 60 s (state: ${state:-none});" \
     "see $LOGDIR/slurmctld.log and $LOGDIR/slurmd.log" >&2
exit 1
