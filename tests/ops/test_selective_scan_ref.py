"""The pure-PyTorch selective scan: against a naive loop, by hand, gradcheck, upstream fixtures, errors."""
import math

import pytest
import torch
from conftest import DEVICES
from fixture_utils import load_fixture, rel_err
from ops.naive import naive_scan

from vssm.ops import linear_scan, selective_scan, selective_scan_ref


def random_inputs(bt=2, d=6, n=1, length=17, groups=1, with_c=True, dtype=torch.float32, device='cpu'):
    kw = dict(dtype=dtype, device=device)
    inputs = dict(
        u=torch.randn(bt, d, length, **kw),
        delta=torch.randn(bt, d, length, **kw) - 1,
        A=-torch.rand(d, n, device=device) - 0.2,
        B=torch.randn(bt, groups, n, length, **kw),
        delta_bias=torch.rand(d, device=device) - 2,
    )
    if with_c:
        inputs.update(C=torch.randn(bt, groups, n, length, **kw), D=torch.rand(d, device=device) + 0.5)
    return inputs


@pytest.mark.parametrize('length', [1, 2, 3, 7, 49, 129, 300])
def test_linear_scan_matches_loop(length):
    a, b = torch.rand(3, 4, length, dtype=torch.float64), torch.randn(3, 4, length, dtype=torch.float64)
    h, expected = torch.zeros(3, 4, dtype=torch.float64), []
    for t in range(length):
        h = a[..., t] * h + b[..., t]
        expected.append(h)
    torch.testing.assert_close(linear_scan(a, b), torch.stack(expected, -1), rtol=1e-12, atol=1e-12)


def test_state_form_worked_by_hand():
    # D=1, N=1, L=3, A=-ln2 so exp(dt*A) = 2^-dt; no softplus, dt = 1: h = [1*1*1, 0.5*1 + 2, 0.5*2.5 + 3]
    u = torch.tensor([[[1.0, 2.0, 3.0]]])
    delta = torch.ones(1, 1, 3)
    A = torch.tensor([[-math.log(2.0)]])
    B = torch.ones(1, 1, 3)
    h = selective_scan(u, delta, A, B, delta_softplus=False)
    torch.testing.assert_close(h, torch.tensor([[[[1.0, 2.5, 4.25]]]]))
    # Output form with C = 2 and D = 10: y = 2 h + 10 u
    y = selective_scan(u, delta, A, B, C=2 * torch.ones(1, 1, 3), D=torch.tensor([10.0]), delta_softplus=False)
    torch.testing.assert_close(y, torch.tensor([[[12.0, 25.0, 38.5]]]))


@pytest.mark.parametrize('form', ['state', 'output'])
@pytest.mark.parametrize('n, groups, length', [(1, 1, 1), (1, 1, 33), (3, 2, 19), (2, 3, 64)])
@pytest.mark.parametrize('device', DEVICES)
def test_matches_naive_loop(form, n, groups, length, device):
    inputs = random_inputs(d=6, n=n, length=length, groups=groups, with_c=form == 'output', device=device)
    got = selective_scan(**inputs, backend='torch')
    expected = naive_scan(**{k: v.cpu().double() for k, v in inputs.items()})
    torch.testing.assert_close(got.cpu().double(), expected, rtol=2e-5, atol=2e-5)
    assert got.dtype == torch.float32


@pytest.mark.parametrize('form', ['state', 'output'])
def test_gradcheck_float64(form):
    inputs = random_inputs(bt=2, d=4, n=2, length=9, groups=2, with_c=form == 'output', dtype=torch.float64)
    inputs['A'], inputs['delta_bias'] = inputs['A'].double(), inputs['delta_bias'].double()
    if form == 'output':
        inputs['D'] = inputs['D'].double()
    inputs['delta'][0, 0, 0] = 25.0  # softplus' linear branch
    names = list(inputs)
    tensors = [inputs[k].requires_grad_() for k in names]

    def fn(*args):
        return selective_scan_ref(**dict(zip(names, args)))

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_three_dim_b_means_one_shared_group():
    inputs = random_inputs(groups=1, with_c=False)
    b3 = inputs['B'][:, 0]  # (Bt, N, L)
    torch.testing.assert_close(selective_scan(**{**inputs, 'B': b3}), selective_scan(**inputs))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    inputs = random_inputs(length=200, dtype=dtype)
    got = selective_scan(**inputs)
    assert got.dtype == torch.float32
    reference = selective_scan(**{k: v.float() for k, v in inputs.items()})  # same (rounded) values, fp32
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_half_gradients_have_input_dtype():
    inputs = random_inputs(dtype=torch.bfloat16)
    for key in ('u', 'delta', 'B', 'C'):
        inputs[key].requires_grad_()
    selective_scan(**inputs).sum().backward()
    for key in ('u', 'delta', 'B', 'C'):
        assert inputs[key].grad.dtype == torch.bfloat16


def test_non_contiguous_inputs():
    inputs = random_inputs(d=6, length=20)
    big_u = torch.randn(2, 20, 12).transpose(1, 2)  # (Bt, 12, L), non-contiguous
    u = big_u[:, ::2]
    expected = selective_scan(**{**inputs, 'u': u.contiguous()})
    torch.testing.assert_close(selective_scan(**{**inputs, 'u': u}), expected)


@pytest.mark.parametrize('case', ['state_small', 'state_long', 'output_small', 'output_long', 'output_small_n3'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_upstream_fixture(case, dtype):
    fixture = load_fixture('selective_scan')
    data = fixture['cases'][case]
    tol = fixture['tolerances']['float32_vs_float64' if dtype == torch.float32 else 'float64_vs_float64']
    inputs = {k: v.to(dtype).clone().requires_grad_() for k, v in data['inputs'].items()}
    out = selective_scan(**inputs, delta_softplus=data['delta_softplus'])
    (out * data['dout'].to(out.dtype)).sum().backward()
    expected = data['float64']
    assert rel_err(out, expected['out']) < tol
    for name, tensor in inputs.items():
        assert rel_err(tensor.grad, expected[f'd_{name}']) < tol, name


@pytest.mark.parametrize('change, message', [
    (dict(u=torch.randn(2, 6)), 'u must be'),
    (dict(delta=torch.randn(2, 6, 5)), 'delta must have the shape'),
    (dict(A=torch.randn(5, 1)), 'A must be'),
    (dict(B=torch.randn(2, 4, 1, 17)), 'divisible by the number of B/C groups'),
    (dict(B=torch.randn(2, 1, 1, 16)), 'B must be'),
    (dict(delta_bias=torch.randn(5)), 'delta_bias must be'),
])
def test_bad_shapes_raise_clear_errors(change, message):
    inputs = random_inputs(with_c=False)
    with pytest.raises(ValueError, match=message):
        selective_scan(**{**inputs, **change})


def test_skip_term_needs_output_form():
    inputs = random_inputs(with_c=False)
    with pytest.raises(ValueError, match='only exists in the output-returning form'):
        selective_scan(**inputs, D=torch.ones(6))


def test_unknown_backend_and_missing_kernel():
    inputs = random_inputs()
    with pytest.raises(ValueError, match='Unknown ops backend'):
        selective_scan(**inputs, backend='triton')
    from conftest import has_kernel
    if not has_kernel('selective_scan'):
        with pytest.raises(RuntimeError, match='pip install --no-build-isolation -v kernels/selective_scan'):
            selective_scan(**inputs, backend='cuda')
