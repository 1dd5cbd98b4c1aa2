"""vssm: visual state space models (Spatial-Mamba, VMamba v2, Spectral VMamba) for OpenMMLab.

``import vssm`` registers the backbones in mmpretrain's ``MODELS``, allows the classes of mmengine checkpoints under
``torch.load(weights_only=True)`` and makes mmengine check a local checkpoint file before loading it (so the
libraries' Inferencers and tools load our checkpoints, and a truncated file says so). The engine (``vssm.engine``) is
imported by the tools and by configs that name its hooks.
"""
import warnings

# mmengine imports pkg_resources (and reloads it) whenever a config names an `mmdet::` / `mmseg::` base, and
# setuptools warns on every such import that pkg_resources is deprecated: noise users cannot act on, since the
# stack pins setuptools<81 for exactly that import. Only this message is silenced.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated as an API', category=UserWarning)

from ._compat import guard_mmpretrain_multimodal  # noqa: E402
from .version import __version__  # noqa: E402

guard_mmpretrain_multimodal()

from . import models  # noqa: E402  (registers the backbones in mmpretrain's MODELS)
from .fileio import register_checkpoint_check, register_safe_globals  # noqa: E402

register_safe_globals()
register_checkpoint_check()

__all__ = ['__version__', 'models']
