"""The CUDA and Triton kernels against the PyTorch references over random cases (GPU; skipped without CUDA or the
kernels). For each op (the scan's state and output forms, the depthwise conv, the state fusion, the cross scan's
Triton kernel: VMamba's four directions and random per-image orders, K = 1-8, ranks 1-64, N up to 16, maps from 1x1
to 60x60, and the CUDA scan's cross form on the same draws plus index maps that repeat and skip tokens),
``--fuzz-cases`` random cases (default 20, or ``$VSSM_FUZZ_CASES``) from ``tests/ops/fuzz.py``'s GPU bounds: L up to
6000 with the models' and the 256-step chunk boundaries' lengths (1, 49, 129, 255-257, 3136), N up to 16, K = 1, 2, 4
or 8 groups of B/C, depthwise kernels 1..31 with dilations, zero and replicate padding, planes from 1x1 across the
32x32 tiles, every flag combination, fp32/fp16/bf16, contiguous, transposed, sliced, stride-0 and channels-last
inputs. Each case runs forward and backward on the kernel and on the reference; the output
and every input's gradient must agree within the tolerances of ``test_selective_scan_cuda.py`` /
``test_dwconv2d_cuda.py`` (max relative error; the cross scan's in ``fuzz.CROSS_TOL``).

The Triton elementwise ops the same way, each kernel (``backend='cuda'``, ``VSSM_TRITON_FUSIONS=1``) against its
reference (``backend='torch'``): ``layer_norm_2d`` on (B, C, H, W) maps of 1 to 2200 channels (across the forward's
2048- and the backward's 1024-channel single tiles) with the kernel forced on every map (``fuzz.py`` lifts the
dispatch's ``KERNEL_MAX_CHANNELS`` / ``KERNEL_MIN_PIXELS`` inside the call), ``layer_norm_last`` on rows of up to 256
channels, both with every ``out_dtype``; ``bias_gelu`` and ``add_residual`` on rows of 1 to 16900 pixels (across the
kernels' 1024-element blocks) and up to about 25000 (image, channel) rows, the residual with and without its bias,
with and without mmcv's DropPath in training (both calls draw the same keep mask from the same seed), a float32
stream with a 16-bit branch and same dtypes, (B, C, H, W), (B, H, W, C) and token layouts; the token merge
(``scatter_tokens`` with inverse permutations) over VMamba's four directions and random shared or per-image
permutations, K = 1-8. Their tolerances are their own GPU tests' (``conftest.TOLERANCES`` / ``GRAD_TOLERANCES``,
``test_token_maps.py``'s), as max relative errors against at least 1 (``fuzz.error_floor``); LayerNorm and bias + GELU
are compared with their float64 references, as their tests compare.

    pytest tests/ops/test_fuzz_kernels_cuda.py -s --fuzz-cases 1000 [--fuzz-seed 0]

prints, per op and dtype, the cases, the mismatches and the worst error against its tolerance; a failure lists
every failing case with its index in the op's stream (``fuzz.draw_cases(op, n, seed)[index]`` rebuilds it).
"""
import time

import pytest
import torch
from ops import fuzz

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.mark.parametrize('op', list(fuzz.KERNEL_OPS))
def test_kernel_matches_reference_on_random_cases(op, request):
    if not fuzz.KERNEL_OPS[op][2]():
        pytest.skip('kernel not built: see kernels/README.md')
    count, seed = request.config.getoption('--fuzz-cases'), request.config.getoption('--fuzz-seed')
    start = time.perf_counter()
    results = [fuzz.compare_case(case) for case in fuzz.draw_cases(op, count, seed)]
    print(f'\n{op}: {count} cases (seed {seed}) in {time.perf_counter() - start:.1f} s on '
          f'{torch.cuda.get_device_name()}\n{fuzz.format_summary(fuzz.summarize(results))}')
    failures = [fuzz.describe_failure(index, result) for index, result in enumerate(results) if not result.ok]
    assert not failures, f'{len(failures)} of {count} cases differ:\n' + '\n'.join(failures)
