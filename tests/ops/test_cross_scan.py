"""vssm.ops.cross_selective_scan (VMamba's and Spectral VMamba's SSM core): the Triton kernel against float64 autograd
(in Triton's interpreter on the CPU, and on a GPU against the reference in fp32 and under bf16 autocast), its custom
ops under ``torch.library.opcheck`` and ``torch.compile`` (in the interpreter); the CUDA scan's cross form (values and
gradients) against its reference on a GPU and its glue on the CPU; the dispatch, errors."""
import textwrap

import pytest
import torch
from conftest import GRAD_TOLERANCES, TOLERANCES
from ops.triton_interpreter import run_in_interpreter

from vssm.models.vmamba import cross_scan_index
from vssm.ops import cross_scan, cross_selective_scan, cross_selective_scan_ref, inverse_permutation
from vssm.ops.cross_scan import cross_form_ref, kernel_available
from vssm.ops.selective_scan import cross_form_available

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and kernel_available()), reason='needs a GPU and Triton')
needs_cross_form = pytest.mark.skipif(not (torch.cuda.is_available() and cross_form_available()),
                                      reason='needs a GPU and the selective_scan kernel')


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '1')
    monkeypatch.setenv('VSSM_CROSS_FORM', '1')


def _permutations(b, k, length, generator):
    return torch.stack([torch.stack([torch.randperm(length, generator=generator) for _ in range(k)])
                        for _ in range(b)])


def _inputs(b, d, h, w, k, rank, n_state, per_batch, device='cpu', seed=0):
    """x, index, inverse, x_proj_weight, dt_weight, dt_bias, A, Ds (VMamba's four directions, or per-batch random
    permutations as Spectral VMamba's orders)."""
    g = torch.Generator().manual_seed(seed)
    length = h * w
    if per_batch:
        index = _permutations(b, k, length, g)
        inverse = inverse_permutation(index)
    else:
        index, inverse = cross_scan_index(h, w, 'cpu')
    x = torch.randn(b, d, length, generator=g)
    x_proj = torch.randn(k, rank + 2 * n_state, d, generator=g) / d**0.5
    dt_w = torch.randn(k, d, rank, generator=g) / rank**0.5
    dt_bias = torch.rand(k, d, generator=g) * 4 - 6  # softplus^-1 of VMamba's initial step sizes
    A = -torch.rand(k * d, n_state, generator=g) * 4 - 0.2
    Ds = torch.randn(k * d, generator=g)
    return [t.to(device) for t in (x, index, inverse, x_proj, dt_w, dt_bias, A, Ds)]


INTERPRETER_CASE = '''
import torch
from vssm.ops import _triton_cross_scan as kernel
from vssm.ops import gather_tokens, plain_autograd, scatter_tokens, selective_scan

def check(b, d, h, w, k, r, n, per_batch, programs_per_sm=kernel.PROGRAMS_PER_SM, tile=kernel.TILE_ELEMENTS):
    kernel.PROGRAMS_PER_SM = programs_per_sm  # the interpreter counts one multiprocessor: more programs, more segments
    kernel.TILE_ELEMENTS = tile
    torch.manual_seed(0)
    length = h * w
    if per_batch:  # index maps that differ per image
        index = torch.stack([torch.stack([torch.randperm(length) for _ in range(k)]) for _ in range(b)])
    else:  # VMamba's four directions (imports the models: not in an ops_only run)
        from vssm.models.vmamba import cross_scan_index
        index = cross_scan_index(h, w, 'cpu')[0]
    x = torch.randn(b, d, length)
    dbl = torch.randn(b, k, r + 2 * n, length)
    dtw, bias = torch.randn(k, d, r) * 0.5, torch.randn(k * d) - 2
    A, Ds = -torch.rand(k * d, n) * 2 - 0.1, torch.randn(k * d)
    out, states = kernel.forward(x, dbl, index, dtw, bias, A, Ds)
    g = torch.randn(b, d, length)
    grads = kernel.backward(g, x, dbl, index, dtw, bias, A, Ds, states)
    leaves = [t.double().requires_grad_() for t in (x, dbl, dtw, bias, A, Ds)]
    xx, dd, ww, bb, aa, ss = leaves
    with plain_autograd():  # the composition, differentiated by autograd
        xs = gather_tokens(xx, index)
        dts, Bs, Cs = torch.split(dd.gather(3, index[:, :, None].expand(b, k, r + 2 * n, length)), [r, n, n], 2)
        y = selective_scan(xs.reshape(b, k * d, length), torch.matmul(ww, dts).reshape(b, k * d, length), aa, Bs,
                           Cs, ss, bb, True, backend='torch')
        ref = scatter_tokens(y.view(b, k, d, length), index, length)
    expected = [ref.detach(), *torch.autograd.grad(ref, leaves, g.double())]
    for name, got, want in zip(['out', 'x', 'dbl', 'dt_weight', 'dt_bias', 'A', 'Ds'], (out, *grads), expected):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1e-5, (b, d, h, w, k, r, n, name, err)
'''


