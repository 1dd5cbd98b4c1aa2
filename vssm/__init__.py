"""vssm: visual state space models (Spatial-Mamba, VMamba v2, Spectral VMamba) for OpenMMLab."""
from ._compat import guard_mmpretrain_multimodal
from .version import __version__

guard_mmpretrain_multimodal()

from . import models  # noqa: E402  (registers the backbones in mmpretrain's MODELS)
from . import rank_agreement  # noqa: E402,F401  (registers RankAgreementHook in mmengine's HOOKS)

__all__ = ['__version__', 'models']
