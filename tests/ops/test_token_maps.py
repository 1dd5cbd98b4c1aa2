"""vssm.ops.gather_tokens / scatter_tokens: values by their definition, and hand-written backwards equal to plain
autograd in float64 on every kind of index map (permutations, repeated and skipped positions, sequences shorter or
longer than the token count, one index shared by the batch), gradcheck, opcheck, torch.compile, saved tensors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vssm.ops import gather_tokens, inverse_permutation, plain_autograd, scatter_tokens


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
    torch.library.opcheck(torch.ops.vssm.gather_tokens.default, (x, perm, inverse_permutation(perm)))
    torch.library.opcheck(torch.ops.vssm.gather_tokens.default, (x, repeats, None))
    torch.library.opcheck(torch.ops.vssm.scatter_tokens.default, (torch.randn(2, 3, 4, 6), perm, 6,
                                                                  inverse_permutation(perm)))
    torch.library.opcheck(torch.ops.vssm.scatter_tokens.default, (torch.randn(2, 3, 4, 4), repeats, 6, None))


def test_saves_only_the_index_maps_and_compiles_fullgraph():
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

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend='aot_eager', fullgraph=True)
    got, = torch.autograd.grad(compiled(x), x)
    expected, = torch.autograd.grad(fn(x), x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(out, 8 * x.detach().flatten(2))


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
