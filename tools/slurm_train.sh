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
names=(PARTITION JOB_NAME CONFIG WORK_DIR)
for i in 0 1 2 3; do
  if [ $# -le "$i" ] || is_option "${@:$((i + 1)):1}"; then die "missing: ${names[*]:$i}."; fi
done
PARTITION=$1
JOB_NAME=$2
CONFIG=$(abs_path "$3")
WORK_DIR=$(abs_path "$4")
require_file "config file" "$CONFIG"
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
# SRUN_ARGS is split into words on purpose (several srun options in one variable).
# shellcheck disable=SC2086
srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
  --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
  "$PYTHON" -u "$ROOT/tools/train.py" "$CONFIG" --work-dir="$WORK_DIR" --launcher=slurm "$@"