@pytest.mark.skipif(not kernel_available() or torch.cuda.is_available(),
                    reason='needs Triton; with a GPU the GPU tests below run the kernels')
@pytest.mark.parametrize('cases', [
    # two per-image orders (Spectral VMamba's case) on an odd, non-square map (256-element tiles: 16 steps, three of
    # them), 5 channels (not a multiple of the 16 per program); each sequence cut into two segments (two tiles walked
    # in order, then one). The interpreter's time goes to the associative scans: few programs and small tiles here.
    [(1, 5, 3, 11, 2, 3, 1, True, 4, 256)],
    pytest.param([
        (1, 5, 3, 23, 4, 3, 2, False),  # VMamba's four directions, one segment of three tiles
        (1, 5, 3, 23, 4, 3, 2, False, 8),  # and cut into two segments
        (2, 5, 3, 5, 4, 3, 1, False),  # one tile: nothing carried
        (1, 16, 10, 20, 4, 2, 1, False, 16),  # four tiles of 64 steps, one per segment
        (1, 16, 20, 30, 4, 2, 1, False, 12),  # ten tiles in three segments (4, 4, 2)
        (2, 18, 2, 3, 2, 3, 2, True),  # per-image permutations, two channel blocks
        (2, 7, 5, 7, 3, 5, 3, True, 100),  # per-image permutations, N = 3 (three tiles of 16, one per segment), K = 3
        (1, 16, 5, 7, 4, 17, 1, False),  # rank 17: the step sizes through tl.dot
    ], marks=pytest.mark.slow)], ids=['tiles-and-segments', 'more-shapes'])
def test_kernel_matches_float64_autograd_in_the_triton_interpreter(cases):
    """The kernels run by Triton's interpreter on CPU tensors, fp32, against the composition in float64 (a fresh
    process: the interpreter is chosen when Triton is imported)."""
    script = INTERPRETER_CASE + ''.join(f'check{case!r}\n' for case in cases) + "print('ok')\n"
    run_in_interpreter(textwrap.dedent(script), ops_only=all(case[7] for case in cases))  # per-image orders only


