"""A Runner whose checkpoint loading is strict and checks the file first.

mmengine's ``Runner.load_checkpoint`` (``load_from``, ``--resume``, the checkpoint of ``tools/test.py``) loads with
``strict=False``: a checkpoint of another family or size "loads" with warnings and the run goes on from noise.
``StrictRunner`` loads strictly, and a missing, truncated or corrupt file fails at once with what to do.
"""
import os.path as osp

from mmengine.config import Config
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from ..fileio import is_readable_checkpoint

__all__ = ['StrictRunner', 'build_runner']


@RUNNERS.register_module()
class StrictRunner(Runner):
    """mmengine's ``Runner`` with strict checkpoint loading (see the module docstring)."""

    def load_checkpoint(self, filename: str, map_location='cpu', strict: bool = True,
                        revise_keys=[(r'^module\.', '')]):
        if '://' not in filename and not is_readable_checkpoint(filename):
            state = 'does not exist' if not osp.isfile(filename) else 'is truncated or corrupt (not a readable ' \
                'torch zip archive); copy it again, or resume from an earlier checkpoint'
            raise ValueError(f'checkpoint {filename!r} {state}.')
        return super().load_checkpoint(filename, map_location=map_location, strict=strict, revise_keys=revise_keys)


def build_runner(cfg: Config) -> Runner:
    """The config's own ``runner_type`` when it names one, else :class:`StrictRunner`."""
    if 'runner_type' not in cfg:
        cfg.runner_type = 'StrictRunner'
    return RUNNERS.build(cfg)
