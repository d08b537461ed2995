#!/usr/bin/env bash
# A real single-node (or two-node, SLURM_CI_NODES=2) SLURM cluster on this machine, for tests and
# for trying launch/slurm/*.sbatch.
#
#   scripts/slurm-test-cluster.sh install   # apt-get install slurmctld slurmd slurm-client munge (root)
#   scripts/slurm-test-cluster.sh up        # start munged + slurmctld + slurmd (root), wait for "idle"
#   scripts/slurm-test-cluster.sh status    # daemons, node state, queue
#   scripts/slurm-test-cluster.sh down      # cancel jobs, stop the daemons by their pidfiles
#
# SLURM_CI_FAKE_GPUS=N (default 0) advertises N counted-only "gpu" GRES on the node, so job
# scripts that ask for --gpus-per-node/--gres=gpu:N can be scheduled here (no real device).
#
# SLURM_CI_NODES=2 makes a two-node cluster instead: nodes n1 and n2, each a slurmd in its own
# network namespace (dd-n1, dd-n2; also its own UTS namespace, hostname n1/n2) with its own address
# (10.77.0.1, 10.77.0.2 on the bridge dd-br0; slurmctld listens on the bridge's 10.77.0.254 in
# the root namespace). Processes that slurmd starts live in its namespace, so a job's ranks on n1
# and n2 can only talk over that network, as on two machines; /etc/netns/dd-nX/hosts (bind-mounted
# over /etc/hosts in the node's mount namespace) makes n1, n2 and ctl resolvable there. This
# cluster has its own state folder (default /tmp/slurm-ci-2n), config ($SLURM_CI_DIR/etc/slurm.conf:
# clients need SLURM_CONF set to it, see `status`) and ports (6827/6828), so it can run beside the
# single-node one. `down` also removes the namespaces, the bridge and the hosts files.
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

NODES=${SLURM_CI_NODES:-1}
case "$NODES" in 1 | 2) ;; *) echo "slurm-test-cluster: SLURM_CI_NODES must be 1 or 2, got '$NODES'" >&2; exit 2 ;; esac
if [ "$NODES" = 2 ]; then
  BASE=${SLURM_CI_DIR:-/tmp/slurm-ci-2n}
  CONF=$BASE/etc/slurm.conf
  GRES_CONF=$BASE/etc/gres.conf
  export SLURM_CONF=$CONF    # for the daemons and the clients this script runs
else
  BASE=${SLURM_CI_DIR:-/tmp/slurm-ci}
  CONF=/etc/slurm/slurm.conf
  GRES_CONF=/etc/slurm/gres.conf
fi
NET=10.77.0          # two-node mode: n1=$NET.1, n2=$NET.2, controller=$NET.254 (bridge dd-br0)
BRIDGE=dd-br0
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
    printf '%s\nNodeName=%s Name=gpu File=%s/fake-dev/gpu[0-%s]\n' \
      "$MARKER" "$(node_names)" "$BASE" $((FAKE_GPUS - 1)) >"$GRES_CONF"
  else
    rm -f "$GRES_CONF"
  fi
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  # `nproc` honours OMP_NUM_THREADS (set to 1 by multi-process tests); count the real CPUs
  ncpu=$(getconf _NPROCESSORS_ONLN)
  local ctld_host=localhost ports="" slurmd_files=slurmd spool=$BASE/spool nodes
  nodes="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$mem $node_gres State=UNKNOWN"
  if [ "$NODES" = 2 ]; then
    # Own ports, so that a single-node cluster (6817/6818 in the root namespace) can run beside it.
    # slurmctld insists on running on the host named here, so: this host's name, the bridge's address.
    ctld_host="$(hostname -s)($NET.254)" ports="SlurmctldPort=6827"$'\n'"SlurmdPort=6828"
    slurmd_files="slurmd-%n" spool="$BASE/spool/%n"   # %n = node name: one pidfile, log, spool each
    nodes="NodeName=n1 NodeAddr=$NET.1 CPUs=$ncpu RealMemory=$mem $node_gres State=UNKNOWN"
    nodes+=$'\n'"NodeName=n2 NodeAddr=$NET.2 CPUs=$ncpu RealMemory=$mem $node_gres State=UNKNOWN"
  fi
  cat >"$CONF" <<CONF
