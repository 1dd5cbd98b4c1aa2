"""vssm.ops.add_residual: the Triton kernel against float64 autograd (in Triton's interpreter on the CPU, and on a
GPU) and against the plain composition in 16 bits, DropPath's mask as mmcv draws it, the dispatch, errors, and
VMamba's block with fc2's bias folded into the residual against the plain composition."""
import textwrap

import pytest
import torch
from conftest import GRAD_TOLERANCES, TOLERANCES
from mmcv.cnn.bricks import DropPath
from ops.triton_interpreter import run_in_interpreter

from vssm.ops import add_residual, add_residual_ref
from vssm.ops.residual import drop_path_mask, kernel_available, kernel_runs

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and kernel_available()), reason='needs a GPU and Triton')

SHAPES = [(2, 5, 3, 7), (3, 96, 9, 11), (4, 384, 7, 7), (2, 17, 56, 56)]


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '1')


@pytest.mark.skipif(not kernel_available() or torch.cuda.is_available(),
                    reason='needs Triton; with a GPU the GPU tests below run the kernels')
def test_kernel_matches_float64_autograd_in_the_triton_interpreter():
    """The kernels in Triton's interpreter: float32 maps against float64 autograd, a float32 stream plus a bfloat16
    branch against the plain composition in those dtypes; with and without the bias and the keep mask (one image
    dropped), rows spanning several programs."""
    script = textwrap.dedent('''
        import itertools
        import torch
        from vssm.ops import _triton_residual as kernel, _triton_common as common
        torch.manual_seed(0)
        common.MIN_ROW_BLOCK = common.MAX_ROW_BLOCK = 16
        common.ROW_TILE = 64  # 4 rows per program: programs over several rows, the last one partial
        b, c, length = 3, 5, 21
        for has_bias, has_mask in itertools.product((False, True), repeat=2):
            x, y, g = torch.randn(b, c, length), torch.randn(b, c, length), torch.randn(b, c, length)
            bias = torch.randn(c) if has_bias else None
            mask, keep = (torch.tensor([1., 0., 1.]), 0.7) if has_mask else (None, 1.)

            def ref(x, y, bias):
                t = y if bias is None else y + bias.to(y.dtype)[:, None]
                t = t if mask is None else t.div(keep) * mask.to(y.dtype)[:, None, None]
                return x + t

            leaves = [t.double().requires_grad_() for t in (x, y)] + ([bias.double().requires_grad_()]
                                                                       if has_bias else [])
            want = ref(leaves[0], leaves[1], leaves[2] if has_bias else None)
            grads = torch.autograd.grad(want, leaves, g.double())
            out = kernel.forward(x, y, bias, mask, keep)
            dy, db = kernel.backward(g, torch.float32, has_bias, mask, keep)
            got = [out, dy] + ([db] if has_bias else [])
            for name, a, e in zip(('out', 'dy', 'db'), got, [want.detach(), grads[1]] + list(grads[2:])):
                err = ((a.double() - e).norm() / e.norm()).item()
                assert err < 1e-6, (has_bias, has_mask, name, err)
            # a float32 stream plus a bfloat16 branch
            yb, gb = y.bfloat16(), g
            mask_b = None if mask is None else mask.bfloat16()
            yr = yb.clone().requires_grad_()
            br = None if bias is None else bias.clone().requires_grad_()
            mask = mask_b
            want = ref(x, yr, br)
            grads = torch.autograd.grad(want, [yr] + ([br] if has_bias else []), gb)
            out = kernel.forward(x, yb, bias, mask_b, keep)
            dy, db = kernel.backward(gb, torch.bfloat16, has_bias, mask_b, keep)
            assert out.dtype == torch.float32 and dy.dtype == torch.bfloat16
            torch.testing.assert_close(out, want.detach(), rtol=3e-2, atol=5e-2)
            torch.testing.assert_close(dy, grads[0], rtol=3e-2, atol=5e-2)
            if has_bias:  # summed in float32 (the reference's bfloat16 sum rounds)
                torch.testing.assert_close(db, dy.double().sum((0, 2)).float(), rtol=1e-5, atol=1e-5)
        print('ok')
        ''')
    run_in_interpreter(script, ops_only=True)


def test_drop_path_mask_draws_as_mmcv():
    """The same random numbers as mmcv's drop_path, so that the kernel's result equals DropPath's."""
    drop = DropPath(0.3).train()
    y = torch.randn(6, 4, 3, 3)
    torch.manual_seed(5)
    want = drop(y)
    torch.manual_seed(5)
    mask, keep = drop_path_mask(drop, y)
    assert keep == pytest.approx(0.7) and mask.shape == (6, )
    torch.testing.assert_close(add_residual_ref(torch.zeros_like(y), y, None, mask, keep), want, rtol=0, atol=0)
    assert drop_path_mask(drop.eval(), y) == (None, 1.)
    assert drop_path_mask(torch.nn.Identity(), y) == (None, 1.)


def test_cpu_tensors_and_the_switch_take_the_reference(monkeypatch):
    x, y, bias = torch.randn(2, 6, 3, 4), torch.randn(2, 6, 3, 4), torch.randn(6)
    assert torch.equal(add_residual(x, y, None, bias), x + (y + bias[:, None, None]))
    compiled = torch.compile(lambda a, b: add_residual(a, b, None, bias), backend='aot_eager', fullgraph=True)
    torch.testing.assert_close(compiled(x, y), x + (y + bias[:, None, None]))
    fake_cuda = type('FakeCuda', (), {'is_cuda': True, 'dtype': torch.bfloat16})()
    assert kernel_runs(fake_cuda) is kernel_available() and not kernel_runs(fake_cuda, 'torch')
    assert not kernel_runs(y)
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '0')
    assert not kernel_runs(fake_cuda)


