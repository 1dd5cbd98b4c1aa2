#!/usr/bin/env bash
# Distributed training with torchrun:  tools/dist_train.sh CONFIG NGPUS [tools/train.py options]
# NGPUS processes on this node (without GPUs, CPU processes over gloo). Paths are taken from the directory you call
# from. Several nodes: run it on each with the same NNODES, MASTER_ADDR and PORT and its own NODE_RANK (README).
# Environment: PYTHON, PORT (default 29500), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1 on one node).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
USAGE="tools/dist_train.sh CONFIG NGPUS [tools/train.py options, e.g. --demo --work-dir DIR --resume]"
source "$ROOT/tools/_dist_env.sh"
if [ $# -lt 1 ] || is_option "$1"; then die "CONFIG is missing."; fi
if [ $# -lt 2 ] || is_option "$2"; then die "NGPUS is missing (the number of processes on this node, e.g. 8)."; fi
is_count "$2" || die "NGPUS must be a positive integer, got '$2'."
CONFIG=$(abs_path "$1")
require_file "config file" "$CONFIG"
NGPUS=$2
shift 2
setup_torchrun "$NGPUS"
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
  --nproc_per_node="$NPROC" --master_port="$PORT" "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "$@"
