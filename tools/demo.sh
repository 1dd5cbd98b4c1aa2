#!/usr/bin/env bash
# The quick start: set up (if needed), make the demo data, then train and test Spatial-Mamba-T on each task
# through tools/dist_train.sh / dist_test.sh (2 processes; CPU processes over gloo when there is no GPU), and
# print top-1, bbox/segm mAP and mIoU.
#
#   bash tools/demo.sh          # NPROC=2; the schedules of the demo overrides (100 / 40 / 40 iterations)
#   ITERS=4 bash tools/demo.sh  # the same with 4 iterations per task (a smoke run)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NPROC=${NPROC:-2}
ITERS=${ITERS:-}
OUT=${OUT:-work_dirs/demo}

bash tools/setup.sh
PY=.venv/bin/python
$PY tools/make_demo_data.py --out data/demo

run_task() {  # name config [extra test args]
  local name=$1 config=$2
  shift 2
  local wd="$OUT/$name"
  local iters=()
  [ -z "$ITERS" ] || iters=(--cfg-options train_cfg.max_iters="$ITERS" train_cfg.val_interval="$ITERS" \
    default_hooks.checkpoint.interval="$ITERS")
  echo "=== $name: train ($config, log: $wd.train.log)"
  local t0=$SECONDS
  tools/dist_train.sh "$config" "$NPROC" --demo --work-dir "$wd" "${iters[@]}" > "$wd.train.log" 2>&1 \
    || { tail -n 40 "$wd.train.log"; exit 1; }
  echo "=== $name: test $* (log: $wd.test.log)"
  tools/dist_test.sh "$config" "$(cat "$wd/last_checkpoint")" "$NPROC" --demo --work-dir "$wd" "$@" \
    > "$wd.test.log" 2>&1 || { tail -n 40 "$wd.test.log"; exit 1; }
  echo "=== $name: done in $((SECONDS - t0)) s"
}

mkdir -p "$OUT"
run_task classification classification/configs/spatial_mamba/spatial-mamba-tiny_8xb128_in1k.py
run_task detection detection/configs/spatial_mamba/mask-rcnn_spatial-mamba-t_fpn_1x_coco.py
run_task segmentation segmentation/configs/spatial_mamba/spatial-mamba-tiny_upernet_8xb2-160k_ade20k-512x512.py --tta

$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = [('classification', 'accuracy/top1', 'top-1 (%)'), ('detection', 'coco/bbox_mAP', 'bbox mAP'),
        ('detection', 'coco/segm_mAP', 'segm mAP'), ('segmentation', 'mIoU', 'mIoU (%, multi-scale + flip)')]
print('\nSpatial-Mamba-T on the demo data (metrics.json in each work dir):')
for task, key, label in rows:
    metrics = json.load(open(f'{out}/{task}/metrics.json'))
    print(f'  {task:15s} {label:30s} {metrics[key]:.3f}')
PY
