"""FLOP counting for vssm models with mmengine.analysis (fvcore's rules).

mmengine's analyzer traces the model with ``torch.jit.trace`` and counts one multiply-add as one
FLOP for matmuls, convolutions and norms; elementwise ops are not counted. The selective scan is one
autograd node (``prim::PythonOp._SelectiveScanRef``) that the analyzer cannot see into, so it gets a
handle with the upstream papers' rule: 7 * B * L * D * N for the state-returning scan
(Spatial-Mamba), 9 * B * L * D * N + B * D * L (the D skip) for the output-returning scan
(VMamba v2, Spectral VMamba). The same numbers as the papers' tables follow.
"""
import copy
from typing import Any, Dict, List, Tuple

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape
from torch import nn

from ..models.layers.recompute import recompute_enabled, set_recompute

__all__ = ['selective_scan_flop_jit', 'flop_handles', 'count_flops']


def selective_scan_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """FLOPs of one selective-scan call; the traced tensor inputs start with (u, delta, A, ...).

    The output's rank tells the form: (B, D, N, L) states or (B, D, L) outputs.
    """
    batch, channels, length = get_shape(inputs[0])
    n_state = get_shape(inputs[2])[1]
    if len(get_shape(outputs[0])) == 4:
        return 7 * batch * length * channels * n_state
    return 9 * batch * length * channels * n_state + batch * channels * length


def flop_handles() -> Dict[str, Any]:
    """Extra op handles for :class:`mmengine.analysis.FlopAnalyzer`."""
    return {'prim::PythonOp._SelectiveScanRef': selective_scan_flop_jit}


def count_flops(model: nn.Module, input_shape: Tuple[int, ...], mode: str = 'train') -> int:
    """Total FLOPs of ``model`` on one zero input of ``input_shape`` (C, H, W).

    Args:
        model: the model; it is not modified (a copy is traced).
        input_shape: (C, H, W) of one image.
        mode: ``'train'`` (as the upstream ``flops()`` of all three families, whose published numbers
            count a BatchNorm as 5 FLOPs per element) or ``'eval'`` (2 per element).
    """
    if mode not in ('train', 'eval'):
        raise ValueError(f"count_flops: mode must be 'train' or 'eval', got {mode!r}.")
    model = copy.deepcopy(model).train(mode == 'train')
    param = next(model.parameters())
    inputs = torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype)
    # The memory-saving autograd functions (vssm.models.layers.recompute) would hide their matmuls from the tracer:
    # count the plain ops (the same FLOPs).
    previous = recompute_enabled()
    set_recompute(False)
    try:
        analyzer = FlopAnalyzer(model, (inputs, )).set_op_handle(**flop_handles())
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        return int(analyzer.total())
    finally:
        set_recompute(previous)
