#!/usr/bin/env bash
# Distributed testing with torchrun:  tools/dist_test.sh CONFIG CHECKPOINT NGPUS [--tta] [tools/test.py options]
# Without GPUs, NGPUS CPU processes test together over gloo. Environment: PYTHON, PORT, NNODES, NODE_RANK, MASTER_ADDR.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 CONFIG CHECKPOINT NGPUS [tools/test.py options, e.g. --tta --demo --work-dir DIR]" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/_dist_env.sh" "$3"
CONFIG=$1
CHECKPOINT=$2
shift 3
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
  --nproc_per_node="$NPROC" --master_port="$PORT" "$ROOT/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