OPS_CASE = '''
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs
from vssm.ops import cross_scan, cross_selective_scan, inverse_permutation
from vssm.models.vmamba import cross_scan_index

# the kernel wherever it may run but on CPU tensors (Triton's interpreter)
cross_scan._use_kernel = lambda backend, x, index, inverse, merge, n_state, *_: (
    backend != 'torch' and inverse is not None and merge is None)

def inputs(b, d, h, w, k, r, n, per_batch):
    """index, inverse and the leaves x, x_proj_weight, dt_weight, dt_bias, A, Ds."""
    g = torch.Generator().manual_seed(0)
    length = h * w
    if per_batch:  # index maps that differ per image
        index = torch.stack([torch.stack([torch.randperm(length, generator=g) for _ in range(k)]) for _ in range(b)])
    else:
        index = cross_scan_index(h, w, 'cpu')[0]
    x = torch.randn(b, d, length, generator=g)
    x_proj = torch.randn(k, r + 2 * n, d, generator=g) / d**0.5
    dt_w = torch.randn(k, d, r, generator=g) / r**0.5
    dt_bias = torch.rand(k, d, generator=g) * 4 - 6
    A = -torch.rand(k * d, n, generator=g) * 4 - 0.2
    return index, inverse_permutation(index), [x, x_proj, dt_w, dt_bias, A, torch.randn(k * d, generator=g)]

def check_opcheck(case):
    """The forward op's schema, fake implementation, autograd registration, and AOTAutograd with dynamic shapes
    (forward and backward against eager)."""
    index, _, (x, x_proj, dt_w, dt_bias, A, Ds) = inputs(*case)
    dbl = torch.einsum('kcd,bdl->bkcl', x_proj, x)  # (B, K, R + 2N, L)
    args = [t.requires_grad_() for t in (x, dbl, dt_w, dt_bias.reshape(-1), A, Ds)]
    torch.library.opcheck(torch.ops.vssm.cross_scan_fwd.default, args[:2] + [index] + args[2:])

def scan(x, index, inverse, x_proj, dt_w, dt_bias, A, Ds, backend='auto'):
    return cross_selective_scan(x, index, x_proj, dt_w, dt_bias, A, Ds, inverse=inverse, backend=backend)

def run(fn, index, inverse, params, backend='auto'):
    leaves = [t.clone().requires_grad_() for t in params]
    out = fn(leaves[0], index, inverse, *leaves[1:], backend=backend)
    return [out, *torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel()).view_as(out))]

def assert_close(got, want):
    for name, a, b in zip(['out', 'x', 'x_proj_weight', 'dt_weight', 'dt_bias', 'A', 'Ds'], got, want):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-5, (name, err)

def check_compiled(case, *more_cases, dynamic=False):
    """cross_selective_scan compiled (fullgraph, aot_eager): one graph with the ops forward and backward, its values
    and gradients against the eager kernel path and the reference; more cases: other shapes, no recompilation."""
    torch._dynamo.reset()
    graphs = AotEagerAndRecordGraphs()
    compiled = torch.compile(scan, fullgraph=True, backend=graphs, dynamic=dynamic)
    for i, shape in enumerate((case, ) + more_cases):
        index, inverse, params = inputs(*shape)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = run(compiled, index, inverse, params)
        assert_close(got, run(scan, index, inverse, params))
        assert_close(got, run(scan, index, inverse, params, backend='torch'))
    assert len(graphs.graphs) == 1 and len(graphs.fw_graphs) == len(graphs.bw_graphs) == 1
    for gm, op in ((graphs.fw_graphs[0], torch.ops.vssm.cross_scan_fwd.default),
                   (graphs.bw_graphs[0], torch.ops.vssm.cross_scan_bwd.default)):
        assert sum(node.target is op for node in gm.graph.nodes) == 1, gm.graph
'''


@pytest.mark.skipif(not kernel_available() or torch.cuda.is_available(),
                    reason='needs Triton; with a GPU, test_compiled_kernel_matches_eager_on_gpu runs the ops')
@pytest.mark.parametrize('calls', [
    # (B, D, H, W, K, R, N, per-image orders): two per-image orders on a 3 x 7 map, N = 4, two tiles of 16 steps (the
    # interpreter's time grows with the programs, sequences x tiles per launch; opcheck runs the forward five times)
    pytest.param('case = (1, 5, 3, 7, 2, 3, 4, True)\ncheck_opcheck(case)\ncheck_compiled(case)\n',
                 marks=pytest.mark.slow),
    # VMamba's four directions on a 3 x 11 map (two tiles of 32 steps), then compiled with dynamic shapes and run
    # on a 5 x 13 map (three tiles) without recompiling
    pytest.param('case = (1, 5, 3, 11, 4, 3, 2, False)\ncheck_opcheck(case)\n'
                 'check_compiled(case, (1, 5, 5, 13, 4, 3, 2, False), dynamic=True)\n', marks=pytest.mark.slow)],
    ids=['orders', 'vmamba-dynamic'])
def test_custom_ops_pass_opcheck_and_compile_in_the_triton_interpreter(calls):
    """``vssm::cross_scan_fwd``/``cross_scan_bwd`` (the kernels as graph nodes under torch.compile) in Triton's
    interpreter, fp32 CPU tensors: ``torch.library.opcheck`` (every default utility), and ``cross_selective_scan``
    compiled with ``fullgraph=True`` and ``aot_eager`` against eager, both on the kernel path and on the reference."""
    run_in_interpreter(OPS_CASE + calls + "print('ok')\n")


def test_cpu_takes_the_reference():
    inputs = _inputs(2, 6, 3, 5, 4, 2, 1, False)
    x, index, inverse, *params = inputs
    torch.testing.assert_close(cross_selective_scan(x, index, *params, inverse=inverse),
                               cross_selective_scan_ref(x, index, *params, inverse=inverse), rtol=0, atol=0)


