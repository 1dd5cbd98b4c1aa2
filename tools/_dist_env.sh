# Sourced by the launchers (dist_train.sh, dist_test.sh, slurm_train.sh, slurm_test.sh) after they set ROOT and
# USAGE: argument checks that name what is missing, paths taken from the caller's directory, the interpreter, the
# rendezvous variables and thread counts, and the srun call of the Slurm launchers. Nothing runs at source time
# except remembering the caller's directory.
CALLER_DIR="$PWD"
SCRIPT="tools/$(basename "$0")"

die() {  # message: print it and the usage line, exit 2
  printf '%s: %s\nusage: %s\n' "$SCRIPT" "$1" "$USAGE" >&2
  exit 2
}

is_count() { [[ "${1:-}" =~ ^[1-9][0-9]*$ ]]; }

is_option() { [[ "${1:-}" == -* ]]; }

require_args() {  # NAME... -- "$@": fail, naming the first missing positional argument and those after it
  local names=() i=0
  while [ "$1" != "--" ]; do names+=("$1"); shift; done
  shift
  for ((i = 0; i < ${#names[@]}; i++)); do
    if [ $# -le "$i" ] || is_option "${@:$((i + 1)):1}"; then die "missing: ${names[*]:$i}."; fi
  done
}

abs_path() {  # a path from the caller's directory, made absolute (URIs such as s3://... unchanged)
  case "$1" in
    /* | *://*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$CALLER_DIR/$1" ;;
  esac
}

require_file() {  # what path: fail unless the file exists (URIs are left to the tools)
  [[ "$2" == *://* ]] || [ -f "$2" ] || die "$1 '$2' does not exist (relative paths are taken from $CALLER_DIR)."
}

port_is_free() { "$PYTHON" -c 'import socket, sys; socket.socket().bind(("", int(sys.argv[1])))' "$1" 2>/dev/null; }

find_python() {
  if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
  fi
}

# setup_torchrun NPROC: the torchrun rendezvous of the node (NNODES, NODE_RANK, MASTER_ADDR, PORT), threads per
# process, then enter_root.
setup_torchrun() {
  NPROC=$1
  find_python
  NNODES=${NNODES:-1}
  NODE_RANK=${NODE_RANK:-0}
  is_count "$NNODES" || die "NNODES must be a positive integer, got '$NNODES'."
  [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] \
    || die "NODE_RANK must be one of 0..$((NNODES - 1)) (NNODES=$NNODES), got '$NODE_RANK'."
  if [ "$NNODES" -gt 1 ]; then
    [ -n "${MASTER_ADDR:-}" ] || die "NNODES=$NNODES: set MASTER_ADDR to the address of the node with NODE_RANK=0, \
the same on every node (and PORT, default 29500, to a port free there)."
    PORT=${PORT:-29500}
  else
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    if [ -z "${PORT:-}" ]; then
      PORT=29500
      if ! port_is_free "$PORT"; then  # another run on this machine holds it; one node can use any port
        PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
        echo "[vssm] port 29500 is in use on this machine: using port $PORT (set PORT to choose)." >&2
      fi
    fi
  fi
  is_count "$PORT" || die "PORT must be a port number, got '$PORT'."
  if [ -z "${OMP_NUM_THREADS:-}" ]; then
    OMP_NUM_THREADS=$(( $(nproc) / NPROC ))
    [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
  fi
  enter_root
}

# enter_root: PYTHONPATH and VSSM_CALLER_DIR (tools/train.py and test.py resolve their path options against it), then
# the repository root, where the configs' relative paths (data/, checkpoints/, work_dirs/) point.
enter_root() {
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  export VSSM_CALLER_DIR="$CALLER_DIR"
  cd "$ROOT"
}

# slurm_run PARTITION JOB_NAME TOOL ARGS...: TOOL (tools/train.py or tools/test.py) with ARGS (which include
# --launcher=slurm: mmengine reads the ranks and the first node's address from Slurm's variables) as one srun task
# per GPU: GPUS in all, GPUS_PER_NODE per node, CPUS_PER_TASK each, SRUN_ARGS added, MASTER_PORT from PORT (29500).
slurm_run() {
  local partition=$1 job_name=$2 tool=$3
  shift 3
  GPUS=${GPUS:-8}
  GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
  CPUS_PER_TASK=${CPUS_PER_TASK:-5}
  is_count "$GPUS" || die "GPUS must be a positive integer, got '$GPUS'."
  is_count "$GPUS_PER_NODE" || die "GPUS_PER_NODE must be a positive integer, got '$GPUS_PER_NODE'."
  find_python
  export MASTER_PORT=${PORT:-${MASTER_PORT:-29500}}
  enter_root
  # SRUN_ARGS is split into words on purpose (several srun options in one variable).
  # shellcheck disable=SC2086
  srun -p "$partition" --job-name="$job_name" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
    "$PYTHON" -u "$ROOT/$tool" "$@"
}
