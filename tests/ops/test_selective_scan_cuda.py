"""CUDA selective scan against the PyTorch reference: outputs and every gradient, per dtype, at the models'
exact stage shapes, odd sizes, non-contiguous inputs, random shapes; opcheck and torch.compile."""
import random

import pytest
import torch
from conftest import has_kernel
from fixture_utils import rel_err
from ops.shapes import scan_cases

from vssm.ops import selective_scan

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and has_kernel('selective_scan')),
                                reason='needs a GPU and the built kernel: see kernels/README.md')

# max|kernel - reference| / max|reference|. Both compute in float32 from the same (rounded) inputs, so outputs
# agree to float32 summation order; gradients of fp16/bf16 inputs are rounded to that dtype.
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
GRAD_TOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_inputs(bt, d, length, n=1, groups=1, form='state', dtype=torch.float32, seed=0):
    g = torch.Generator(device='cuda').manual_seed(seed)
    kw = dict(device='cuda', generator=g)
    inputs = dict(
        u=torch.randn(bt, d, length, **kw).to(dtype),
        delta=(torch.randn(bt, d, length, **kw) * 0.5 - 1).to(dtype),
        A=-(torch.rand(d, n, **kw) + 0.1),
        B=torch.randn(bt, groups, n, length, **kw).to(dtype),
        delta_bias=torch.rand(d, **kw) - 2.5,
    )
    if form == 'output':
        inputs['C'] = torch.randn(bt, groups, n, length, **kw).to(dtype)
        inputs['D'] = torch.rand(d, **kw) + 0.5
    return inputs


def compare(inputs, seed=1):
    leaves_k = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    leaves_r = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out_k = selective_scan(**leaves_k, backend='cuda')
    out_r = selective_scan(**leaves_r, backend='torch')
    dtype = inputs['u'].dtype
    assert out_k.dtype == torch.float32 and out_k.shape == out_r.shape
    assert rel_err(out_k, out_r) < OUT_TOL[dtype], ('out', rel_err(out_k, out_r))
    dout = torch.randn(out_r.shape, device='cuda', generator=torch.Generator('cuda').manual_seed(seed))
    (out_k * dout).sum().backward()
    (out_r * dout).sum().backward()
    for key in inputs:
        gk, gr = leaves_k[key].grad, leaves_r[key].grad
        assert gk.dtype == gr.dtype and gk.shape == gr.shape, key
        tol = GRAD_TOL[dtype] if key in ('u', 'delta', 'B', 'C') else GRAD_TOL[torch.float32] * 10
        assert rel_err(gk, gr) < tol, (key, rel_err(gk, gr))


@pytest.mark.parametrize('case', scan_cases(), ids=lambda c: '-'.join(map(str, c[:4])))
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_model_stage_shapes(case, dtype):
    form, _, _, _, d, groups, length = case
    compare(make_inputs(1, d, length, groups=groups, form=form, dtype=dtype))


@pytest.mark.parametrize('form', ['state', 'output'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('length', [1, 2, 49, 129, 255, 256, 257, 3136])
def test_odd_lengths(form, dtype, length):
    compare(make_inputs(2, 24, length, groups=4 if form == 'output' else 1, form=form, dtype=dtype))


@pytest.mark.parametrize('n', [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize('form', ['state', 'output'])
def test_state_sizes(n, form):
    compare(make_inputs(2, 16, 300, n=n, groups=2, form=form))


def test_no_bias_no_softplus_no_skip():
    inputs = make_inputs(2, 16, 100, form='output')
    inputs.pop('delta_bias')
    inputs.pop('D')
    inputs['delta'] = inputs['delta'].abs()  # without softplus a negative step makes the recurrence explode
    for softplus in (True, False):
        out_k = selective_scan(**inputs, delta_softplus=softplus, backend='cuda')
        out_r = selective_scan(**inputs, delta_softplus=softplus, backend='torch')
        assert rel_err(out_k, out_r) < 2e-5


def test_non_contiguous_inputs():
    inputs = make_inputs(2, 32, 200, form='output', groups=2)
    wide = torch.randn(2, 64, 200, device='cuda')
    inputs['u'] = wide[:, ::2]  # stride 2 along D
    inputs['delta'] = torch.randn(2, 200, 32, device='cuda').transpose(1, 2)  # stride 32 along L
    compare(inputs)


def test_large_batch_many_channels():
    compare(make_inputs(8, 1024, 196, form='state'))


def test_random_shapes():
    rng = random.Random(0)
    for trial in range(300):
        form = rng.choice(['state', 'output'])
        groups = rng.choice([1, 2, 4])
        d = groups * rng.randint(1, 24)
        n = rng.choice([1, 1, 1, 2, 4, 7])
        length = rng.choice([rng.randint(1, 40), rng.randint(1, 700), rng.randint(1, 5000)])
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        compare(make_inputs(rng.randint(1, 3), d, length, n=n, groups=groups, form=form, dtype=dtype, seed=trial),
                seed=trial)


@pytest.mark.parametrize('form', ['state', 'output'])
def test_opcheck(form):
    inputs = make_inputs(2, 8, 70, form=form, groups=2)
    args = (inputs['u'], inputs['delta'], inputs['A'], inputs['B'], inputs.get('C'), inputs.get('D'),
            inputs['delta_bias'], True)
    args = tuple(a.requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    torch.library.opcheck(torch.ops.vssm_selective_scan.fwd.default, args)


def test_torch_compile_matches_eager():
    inputs = make_inputs(2, 16, 300, form='output', groups=4)

    def fn(u, delta, A, B, C, D, delta_bias):
        return selective_scan(u, delta, A, B, C, D, delta_bias, backend='cuda').square().sum()

    eager = fn(**inputs)
    compiled = torch.compile(fn, fullgraph=True)(**inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_cuda_backend_rejects_float64():
    inputs = {k: v.double() for k, v in make_inputs(1, 4, 10).items()}
    with pytest.raises(ValueError, match='CUDA kernel takes'):
        selective_scan(**inputs, backend='cuda')
    assert selective_scan(**inputs).dtype == torch.float64  # 'auto' keeps it on the reference
