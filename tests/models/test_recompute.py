"""vssm.models.layers' memory-saving functions (gelu_linear, recomputed_linear, normed_linear, grouped_matmul): the
outputs and gradients of the plain compositions (fp32 and under bf16 autocast), less saved for the backward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vssm.models.layers import Linear2d, gelu_linear, grouped_matmul


def _case(channels_first, seed=0):
    torch.manual_seed(seed)
    fc = Linear2d(16, 6) if channels_first else nn.Linear(16, 6)
    h = torch.randn(2, 16, 5, 7) if channels_first else torch.randn(2, 5, 16)
    return h, fc


def _grads(fn, h, fc, autocast):
    h = h.clone().requires_grad_()
    fc.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        out = fn(h, fc)
    (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach().float(), h.grad, fc.weight.grad.clone(), fc.bias.grad.clone()


@pytest.mark.parametrize('channels_first', [False, True])
@pytest.mark.parametrize('autocast', [False, True])
def test_matches_the_plain_composition(channels_first, autocast):
    h, fc = _case(channels_first)
    plain = _grads(lambda x, m: m(F.gelu(x)), h, fc, autocast)
    ours = _grads(lambda x, m: gelu_linear(x, m, channels_first), h, fc, autocast)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    for name, a, b in zip(['out', 'h', 'weight', 'bias'], ours, plain):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=name)


def test_saves_one_hidden_tensor_fewer():
    h, fc = _case(False)
    h = h.requires_grad_()

    def saved_bytes(fn):
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel()) or t, lambda t: t):
            fn(h, fc).sum()
        return sum(total)

    plain = saved_bytes(lambda x, m: m(F.gelu(x)))
    ours = saved_bytes(lambda x, m: gelu_linear(x, m))
    assert plain - ours == h.numel()


@pytest.mark.parametrize('autocast', [False, True])
def test_norm_gate_projection_matches_autograd(autocast):
    """Spatial-Mamba's out_proj(LN(y) * SiLU(z)) and SS2D's out_proj(LN2d(y)): outputs and every gradient (the
    norm's weight and bias included) as plain autograd gives them, with fewer saved tensors."""
    from vssm.models.layers import LayerNorm2d, normed_linear
    from vssm.models.layers.recompute import recomputed_linear
    torch.manual_seed(0)
    norm, fc = nn.LayerNorm(16), nn.Linear(16, 6, bias=False)
    with torch.no_grad():
        norm.weight.add_(torch.randn(16) * 0.1), norm.bias.add_(torch.randn(16) * 0.1)
    y, z = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    gate = lambda t, g, w, b: F.layer_norm(t, (16, ), w, b, 1e-5) * F.silu(g)  # noqa: E731
    norm2d, fc2d = LayerNorm2d(16), Linear2d(16, 6, bias=False)
    y2d = torch.randn(2, 16, 4, 5)
    cases = [
        (lambda a, b: fc(norm(a) * F.silu(b)),
         lambda a, b: recomputed_linear(gate, fc, a, b, norm.weight, norm.bias), (y, z), (norm, fc)),
        (lambda a: fc2d(norm2d(a).to(a.dtype)), lambda a: normed_linear(a, norm2d, fc2d, a.dtype), (y2d, ),
         (norm2d, fc2d)),
    ]
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for plain, ours, inputs, modules in cases:
        results = []
        for fn in (plain, ours):
            leaves = [t.clone().requires_grad_() for t in inputs]
            for m in modules:
                m.zero_grad()
            saved = []
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast), \
                    torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
                out = fn(*leaves)
            (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            grads = [t.grad for t in leaves] + [p.grad.clone() for m in modules for p in m.parameters()]
            results.append((out.detach().float(), grads, sum(saved)))
        (out_a, grads_a, saved_a), (out_b, grads_b, saved_b) = results
        torch.testing.assert_close(out_b, out_a, **tol)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(b, a, **tol)
        assert saved_b < saved_a


@pytest.mark.parametrize('autocast', [False, True])
def test_normed_linear_matches_autograd(autocast):
    from vssm.models.layers import normed_linear
    torch.manual_seed(0)
    norm, fc = nn.LayerNorm(16), nn.Linear(16, 8)
    with torch.no_grad():
        norm.weight.add_(torch.randn(16) * 0.1), norm.bias.add_(torch.randn(16) * 0.1)
    x = torch.randn(2, 3, 4, 16)
    results = []
    for fn in (lambda t: fc(norm(t)), lambda t: normed_linear(t, norm, fc)):
        leaf = x.clone().requires_grad_()
        norm.zero_grad(), fc.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = fn(leaf)
        (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append([out.detach().float(), leaf.grad] + [p.grad.clone() for m in (norm, fc) for p in m.parameters()])
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **tol)
    assert normed_linear(x, None, fc).equal(fc(x))


def test_set_recompute_off_gives_the_plain_compositions_and_the_same_model_outputs():
    from vssm.models import SpatialMamba
    from vssm.models.layers import recompute_enabled, set_recompute
    torch.manual_seed(0)
    model = SpatialMamba(dict(dims=[16, 32, 32, 32], depths=[1, 1, 1, 1]), out_indices=(0, 3)).train()
    x = torch.randn(2, 3, 64, 64)
    results, saved = [], []
    try:
        for enabled in (True, False):
            set_recompute(enabled)
            assert recompute_enabled() is enabled
            model.zero_grad()
            count = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: count.append(t.numel()) or t, lambda t: t):
                outs = model(x)
            sum(o.square().sum() for o in outs).backward()
            results.append([o.detach() for o in outs] + [p.grad.clone() for p in model.parameters()])
            saved.append(sum(count))
    finally:
        set_recompute(True)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert saved[0] < saved[1]


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a GPU'))])
@pytest.mark.parametrize('groups', [1, 4])
@pytest.mark.parametrize('autocast', [False, True])
def test_grouped_matmul_matches_matmul_and_saves_no_weight_copy(groups, autocast, device):
    torch.manual_seed(0)
    weight = torch.randn(groups, 5, 7, device=device, requires_grad=True)
    x = torch.randn(3, groups, 7, 11, device=device, requires_grad=True)
    x_view = x[:, :, :, 1:]  # a strided view, as the split rows of x_proj's output that dt_proj takes
    probe = torch.randn(3, groups, 5, 10, device=device)
    results, saved = [], []
    for fn in (torch.matmul, grouped_matmul):
        weight.grad = x.grad = None
        stored = []
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: stored.append(t) or t, lambda t: t):
                out = fn(weight, x_view)
        (out.float() * probe).sum().backward()
        results.append((out.detach(), weight.grad.clone(), x.grad.clone()))
        saved.append(stored)
    tol = dict(rtol=2e-2, atol=5e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for name, a, b in zip(['out', 'weight grad', 'x grad'], results[1], results[0]):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=name)
    # Only views are saved: of x (its storage) and of the weight or its autocast copy, whose size is the weight's,
    # never a copy expanded over the batch.
    for t in saved[1]:
        assert t.untyped_storage().nbytes() <= max(x.untyped_storage().nbytes(),
                                                   weight.numel() * t.element_size()), tuple(t.shape)


