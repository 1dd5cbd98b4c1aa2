#!/usr/bin/env bash
# Create .venv at the repository root and install the tested stack (requirements.txt) plus vssm itself.
#
#   bash tools/setup.sh            # idempotent: a second run only checks and takes seconds
#
# On a machine with a CUDA GPU, a CUDA build of torch and nvcc (CUDA_HOME, or nvcc on PATH, matching
# torch.version.cuda's major version), mmcv is built with its CUDA ops and the two kernels of kernels/ are built
# too; the last lines say which implementation the models' ops will use. Without them (e.g. on a CPU machine)
# mmcv is built with its CPU ops and the models run on the PyTorch references.
#
# Environment:
#   VSSM_PYTHON      interpreter used to create the venv (default: python3.11, else python3)
#   VSSM_VENV        where the venv goes (default: .venv at the repository root; the commands in README.md use that)
#   VSSM_WHEELHOUSE  folder with a prebuilt mmcv-2.1.0 wheel built against the torch in use (default:
#                    ../shared/wheels, which holds a CPU build for torch 2.14.1 and is used only for that). Without
#                    one, mmcv is built from its sdist (about 10-20 minutes on 2 cores) and the wheel is kept in
#                    ~/.cache/vssm/wheels/torch-<version>[-cu<cuda>]/ for the next run; so are the kernels' wheels,
#                    per source version of kernels/.
#   VSSM_SYSTEM_PACKAGES  1: the venv sees the interpreter's own packages (--system-site-packages) and keeps
#                    those already installed at their versions, e.g. the torch of a cluster module or a container
#                    image; only missing requirements are installed, at the pinned versions (and setuptools if it
#                    is >= 81: mmcv's build and mmengine need pkg_resources). pip's own settings (PIP_INDEX_URL,
#                    PIP_FIND_LINKS, PIP_NO_INDEX) say where from.
#   VSSM_CUDA        1 / 0: build the CUDA parts or not (default: 1 when a GPU, CUDA torch and nvcc are found)
#   TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default: those of the GPUs of this machine)
#   MAX_JOBS         parallel compile jobs (default: the number of cores)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VSSM_VENV:-$ROOT/.venv}"
PY_BOOT="${VSSM_PYTHON:-$(command -v python3.11 || command -v python3)}"
STAMP="$VENV/.vssm-setup-stamp"
log() { printf '[setup] %s\n' "$*"; }

