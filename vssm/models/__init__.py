"""Backbones, registered in mmpretrain's MODELS (mmdet/mmseg configs use them as ``mmpretrain.<Name>``)."""
from .spatial_mamba import SpatialMamba
from .spectral_vmamba import SpectralVMamba
from .vmamba import VMamba

__all__ = ['SpatialMamba', 'VMamba', 'SpectralVMamba']
