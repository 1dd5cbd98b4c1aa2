#!/usr/bin/env bash
# Distributed testing with torchrun:  tools/dist_test.sh CONFIG CHECKPOINT NGPUS [tools/test.py options]
# NGPUS processes on this node (without GPUs, CPU processes over gloo). Paths are taken from the directory you call
# from. Several nodes: as tools/dist_train.sh (NNODES, NODE_RANK, MASTER_ADDR, PORT; README).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
USAGE="tools/dist_test.sh CONFIG CHECKPOINT NGPUS [tools/test.py options, e.g. --tta --demo --work-dir DIR]"
source "$ROOT/tools/_dist_env.sh"
if [ $# -lt 1 ] || is_option "$1"; then die "CONFIG is missing."; fi
if [ $# -lt 2 ] || is_option "$2"; then die "CHECKPOINT and NGPUS are missing."; fi
if [ $# -lt 3 ] || ! is_count "$3"; then
  if is_count "$2" && [ ! -f "$(abs_path "$2")" ]; then
    die "CHECKPOINT is missing: '$2' stands where the checkpoint goes${3:+ and '$3' where NGPUS goes}."
  fi
  if [ $# -lt 3 ] || is_option "$3"; then die "NGPUS is missing (the number of processes on this node, e.g. 8)."; fi
  die "NGPUS must be a positive integer, got '$3'."
fi
CONFIG=$(abs_path "$1")
CHECKPOINT=$(abs_path "$2")
require_file "config file" "$CONFIG"
require_file "checkpoint" "$CHECKPOINT"
NGPUS=$3
shift 3
setup_torchrun "$NGPUS"
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
  --nproc_per_node="$NPROC" --master_port="$PORT" "$ROOT/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
