"""vssm.ops.gather_tokens / scatter_tokens: values by their definition, and hand-written backwards equal to plain
autograd in float64 on every kind of index map (permutations, repeated and skipped positions, sequences shorter or
longer than the token count, one index shared by the batch), gradcheck, opcheck, torch.compile, saved tensors; the
Triton kernel that adds the sequences back over permutations against the plain gather and sum (Triton's interpreter
on the CPU, and on a GPU)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ops.triton_interpreter import run_in_interpreter
from torch._dynamo.backends.debugging import aot_eager

from vssm.ops import gather_tokens, inverse_permutation, plain_autograd, scatter_tokens, token_maps


def _index(kind: str, batch: int, k: int, length: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    if kind == 'permutation':
        return torch.stack([torch.stack([torch.randperm(length, generator=gen) for _ in range(k)])
                            for _ in range(batch)])
    if kind == 'repeats':  # every row repeats some positions and skips others
        return torch.randint(0, length, (batch, k, steps), generator=gen)
    # gaps: one position never read by any sequence, another read by all of them at every other step
    index = torch.randint(1, length, (batch, k, steps), generator=gen)
    index[..., ::2] = length - 1
    return index


def _by_definition(x, y, index, length):
    """Python loops over the definitions in vssm.ops.token_maps."""
    b, d, _ = x.shape
    k, steps = index.shape[1:]
    gathered = torch.zeros(b, k, d, steps, dtype=x.dtype)
    scattered = torch.zeros(b, d, length, dtype=y.dtype)
    for bi in range(b):
        for ki in range(k):
            for i in range(steps):
                p = index[bi if index.shape[0] > 1 else 0, ki, i]
                gathered[bi, ki, :, i] = x[bi, :, p]
                scattered[bi, :, p] += y[bi, ki, :, i]
    return gathered, scattered


def _grads(fn, inp, weight):
    inp = inp.clone().requires_grad_()
    out = fn(inp)
    grad, = torch.autograd.grad((out * weight).sum(), inp)
    return out.detach(), grad


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(['permutation', 'repeats', 'gaps']), batch=st.integers(1, 3), k=st.integers(1, 5),
       length=st.integers(2, 13), extra=st.integers(-1, 3), shared=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_values_and_gradients_equal_plain_autograd(kind, batch, k, length, extra, shared, seed):
    gen = torch.Generator().manual_seed(seed)
    steps = length if kind == 'permutation' else max(1, length + extra)
    index = _index(kind, 1 if shared else batch, k, length, steps, gen)
    d = 3
    x = torch.randn(batch, d, length, dtype=torch.float64, generator=gen)
    y = torch.randn(batch, k, d, steps, dtype=torch.float64, generator=gen)
    gathered, scattered = _by_definition(x, y, index, length)
    inverses = [None] + ([inverse_permutation(index)] if kind == 'permutation' else [])
    for inverse in inverses:
        for fn, inp, expected in ((lambda t: gather_tokens(t, index, inverse), x, gathered),
                                  (lambda t: scatter_tokens(t, index, length, inverse), y, scattered)):
            weight = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
            out, grad = _grads(fn, inp, weight)
            with plain_autograd():
                plain_out, plain_grad = _grads(fn, inp, weight)
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(plain_out, expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grad, plain_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('kind', ['permutation', 'repeats', 'gaps'])
def test_gradcheck_and_gradgradcheck(kind):
    gen = torch.Generator().manual_seed(1)
    index = _index(kind, 2, 3, 7, 9 if kind != 'permutation' else 7, gen)
    steps = index.shape[2]
    inverse = inverse_permutation(index) if kind == 'permutation' else None
    x = torch.randn(2, 2, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 2, steps, dtype=torch.float64, requires_grad=True)
    for fn, inp in ((lambda t: gather_tokens(t, index, inverse), x),
                    (lambda t: scatter_tokens(t, index, 7, inverse), y)):
        assert torch.autograd.gradcheck(fn, (inp, ))
        assert torch.autograd.gradgradcheck(fn, (inp, ))


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    perm = _index('permutation', 2, 3, 6, 6, gen)
    repeats = _index('repeats', 1, 3, 6, 4, gen)
    x = torch.randn(2, 4, 6)
    torch.library.opcheck(torch.ops.vssm.gather_tokens.default, (x, perm, inverse_permutation(perm), 'auto'))
    torch.library.opcheck(torch.ops.vssm.gather_tokens.default, (x, repeats, None, 'auto'))
    torch.library.opcheck(torch.ops.vssm.scatter_tokens.default, (torch.randn(2, 3, 4, 6), perm, 6,
                                                                  inverse_permutation(perm), 'auto'))
    torch.library.opcheck(torch.ops.vssm.scatter_tokens.default, (torch.randn(2, 3, 4, 4), repeats, 6, None, 'torch'))


@pytest.mark.parametrize('inline', [True, False])
def test_saves_only_the_index_maps_and_compiles_fullgraph(inline, monkeypatch):
    """Eager: only the index maps saved. Compiled with fullgraph: the same gradients with the maps inlined as plain
    ops (the default: inductor fuses them) and as the opaque custom ops; a map that repeats tokens too."""
    monkeypatch.setattr(token_maps, 'INLINE_UNDER_COMPILE', inline)
    gen = torch.Generator().manual_seed(3)
    index = _index('permutation', 1, 4, 20, 20, gen)
    inverse = inverse_permutation(index)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = scatter_tokens(gather_tokens(x, index, inverse) * 2, index, 20, inverse)
    assert all(t is index or t is inverse for t in saved) and saved

    def fn(t):
        return scatter_tokens(gather_tokens(t, index, inverse).square(), index, 20, inverse).sum()

    graphs = []

    def backend(gm, inputs):  # records dynamo's graph, then compiles it as aot_eager does
        graphs.append(str(gm.graph))
        return aot_eager(gm, inputs)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    got, = torch.autograd.grad(compiled(x), x)
    expected, = torch.autograd.grad(fn(x), x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(out, 8 * x.detach().flatten(2))
    assert ('vssm.gather_tokens' in graphs[0] and 'vssm.scatter_tokens' in graphs[0]) is not inline
    repeats = _index('repeats', 2, 3, 20, 12, gen)

    def fn_repeats(t):
        return scatter_tokens(gather_tokens(t, repeats).square(), repeats, 20).sum()

    compiled = torch.compile(fn_repeats, backend='aot_eager', fullgraph=True)
    got, = torch.autograd.grad(compiled(x), x)
    expected, = torch.autograd.grad(fn_repeats(x), x)
    torch.testing.assert_close(got, expected)


def test_traces_to_plain_ops_and_rejects_bad_index_maps():
    index = torch.randint(0, 6, (1, 2, 6))
    x = torch.randn(2, 3, 6)
    traced = torch.jit.trace(lambda t: scatter_tokens(gather_tokens(t, index), index, 6), (x, ))
    assert 'vssm::' not in str(traced.graph)
    torch.testing.assert_close(traced(x), scatter_tokens(gather_tokens(x, index), index, 6))
    with pytest.raises(ValueError, match='int64'):
        gather_tokens(x, index.int())
    with pytest.raises(ValueError, match='B or 1'):
        gather_tokens(x, index.expand(3, -1, -1))
    with pytest.raises(ValueError, match='inverse must be'):
        gather_tokens(x, index, index[:, :1])
    with pytest.raises(ValueError, match='does not match'):
        scatter_tokens(torch.randn(2, 3, 3, 6), index, 6)


# (batch, K, D, H, W, batch-wide index): channels and tokens that fill no tile (the kernel's tiles by token count and,
# in the interpreter, 4 x 8 too), one index for the batch and one per image, VMamba's 4 and Spectral VMamba's 8
# sequences
MERGE_SHAPES = [(2, 4, 5, 3, 7, True), (2, 8, 9, 5, 7, False), (1, 3, 17, 1, 130, False)]


def _merge_case(batch, k, d, height, width, shared, dtype, device='cpu', seed=0):
    gen = torch.Generator().manual_seed(seed)
    length = height * width
    index = _index('permutation', 1 if shared else batch, k, length, length, gen)
    y = torch.randn(batch, k, d, length, generator=gen).to(device, dtype)
    return y, index.to(device), inverse_permutation(index).to(device)


@pytest.mark.skipif(token_maps._KERNEL is None or torch.cuda.is_available(),
                    reason='needs Triton; with a GPU the GPU test below runs the kernel')
def test_merge_and_gather_kernels_match_the_plain_ops_in_the_triton_interpreter():
    """The kernels run by Triton's interpreter on CPU tensors (a fresh process), with the module's tiles and small
    ones: the merge in float32 to the last bits, in 16-bit types within one rounding; the gather exactly."""
    from vssm.ops import _triton_token_maps as kernel
    assert [kernel.tiles(n) for n in (49, 196, 3136, 5)] == [(16, 64), (8, 256), (8, 256), (64, 16)]
    script = f"""
