#!/usr/bin/env bash
# Create .venv at the repository root and install the tested stack (requirements.txt) plus vssm itself.
#
#   bash tools/setup.sh            # idempotent: a second run only checks and takes seconds
#
# Environment:
#   VSSM_PYTHON      interpreter used to create the venv (default: python3.11, else python3)
#   VSSM_WHEELHOUSE  folder with a prebuilt mmcv-2.1.0 wheel matching torch 2.14.1 (default: ../shared/wheels
#                    if it exists). Without one, mmcv is built from its sdist (about 10-20 minutes on 2 cores)
#                    and the wheel is kept in ~/.cache/vssm/wheels/torch-<version>/ for the next run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY_BOOT="${VSSM_PYTHON:-$(command -v python3.11 || command -v python3)}"
STAMP="$VENV/.vssm-setup-stamp"
log() { printf '[setup] %s\n' "$*"; }

want_stamp() { cat requirements.txt pyproject.toml tools/setup.sh | sha256sum | cut -d' ' -f1; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PY_BOOT"
  "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# Fast path: nothing changed since the last complete run and the stack still imports.
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(want_stamp)" ] \
   && "$PY" -c "import mmcv.ops, mmdet, mmseg, mmpretrain, vssm" >/dev/null 2>&1; then
  log "environment up to date ($VENV)"
  exit 0
fi

pin() { grep -E "^$1(==|>|<|$)" requirements.txt | head -n1; }

log "step 1/4: torch, torchvision, numpy, build tools"
"${PIP[@]}" install -q "$(pin torch)" "$(pin torchvision)" "$(pin numpy)" "$(pin setuptools)" "$(pin wheel)" "$(pin ninja)"

TORCH_VER="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"

log "step 2/4: mmcv 2.1.0 with compiled ops (torch $TORCH_VER, $PYTAG)"
if "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" >/dev/null 2>&1; then
  log "mmcv 2.1.0 with ops already installed"
else
  CACHE="${HOME}/.cache/vssm/wheels/torch-${TORCH_VER}"
  mkdir -p "$CACHE"
  HOUSE="${VSSM_WHEELHOUSE:-$ROOT/../shared/wheels}"
  found=""
  for dir in "$HOUSE" "$CACHE"; do
    # A cached wheel is only usable for the torch it was built against; the shared house is for torch 2.14.1.
    if [ "$dir" = "$HOUSE" ] && [ "$TORCH_VER" != "2.14.1" ]; then continue; fi
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
    MMCV_WITH_OPS=1 FORCE_CUDA="${FORCE_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      CFLAGS="-g0 -O3" CXXFLAGS="-g0 -O3" \
      "${PIP[@]}" wheel -q --no-build-isolation --no-deps --no-cache-dir -w "$CACHE" "$BUILD"/mmcv-2.1.0
    rm -rf "$BUILD"
    found="$(ls "$CACHE"/mmcv-2.1.0-*.whl | head -n1)"
  fi
  log "installing $found"
  "${PIP[@]}" install -q --no-deps --force-reinstall "$found"
  # mmcv's own runtime dependencies (the wheel was installed without them).
  "${PIP[@]}" install -q addict packaging Pillow pyyaml yapf "$(pin opencv-python)" "$(pin mmengine)"
  "$PY" -c "import mmcv.ops" || { echo "[setup] mmcv.ops does not import: the wheel does not match torch $TORCH_VER" >&2; exit 1; }
fi

log "step 3/4: the rest of requirements.txt"
"${PIP[@]}" install -q -r requirements.txt

log "step 4/4: vssm (editable)"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e .

"$PY" -c "import mmcv.ops, mmdet, mmseg, mmpretrain, vssm; print('[setup] ok: torch', __import__('torch').__version__, '| mmcv', mmcv.__version__, '| mmdet', mmdet.__version__, '| mmseg', mmseg.__version__, '| mmpretrain', mmpretrain.__version__)"
want_stamp > "$STAMP"
