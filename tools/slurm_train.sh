#!/usr/bin/env bash
# Training on a Slurm cluster, one task per GPU through srun (as mmdet's and mmseg's tools/slurm_train.sh):
#   [GPUS=16] [GPUS_PER_NODE=8] tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py options]
# Environment: GPUS (total tasks, default 8), GPUS_PER_NODE (8), CPUS_PER_TASK (5), SRUN_ARGS (extra srun options),
# PORT (the rendezvous port on the first node, default 29500), PYTHON. Paths are taken from the directory you call
# from; mmengine reads the ranks and the first node's address from Slurm's variables (--launcher slurm).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
USAGE="tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py options, e.g. --resume --amp]"
source "$ROOT/tools/_dist_env.sh"
require_args PARTITION JOB_NAME CONFIG WORK_DIR -- "$@"
CONFIG=$(abs_path "$3")
WORK_DIR=$(abs_path "$4")
require_file "config file" "$CONFIG"
PARTITION=$1 JOB_NAME=$2
shift 4
slurm_run "$PARTITION" "$JOB_NAME" tools/train.py "$CONFIG" --work-dir="$WORK_DIR" --launcher=slurm "$@"
