"""FLOPs with mmengine.analysis and the scan handle: the papers' numbers at 224x224, per family and size."""
import warnings

import pytest
from models.families import FAMILIES, build_classifier

from vssm.analysis import count_flops

# The T models in the default suite, S and B under `slow`: each count traces a full-size model at 224 px.
CASES = [pytest.param(f, size, gflops, id=f'{f.name}-{size}', marks=[pytest.mark.slow] if size != 'tiny' else [])
         for f in FAMILIES for size, gflops in f.gflops.items()]


@pytest.mark.parametrize('family, size, gflops', CASES)
def test_flops_match_upstream(family, size, gflops):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        flops = count_flops(build_classifier(family, size), (3, 224, 224))
    assert flops / 1e9 == pytest.approx(gflops, abs=1e-3)
