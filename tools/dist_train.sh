#!/usr/bin/env bash
# Distributed training with torchrun:  tools/dist_train.sh CONFIG NGPUS [tools/train.py options]
# Without GPUs, NGPUS CPU processes train together over gloo. Environment: PYTHON, PORT, NNODES, NODE_RANK, MASTER_ADDR.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG NGPUS [tools/train.py options, e.g. --demo --work-dir DIR --resume]" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/_dist_env.sh" "$2"
CONFIG=$1
shift 2
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
  --nproc_per_node="$NPROC" --master_port="$PORT" "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "$@"
