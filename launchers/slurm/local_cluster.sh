#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (Debian's slurm-wlm + munge), to try and test
# `hydra/launcher=submitit_slurm` without a real cluster. Needs root (it installs packages).
#
#   launchers/slurm/local_cluster.sh up   [STATE_DIR]   # install if needed, start munged, slurmctld, slurmd
#   launchers/slurm/local_cluster.sh down [STATE_DIR]   # stop the daemons
#
# Then point the SLURM clients at it: export SLURM_CONF=STATE_DIR/slurm.conf (printed by `up`).
set -euo pipefail
cmd=${1:?usage: $0 up|down [STATE_DIR]}
dir=${2:-/tmp/rewardkit-slurm}
conf="$dir/slurm.conf"

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
  if pgrep -x munged >/dev/null; then
    return
  fi
  mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || mungekey -c -k /etc/munge/munge.key
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(free -m | awk '/^Mem:/ {print int($2 * 0.8)}')
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run"
  cat >"$conf" <<CONF
ClusterName=rewardkit
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# A job ends 5 s after its SIGTERM (requeue, cancel), not SLURM's default 30 s.
KillWait=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

case "$cmd" in
  up)
    install_packages
    start_munge
    write_conf
    export SLURM_CONF="$conf"
    pgrep -f "slurmctld -f $conf" >/dev/null || slurmctld -f "$conf"
    pgrep -f "slurmd -f $conf" >/dev/null || slurmd -f "$conf"
    for _ in $(seq 1 60); do
      if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        echo "SLURM_CONF=$conf"
        exit 0
      fi
      sleep 0.5
    done
    echo "the local SLURM cluster did not come up; logs in $dir/log" >&2
    exit 1
    ;;
  down)
    for pidfile in "$dir/run/slurmd.pid" "$dir/run/slurmctld.pid"; do
      [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    ;;
  *)
    echo "usage: $0 up|down [STATE_DIR]" >&2
    exit 2
    ;;
esac
