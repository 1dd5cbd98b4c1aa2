"""Convert an upstream Spectral VMamba checkpoint (Sahardastani/spectral_vmamba) to vssm's key layout.

    python tools/model_converters/spectral_vmamba_to_vssm.py UPSTREAM.pth OUT.pth [--ema] [--check-arch tiny]

Upstream classification checkpoints (``{'model': state_dict}``, the frozen ResNet-18 under ``model_patchification``)
become mmpretrain ``ImageClassifier`` checkpoints (``backbone.*``, ``head.fc.*``; ``classifier.norm`` becomes
``backbone.outnorm3``). Evaluate them with ``model.backbone.upstream_compat=True`` to reproduce upstream's outputs.
With ``--check-arch`` the result is loaded strictly into the classifier of that size (use ``--num-classes 100`` for
the mini-ImageNet checkpoints).
"""
from _convert import run

from vssm.models.spectral_vmamba import convert_upstream_state_dict

if __name__ == '__main__':
    run(__doc__, convert_upstream_state_dict, 'SpectralVMamba')
