"""SpatialMamba with the CUDA kernels against the PyTorch references, on a GPU (outputs and gradients)."""
import pytest
import torch
from conftest import has_kernel
from models.kernel_compare import assert_kernels_match_reference

from vssm.models import SpatialMamba

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel('selective_scan') and has_kernel('dwconv2d')),
    reason='needs a GPU and both kernels: see kernels/README.md')

ARCH = dict(dims=32, depths=[1, 2, 2, 1])


def test_kernels_match_reference_in_the_backbone():
    # The conv biases that a BatchNorm follows have a true gradient of 0: what any path gives there is noise.
    assert_kernels_match_reference(lambda backend: SpatialMamba(ARCH, out_indices=(0, 1, 2, 3), ops_backend=backend),
                                   torch.randn(2, 3, 96, 128, device='cuda'),
                                   skip=lambda name: name.endswith('conv.2.conv.bias'))
