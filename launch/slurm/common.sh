# Shared body of train.sbatch and multinode.sbatch; sourced by the batch shell, defines dd_launch.
#
# Variables (all optional; sbatch exports the submitting shell's environment by default):
#   DD_REPO      repository root holding train.py          (default: the folder sbatch ran from)
#   DD_PYTHON    interpreter with distill_depth installed  (default: python from PATH)
#   DD_RUN_DIR   run folder = train.output_dir; the same folder resumes, and the W&B run id is
#                derived from it (default: runs/<job name>-<job id>; the job id survives requeues)
#   DD_DEVICE    cpu | auto. cpu hides every GPU from the trainer        (default: auto)
#   MASTER_PORT  rendezvous port on the first node (default: 10000 + job id % 20000)
#   DD_SRUN_ARGS extra srun options, split on spaces (e.g. "--cpu-bind=cores")
# A train.output_dir=... (or --output-dir) argument wins over DD_RUN_DIR. A first argument ending
# in .yaml/.yml is taken as the config file (--config FILE).

_dd_log() { echo "[slurm $(date -u +%H:%M:%S)] $*"; }

# Preemption protocol. The warning signal (--signal=B:USR2@N, or `scancel -b -s USR2 JOBID`) goes
# to this batch shell only. The trap remembers it and forwards USR2 to srun, which relays it to
# every task; each trainer checkpoints at the same step boundary and exits 0. Then this shell
# runs `scontrol requeue`. The trainer itself never requeues (DISTILL_DEPTH_REQUEUE=0), because
# it also checkpoints on SIGTERM, and SIGTERM also means "user ran scancel" or "another rank died
# and srun is ending the step": requeueing on those would make jobs uncancellable and turn a
# crash into a restart loop. bash only runs a trap between commands, hence `srun ... &` + `wait`.
_dd_on_warning() {
  _dd_requeue=1
  _dd_log "batch shell got SIGUSR2: asking every rank to checkpoint, then requeue"
  if [ -n "${_dd_srun_pid:-}" ]; then kill -s USR2 "$_dd_srun_pid" 2>/dev/null || true; fi
}

_dd_requeue_self() {
  _dd_log "requeueing job $SLURM_JOB_ID (it resumes from the newest complete checkpoint)"
  scontrol requeue "$SLURM_JOB_ID"
}

dd_launch() {
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: submit this script with sbatch (SLURM_JOB_ID is not set)" >&2
    return 2
  fi
  local repo=${DD_REPO:-$SLURM_SUBMIT_DIR}
  cd "$repo" || return 2
  if [ ! -f train.py ]; then
    echo "error: $repo/train.py not found: submit from the repository root or set DD_REPO" >&2
    return 2
  fi
  local python=${DD_PYTHON:-python}

  # `sbatch train.sbatch configs/x.yaml k=v` is short for `... --config configs/x.yaml k=v`.
  local args=("$@") arg prev="" run_dir=""
  case ${1:-} in *.yaml | *.yml) args=(--config "$@") ;; esac
  for arg in "${args[@]}"; do
    case $arg in
      train.output_dir=*) run_dir=${arg#train.output_dir=} ;;
      --output-dir=*) run_dir=${arg#--output-dir=} ;;
    esac
    if [ "$prev" = --output-dir ]; then run_dir=$arg; fi
    prev=$arg
  done
  if [ -z "$run_dir" ]; then
    run_dir=${DD_RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
    args+=("train.output_dir=$run_dir")
  fi

  case ${DD_DEVICE:-auto} in
    cpu) export CUDA_VISIBLE_DEVICES="" ACCELERATE_USE_CPU=true ;;
    auto) ;;
    *) echo "error: DD_DEVICE must be cpu or auto, got '$DD_DEVICE'" >&2; return 2 ;;
  esac
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  export MASTER_ADDR
  export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}

  _dd_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
    "$SLURM_NTASKS tasks, rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $run_dir"

  _dd_requeue=0
  trap _dd_on_warning USR2
  export DISTILL_DEPTH_REQUEUE=0
  # --kill-on-bad-exit: one dead rank ends the whole step at once instead of leaving the others
  # blocked in a collective until the timeout. --gpu-bind=none: every task sees all GPUs of its
  # node and picks cuda:LOCAL_RANK (as under torchrun), also with --gpus-per-task.
  # shellcheck disable=SC2086
  srun --kill-on-bad-exit=1 --gpu-bind=none --label ${DD_SRUN_ARGS:-} \
    bash launch/slurm/task.sh "$python" train.py "${args[@]}" &
  _dd_srun_pid=$!
  local rc
  wait "$_dd_srun_pid"
  rc=$?
  # A trap interrupts `wait` (status > 128) while srun still runs: keep waiting for srun itself.
  while kill -0 "$_dd_srun_pid" 2>/dev/null; do wait "$_dd_srun_pid"; rc=$?; done
  wait "$_dd_srun_pid" 2>/dev/null
  local last=$?
  if [ "$last" -ne 127 ]; then rc=$last; fi
  _dd_log "training step ended with exit code $rc"
  if [ "$_dd_requeue" = 1 ] && [ "$rc" -eq 0 ]; then
    _dd_requeue_self || return 1
  fi
  return "$rc"
}
