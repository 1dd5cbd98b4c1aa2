#!/usr/bin/env bash
# Testing on a Slurm cluster, one task per GPU through srun (as mmdet's and mmseg's tools/slurm_test.sh):
#   [GPUS=8] tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [tools/test.py options, e.g. --tta]
# Environment: as tools/slurm_train.sh (GPUS, GPUS_PER_NODE, CPUS_PER_TASK, SRUN_ARGS, PORT, PYTHON).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
USAGE="tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [tools/test.py options, e.g. --tta --work-dir DIR]"
source "$ROOT/tools/_dist_env.sh"
names=(PARTITION JOB_NAME CONFIG CHECKPOINT)
for i in 0 1 2 3; do
  if [ $# -le "$i" ] || is_option "${@:$((i + 1)):1}"; then die "missing: ${names[*]:$i}."; fi
done
PARTITION=$1
JOB_NAME=$2
CONFIG=$(abs_path "$3")
CHECKPOINT=$(abs_path "$4")
require_file "config file" "$CONFIG"
require_file "checkpoint" "$CHECKPOINT"
shift 4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
is_count "$GPUS" || die "GPUS must be a positive integer, got '$GPUS'."
is_count "$GPUS_PER_NODE" || die "GPUS_PER_NODE must be a positive integer, got '$GPUS_PER_NODE'."
find_python
export MASTER_PORT=${PORT:-${MASTER_PORT:-29500}}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export VSSM_CALLER_DIR="$CALLER_DIR"
cd "$ROOT"
# shellcheck disable=SC2086
srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
  --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
  "$PYTHON" -u "$ROOT/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher=slurm "$@"
