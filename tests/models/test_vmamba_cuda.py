"""VMamba with the selective-scan kernel against the PyTorch reference, on a GPU (outputs and gradients)."""
import pytest
import torch
from conftest import has_kernel
from models.kernel_compare import assert_kernels_match_reference

from vssm.models import VMamba

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and has_kernel('selective_scan')),
                                reason='needs a GPU and the selective_scan kernel: see kernels/README.md')

ARCH = dict(dims=32, depths=[1, 2, 2, 1])


def test_kernels_match_reference_in_the_backbone():
    assert_kernels_match_reference(lambda backend: VMamba(ARCH, out_indices=(0, 1, 2, 3), ops_backend=backend),
                                   torch.randn(2, 3, 96, 128, device='cuda'))