def test_dispatch_rules(monkeypatch):
    """The kernel only for CUDA tensors, with the switch, for permutations without a separate merge map, where it pays
    (16-bit inference over per-image maps), and not under deterministic algorithms (its atomics); under torch.compile
    too, not under torch.export."""
    from types import SimpleNamespace

    from vssm.ops import cross_scan
    monkeypatch.setattr(cross_scan, '_KERNEL', object())
    x = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device('cuda'))
    index = torch.zeros(2, 4, 6, dtype=torch.int64)  # per-image maps, 16-bit inference: where the kernel pays
    assert not cross_scan._use_kernel('auto', SimpleNamespace(is_cuda=True, dtype=torch.float32, device=x.device),
                                      index, index, None, 1)  # float32
    assert not cross_scan._use_kernel('auto', x, index[:1], index[:1], None, 1)  # one map for the batch
    assert not cross_scan._use_kernel('auto', x, index, index, None, 1, needs_grad=True)  # training
    assert cross_scan._use_kernel('auto', x, index, index, None, 1)
    assert not cross_scan._use_kernel('torch', x, index, index, None, 1)
    assert not cross_scan._use_kernel('auto', x, index, None, None, 1)  # not known to be permutations
    assert not cross_scan._use_kernel('auto', x, index, index, index, 1)  # a separate merge map
    assert not cross_scan._use_kernel('auto', SimpleNamespace(is_cuda=False, dtype=torch.bfloat16,
                                                              device=torch.device('cpu')), index, index, None, 1)
    assert not cross_scan._use_kernel('auto', x, index, index, None, 17)  # N above the scan kernels' 16
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '0')
    assert not cross_scan._use_kernel('auto', x, index, index, None, 1)
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '1')
    with monkeypatch.context() as patch:
        patch.setattr(torch.compiler, 'is_compiling', lambda: True)
        assert cross_scan._use_kernel('auto', x, index, index, None, 1)  # compiled: the custom ops
        patch.setattr(torch.compiler, 'is_exporting', lambda: True)
        assert not cross_scan._use_kernel('auto', x, index, index, None, 1)
    torch.use_deterministic_algorithms(True)
    try:
        assert not cross_scan._use_kernel('auto', x, index, index, None, 1)
    finally:
        torch.use_deterministic_algorithms(False)


def test_cross_form_dispatch_rules(monkeypatch):
    """The CUDA scan's cross form: with VSSM_CROSS_FORM=1, on CUDA tensors with one map to read and add back to (any
    index), on the CUDA backend and not under deterministic algorithms or export; independent of the Triton switch."""
    from types import SimpleNamespace
    monkeypatch.setattr(cross_scan, 'cross_form_available', lambda: True)
    x = SimpleNamespace(is_cuda=True, dtype=torch.float32, device=torch.device('cuda'))
    index = torch.zeros(1, 4, 6, dtype=torch.int64)
    assert cross_scan._use_cross_form('auto', x, index, None, 1)
    assert cross_scan._use_cross_form('cuda', SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=x.device),
                                      index, None, 16)
    assert not cross_scan._use_cross_form('torch', x, index, None, 1)
    assert not cross_scan._use_cross_form('auto', x, index, index, 1)  # a separate merge map
    assert not cross_scan._use_cross_form('auto', x, index.int(), None, 1)
    assert not cross_scan._use_cross_form('auto', x, index, None, 17)
    assert not cross_scan._use_cross_form('auto', SimpleNamespace(is_cuda=False, dtype=torch.float32,
                                                                  device=torch.device('cpu')), index, None, 1)
    assert not cross_scan._use_cross_form('auto', SimpleNamespace(is_cuda=True, dtype=torch.float64,
                                                                  device=x.device), index, None, 1)
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '0')
    assert cross_scan._use_cross_form('auto', x, index, None, 1)
    monkeypatch.setenv('VSSM_CROSS_FORM', '0')
    assert not cross_scan._use_cross_form('auto', x, index, None, 1)
    monkeypatch.delenv('VSSM_CROSS_FORM')
    assert not cross_scan._use_cross_form('auto', x, index, None, 1)  # off by default
    monkeypatch.setenv('VSSM_CROSS_FORM', '1')
    with monkeypatch.context() as patch:
        patch.setattr(torch.compiler, 'is_exporting', lambda: True)
        assert not cross_scan._use_cross_form('auto', x, index, None, 1)
    torch.use_deterministic_algorithms(True)
    try:
        assert not cross_scan._use_cross_form('auto', x, index, None, 1)
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(cross_scan, 'cross_form_available', lambda: False)
    assert not cross_scan._use_cross_form('auto', x, index, None, 1)


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16], ids=str)
def test_cross_form_low_rank_gradients_match_autograd(dtype):
    """The cross form's backward turns the step sizes' gradient into dt_proj's and the low-rank inputs' with two GEMMs
    (vssm.ops.selective_scan.low_rank_grads): against autograd of delta = dt_weight[k] @ dbl[:, k, :R] in float64,
    and in bf16 within its rounding."""
    from vssm.ops.selective_scan import low_rank_grads
    g = torch.Generator().manual_seed(0)
    b, k, d, rank, n_state, length = 2, 4, 6, 3, 2, 35
    dbl = torch.randn(b, k, rank + 2 * n_state, length, generator=g, dtype=torch.float64)
    weight = torch.randn(k * d, rank, generator=g, dtype=torch.float64).requires_grad_()
    dts = dbl[:, :, :rank].clone().requires_grad_()
    ddelta = torch.randn(b, k * d, length, generator=g, dtype=torch.float64)
    delta = torch.matmul(weight.view(k, d, rank), dts).reshape(b, k * d, length)
    want = torch.autograd.grad(delta, [weight, dts], ddelta)
    got = low_rank_grads(ddelta.float(), dbl.to(dtype), weight.detach().to(weight.dtype if dtype == torch.float64
                                                                            else torch.float32))
    assert got[0].shape == weight.shape and got[1].shape == dts.shape and got[1].dtype == dtype
    tol = 1e-6 if dtype == torch.float64 else 2e-2
    for a, w in zip(got, want):
        assert ((a.double() - w).norm() / w.norm()).item() < tol


