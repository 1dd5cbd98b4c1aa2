#!/usr/bin/env bash
# Testing on a Slurm cluster, one task per GPU through srun (as mmdet's and mmseg's tools/slurm_test.sh):
#   [GPUS=8] tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [tools/test.py options, e.g. --tta]
# Environment: as tools/slurm_train.sh (GPUS, GPUS_PER_NODE, CPUS_PER_TASK, SRUN_ARGS, PORT, PYTHON).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
USAGE="tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [tools/test.py options, e.g. --tta --work-dir DIR]"
source "$ROOT/tools/_dist_env.sh"
require_args PARTITION JOB_NAME CONFIG CHECKPOINT -- "$@"
CONFIG=$(abs_path "$3")
CHECKPOINT=$(abs_path "$4")
require_file "config file" "$CONFIG"
require_file "checkpoint" "$CHECKPOINT"
PARTITION=$1 JOB_NAME=$2
shift 4
slurm_run "$PARTITION" "$JOB_NAME" tools/test.py "$CONFIG" "$CHECKPOINT" --launcher=slurm "$@"
