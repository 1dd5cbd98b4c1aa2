"""The engine: what the tools add to mmengine's Runner (strict loading, resume, RNG states, rank checks).

Importing it registers ``StrictRunner`` / ``StrictTestRunner`` in mmengine's ``RUNNERS`` and ``RNGStateHook``,
``RankAgreementHook`` and ``SyncNormBuffersHook`` in its ``HOOKS`` (the root registries, seen from mmpretrain, mmdet
and mmseg). tools/train.py and tools/test.py import it; a config that names these hooks adds ``'vssm.engine'`` to
``custom_imports``. The models never import it.
"""
from .checkpoint import CheckpointMismatchError, check_checkpoint_for_config, check_state_fits
from .hooks import RankAgreementHook, RNGStateHook, SyncNormBuffersHook
from .launch import (
                     add_common_args,
                     apply_demo_override,
                     check_data_paths,
                     clear_pretrained,
                     finish_distributed,
                     is_main_process,
                     load_config,
                     prepare_for_device,
                     setup_run,
)
from .resume import AtomicLocalBackend, resolve_resume, use_atomic_checkpoints
from .runner import StrictRunner, StrictTestRunner, build_runner

__all__ = [
    'CheckpointMismatchError', 'check_checkpoint_for_config', 'check_state_fits', 'RankAgreementHook',
    'RNGStateHook', 'SyncNormBuffersHook', 'StrictRunner', 'StrictTestRunner', 'build_runner', 'AtomicLocalBackend',
    'resolve_resume', 'use_atomic_checkpoints', 'add_common_args', 'apply_demo_override', 'check_data_paths',
    'clear_pretrained', 'finish_distributed', 'is_main_process', 'load_config', 'prepare_for_device', 'setup_run'
]
