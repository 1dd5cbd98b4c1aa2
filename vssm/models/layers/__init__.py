"""Building blocks shared by two or more families."""
from .arch import parse_arch
from .base import StagedBackbone
from .keys import to_classifier_keys, unwrap_state_dict
from .norm import LayerNorm2d, Linear2d, normed_linear
from .recompute import gelu_linear, grouped_matmul, recompute_enabled, recomputed_linear, set_recompute
from .ssm_init import init_A_logs, init_Ds, init_dt_bias, init_dt_weight, init_x_proj_weight, trunc_normal_linear_init

__all__ = [
    'parse_arch', 'StagedBackbone', 'to_classifier_keys', 'unwrap_state_dict', 'LayerNorm2d', 'Linear2d',
    'gelu_linear', 'grouped_matmul', 'recomputed_linear', 'normed_linear',
    'set_recompute', 'recompute_enabled',
    'init_A_logs', 'init_dt_bias', 'init_dt_weight', 'init_Ds', 'init_x_proj_weight', 'trunc_normal_linear_init'
]