import torch
from torch._dynamo.backends.debugging import aot_eager
from vssm.ops import _triton_token_maps as kernel
from vssm.ops.token_maps import inverse_permutation

tiles = kernel.tiles
# the module's tiles in the three dtypes, 4 x 8 tiles (several programs per image and channel block) in float32
for small, dtypes in ((False, ((torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3))),
                      (True, ((torch.float32, 1e-6), ))):
    kernel.tiles = (lambda length: (4, 8)) if small else tiles
    for batch, k, d, height, width, shared in {MERGE_SHAPES!r}:
        gen = torch.Generator().manual_seed(0)
        length = height * width
        rows = 1 if shared else batch
        index = torch.stack([torch.stack([torch.randperm(length, generator=gen) for _ in range(k)])
                             for _ in range(rows)])
        inverse = inverse_permutation(index)
        for dtype, tol in dtypes:
            y = torch.randn(batch, k, d, length, generator=gen).to(dtype)
            got = kernel.merge(y, inverse)
            expected = y.float().gather(3, inverse[:, :, None].expand(batch, k, d, length)).sum(1)
            assert got.dtype == dtype and got.shape == (batch, d, length)
            torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
            # the gather, over the same permutations and over index maps that repeat and skip tokens (fewer steps)
            x = y[:, 0].contiguous()
            for idx in (index, torch.randint(0, length, (rows, k, max(1, length // 2 + 1)), generator=gen)):
                got = kernel.gather(x, idx)
                expected = x[:, None].expand(batch, k, d, length).gather(
                    3, idx[:, :, None].expand(batch, k, d, idx.shape[2]))
                assert got.dtype == dtype and torch.equal(got, expected)
print('ok')
"""
    run_in_interpreter(script, ops_only=True)


def test_the_kernel_runs_only_on_cuda_tensors_of_its_dtypes_and_backends(monkeypatch):
    y = torch.randn(1, 2, 3, 4)
    monkeypatch.setattr(token_maps, '_KERNEL', object())  # as if Triton were importable
    assert not token_maps._kernel_runs(y, 'auto')  # CPU tensor
    cuda_like = torch.empty(1, 2, 3, 4, device='meta')
    monkeypatch.setattr(torch.Tensor, 'is_cuda', property(lambda t: t.device.type == 'meta'))
    assert token_maps._kernel_runs(cuda_like, 'auto') and token_maps._kernel_runs(cuda_like, 'cuda')
    assert not token_maps._kernel_runs(cuda_like, 'torch')
    assert not token_maps._kernel_runs(cuda_like.double(), 'auto')
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '0')
    assert not token_maps._kernel_runs(cuda_like, 'auto')
    with pytest.raises(ValueError, match='backend'):
        scatter_tokens(y, torch.zeros(1, 2, 4, dtype=torch.long), 4, backend='triton')


@pytest.mark.skipif(not torch.cuda.is_available() or token_maps._KERNEL is None, reason='needs a GPU and Triton')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize('shape', MERGE_SHAPES + [(4, 4, 96, 56, 56, True)])
def test_merge_kernel_matches_the_reference_on_gpu(shape, dtype):
    """scatter_tokens with inverse permutations, and gather_tokens' backward (the same merge), kernel against
    ``backend='torch'``: values and gradients."""
    y, index, inverse = _merge_case(*shape, dtype, 'cuda')
    length = index.shape[2]
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    got = scatter_tokens(y, index, length, inverse)
    torch.testing.assert_close(got, scatter_tokens(y, index, length, inverse, backend='torch'), **tol)
    x = torch.randn(y.shape[0], y.shape[2], length, device='cuda', dtype=dtype, requires_grad=True)
    grads = [torch.autograd.grad((gather_tokens(x, index, inverse, backend=backend) * y).sum(), x)[0]
             for backend in ('auto', 'torch')]
    torch.testing.assert_close(*grads, **tol)


@pytest.mark.skipif(not torch.cuda.is_available() or token_maps._KERNEL is None, reason='needs a GPU and Triton')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('shape', MERGE_SHAPES + [(4, 4, 96, 56, 56, True)])
def test_gather_kernel_matches_the_reference_on_gpu(shape, dtype):
    """gather_tokens (over the permutations, and over maps that repeat and skip tokens) and scatter_tokens' backward
    (the same gather), kernel against ``backend='torch'``: exactly equal values and gradients."""
    y, index, inverse = _merge_case(*shape, dtype, 'cuda')
    batch, k, d, length = y.shape
    x = torch.randn(batch, d, length, device='cuda', dtype=dtype)
    repeats = torch.randint(0, length, (index.shape[0], k, length // 2 + 1), device='cuda')
    for idx, inv in ((index, inverse), (repeats, None)):
        got = gather_tokens(x, idx, inv)
        assert torch.equal(got, gather_tokens(x, idx, inv, backend='torch'))
        leaf = torch.randn(batch, k, d, idx.shape[2], device='cuda', dtype=dtype, requires_grad=True)
        grads = [torch.autograd.grad((scatter_tokens(leaf, idx, length, inv, backend=backend) * x).sum(), leaf)[0]
                 for backend in ('auto', 'torch')]
        assert torch.equal(*grads)
