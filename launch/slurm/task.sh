#!/usr/bin/env bash
# One srun task = one training rank. Translates SLURM's per-task variables into the
# torch.distributed ones and then *execs* the trainer, so the Python process is the task process
# itself: step signals (the warning USR2, SIGTERM) reach it directly and srun sees its real exit
# code. MASTER_ADDR/MASTER_PORT come from the batch script (identical for every task).
#   usage (inside srun): bash launch/slurm/task.sh PYTHON train.py CONFIG [key=value ...]
set -euo pipefail

: "${SLURM_PROCID:?task.sh runs inside srun}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}"
export RANK=$SLURM_PROCID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_RANK=$SLURM_LOCALID
# SLURM_STEP_TASKS_PER_NODE looks like "8" or "8(x2)"; uneven layouts ("3,2") leave it unset.
per_node=${SLURM_STEP_TASKS_PER_NODE%%(*}
if [[ $per_node =~ ^[0-9]+$ ]]; then export LOCAL_WORLD_SIZE=$per_node; fi
# Ignore the warning signal until the trainer installs its handler (an ignored disposition
# survives exec): a USR2 that lands while Python is still importing must not kill a rank.
trap '' USR2
exec "$@"
