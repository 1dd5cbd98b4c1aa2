"""SpectralVMamba on a GPU: the kernel path against the reference path (outputs and gradients), the GPU against the
CPU, bf16 autocast, the iterative eigensolver against the dense one, CUDA-graph replay of the ordering, rotation
invariance, and upstream mode."""
import pytest
import torch
from conftest import has_kernel
from fixture_utils import rel_err
from models.kernel_compare import assert_kernels_match_reference

from vssm.models import SpectralVMamba
from vssm.ops.spectral_order import spectral_order

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and has_kernel('selective_scan')),
                                reason='needs a GPU and the selective_scan kernel: see kernels/README.md')

ARCH = dict(dims=[256, 64, 128, 256], depths=[1, 2, 1, 1])


def _pair(**kwargs):
    torch.manual_seed(0)
    cpu = SpectralVMamba(ARCH, out_indices=(0, 1, 2, 3), ops_backend='torch', **kwargs)
    gpu = SpectralVMamba(ARCH, out_indices=(0, 1, 2, 3), ops_backend='cuda', **kwargs).cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def test_kernels_match_reference_on_gpu():
    """Kernel path against the reference path, both on the GPU: the orders come from the stage-0 features, which
    do not depend on the scan backend, so both paths scan the same sequences (outputs and every gradient)."""
    assert_kernels_match_reference(lambda backend: SpectralVMamba(ARCH, out_indices=(0, 1, 2, 3), ops_backend=backend),
                                   torch.randn(2, 3, 64, 96, device='cuda'))


def test_gpu_matches_cpu():
    """The same model on the GPU and on the CPU: the orders (L <= 24: the dense eigensolver on both) and outputs."""
    torch.backends.cudnn.allow_tf32 = False  # the RFN's convs
    cpu, gpu = _pair()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outs_cpu, orders_cpu = cpu.forward_with_orders(x)
        outs_gpu, orders_gpu = gpu.forward_with_orders(x.cuda())
    for stage, (a, b) in enumerate(zip(orders_cpu, orders_gpu)):
        assert (a == b.cpu()).float().mean() > 0.97, stage
    for stage, (a, b) in enumerate(zip(outs_cpu, outs_gpu)):
        assert rel_err(b.cpu(), a) < 2e-3, stage


def test_upstream_mode_on_gpu():
    """Upstream's per-token sign fix multiplies each token by the sign of its mean over the eigenvectors, whose signs
    the eigensolver chooses (LAPACK on the CPU, cuSOLVER on the GPU): upstream's orders are device-dependent, so only
    the spectrum and the stage-0 permutation are compared here."""
    cpu, gpu = _pair(upstream_compat=True)
    features = torch.nn.functional.avg_pool2d(torch.randn(2, 64, 6, 8), 3, 1, 1)
    _, on_cpu = spectral_order(features, upstream_compat=True, return_details=True)
    order, on_gpu = spectral_order(features.cuda(), upstream_compat=True, return_details=True)
    # cdist takes the matrix-product path on both devices (more than 25 tokens), rounded differently: 5e-5.
    torch.testing.assert_close(on_gpu['eigenvalues'].cpu(), on_cpu['eigenvalues'], atol=5e-5, rtol=0)
    assert torch.equal(order.sort(dim=1).values.cpu(), torch.arange(48)[None, :, None].expand(2, -1, 4))
    with torch.no_grad():
        outs = gpu(torch.randn(2, 3, 64, 96, device='cuda'))
    assert all(torch.isfinite(o).all() for o in outs), [torch.isfinite(o).all().item() for o in outs]


def test_bf16_autocast_forward_and_backward_are_finite():
    _, gpu = _pair()
    x = torch.randn(4, 3, 224, 224, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        outs = gpu(x)
    loss = sum(o.float().mean() for o in outs)
    loss.backward()
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


@pytest.mark.parametrize('side', [24, 32, 64])
def test_iterative_eigensolver_on_gpu(side):
    features = torch.nn.functional.avg_pool2d(torch.randn(2, 64, side, side, device='cuda'), 3, 1, 1)
    with torch.autocast('cuda', dtype=torch.bfloat16):  # the solver must ignore autocast
        order, details = spectral_order(features, eigensolver='iterative', return_details=True)
    assert torch.equal(order.sort(dim=1).values.cpu(),
                       torch.arange(side * side)[None, :, None].expand(2, -1, 4))
    if side <= 32:
        _, dense = spectral_order(features, eigensolver='dense', return_details=True)
        assert (details['eigenvalues'][:, 1:5] - dense['eigenvalues'][:, 1:5]).abs().max() < 1e-4


def test_rotation_invariance_on_gpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _, gpu = _pair()
    gpu.eval()
    x = torch.randn(10, 3, 224, 224, device='cuda')
    with torch.no_grad():
        base = gpu(x)[-1].mean(dim=(2, 3))
        errors = [max(rel_err(gpu(torch.rot90(x[i:i + 1], k, (2, 3)))[-1].mean(dim=(2, 3)), base[i:i + 1])
                      for k in (1, 2, 3)) for i in range(10)]
    assert sum(e < 1e-3 for e in errors) >= 9, errors


def test_cuda_graph_replay_matches_eager():
    from vssm.ops.spectral_order import solver_graphs
    features = torch.nn.functional.avg_pool2d(torch.randn(2, 512, 32, 32, device='cuda'), 3, 1, 1)
    graphs = solver_graphs()
    eager_order, eager = spectral_order(features, return_details=True)
    results = [spectral_order(features, return_details=True, graphs=graphs) for _ in range(3)]
    assert graphs.captures == 1 and graphs.replays == 2  # captured at the second call, replayed from then on
    for order, details in results:
        torch.testing.assert_close(details['eigenvalues'], eager['eigenvalues'], atol=1e-6, rtol=0)
        assert (order == eager_order).float().mean() > 0.999
    # A different input of the same shape: the graph reads the new values.
    other = torch.nn.functional.avg_pool2d(torch.randn(2, 512, 32, 32, device='cuda'), 3, 1, 1)
    order, details = spectral_order(other, return_details=True, graphs=graphs)
    reference_order, reference = spectral_order(other, return_details=True)
    torch.testing.assert_close(details['eigenvalues'], reference['eigenvalues'], atol=1e-6, rtol=0)
    assert (order == reference_order).float().mean() > 0.999


def test_model_with_cuda_graphs_matches_eager_and_deepcopies():
    import copy
    _, gpu = _pair()
    gpu.eval()
    x = torch.randn(2, 3, 128, 160, device='cuda')  # stage 0: 8 x 10 = 80 tokens, the iterative solver
    with torch.no_grad():
        gpu.order_graphs.enabled = False
        eager = gpu(x)
        gpu.order_graphs.enabled = True
        outs = [gpu(x) for _ in range(3)]
    assert gpu.order_graphs.captures == 1 and gpu.order_graphs.replays == 2
    for out in outs:
        for a, b in zip(out, eager):
            assert rel_err(a, b) < 1e-5
    teacher = copy.deepcopy(gpu)  # e.g. an EMA teacher: its own, empty cache
    assert teacher.order_graphs.captures == 0 and teacher.order_graphs is not gpu.order_graphs
    with torch.no_grad():
        assert rel_err(teacher(x)[-1], eager[-1]) < 1e-5
