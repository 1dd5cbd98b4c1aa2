"""Measuring vssm models: FLOPs, models built from configs without weights, timing, saved-activation memory.

* :mod:`.flops`: FLOP counting with the upstream papers' rule for the selective scan (``count_flops``).
* :mod:`.models`: configs prepared for building without pretrained weights, the benchmarks' model specs.
* :mod:`.timing`: GPU synchronisation, memory release and peaks, timed spans.
* :mod:`.memory`: the tensors a training forward saves for the backward, by module.

The tools in ``tools/analysis_tools/`` import these; the models never do.
"""
from .flops import count_flops, flop_handles, selective_scan_flop_jit
from .memory import SavedMemory, SavedTensorRecorder, record_saved_tensors, static_bytes
from .models import (
                     MODEL_SPECS,
                     ModelSpec,
                     backbone_state_dict,
                     build_backbone,
                     build_model,
                     build_spec_model,
                     config_file,
                     prepare_config,
)
from .timing import median_ms, peak_bytes, release, reset_peak, synchronize, timed_span

__all__ = [
    'count_flops', 'flop_handles', 'selective_scan_flop_jit', 'SavedMemory', 'SavedTensorRecorder',
    'record_saved_tensors', 'static_bytes', 'MODEL_SPECS', 'ModelSpec', 'backbone_state_dict', 'build_backbone',
    'build_model', 'build_spec_model', 'config_file', 'prepare_config', 'median_ms', 'peak_bytes', 'release',
    'reset_peak', 'synchronize', 'timed_span'
]
