"""The engine: what the tools add to mmengine's Runner (strict loading, resume, RNG states, rank checks).

Importing it registers ``StrictRunner`` in mmengine's ``RUNNERS`` and ``RNGStateHook`` / ``RankAgreementHook`` in
its ``HOOKS`` (the root registries, seen from mmpretrain, mmdet and mmseg). tools/train.py and tools/test.py import
it; a config that names these hooks adds ``'vssm.engine'`` to ``custom_imports``. The models never import it.
"""
from .hooks import RankAgreementHook, RNGStateHook
from .launch import (add_common_args, apply_demo_override, check_data_paths, clear_pretrained, finish_distributed,
                     is_main_process, load_config, prepare_for_device, setup_run)
from .resume import AtomicLocalBackend, resolve_resume, use_atomic_checkpoints
from .runner import StrictRunner, build_runner

__all__ = [
    'RankAgreementHook', 'RNGStateHook', 'StrictRunner', 'build_runner', 'AtomicLocalBackend', 'resolve_resume',
    'use_atomic_checkpoints', 'add_common_args', 'apply_demo_override', 'check_data_paths', 'clear_pretrained',
    'finish_distributed', 'is_main_process', 'load_config', 'prepare_for_device', 'setup_run'
]