@pytest.mark.parametrize('kind', ['directions', 'per-image', 'repeats-and-skips'])
def test_cross_form_glue_matches_the_composition(kind, monkeypatch):
    """What cross_selective_scan hands the cross form (x_proj and dt_proj on the raster map, the parameters as the
    kernel takes them), run through the form's reference on the CPU: equal to the composition, values and every
    gradient."""
    calls = []
    monkeypatch.setattr(cross_scan, '_use_cross_form', lambda *args: True)
    monkeypatch.setattr(cross_scan, 'cross_form', lambda *args: calls.append(args) or cross_form_ref(*args))
    x, index, inverse, *params = _inputs(2, 6, 3, 5, 4, 2, 3, kind != 'directions')
    if kind == 'repeats-and-skips':  # rows that are not permutations: tokens read twice, tokens left out
        index, inverse = torch.randint(0, 15, (2, 4, 15), generator=torch.Generator().manual_seed(1)), None
    results = []
    for fn in (cross_selective_scan, cross_selective_scan_ref):
        leaves = [t.clone().requires_grad_() for t in [x] + params]
        out = fn(leaves[0], index, *leaves[1:], inverse=inverse)
        results.append([out, *torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel()).view_as(out))])
    assert len(calls) == 1
    for name, got, want in zip(['out', 'x', 'x_proj', 'dt_weight', 'dt_bias', 'A', 'Ds'], *results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_errors():
    x, index, inverse, x_proj, dt_w, dt_bias, A, Ds = _inputs(2, 6, 3, 5, 4, 2, 1, False)
    with pytest.raises(ValueError, match=r'index \(B or 1, K, L\)'):
        cross_selective_scan(x, index[:, :3], x_proj, dt_w, dt_bias, A, Ds, inverse=inverse)
    with pytest.raises(ValueError, match=r'x_proj_weight \(K, R \+ 2N, D\)'):
        cross_selective_scan(x, index, x_proj[:, :-1], dt_w, dt_bias, A, Ds, inverse=inverse)


GPU_CASES = [
    (2, 96, 56, 56, 4, 6, 1, False),  # VMamba-T stage 1
    (3, 40, 13, 7, 4, 3, 1, False),  # odd, non-square, channels not a multiple of 16
    (2, 192, 7, 7, 8, 12, 1, True),  # Spectral-like: per-image orders, K = 8
    (2, 24, 9, 10, 4, 4, 4, True),  # N = 4
]


@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('case', GPU_CASES, ids=lambda c: 'x'.join(map(str, c[:4])) + f'-K{c[4]}-R{c[5]}-N{c[6]}')
def test_kernel_matches_the_reference_on_gpu(case, dtype, monkeypatch):
    """Values and every gradient against the reference composition (its scan on the CUDA kernel when built), in fp32
    and under bf16 autocast (x in bf16 as the model's is); the kernel wherever it may run, training included."""
    from vssm.ops import cross_scan
    monkeypatch.setattr(cross_scan, '_pays', lambda *args: True)
    inputs = _inputs(*case, device='cuda')
    x, index, inverse, *params = inputs
    results = []
    for backend in ('torch', 'auto'):
        leaves = [t.detach().clone().requires_grad_() for t in [x] + params]
        xx, *pp = leaves
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            ref_path = backend == 'torch'
            fn = cross_selective_scan_ref if ref_path else cross_selective_scan
            out = fn(xx.to(dtype), index, *pp, inverse=inverse)
        grad_out = torch.randn(out.shape, device='cuda', generator=torch.Generator('cuda').manual_seed(1))
        grads = torch.autograd.grad(out, leaves, grad_out)
        results.append((out, grads))
    (ref, ref_grads), (got, got_grads) = results
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    rtol, atol = GRAD_TOLERANCES[dtype]
    for name, g, r in zip(['x', 'x_proj', 'dt_weight', 'dt_bias', 'A', 'Ds'], got_grads, ref_grads):
        err = ((g.float() - r.float()).norm() / r.float().norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), (name, err)


@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_compiled_kernel_matches_eager_on_gpu(dtype, monkeypatch):
    """Compiled with inductor (``fullgraph=True``), the kernels run as the custom ops: values and every gradient
    against the eager kernel path, in fp32 and under bf16 autocast."""
    from vssm.ops import cross_scan
    monkeypatch.setattr(cross_scan, '_pays', lambda *args: True)
    calls = []
    for name in ('forward', 'backward'):
        kernel_fn = getattr(cross_scan._KERNEL, name)
        monkeypatch.setattr(cross_scan._KERNEL, name, lambda *a, f=kernel_fn, n=name: calls.append(n) or f(*a))
    x, index, inverse, *params = _inputs(*GPU_CASES[1], device='cuda')
    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(cross_selective_scan, fullgraph=True), cross_selective_scan):
        calls.clear()
        leaves = [t.detach().clone().requires_grad_() for t in [x] + params]
        xx, *pp = leaves
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fn(xx.to(dtype), index, *pp, inverse=inverse)
        grad_out = torch.randn(out.shape, device='cuda', generator=torch.Generator('cuda').manual_seed(1))
        results.append((out, torch.autograd.grad(out, leaves, grad_out)))
        assert calls == ['forward', 'backward']
    (got, got_grads), (ref, ref_grads) = results
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    for name, g, r in zip(['x', 'x_proj', 'dt_weight', 'dt_bias', 'A', 'Ds'], got_grads, ref_grads):
        assert g.dtype == r.dtype, name
        err = ((g.float() - r.float()).norm() / r.float().norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), (name, err)


