"""The Triton kernels of vssm.ops compile for an H100 (sm_90) with Triton's real compiler, on any machine: every
launch their wrappers make for one tile of channels and for the chunked path, in fp32 and half precision. The
interpreter tests check the kernels' numbers; this checks what only compilation sees (Triton's type rules for loop
variables, constexpr branches, ptxas)."""
import pytest
import torch
from ops.triton_compile import compile_launch, record_launches

from vssm.ops.layer_norm import kernel_available

pytestmark = pytest.mark.skipif(not kernel_available(), reason='needs Triton')

# channel counts: one tile in registers and the chunked paths (observe_gate above 256 channels; layer_norm_2d's
# backward above 1024, its forward above 2048)
CHANNELS = [96, 520, 2100]
SINGLE_TILE = {'_ln2d_fwd_kernel': lambda c: c <= 2048, '_ln2d_bwd_kernel': lambda c: c <= 1024,
               '_observe_gate_fwd': lambda c: c <= 256, '_observe_gate_bwd': lambda c: c <= 256}


def _layer_norm_launches(channels, dtype):
    from vssm.ops import _triton_layer_norm as kernel
    b, length = 2, 15
    x = torch.empty(b, channels, length, dtype=dtype)
    w, bias = torch.empty(channels), torch.empty(channels)
    mean = rstd = torch.empty(b, length)
    return record_launches(kernel, ['_ln2d_fwd_kernel', '_ln2d_bwd_kernel'], lambda: (
        kernel.forward(x, w, bias, 1e-6, dtype), kernel.backward(torch.empty_like(x), x, w, mean, rstd)))


def _layer_norm_last_launches(channels, dtype):
    """Rows of channels (layer_norm_last): the channel stride 1, which Triton specializes."""
    from vssm.ops import _triton_layer_norm as kernel
    rows = torch.empty(1, 30, channels, dtype=dtype)
    w, bias = torch.empty(channels), torch.empty(channels)
    mean = rstd = torch.empty(1, 30)
    return record_launches(kernel, ['_ln2d_fwd_kernel', '_ln2d_bwd_kernel'], lambda: (
        kernel.forward(rows, w, bias, 1e-6, dtype, channels_last=True),
        kernel.backward(torch.empty_like(rows), rows, w, mean, rstd, channels_last=True)))


def _observe_gate_launches(channels, dtype):
    from vssm.ops import _triton_observe_gate as kernel
    b, length = 2, 15
    fused, u = torch.empty(b, channels, length), torch.empty(b, channels, length, dtype=dtype)
    C = torch.empty(b, 1, length, dtype=dtype)
    z = torch.empty(b, length, 2 * channels, dtype=dtype)[..., channels:]
    ds, w, bias = torch.empty(channels), torch.empty(channels), torch.empty(channels)
    mean = rstd = torch.empty(b * length)
    return record_launches(kernel, ['_observe_gate_fwd', '_observe_gate_bwd'], lambda: (
        kernel.forward(fused, C, u, ds, z, w, bias, 1e-6),
        kernel.backward(torch.empty(b, length, channels, dtype=dtype), fused, C, u, ds, z, w, bias, mean, rstd)))


