"""A backbone with the CUDA kernels against the same backbone on the PyTorch reference ops, both on the GPU: outputs
and every parameter gradient (used by the families' ``*_cuda.py`` tests)."""
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from fixture_utils import rel_err
from torch import Tensor, nn


def run_backend(build: Callable[[str], nn.Module], backend: str, state_dict: dict, x: Tensor, proj: Sequence[Tensor],
                autocast: bool,
                skip: Callable[[str], bool] = lambda name: False) -> Tuple[List[Tensor], Dict[str, Tensor]]:
    """Outputs (float32) and parameter gradients of ``build(backend)`` loaded with ``state_dict`` on ``x``, for the loss
    sum(out_i * proj_i): a random projection (sum(o**2) of LayerNorm outputs would be nearly constant, its gradient
    noise). ``skip(name)``: parameters whose true gradient is 0 (any path gives noise there)."""
    model = build(backend).cuda()
    model.load_state_dict(state_dict)
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
        outs = model(x)
    sum((o.float() * p).sum() for o, p in zip(outs, proj)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and not skip(n)}
    return [o.float() for o in outs], grads


def errors(outs: List[Tensor], grads: Dict[str, Tensor], gold_outs: List[Tensor],
           gold_grads: Dict[str, Tensor]) -> Dict[str, float]:
    """Per tensor: max|diff| / max|gold| (gradients: at least 1% of the largest gradient as the scale)."""
    scale = max(g.abs().max().item() for g in gold_grads.values())
    errs = {f'out{i}': rel_err(a, b) for i, (a, b) in enumerate(zip(outs, gold_outs))}
    assert grads.keys() == gold_grads.keys()
    for name, g in grads.items():
        gold = gold_grads[name]
        errs[name] = (g - gold).abs().max().item() / max(gold.abs().max().item(), 1e-2 * scale)
    return errs


def assert_kernels_match_reference(build: Callable[[str], nn.Module], x: Tensor, fp32_tol: float = 1e-3,
                                   skip: Callable[[str], bool] = lambda name: False) -> None:
    """fp32: the kernel path agrees with the reference path to ``fp32_tol``; bf16 autocast: the kernel path is no
    further from the fp32 reference than the reference path under the same autocast (or within 1e-2)."""
    torch.manual_seed(0)
    model = build('torch')
    state_dict = model.state_dict()
    with torch.no_grad():
        shapes = [o.shape for o in model.cuda()(x)]
    proj = [torch.randn(s, device='cuda') for s in shapes]
    gold = run_backend(build, 'torch', state_dict, x, proj, autocast=False, skip=skip)
    for name, err in errors(*run_backend(build, 'cuda', state_dict, x, proj, autocast=False, skip=skip), *gold).items():
        assert err < fp32_tol, (name, err)
    ref_bf16 = errors(*run_backend(build, 'torch', state_dict, x, proj, autocast=True, skip=skip), *gold)
    ker_bf16 = errors(*run_backend(build, 'cuda', state_dict, x, proj, autocast=True, skip=skip), *gold)
    for name, err in ker_bf16.items():
        assert err < max(2 * ref_bf16[name], 1e-2), (name, err, ref_bf16[name])