# What the kernels are built from: a change there (e.g. after git pull) rebuilds them.
kernel_hash() { find "kernels/$1" kernels/common -type f \( -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' \
  -o -name '*.py' -o -name '*.toml' \) -not -path '*/build/*' -not -path '*.egg-info/*' -not -path '*/__pycache__/*' \
  | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16; }
want_stamp() {
  { cat requirements.txt pyproject.toml tools/setup.sh; echo "cuda=${WITH_CUDA:-0} system=$SYSTEM_PACKAGES"
    [ "${WITH_CUDA:-0}" != 1 ] || { kernel_hash selective_scan; kernel_hash dwconv2d; }; } | sha256sum | cut -d' ' -f1
}

SYSTEM_PACKAGES="${VSSM_SYSTEM_PACKAGES:-0}"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PY_BOOT"
  if [ "$SYSTEM_PACKAGES" = 1 ]; then
    # An interpreter that is itself in a venv (e.g. a container's): the new venv sees exactly that venv's packages,
    # added after its own as site directories by a .pth file (their .pth files run too); --system-site-packages would
    # reach the base installation instead, whose packages that venv never saw. Otherwise: the system's packages.
    parent_sites="$("$PY_BOOT" -c 'import site, sys
if sys.prefix != sys.base_prefix: print("\n".join(f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()))')"
    if [ -n "$parent_sites" ]; then
      "$PY_BOOT" -m venv "$VENV"
      echo "$parent_sites" > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_vssm_system_packages.pth"
    else
      "$PY_BOOT" -m venv --system-site-packages "$VENV"
    fi
    touch "$VENV/.vssm-system-packages"
  else
    "$PY_BOOT" -m venv "$VENV"
  fi
elif [ "$SYSTEM_PACKAGES" = 1 ] && [ ! -f "$VENV/.vssm-system-packages" ]; then
  echo "[setup] VSSM_SYSTEM_PACKAGES=1 but $VENV was created without the system's packages: remove $VENV and run" \
    "again, or leave VSSM_SYSTEM_PACKAGES unset." >&2
  exit 1
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# Whether to build the CUDA parts: a GPU, a CUDA build of torch and an nvcc torch finds (CUDA_HOME or PATH).
detect_cuda() {
  "$PY" -c 'import torch; from torch.utils.cpp_extension import CUDA_HOME
print(int(torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None))' 2>/dev/null \
    || echo 0
}
WITH_CUDA=${VSSM_CUDA:-}
if [ -z "$WITH_CUDA" ] && "$PY" -c "import torch" >/dev/null 2>&1; then WITH_CUDA=$(detect_cuda); fi

# The models' ops and where they run: the kernels on a GPU when built, the PyTorch references otherwise.
report_backends() {
  "$PY" - <<'PY'
import torch
import mmcv.ops
import vssm  # noqa: F401
from vssm.ops._backend import describe_backends
device = 'cuda' if torch.cuda.is_available() else 'cpu'
try:  # a CUDA op that runs (mmcv.ops.get_compiling_cuda_version() crashes in some builds whose ops work)
    boxes = torch.tensor([[0., 0., 4., 4.], [1., 1., 5., 5.]], device=device)
    cuda = device == 'cuda' and mmcv.ops.nms(boxes, torch.tensor([0.9, 0.8], device=device), 0.1)[1].tolist() == [0]
except RuntimeError:
    cuda = False
print('[setup] mmcv ops: ' + ('CPU and CUDA' if cuda else 'CPU only'))
print(f'[setup] vssm models on {device}: ' + describe_backends('auto', torch.empty(1, device=device)))
PY
}

# Fast path: nothing changed since the last complete run and the stack still imports.
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(want_stamp)" ] \
   && "$PY" -c "import vssm, mmcv.ops, mmdet, mmseg, mmpretrain" >/dev/null 2>&1; then
  log "environment up to date ($VENV)"
  [ "${WITH_CUDA:-0}" != 1 ] || report_backends
  exit 0
fi

pin() { grep -E "^$1(==|>|<|$)" requirements.txt | head -n1; }
# pip install of requirement lines; with VSSM_SYSTEM_PACKAGES=1, those already installed (any version, or another
# build of the same modules) are kept and the rest installed without pip's resolver, then their unmet dependencies
# (tools/_requirements.py).
install_reqs() {
  if [ "$SYSTEM_PACKAGES" != 1 ]; then "${PIP[@]}" install -q "$@"; return; fi
  local wanted
  mapfile -t wanted < <("$PY" tools/_requirements.py missing "$@")
  [ "${#wanted[@]}" = 0 ] || "${PIP[@]}" install -q --no-deps "${wanted[@]}"
  for _ in 1 2 3 4 5; do
    mapfile -t wanted < <("$PY" tools/_requirements.py unmet "$@")
    [ "${#wanted[@]}" != 0 ] || return 0
    "${PIP[@]}" install -q --no-deps "${wanted[@]}"
  done
}
requirement_lines() { grep -vE '^\s*(#|$)' requirements.txt; }

log "step 1/4: torch, torchvision, numpy, build tools"
install_reqs "$(pin torch)" "$(pin torchvision)" "$(pin numpy)" "$(pin setuptools)" "$(pin wheel)" "$(pin ninja)"

TORCH_VER="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
[ -n "$WITH_CUDA" ] || WITH_CUDA=$(detect_cuda)
MMCV_KIND=""
CACHE="${HOME}/.cache/vssm/wheels/torch-${TORCH_VER}"
if [ "$WITH_CUDA" = 1 ]; then
  CUDA_VER="$("$PY" -c 'import torch; print(torch.version.cuda)')"
  NVCC="$("$PY" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME)')/bin/nvcc"
  NVCC_VER="$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p')"
  if [ "${NVCC_VER%%.*}" != "${CUDA_VER%%.*}" ]; then
    echo "[setup] $NVCC is CUDA $NVCC_VER but torch $TORCH_VER was built with CUDA $CUDA_VER: their major versions" \
      "must match. Point CUDA_HOME at a matching toolkit, install the torch build for your CUDA, or set VSSM_CUDA=0" \
      "to set up without the CUDA parts." >&2
    exit 1
  fi
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch
caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
print(";".join(f"{a}.{b}" for a, b in caps))')"
  fi
  export TORCH_CUDA_ARCH_LIST
  log "CUDA: torch $TORCH_VER+cu$CUDA_VER, nvcc $NVCC_VER, architectures $TORCH_CUDA_ARCH_LIST"
  MMCV_KIND=", CUDA ops"
  CACHE="$CACHE-cu$CUDA_VER"
fi

MMCV_CHECK_LOG="$(mktemp)"
trap 'rm -f "$MMCV_CHECK_LOG"' EXIT
# mmcv 2.1.0 with ops, and with CUDA ops when the CUDA parts are built: nms run on the GPU (some builds whose CUDA ops
# work crash in mmcv.ops.get_compiling_cuda_version()); the output is kept for the error
has_mmcv() {
  "$PY" -X faulthandler -c "import mmcv, mmcv.ops, torch; assert mmcv.__version__ == '2.1.0'
if '$WITH_CUDA' == '1':
    boxes = torch.tensor([[0., 0., 4., 4.], [1., 1., 5., 5.]], device='cuda')
    assert mmcv.ops.nms(boxes, torch.tensor([0.9, 0.8], device='cuda'), 0.1)[1].tolist() == [0]" \
    >"$MMCV_CHECK_LOG" 2>&1
}

log "step 2/4: mmcv 2.1.0 with compiled ops (torch $TORCH_VER, $PYTAG$MMCV_KIND)"
if has_mmcv; then
  log "mmcv 2.1.0 with ops already installed"
else
  mkdir -p "$CACHE"
  HOUSE="${VSSM_WHEELHOUSE:-$ROOT/../shared/wheels}"
  found=""
  for dir in "$HOUSE" "$CACHE"; do
    # A cached wheel is only usable for the torch it was built against; the default house holds a CPU build for
    # torch 2.14.1. A house given in VSSM_WHEELHOUSE is tried as it is (the import check below tells).
    if [ -z "${VSSM_WHEELHOUSE:-}" ] && [ "$dir" = "$HOUSE" ] \
       && { [ "$TORCH_VER" != "2.14.1" ] || [ "$WITH_CUDA" = 1 ]; }; then continue; fi
    for whl in "$dir"/mmcv-2.1.0-"$PYTAG"-"$PYTAG"-*.whl; do
      [ -f "$whl" ] && found="$whl" && break 2
    done
  done
  if [ -z "$found" ]; then
    log "no prebuilt mmcv wheel found: building it from the sdist (10-20 minutes on 2 cores)"
    BUILD="$(mktemp -d)"
    "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$BUILD"
    tar -xzf "$BUILD"/mmcv-2.1.0.tar.gz -C "$BUILD"
    # torch >= 2.14 needs C++20 (ATen: "C++20 or later compatible compiler is required").
    sed -i 's/-std=c++17/-std=c++20/g' "$BUILD"/mmcv-2.1.0/setup.py
    MMCV_WITH_OPS=1 FORCE_CUDA="$WITH_CUDA" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      CFLAGS="-g0 -O3" CXXFLAGS="-g0 -O3" \
      "${PIP[@]}" wheel -q --no-build-isolation --no-deps --no-cache-dir -w "$CACHE" "$BUILD"/mmcv-2.1.0
    rm -rf "$BUILD"
    found="$(ls "$CACHE"/mmcv-2.1.0-*.whl | head -n1)"
  fi
  log "installing $found"
  "${PIP[@]}" install -q --no-deps --force-reinstall "$found"
  # mmcv's own runtime dependencies (the wheel was installed without them).
  install_reqs addict packaging Pillow pyyaml yapf "$(pin opencv-python)" "$(pin mmengine)"
  "$PY" -c "import mmcv.ops" || { echo "[setup] mmcv.ops does not import: the wheel does not match torch $TORCH_VER" >&2; exit 1; }
  if ! has_mmcv; then
    tail -n 20 "$MMCV_CHECK_LOG" >&2
    echo "[setup] the check of $found failed (above): a wheel without CUDA ops, or one built for another torch;" \
      "remove it from $(dirname "$found") and run again" >&2
    exit 1
  fi
fi

log "step 3/4: the rest of requirements.txt"
mapfile -t REQS < <(requirement_lines)
install_reqs "${REQS[@]}"

log "step 4/4: vssm (editable)"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e .

if [ "$WITH_CUDA" = 1 ]; then
  # One wheel per kernel and source version, kept in the cache: a new venv reuses it, a source change rebuilds.
  for kernel in selective_scan dwconv2d; do
    hash="$(kernel_hash "$kernel")"
    marker="$VENV/.vssm-kernel-$kernel"
    if [ "$(cat "$marker" 2>/dev/null)" = "$hash" ] && "$PY" -c "import torch, vssm_$kernel" >/dev/null 2>&1; then
      log "kernel vssm_$kernel up to date"
      continue
    fi
    KDIR="$CACHE/kernels/$kernel-$hash-${TORCH_CUDA_ARCH_LIST//[^0-9.]/_}"
    if ! ls "$KDIR"/vssm_"$kernel"-*.whl >/dev/null 2>&1; then
      log "building kernels/$kernel (architectures $TORCH_CUDA_ARCH_LIST)"
      mkdir -p "$KDIR"
      MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${PIP[@]}" wheel -q --no-build-isolation --no-deps -w "$KDIR" "kernels/$kernel"
    fi
    log "installing $(ls "$KDIR"/vssm_"$kernel"-*.whl)"
    "${PIP[@]}" install -q --no-deps --force-reinstall "$KDIR"/vssm_"$kernel"-*.whl
    echo "$hash" > "$marker"
  done
fi

"$PY" -c "import vssm, mmcv.ops, mmdet, mmseg, mmpretrain; print('[setup] ok: torch', __import__('torch').__version__, '| mmcv', mmcv.__version__, '| mmdet', mmdet.__version__, '| mmseg', mmseg.__version__, '| mmpretrain', mmpretrain.__version__)"
report_backends
want_stamp > "$STAMP"
