"""vssm.ops.selective_scan's dispatch: inputs the kernel cannot take (state size N > KERNEL_MAX_STATE, float64) go to
the reference under backend='auto' and fail with the limit named under backend='cuda' (CPU: the kernel is stubbed)."""
import importlib

import pytest
import torch

from vssm.ops import selective_scan, selective_scan_ref

scan_module = importlib.import_module('vssm.ops.selective_scan')  # the module (vssm.ops exports the function)


def _inputs(n: int, dtype=torch.float32):
    torch.manual_seed(0)
    u, delta = torch.randn(2, 4, 9, dtype=dtype), torch.randn(2, 4, 9, dtype=dtype)
    A = -torch.rand(4, n, dtype=dtype) - 0.5
    B, C = torch.randn(2, 1, n, 9, dtype=dtype), torch.randn(2, 1, n, 9, dtype=dtype)
    return u, delta, A, B, C


@pytest.fixture
def stub_kernel(monkeypatch):
    """The kernel path 'available' on CPU tensors; a call that reaches it records its state size."""
    calls = []
    monkeypatch.setattr(scan_module, 'resolve_backend', lambda backend, *args: 'cuda')
    monkeypatch.setattr(scan_module, '_selective_scan_cuda',
                        lambda u, delta, A, *rest: calls.append(A.shape[1]) or torch.zeros(u.shape))
    return calls


@pytest.mark.parametrize('n', [1, scan_module.KERNEL_MAX_STATE])
def test_state_sizes_the_kernel_takes_go_to_it(stub_kernel, n):
    selective_scan(*_inputs(n), backend='auto')
    assert stub_kernel == [n]


def test_larger_states_and_float64_go_to_the_reference_under_auto(stub_kernel):
    for n, dtype in ((scan_module.KERNEL_MAX_STATE + 1, torch.float32), (2, torch.float64)):
        inputs = _inputs(n, dtype)
        torch.testing.assert_close(selective_scan(*inputs, backend='auto'), selective_scan_ref(*inputs))
    assert stub_kernel == []


def test_backend_cuda_names_the_limit(stub_kernel):
    with pytest.raises(ValueError, match=f'state size N <= {scan_module.KERNEL_MAX_STATE}, got N = 17'):
        selective_scan(*_inputs(17), backend='cuda')
    with pytest.raises(ValueError, match='float64'):
        selective_scan(*_inputs(2, torch.float64), backend='cuda')


def test_the_limit_matches_the_kernel_source():
    from pathlib import Path
    header = Path(__file__).resolve().parents[2] / 'kernels/selective_scan/csrc/selective_scan.h'
    assert f'constexpr int kMaxState = {scan_module.KERNEL_MAX_STATE};' in header.read_text()
