#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and for trying launch/slurm/*.sbatch.
#
#   scripts/slurm-test-cluster.sh install   # apt-get install slurmctld slurmd slurm-client munge (root)
#   scripts/slurm-test-cluster.sh up        # start munged + slurmctld + slurmd (root), wait for "idle"
#   scripts/slurm-test-cluster.sh status    # daemons, node state, queue
#   scripts/slurm-test-cluster.sh down      # cancel jobs, stop the daemons by their pidfiles
#
# SLURM_CI_FAKE_GPUS=N (default 0) advertises N counted-only "gpu" GRES on the node, so job
# scripts that ask for --gpus-per-node/--gres=gpu:N can be scheduled here (no real device).
#
# State, spool, logs and pidfiles live under $SLURM_CI_DIR (default /tmp/slurm-ci). No systemd,
# cgroups or accounting database is needed. The config is written to /etc/slurm/slurm.conf (where
# every SLURM client looks) and carries a marker line: a slurm.conf without it belongs to someone
# else and is never overwritten. Daemons are stopped by the PIDs in their pidfiles, never by name,
# and munged only when this script started it.
#
# Timings that tests rely on (measured with Slurm 22.05 on Debian 12): cred_expire=10 lets a requeued job
# start again after ~12 s instead of ~121 s; sched_interval=2,bf_interval=1 avoid a ~30 s wait.
set -euo pipefail

BASE=${SLURM_CI_DIR:-/tmp/slurm-ci}
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
FAKE_GPUS=${SLURM_CI_FAKE_GPUS:-0}
MARKER="# written by distill-depth scripts/slurm-test-cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)
export PATH="/usr/sbin:/sbin:$PATH"

die() { echo "slurm-test-cluster: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" -eq 0 ] || die "'$1' must run as root (it installs/starts system daemons)"; }
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

installed() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null
}

cmd_install() {
  if installed; then echo "slurm and munge already installed"; return 0; fi
  need_root install
  command -v apt-get >/dev/null || die "no apt-get: install ${PACKAGES[*]} with your package manager"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
  installed || die "apt-get finished but slurmctld/slurmd/sbatch/munged are still missing"
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  if munge -n >/dev/null 2>&1; then return 0; fi   # a munged is already running: use it
  # munged refuses to run as root with the packaged log dir; its pidfile is /run/munge/munged.pid.
  runuser -u munge -- /usr/sbin/munged
  touch "$BASE/run/munged.ours"
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
}

write_conf() {
  if [ -e "$CONF" ] && ! grep -qxF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to overwrite it"
  fi
  if [ -e "$GRES_CONF" ] && ! grep -qxF "$MARKER" "$GRES_CONF"; then
    die "$GRES_CONF exists and was not written by this script; refusing to overwrite it"
  fi
  local mem ncpu gres_types="" node_gres=""
  mkdir -p "$(dirname "$CONF")"
  if [ "$FAKE_GPUS" -gt 0 ]; then
    # Counted-only GPUs (no device files): enough to test --gpus-per-node/--gres job scripts.
    gres_types="GresTypes=gpu"
    node_gres="Gres=gpu:$FAKE_GPUS"
    # slurmd counts GPUs by their File= entries; plain files stand in for /dev/nvidiaN.
    mkdir -p "$BASE/fake-dev"
    touch $(seq -f "$BASE/fake-dev/gpu%g" 0 $((FAKE_GPUS - 1)))
    printf '%s\nNodeName=localhost Name=gpu File=%s/fake-dev/gpu[0-%s]\n' \
      "$MARKER" "$BASE" $((FAKE_GPUS - 1)) >"$GRES_CONF"
  else
    rm -f "$GRES_CONF"
  fi
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  # `nproc` honours OMP_NUM_THREADS (set to 1 by multi-process tests); count the real CPUs
  ncpu=$(getconf _NPROCESSORS_ONLN)
  cat >"$CONF" <<CONF
$MARKER
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=1
$gres_types
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$mem $node_gres State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null || true; }

cmd_up() {
  need_root up
  installed || die "slurm is not installed: run '$0 install' first"
  local t0 state=""
  t0=$(date +%s%N)
  mkdir -p "$BASE"/{state,spool,log,run}
  start_munge
  if pid_alive "$BASE/run/slurmctld.pid" && pid_alive "$BASE/run/slurmd.pid"; then
    echo "slurm already up (state in $BASE)"
  else
    write_conf
    # -i: ignore unreadable state from an earlier, uncleanly stopped run.
    pid_alive "$BASE/run/slurmctld.pid" || /usr/sbin/slurmctld -i
    # A second slurmd would kill the first (shared pidfile), so only start one when none runs.
    pid_alive "$BASE/run/slurmd.pid" || /usr/sbin/slurmd -N localhost
  fi
  for _ in $(seq 300); do
    state=$(node_state)
    case "$state" in
      idle | mixed | allocated) break ;;
      # A drain/down remembered in $BASE/state from an earlier config: the node is fine now.
      drain* | down*) scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.1
  done
  echo "slurm up in $(( ($(date +%s%N) - t0) / 1000000 )) ms (node: ${state:-unknown}, state in $BASE)"
  case "$state" in
    idle | mixed | allocated) ;;
    *) die "node never became idle; see $BASE/log/slurmctld.log and $BASE/log/slurmd.log" ;;
  esac
}

stop_pidfile() {
  local file=$1 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

cmd_down() {
  if pid_alive "$BASE/run/slurmctld.pid"; then
    scancel --user="$(id -un)" 2>/dev/null || true
    # Give slurmd a moment to kill the steps before it goes away itself.
    for _ in $(seq 50); do [ -z "$(squeue -h -t R,CG 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  stop_pidfile "$BASE/run/slurmd.pid"
  stop_pidfile "$BASE/run/slurmctld.pid"
  if [ -e "$BASE/run/munged.ours" ]; then
    stop_pidfile /run/munge/munged.pid
    rm -f "$BASE/run/munged.ours"
  fi
  echo "slurm down"
}

cmd_status() {
  local name
  for name in slurmctld slurmd; do
    if pid_alive "$BASE/run/$name.pid"; then echo "$name: running (pid $(cat "$BASE/run/$name.pid"))"
    else echo "$name: stopped"; fi
  done
  if pid_alive "$BASE/run/slurmctld.pid"; then
    sinfo -N -o "%N %T %C" || true
    squeue || true
  fi
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 install|up|down|status   (state under SLURM_CI_DIR=$BASE)" >&2; exit 2 ;;
esac