$MARKER
ClusterName=ci
SlurmctldHost=$ctld_host
$ports
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/$slurmd_files.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/$slurmd_files.log
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
$nodes
PartitionName=ci Nodes=$(node_names) Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

node_names() { if [ "$NODES" = 2 ]; then echo "n[1-2]"; else echo localhost; fi; }
node_list() { if [ "$NODES" = 2 ]; then echo n1 n2; else echo localhost; fi; }
slurmd_pidfile() { if [ "$NODES" = 2 ]; then echo "$BASE/run/slurmd-$1.pid"; else echo "$BASE/run/slurmd.pid"; fi; }
# One state word per node ("idle" for the whole cluster when every node is idle).
node_state() { sinfo -h -N -o %T 2>/dev/null | sort -u | paste -sd, || true; }

slurmd_alive() {
  local node
  for node in $(node_list); do pid_alive "$(slurmd_pidfile "$node")" || return 1; done
}

# Two-node mode: namespaces dd-n1/dd-n2, each with a veth "eth0" ($NET.1, $NET.2) whose peer sits
# on the bridge $BRIDGE ($NET.254, root namespace). The nodes reach each other over the bridge
# (layer 2, no IP forwarding needed) and slurmctld on $NET.254.
net_up() {
  command -v ip >/dev/null || die "two-node mode needs 'ip' (iproute2)"
  command -v unshare >/dev/null && command -v nsenter >/dev/null \
    || die "two-node mode needs 'unshare' and 'nsenter' (util-linux)"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge || die "cannot create the bridge $BRIDGE (ip link add type bridge)"
    ip addr add "$NET.254/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  local i ns
  for i in 1 2; do
    ns=dd-n$i
    if ! ip netns list | grep -qw "$ns"; then
      ip netns add "$ns" || die "cannot create the network namespace $ns (ip netns add)"
    fi
    mkdir -p "/etc/netns/$ns"
    printf '%s\n127.0.0.1 localhost\n%s.1 n1\n%s.2 n2\n%s.254 ctl\n' "$MARKER" "$NET" "$NET" "$NET" \
      >"/etc/netns/$ns/hosts"
    if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
      ip link del "dd-n$i-br" 2>/dev/null || true
      ip link add "dd-n$i-br" type veth peer name eth0 netns "$ns" || die "cannot create a veth pair into $ns"
      ip link set "dd-n$i-br" master "$BRIDGE" up
      ip -n "$ns" addr add "$NET.$i/24" dev eth0
    fi
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
  done
}

