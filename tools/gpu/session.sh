#!/usr/bin/env bash
# GPU-machine checks in one call (see the device notes in README.md): build or install the kernels, then run the
# steps named on the command line, each with its log under $OUT (default /tmp/vssm-gpu-out).
#
#   source .devwheels/activate.sh && bash tools/gpu/session.sh build tests fuzz order
#
# Steps:
#   build   pip-build the kernels ($BUILD_KERNELS, default both; "install build" with BUILD_KERNELS=dwconv2d rebuilds one
#           and takes the other from .kernel-wheels/) into /tmp/vssm-kern and keep their wheels in $OUT/kernel-wheels
#           (reused by a later call when .kernel-wheels/ holds wheels built from the same sources: "install" step)
#   install install prebuilt kernel wheels from .kernel-wheels/ instead of building
#   tests   the GPU tests (tests/ops/*_cuda.py, tests/models/*_cuda.py, or $TESTS); TESTS_BG=1 runs them in the
#           background (with the next steps; the end of the script waits for them)
#   fuzz    tools/fuzz_kernels.py --cases $FUZZ_CASES (default 1000), one process per op ($FUZZ_OPS: all four),
#           in the background
#   order   tools/benchmarks/bench_spectral_order.py at 512x512 (after tests/fuzz: timings need a quiet GPU)
#   ops     tools/benchmarks/bench_ops.py ($OPS_ARGS; the kernels/README.md tables in $OUT/ops.md)
#   bench   tools/analysis_tools/benchmark.py ($BENCH_ARGS; default: the T models and the two peers, which fit the
#           step's time limit; all models with the S/B sizes do not)
#   bench-norecompute  the training rows of our models again without the memory-saving recomputations
#           (--no-recompute): their cost in time, their saving in memory
#   learn   tools/benchmarks/learning_runs.py ($LEARN_ARGS); LEARN_BG=1 runs it in the background
#   amp     tools/benchmarks/amp_stability.py, one process per task, model and dtype ($AMP_TASKS: det seg, $AMP_MODELS,
#           $AMP_DTYPES: bf16 fp16, $AMP_ARGS, e.g. "--iters 500 --time-limit 400"), spread over the GPUs
#           ($AMP_GPUS, default all); AMP_BG=1 runs them in the background
#   multigpu  tools/benchmarks/multi_gpu_check.py --gpus $(GPU count) ($MGPU_ARGS)
#   layouts tools/benchmarks/bench_layouts.py ($LAYOUTS_ARGS, e.g. "--pieces cross_scan cross_merge")
#   ncu     Nsight Compute counters of the kernels at the shapes of the missed targets
#           (tools/benchmarks/ncu_kernels.py, $NCU_ARGS e.g. "--cases fusion-s1-fp32"): $OUT/ncu.md
# The logs end up in $OUT/logs.tar.gz.
set -u
OUT=${OUT:-/tmp/vssm-gpu-out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/vssm-kern:/tmp/site:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
has() { [[ " $* " == *" $step "* ]]; }
background=()
# Steps that time things wait for the background jobs (tests, fuzz, learn) to end first: timings need a quiet GPU.
wait_background() { for pid in "${background[@]}"; do wait "$pid"; done; background=(); }
for step in "$@"; do
  start=$(date +%s)
  case $step in
    build)
      python3 -m pip wheel --no-build-isolation --no-deps -w "$OUT/kernel-wheels" \
        $(for k in ${BUILD_KERNELS:-selective_scan dwconv2d}; do echo ./kernels/$k; done) > "$OUT/build.log" 2>&1 \
        || { tail -40 "$OUT/build.log"; exit 1; }
      python3 -m pip install -q --no-deps --upgrade --target /tmp/vssm-kern "$OUT"/kernel-wheels/*.whl \
        >> "$OUT/build.log" 2>&1 ;;
    install)
      python3 -m pip install -q --no-deps --target /tmp/vssm-kern .kernel-wheels/*.whl > "$OUT/build.log" 2>&1 ;;
    fuzz)
      for op in ${FUZZ_OPS:-scan-state scan-output dwconv2d state-fusion}; do
        timeout "${FUZZ_TIMEOUT:-330}" python3 tools/fuzz_kernels.py --cases "${FUZZ_CASES:-1000}" --ops $op \
          --json "$OUT/fuzz-$op.json" > "$OUT/fuzz-$op.log" 2>&1 &
        background+=($!)
      done ;;
    tests)
      run_tests() {
        timeout "${TESTS_TIMEOUT:-330}" python3 -m pytest -q -p no:cacheprovider -rfE ${TESTS:-tests/ops/test_selective_scan_cuda.py \
          tests/ops/test_dwconv2d_cuda.py tests/models/test_spatial_mamba_cuda.py tests/models/test_vmamba_cuda.py \
          tests/models/test_spectral_vmamba_cuda.py tests/tools/test_resume_cuda.py} > "$OUT/tests.log" 2>&1
        echo "== tests"; tail -15 "$OUT/tests.log"
      }
      if [ "${TESTS_BG:-0}" = 1 ]; then run_tests & background+=($!); else run_tests; fi ;;
    order)
      wait_background
      timeout "${ORDER_TIMEOUT:-150}" python3 tools/benchmarks/bench_spectral_order.py --sizes 512x512 \
        --batches 1 2 8 --json "$OUT/order.json" > "$OUT/order.log" 2>&1
      grep '^{' "$OUT/order.log" ;;
    ops)
      wait_background
      timeout "${OPS_TIMEOUT:-200}" python3 tools/benchmarks/bench_ops.py --json "$OUT/ops.json" \
        --markdown "$OUT/ops.md" ${OPS_ARGS:-} > "$OUT/ops.log" 2>&1
      tail -12 "$OUT/ops.log" ;;
    bench)
      wait_background
      timeout "${BENCH_TIMEOUT:-300}" python3 tools/analysis_tools/benchmark.py --json "$OUT/bench.json" \
        --markdown "$OUT/bench.md" ${BENCH_ARGS:---models spatial-mamba-t vmamba-t spectral-vmamba-t swin-t convnext-t} \
        > "$OUT/bench.log" 2>&1
      tail -40 "$OUT/bench.log" ;;
    bench-norecompute)
      wait_background
      timeout "${BENCH_TIMEOUT:-300}" python3 tools/analysis_tools/benchmark.py --no-recompute --modes train-bf16 \
        --backends cuda --models spatial-mamba-t vmamba-t spectral-vmamba-t \
        --json "$OUT/bench-norecompute.json" --markdown "$OUT/bench-norecompute.md" > "$OUT/bench-norecompute.log" 2>&1
      tail -12 "$OUT/bench-norecompute.log" ;;
    learn)
      run_learn() {
        timeout "${LEARN_TIMEOUT:-400}" python3 tools/benchmarks/learning_runs.py --work-dir /tmp/vssm-learn \
          ${LEARN_ARGS:-} > "$OUT/learn.log" 2>&1
        echo "== learn"; tail -40 "$OUT/learn.log"
        (cd /tmp/vssm-learn && find . \( -name '*.json' -o -name '*.png' -o -name '*.md' -o -name '*.log' \) \
          -not -path '*/data/*' | tar czf "$OUT/learn.tar.gz" -T -)
      }
      if [ "${LEARN_BG:-0}" = 1 ]; then run_learn & background+=($!); else run_learn; fi ;;
    amp)
      ngpu=$(nvidia-smi -L | wc -l)
      gpus=(${AMP_GPUS:-$(seq 0 $(( ngpu - 1 )))})
      words() { echo $# ; }
      nproc_amp=$(( $(words ${AMP_TASKS:-det seg}) * $(words ${AMP_MODELS:-a b c}) * $(words ${AMP_DTYPES:-a b}) ))
      # Each process gets its share of the cores (torch's default is all of them in every process; the 12-process
      # run of 10:10 took 1.3 s per Mask R-CNN iteration at 1333x800)
      amp_threads=$(( $(nproc) / nproc_amp )); [ "$amp_threads" -ge 1 ] || amp_threads=1
      run_amp() {
        local i=0 pids=()
        for task in ${AMP_TASKS:-det seg}; do
          for model in ${AMP_MODELS:-spatial-mamba-t vmamba-t spectral-vmamba-t}; do
            for dtype in ${AMP_DTYPES:-bf16 fp16}; do
              CUDA_VISIBLE_DEVICES=${gpus[$(( i % ${#gpus[@]} ))]} OMP_NUM_THREADS=$amp_threads \
                timeout "${AMP_TIMEOUT:-450}" python3 tools/benchmarks/amp_stability.py --tasks $task --models $model \
                --dtypes $dtype --json "$OUT/amp-$task-$model-$dtype.json" ${AMP_ARGS:-} \
                > "$OUT/amp-$task-$model-$dtype.log" 2>&1 &
              pids+=($!); i=$(( i + 1 ))
            done
          done
        done
        for pid in "${pids[@]}"; do wait "$pid"; done
        for f in "$OUT"/amp-*.log; do echo "== $f"; tail -4 "$f"; done
      }
      # AMP_BG=1: the next steps run meanwhile, on other GPUs (e.g. AMP_GPUS="1" and CUDA_VISIBLE_DEVICES=0 for the
      # rest): the steps that wait for a quiet GPU do not wait for these
      if [ "${AMP_BG:-0}" = 1 ]; then run_amp & amp_background=$!; else run_amp; fi ;;
    multigpu)
      timeout "${MGPU_TIMEOUT:-400}" python3 tools/benchmarks/multi_gpu_check.py --work-dir /tmp/vssm-mgpu \
        --gpus "$(nvidia-smi -L | wc -l)" ${MGPU_ARGS:-} > "$OUT/multigpu.log" 2>&1
      tail -20 "$OUT/multigpu.log"
      (cd /tmp/vssm-mgpu && find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' \) \
        -not -path '*/data/*' | tar czf "$OUT/multigpu.tar.gz" -T -) ;;
    layouts)
      wait_background
      timeout "${LAYOUTS_TIMEOUT:-200}" python3 tools/benchmarks/bench_layouts.py ${LAYOUTS_ARGS:-} \
        > "$OUT/layouts.log" 2>&1
      grep -v Warning "$OUT/layouts.log" | tail -40 ;;
    ncu)
      wait_background
      ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
      if [ -z "$ncu" ]; then echo "ncu: not found"; else
        timeout "${NCU_TIMEOUT:-240}" "$ncu" --profile-from-start off --clock-control none -f -o "$OUT/kernels" \
          --kernel-name 'regex:(dw_[a-z_]*kernel|scan_[a-z]*_kernel|spin_kernel)' \
          --metrics "$(python3 tools/benchmarks/ncu_kernels.py --metrics)" \
          python3 tools/benchmarks/ncu_kernels.py --run ${NCU_ARGS:-} > "$OUT/ncu-run.log" 2>&1
        "$ncu" --import "$OUT/kernels.ncu-rep" --csv --page raw --print-units base --print-kernel-base function \
          > "$OUT/ncu.csv" 2> "$OUT/ncu-import.log"
        python3 tools/benchmarks/ncu_kernels.py --summarize "$OUT/ncu.csv" --parts "$OUT/ncu-run.log" \
          --markdown "$OUT/ncu.md" > "$OUT/ncu-summary.log" 2>&1 || tail -20 "$OUT/ncu-run.log"
        tail -40 "$OUT/ncu-summary.log"
      fi ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "step $step: $(( $(date +%s) - start )) s"
done
for pid in "${background[@]}" ${amp_background:-}; do wait "$pid"; done
for f in "$OUT"/fuzz-*.log; do [ -f "$f" ] && { echo "== $f"; tail -8 "$f"; }; done
# Few files come back from the device: everything but the kernel wheels goes into one archive.
(cd "$OUT" && find . -maxdepth 1 -type f ! -name '*.tar.gz' -printf '%f\n' | tar czf logs.tar.gz -T - --remove-files)
exit 0
