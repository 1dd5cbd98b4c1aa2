"""Ops used by the models. Models import these names only; each dispatches to its backend."""
from ._backend import BACKENDS, plain_autograd
from .bias_gelu import bias_gelu, bias_gelu_ref
from .cross_scan import cross_selective_scan, cross_selective_scan_ref
from .dwconv2d import dwconv2d, dwconv2d_ref, merge_state_fusion_kernels, state_fusion, state_fusion_ref
from .grouped_matmul import grouped_matmul
from .layer_norm import layer_norm_2d, layer_norm_2d_ref, layer_norm_last
from .observe_gate import observe_gate, observe_gate_ref
from .residual import add_residual, add_residual_ref
from .selective_scan import linear_scan, selective_scan, selective_scan_low_rank, selective_scan_ref
from .spectral_order import scan_index, spectral_order
from .token_maps import gather_tokens, inverse_permutation, scatter_tokens

__all__ = [
    'BACKENDS', 'selective_scan', 'selective_scan_ref', 'selective_scan_low_rank', 'linear_scan', 'dwconv2d',
    'dwconv2d_ref', 'state_fusion', 'state_fusion_ref', 'merge_state_fusion_kernels', 'gather_tokens',
    'scatter_tokens', 'inverse_permutation', 'plain_autograd', 'spectral_order', 'scan_index', 'layer_norm_2d',
    'layer_norm_2d_ref', 'layer_norm_last', 'observe_gate', 'observe_gate_ref', 'cross_selective_scan',
    'cross_selective_scan_ref', 'grouped_matmul', 'bias_gelu', 'bias_gelu_ref',
    'add_residual', 'add_residual_ref'
]