net_down() {
  local i
  for i in 1 2; do
    ip netns del "dd-n$i" 2>/dev/null || true
    ip link del "dd-n$i-br" 2>/dev/null || true
    if [ -f "/etc/netns/dd-n$i/hosts" ] && grep -qxF "$MARKER" "/etc/netns/dd-n$i/hosts"; then
      rm -f "/etc/netns/dd-n$i/hosts"
      rmdir "/etc/netns/dd-n$i" 2>/dev/null || true
    fi
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

start_slurmd() {
  local node=$1
  # A second slurmd with the same pidfile would kill the first, so only start one when none runs.
  pid_alive "$(slurmd_pidfile "$node")" && return 0
  if [ "$NODES" = 2 ]; then
    mkdir -p "$BASE/spool/$node"
    # Own network namespace (address), own UTS namespace (hostname = node name, so that
    # gethostname() resolves to the node's address, as torch's gloo needs) and own mount namespace
    # (only for /etc/hosts). Not `ip netns exec`: it mounts a fresh /sys, which hides
    # /sys/fs/cgroup, and slurmd then stops with "No filesystem mounted on /sys/fs/cgroup".
    nsenter --net="/run/netns/dd-$node" unshare --uts --mount -- sh -c \
      'mount --bind "/etc/netns/dd-$1/hosts" /etc/hosts && hostname "$1" && exec /usr/sbin/slurmd -N "$1"' \
      sh "$node" || die "slurmd $node did not start; see $BASE/log/slurmd-$node.log"
  else
    /usr/sbin/slurmd -N "$node"
  fi
}

cmd_up() {
  need_root up
  installed || die "slurm is not installed: run '$0 install' first"
  local t0 state="" node
  t0=$(date +%s%N)
  mkdir -p "$BASE"/{state,spool,log,run}
  start_munge
  if pid_alive "$BASE/run/slurmctld.pid" && slurmd_alive; then
    echo "slurm already up (state in $BASE)"
  else
    write_conf
    [ "$NODES" = 2 ] && net_up
    # -i: ignore unreadable state from an earlier, uncleanly stopped run.
    pid_alive "$BASE/run/slurmctld.pid" || /usr/sbin/slurmctld -i
    for node in $(node_list); do start_slurmd "$node"; done
  fi
  for _ in $(seq 300); do
    pid_alive "$BASE/run/slurmctld.pid" || die "slurmctld is not running; see $BASE/log/slurmctld.log"
    state=$(node_state)
    case "$state" in
      idle | mixed | allocated) break ;;
      # A drain/down remembered in $BASE/state from an earlier config: the node is fine now.
      *drain* | *down*) scontrol update NodeName="$(node_names)" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.1
  done
  echo "slurm up in $(( ($(date +%s%N) - t0) / 1000000 )) ms (nodes $(node_names): ${state:-unknown}, state in $BASE)"
  if [ "$NODES" = 2 ]; then echo "clients need: export SLURM_CONF=$CONF"; fi
  case "$state" in
    idle | mixed | allocated) ;;
    *) die "node never became idle; see $BASE/log/slurmctld.log and $BASE/log/slurmd*.log" ;;
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
  local node other
  if pid_alive "$BASE/run/slurmctld.pid"; then
    scancel --user="$(id -un)" 2>/dev/null || true
    # Give slurmd a moment to kill the steps before it goes away itself.
    for _ in $(seq 50); do [ -z "$(squeue -h -t R,CG 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  for node in $(node_list); do stop_pidfile "$(slurmd_pidfile "$node")"; done
  stop_pidfile "$BASE/run/slurmctld.pid"
  [ "$NODES" = 2 ] && net_down
  if [ -e "$BASE/run/munged.ours" ]; then
    # The other cluster (single-/two-node, default folders) may still need munged: hand it over.
    if [ "$NODES" = 2 ]; then other=/tmp/slurm-ci; else other=/tmp/slurm-ci-2n; fi
    if [ "$other" != "$BASE" ] && pid_alive "$other/run/slurmctld.pid"; then
      touch "$other/run/munged.ours"
    else
      stop_pidfile /run/munge/munged.pid
    fi
    rm -f "$BASE/run/munged.ours"
  fi
  echo "slurm down"
}

cmd_status() {
  local name file
  for name in slurmctld $(for node in $(node_list); do echo "slurmd:$node"; done); do
    if [ "$name" = slurmctld ]; then file=$BASE/run/slurmctld.pid; else file=$(slurmd_pidfile "${name#slurmd:}"); fi
    if pid_alive "$file"; then echo "${name%:localhost}: running (pid $(cat "$file"))"
    else echo "${name%:localhost}: stopped"; fi
  done
  if [ "$NODES" = 2 ]; then echo "SLURM_CONF=$CONF"; fi
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
  *) echo "usage: [SLURM_CI_NODES=1|2] $0 install|up|down|status   (state under SLURM_CI_DIR=$BASE)" >&2; exit 2 ;;
esac