@pytest.mark.parametrize('dtype', [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=str)
@pytest.mark.parametrize('channels', CHANNELS)
@pytest.mark.parametrize('launches', [_layer_norm_launches, _layer_norm_last_launches, _observe_gate_launches],
                         ids=['layer_norm_2d', 'layer_norm_last', 'observe_gate'])
def test_kernels_compile_for_sm90(launches, channels, dtype):
    recorded = launches(channels, dtype)
    assert len(recorded) == 2  # forward and backward
    for kernel, args, kwargs in recorded:
        assert kwargs['SINGLE'] == SINGLE_TILE[kernel.fn.__name__](channels)
        compiled = compile_launch(kernel, args, kwargs)
        assert '.target sm_90' in compiled.asm['ptx'] and len(compiled.asm['cubin']) > 0


def _cross_scan_launches(n_state, n_rank, dtype, monkeypatch):
    from vssm.ops import _triton_cross_scan as kernel
    monkeypatch.setattr(kernel, 'PROGRAMS_PER_SM', 1000)  # sequences cut into segments: every kernel launches
    b, d, k, length = 2, 40, 4, 300
    x = torch.empty(b, d, length, dtype=dtype)
    dbl = torch.empty(b, k, n_rank + 2 * n_state, length, dtype=dtype)
    index = torch.zeros(1, k, length, dtype=torch.int64)
    w, bias, A, ds = (torch.empty(k, d, n_rank, dtype=dtype), torch.empty(k * d), torch.empty(k * d, n_state),
                      torch.empty(k * d))
    states = torch.empty(b, k, d, n_state, kernel._tiles(d, n_rank, n_state, length)[-1])
    names = ['_segment_summary', '_carry', '_cross_scan_fwd', '_adjoint_summary', '_cross_scan_bwd']
    return record_launches(kernel, names, lambda: (
        kernel.forward(x, dbl, index, w, bias, A, ds),
        kernel.backward(torch.empty(b, d, length), x, dbl, index, w, bias, A, ds, states)))


@pytest.mark.parametrize('dtype', [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=str)
@pytest.mark.parametrize('n_state, n_rank', [(1, 6), pytest.param(4, 48, marks=pytest.mark.slow)])
def test_cross_scan_compiles_for_sm90(n_state, n_rank, dtype, monkeypatch):
    """VMamba's shapes (N = 1, rank 6 at stage 1) and a larger state and rank (N = 4, rank 48)."""
    recorded = _cross_scan_launches(n_state, n_rank, dtype, monkeypatch)
    assert len(recorded) == 6  # forward: segment summaries, carries, outputs; backward: the same on the adjoint
    for kernel, args, kwargs in recorded:
        compiled = compile_launch(kernel, args, kwargs)
        assert '.target sm_90' in compiled.asm['ptx'] and len(compiled.asm['cubin']) > 0


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('k, rows', [(4, 1), (8, 2)])
def test_token_maps_compile_for_sm90(k, rows, dtype):
    """scatter_tokens' and gather_tokens' kernels: VMamba's 4 sequences over one index for the batch, Spectral
    VMamba's 8 per image."""
    from vssm.ops import _triton_token_maps as kernel
    b, d, length = 2, 20, 300
    y, inverse = torch.empty(b, k, d, length, dtype=dtype), torch.zeros(rows, k, length, dtype=torch.int64)
    recorded = record_launches(kernel, ['_merge_kernel', '_gather_kernel'],
                               lambda: (kernel.merge(y, inverse), kernel.gather(y[:, 0], inverse)))
    assert len(recorded) == 2
    for launch in recorded:
        compiled = compile_launch(*launch)
        assert '.target sm_90' in compiled.asm['ptx'] and len(compiled.asm['cubin']) > 0


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('length', [3000, 49], ids=['long-rows', 'short-rows'])
def test_bias_gelu_and_add_residual_compile_for_sm90(dtype, length):
    """bias_gelu's and add_residual's kernels (with and without the bias and the keep mask): rows longer than a
    program, and short rows several to a program."""
    from vssm.ops import _triton_bias_gelu as bias_gelu
    from vssm.ops import _triton_residual as residual
    h, bias, mask = torch.empty(2, 6, length, dtype=dtype), torch.empty(6), torch.empty(2, dtype=dtype)
    x = torch.empty(2, 6, length)
    recorded = record_launches(bias_gelu, ['_bias_gelu_fwd', '_bias_gelu_bwd'], lambda: (
        bias_gelu.forward(h, bias), bias_gelu.backward(torch.empty_like(h), h, bias)))
    for b, m in ((bias, mask), (None, None)):
        recorded += record_launches(residual, ['_residual_fwd', '_residual_bwd'], lambda: (
            residual.forward(x, h, b, m, 0.8), residual.backward(x, dtype, b is not None, m, 0.8)))
    assert len(recorded) == 6
    for launch in recorded:
        compiled = compile_launch(*launch)
        assert '.target sm_90' in compiled.asm['ptx'] and len(compiled.asm['cubin']) > 0