def test_grouped_matmul_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r'weight \(K, O, I\) and x \(B, K, I, L\)'):
        grouped_matmul(torch.randn(2, 5, 7), torch.randn(3, 4, 7, 11))


def test_grouped_matmul_traces_to_plain_gemms():
    """Under tracing (FLOP counting, export) the GEMMs are plain aten::bmm nodes, not an opaque autograd function."""
    torch.manual_seed(0)
    weight, x = torch.randn(4, 5, 7), torch.randn(3, 4, 7, 11)
    traced = torch.jit.trace(grouped_matmul, (weight, x))
    assert 'aten::bmm' in str(traced.graph)
    torch.testing.assert_close(traced(weight, x), torch.matmul(weight, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a GPU'))])
@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16], ids=str)
def test_linear_2d_gemm_form_matches_conv2d(monkeypatch, device, bias, dtype):
    """Linear2d's batched-GEMM form (NCHW-contiguous CUDA maps; forced on here for the CPU) against the 1x1
    ``F.conv2d``: values and the gradients of the map, weight and bias, through plain autograd and through the
    recomputed projections' hand-written backward (``gelu_linear``). Odd sizes; bf16 = under autocast."""
    from vssm.models.layers import recompute
    monkeypatch.setattr(recompute, 'gemm_form', lambda x: x.dim() == 4 and x.is_contiguous())
    torch.manual_seed(0)
    autocast = dtype == torch.bfloat16
    param_dtype = torch.float32 if autocast else dtype
    fc = Linear2d(7, 5, bias=bias).to(device, param_dtype)
    x = torch.randn(3, 7, 5, 9, device=device, dtype=param_dtype)
    probe = torch.randn(3, 5, 5, 9, device=device, dtype=param_dtype)

    def conv(t):
        return F.conv2d(t, fc.weight[:, :, None, None], fc.bias)

    results = []
    for fn in (conv, fc, lambda t: conv(F.gelu(t)), lambda t: gelu_linear(t, fc, channels_first=True)):
        leaf = x.clone().requires_grad_()
        fc.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = fn(leaf)
        (out.to(param_dtype) * probe).sum().backward()
        results.append([out.detach(), leaf.grad] + [p.grad.clone() for p in fc.parameters()])
    tol = dict(rtol=2e-2, atol=5e-2) if autocast else dict(rtol=1e-10, atol=1e-10)
    for ours, ref in ((results[1], results[0]), (results[3], results[2])):
        for name, a, b in zip(['out', 'x', 'weight', 'bias'], ours, ref):
            assert a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, **tol, msg=name)