@needs_gpu
def test_kernel_is_used_only_for_permutations_without_a_merge_map(monkeypatch):
    from vssm.ops import cross_scan
    monkeypatch.setattr(cross_scan, '_pays', lambda *args: True)
    calls = []
    monkeypatch.setattr(cross_scan._CrossSelectiveScan, 'apply', lambda *a: calls.append(a) or a[0].float())
    x, index, inverse, *params = _inputs(2, 16, 4, 4, 4, 2, 1, False, device='cuda')
    cross_selective_scan(x, index, *params)  # no inverse: not known to be permutations
    cross_selective_scan(x, index, *params, inverse=inverse, merge=index)
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '0')
    cross_selective_scan(x, index, *params, inverse=inverse)
    assert not calls
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '1')
    cross_selective_scan(x, index, *params, inverse=inverse)
    assert len(calls) == 1


CROSS_FORM_CASES = [
    (2, 96, 56, 56, 4, 6, 1, 'directions'),  # VMamba-T stage 1
    (3, 40, 13, 7, 4, 3, 1, 'directions'),  # odd, non-square; 91 steps: a partial chunk and partial lanes
    (2, 192, 7, 7, 8, 12, 1, 'per-image'),  # Spectral-like: per-image orders, K = 8
    (2, 24, 9, 10, 4, 4, 4, 'repeats-and-skips'),  # N = 4; tokens read twice and tokens left out
    (1, 16, 17, 31, 2, 5, 16, 'per-image'),  # N = 16; 527 steps: three chunks
]


