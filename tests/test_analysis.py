"""FLOPs with mmengine.analysis and the scan handle: the papers' numbers at 224x224."""
import warnings

import pytest
from models.test_spatial_mamba import build_classifier

from vssm.analysis import count_flops


@pytest.mark.parametrize('arch, gflops', [('tiny', 4.468), ('small', 7.117), ('base', 15.801)])
def test_spatial_mamba_flops_match_upstream(arch, gflops):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        flops = count_flops(build_classifier(arch), (3, 224, 224))
    assert flops / 1e9 == pytest.approx(gflops, abs=1e-3)
