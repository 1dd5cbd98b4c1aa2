"""RNGStateHook (vssm/engine/hooks.py) on a GPU: the generator states come back from a checkpoint loaded onto the GPU
(mmengine's resume uses ``map_location='default'``, the current device)."""
import random

import numpy as np
import pytest
import torch

from vssm.engine import hooks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, device='cuda'))


def test_rng_states_restore_from_tensors_on_the_gpu():
    state = hooks._capture_rng()
    name, keys, pos, has_gauss, cached = state['numpy']
    on_gpu = dict(state, numpy=(name, keys.cuda(), pos, has_gauss, cached), torch=state['torch'].cuda(),
                  cuda=[s.cuda() for s in state['cuda']])
    expected = _draws()
    hooks._restore_rng(on_gpu)
    assert _draws() == expected
