"""vssm: visual state space models (Spatial-Mamba, VMamba v2, Spectral VMamba) for OpenMMLab.

``import vssm`` registers the backbones in mmpretrain's ``MODELS`` and allows the classes of mmengine checkpoints
under ``torch.load(weights_only=True)``; the engine (``vssm.engine``) is imported by the tools and by configs that
name its hooks.
"""
from ._compat import guard_mmpretrain_multimodal
from .version import __version__

guard_mmpretrain_multimodal()

from . import models  # noqa: E402  (registers the backbones in mmpretrain's MODELS)
from .fileio import register_safe_globals  # noqa: E402

register_safe_globals()

__all__ = ['__version__', 'models']