def test_a_float64_stream_takes_the_reference(monkeypatch):
    """The kernel computes in float32: where the dispatch would take it for the branch, a float64 residual stream
    still gets the reference (its sum in float64)."""
    import vssm.ops.residual as residual

    def no_kernel(*args):
        raise AssertionError('the kernel ran on a float64 stream')

    monkeypatch.setattr(residual, 'kernel_runs', lambda y, backend='auto': True)
    monkeypatch.setattr(residual._AddResidual, 'apply', no_kernel)
    x, y = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5)
    out = add_residual(x, y)
    assert out.dtype == torch.float64 and torch.equal(out, x + y)


def test_errors():
    with pytest.raises(ValueError, match=r'expected x and y of one shape'):
        add_residual(torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 3))
    with pytest.raises(ValueError, match=r'\(B, C, H, W\) with a bias'):
        add_residual(torch.randn(2, 6, 4), torch.randn(2, 6, 4), None, torch.randn(6))
    with pytest.raises(ValueError, match=r'bias \(C,\)'):
        add_residual(torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4), None, torch.randn(5))
    with pytest.raises(ValueError, match='Unknown ops backend'):
        add_residual(torch.randn(1, 6, 2, 2), torch.randn(1, 6, 2, 2), backend='triton')


@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_vmamba_block_with_the_folded_biases_matches_the_plain_composition(monkeypatch, training):
    """VSSBlock with fc1's bias in GELU's pass and fc2's in the residual's (here on the reference, standing in for
    the kernels): the values and every gradient of x + DropPath(op(norm(x))); x + DropPath(mlp(norm2(x))) in
    float64, the DropPath masks drawn from the same seed."""
    import vssm.models.vmamba as vmamba
    from vssm.models.vmamba import SS2D, VSSBlock

    monkeypatch.setattr(vmamba, 'residual_runs', lambda x, backend: True)
    monkeypatch.setattr(vmamba, 'bias_gelu_runs', lambda x, backend: True)
    torch.manual_seed(0)
    block = VSSBlock(8, 0.4, 2.0, False, SS2D(8, d_state=1, ssm_ratio=1.0, backend='torch')).double()
    block.train(training)
    for p in block.parameters():
        p.data.normal_(0, 0.5)
    x = torch.randn(4, 8, 5, 6, dtype=torch.float64, requires_grad=True)

    def plain(x):
        import torch.nn.functional as F
        mlp = block.mlp
        x = x + block.drop_path(block.op(block.norm(x)))
        return x + block.drop_path(mlp.fc2(F.gelu(mlp.fc1(block.norm2(x)))))

    params = [x, *block.parameters()]
    torch.manual_seed(1)
    want = plain(x)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, params, grad)
    torch.manual_seed(1)
    out = block(x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    for got, exp in zip(torch.autograd.grad(out, params, grad), want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-11)


@needs_gpu
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize('has_bias, dropped', [(False, False), (True, False), (True, True), (False, True)],
                         ids=['plain', 'bias', 'bias-droppath', 'droppath'])
def test_kernel_matches_the_reference_on_gpu(shape, dtype, has_bias, dropped):
    """A float32 stream plus a branch in ``dtype`` against the plain composition in those dtypes."""
    torch.manual_seed(0)
    x = torch.randn(shape, device='cuda', requires_grad=True)
    y = torch.randn(shape, device='cuda').to(dtype).requires_grad_()
    bias = torch.randn(shape[1], device='cuda', requires_grad=True) if has_bias else None
    drop = DropPath(0.5).train() if dropped else None
    torch.manual_seed(3)
    out = add_residual(x, y, drop, bias, backend='cuda')
    torch.manual_seed(3)
    ref = add_residual(x, y, drop, bias, backend='torch')
    grad = torch.randn_like(out)
    leaves = [x, y] + ([bias] if has_bias else [])
    got, want = torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)
    (rtol, atol), (grtol, gatol) = TOLERANCES[dtype], GRAD_TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=grtol, atol=gatol)
    if has_bias:
        torch.testing.assert_close(got[2], want[2], rtol=grtol, atol=gatol)
    assert out.dtype == torch.float32 and got[1].dtype == dtype


@needs_gpu
@pytest.mark.parametrize('shape', [(4, 7, 9, 64), (3, 50, 96)], ids=['channels-last', 'tokens'])
def test_any_layout_without_a_bias_on_gpu(shape):
    """Channels-last maps (and token sequences): DropPath's factor per image, no bias."""
    torch.manual_seed(0)
    x = torch.randn(shape, device='cuda', requires_grad=True)
    y = torch.randn(shape, device='cuda').bfloat16().requires_grad_()
    drop = DropPath(0.5).train()
    torch.manual_seed(3)
    out = add_residual(x, y, drop, backend='cuda')
    torch.manual_seed(3)
    ref = add_residual(x, y, drop, backend='torch')
    grad = torch.randn_like(out)
    (rtol, atol), (grtol, gatol) = TOLERANCES[torch.bfloat16], GRAD_TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for got, want in zip(torch.autograd.grad(out, (x, y), grad), torch.autograd.grad(ref, (x, y), grad)):
        torch.testing.assert_close(got, want, rtol=grtol, atol=gatol)