def test_linear_2d_gemm_form_where_it_pays(monkeypatch):
    """The batched-GEMM form only on NCHW-contiguous CUDA maps of at least ``GEMM_MIN_PIXELS`` pixels (cuDNN is
    faster on smaller, wider maps), in 16 bits or in TF32; never on a CPU tensor, a channels-last map or with the
    switch off."""
    from vssm.models.layers import recompute

    class FakeCudaMap:  # what gemm_form reads of a tensor, on a machine without a GPU
        is_cuda = True
        device = torch.device('cuda')

        def __init__(self, shape, contiguous=True, dtype=torch.bfloat16):
            self.shape, self._contiguous, self.dtype = shape, contiguous, dtype

        def dim(self):
            return len(self.shape)

        def is_contiguous(self):
            return self._contiguous

    side = int(recompute.GEMM_MIN_PIXELS ** 0.5)
    assert side * side == recompute.GEMM_MIN_PIXELS  # 28x28: VMamba-T's stage 2 at 224x224
    assert recompute.gemm_form(FakeCudaMap((2, 96, side, side)))
    assert recompute.gemm_form(FakeCudaMap((2, 96, 1, recompute.GEMM_MIN_PIXELS)))
    assert not recompute.gemm_form(FakeCudaMap((2, 384, side // 2, side // 2)))  # stage 3: cuDNN
    assert not recompute.gemm_form(FakeCudaMap((2, 96, side, side), contiguous=False))
    assert not recompute.gemm_form(FakeCudaMap((2, 96, side * side)))
    assert not recompute.gemm_form(torch.zeros(2, 4, side, side))  # CPU: conv2d
    # float32: only where matmuls may use TF32 (cuDNN's convolutions do by default)
    tf32 = torch.backends.cuda.matmul.allow_tf32  # a property of torch's backend module: set and restored by hand
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not recompute.gemm_form(FakeCudaMap((2, 96, side, side), dtype=torch.float32))
        assert recompute.gemm_form(FakeCudaMap((2, 96, side, side), dtype=torch.float16))
        torch.backends.cuda.matmul.allow_tf32 = True
        assert recompute.gemm_form(FakeCudaMap((2, 96, side, side), dtype=torch.float32))
        assert not recompute.gemm_form(FakeCudaMap((2, 96, side, side), dtype=torch.float64))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    monkeypatch.setattr(recompute, 'GEMM_1X1', False)
    assert not recompute.gemm_form(FakeCudaMap((2, 96, side, side)))