@needs_cross_form
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('case', CROSS_FORM_CASES, ids=lambda c: 'x'.join(map(str, c[:4])) + f'-K{c[4]}-N{c[6]}-{c[7]}')
def test_cross_form_matches_its_reference_on_gpu(case, dtype):
    """The kernel against cross_form_ref on the same inputs (both compute in float32 from the same 16-bit values),
    values and the gradients of every input; inference keeps no states."""
    b, d, h, w, k, rank, n_state, kind = case
    x, index, inverse, x_proj, dt_w, dt_bias, A, Ds = _inputs(b, d, h, w, k, rank, n_state, kind != 'directions',
                                                              device='cuda')
    length = h * w
    if kind == 'repeats-and-skips':
        index = torch.randint(0, length, (b, k, length), device='cuda')
    g = torch.Generator('cuda').manual_seed(2)
    dbl = torch.randn(b, k, rank + 2 * n_state, length, device='cuda', generator=g).to(dtype)
    leaves = (x.to(dtype), dt_w.reshape(k * d, rank), A, dbl, Ds, dt_bias.reshape(-1))
    with torch.no_grad():
        out, states = torch.ops.vssm_selective_scan.cross_fwd(leaves[0], index, *leaves[1:], True, False)
    assert states.numel() == 0
    grad_out = torch.randn(b, d, length, device='cuda', generator=g)
    results = []
    for fn in (cross_scan.cross_form, cross_form_ref):
        args = [t.detach().requires_grad_() for t in leaves]
        got = fn(args[0], index, *args[1:])
        results.append([got, *torch.autograd.grad(got, args, grad_out)])
    assert results[0][0].dtype == torch.float32 and results[0][0].shape == (b, d, length)
    assert ((out - results[0][0]).norm() / out.norm()).item() < 1e-5  # the same sums, added in another order
    for name, got, ref in zip(['out', 'x', 'dt_weight', 'A', 'dbl', 'Ds', 'dt_bias'], *results):
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        # the gradients of 16-bit inputs are rounded to their dtype by both
        assert err < (1e-5 if name == 'out' or dtype == torch.float32 else 1e-2), (name, err)


@needs_cross_form
@pytest.mark.parametrize('keep_states', [False, True])
def test_cross_form_passes_opcheck_on_gpu(keep_states):
    """cross_fwd's schema, fake implementation, autograd registration and AOTAutograd with dynamic shapes (odd map,
    partial chunk)."""
    x, index, _, _, dt_w, dt_bias, A, Ds = _inputs(2, 8, 5, 7, 4, 3, 2, True, device='cuda')
    dbl = torch.randn(2, 4, 3 + 4, 35, device='cuda')
    args = [x, index, dt_w.reshape(-1, 3), A, dbl, Ds, dt_bias.reshape(-1)]
    args = [t.requires_grad_(keep_states) if t.is_floating_point() else t for t in args]
    torch.library.opcheck(torch.ops.vssm_selective_scan.cross_fwd.default, args + [True, keep_states])


def _count_cross_form_calls(monkeypatch):
    """The Triton switch off (its kernel stays out) and a list that grows by one at every call of the cross form (at
    its trace under torch.compile)."""
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '0')
    calls = []
    form = cross_scan.cross_form
    monkeypatch.setattr(cross_scan, 'cross_form', lambda *args: calls.append(1) or form(*args))
    return calls


def _eager_and_compiled(case):
    """The composition, then cross_selective_scan eager, and compiled (fullgraph) for VMamba-T's stage 1 and the
    per-image maps (compiling every case would take minutes)."""
    fns = [cross_selective_scan_ref, cross_selective_scan]
    if case in (GPU_CASES[0], GPU_CASES[2]):
        torch._dynamo.reset()
        fns.append(torch.compile(cross_selective_scan, fullgraph=True))
    return fns


@needs_cross_form
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('case', GPU_CASES, ids=lambda c: 'x'.join(map(str, c[:4])) + f'-K{c[4]}-R{c[5]}-N{c[6]}')
def test_inference_takes_the_cross_form_on_gpu(case, dtype, monkeypatch):
    """Inference (no gradients) runs the cross form, eager and compiled (fullgraph; for one map and for per-image maps),
    and matches the composition (fp32, and under bf16 autocast with x in bf16); with the Triton switch off, so the
    Triton kernel stays out."""
    calls = _count_cross_form_calls(monkeypatch)
    x, index, inverse, *params = _inputs(*case, device='cuda')
    outs = []
    for fn in _eager_and_compiled(case):
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            outs.append(fn(x.to(dtype), index, *params, inverse=inverse))
    assert len(calls) == len(outs) - 1
    rtol, atol = TOLERANCES[dtype]
    for got in outs[1:]:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, outs[0], rtol=rtol, atol=atol)


