"""Convert an upstream Spatial-Mamba checkpoint (EdwardChasel/Spatial-Mamba) to vssm's key layout.

    python tools/model_converters/spatial_mamba_to_vssm.py UPSTREAM.pth OUT.pth [--ema] [--check-arch tiny]

Upstream classification checkpoints (``{'model': state_dict}``) become mmpretrain ``ImageClassifier`` checkpoints
(``backbone.*``, ``head.fc.*``; the final ``norm`` becomes ``backbone.outnorm3``), loadable with ``tools/test.py`` or as
detection/segmentation pretraining through ``init_cfg=dict(type='Pretrained', checkpoint=OUT, prefix='backbone.')``.
Upstream mmdet/mmseg checkpoints already use our keys and load directly; they pass through unchanged. With
``--check-arch`` the result is loaded strictly into the classifier of that size, so a wrong or truncated file fails
here.
"""
from _convert import run

from vssm.models.spatial_mamba import convert_upstream_state_dict

if __name__ == '__main__':
    run(__doc__, convert_upstream_state_dict, 'SpatialMamba')