@needs_cross_form
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('case', GPU_CASES, ids=lambda c: 'x'.join(map(str, c[:4])) + f'-K{c[4]}-R{c[5]}-N{c[6]}')
def test_training_takes_the_cross_form_on_gpu(case, dtype, monkeypatch):
    """Training runs the cross form, eager and compiled (fullgraph, forward and backward; for one map and for per-image
    maps), and matches the composition in values and every gradient (fp32, and under bf16 autocast with x in bf16);
    Triton switch off."""
    calls = _count_cross_form_calls(monkeypatch)
    x, index, inverse, *params = _inputs(*case, device='cuda')
    results = []
    for fn in _eager_and_compiled(case):
        leaves = [t.detach().clone().requires_grad_() for t in [x] + params]
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fn(leaves[0].to(dtype), index, *leaves[1:], inverse=inverse)
        grad_out = torch.randn(out.shape, device='cuda', generator=torch.Generator('cuda').manual_seed(1))
        results.append([out, *torch.autograd.grad(out, leaves, grad_out)])
    assert len(calls) == len(results) - 1
    for got in results[1:]:
        for name, g, r in zip(['out', 'x', 'x_proj', 'dt_weight', 'dt_bias', 'A', 'Ds'], got, results[0]):
            err = ((g.float() - r.float()).norm() / r.float().norm()).item()
            assert err < (1e-5 if dtype == torch.float32 else 2e-2), (name, err)



MODEL_CASE = '''
import torch
from vssm.ops import _triton_cross_scan, cross_scan
from vssm.models import SpectralVMamba, VMamba

_triton_cross_scan.PROGRAMS_PER_SM = 16  # sequences of two or more tiles cut into segments (one multiprocessor)

# the kernel wherever it may run but on CPU tensors (Triton's interpreter); the rest of the model on its reference
cross_scan._use_kernel = lambda backend, x, index, inverse, merge, n_state, *_: (
    backend != 'torch' and inverse is not None and merge is None)

def check(make, batch, size):
    torch.manual_seed(0)
    fused, reference = make('auto').train(), make('torch').train()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(batch, 3, *size)
    outs = []
    for model in (fused, reference):
        out = model(x)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out)
        outs.append((out, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])))
    (out_f, grads_f), (out_r, grads_r) = outs
    for a, b in zip(out_f, out_r):
        assert ((a - b).norm() / b.norm()).item() < 1e-5
    for a, b in zip(grads_f, grads_r):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() < 1e-4, ((a - b).norm() / b.norm()).item()
'''


@pytest.mark.skipif(not kernel_available() or torch.cuda.is_available(),
                    reason="needs Triton; with a GPU the models' GPU tests run the kernel")
@pytest.mark.parametrize('call', [
    # one tile per sequence at every stage (8x8 tokens at stage 1)
    pytest.param("check(lambda b: VMamba(dict(dims=16, depths=[1, 1, 1, 1]), out_indices=(0, 1, 2, 3), "
                 "ops_backend=b), 1, (32, 32))", marks=pytest.mark.slow),
    # three tiles at stage 1 (10x14 tokens) in two segments, two images
    pytest.param("check(lambda b: VMamba(dict(dims=16, depths=[1, 1, 1, 1]), out_indices=(0, 1, 2, 3), "
                 "ops_backend=b), 2, (40, 56))", marks=pytest.mark.slow),
    pytest.param("check(lambda b: SpectralVMamba(dict(dims=[256, 32, 64, 128], depths=[1, 1, 1, 1]), "
                 "out_indices=(0, 1, 2, 3), ops_backend=b), 2, (64, 64))", marks=pytest.mark.slow)],
    ids=['vmamba', 'vmamba-tiles', 'spectral-vmamba'])
def test_models_with_the_kernel_match_the_reference_in_the_triton_interpreter(call):
    """A backbone whose cross scans run the kernel (in Triton's interpreter) against the same backbone on the
    reference: its outputs and every parameter's gradient, training mode."""
    run_in_interpreter(MODEL_CASE + call + "\nprint('ok')\n")


def test_triton_fusions_context_sets_and_restores_the_switch(monkeypatch):
    from vssm.ops._backend import triton_fusions, triton_fusions_enabled
    with triton_fusions(False):
        assert not triton_fusions_enabled()
        with triton_fusions():
            assert triton_fusions_enabled()
        assert not triton_fusions_enabled()
    assert triton_fusions_enabled()  # the fixture's value is back
    monkeypatch.delenv('VSSM_TRITON_FUSIONS')
    assert triton_fusions_enabled()  # on by default
    with triton_fusions(False):
        assert not triton_fusions_enabled()
    assert triton_fusions_enabled()
