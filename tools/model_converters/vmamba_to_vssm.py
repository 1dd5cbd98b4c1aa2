"""Convert an upstream VMamba checkpoint (MzeroMiko/VMamba, v2 or legacy v0 key names) to vssm's key layout.

    python tools/model_converters/vmamba_to_vssm.py UPSTREAM.pth OUT.pth [--ema] [--check-arch tiny]

Upstream classification checkpoints (``{'model': state_dict}``) become mmpretrain ``ImageClassifier`` checkpoints
(``backbone.*``, ``head.fc.*``; ``classifier.norm`` becomes ``backbone.outnorm3``); the legacy v0 names
(``patch_embed.proj``, ``ln_1``, ``self_attention``, ``norm``, ``head``) are renamed on the way. Upstream mmdet/mmseg
checkpoints already use our keys and load directly. With ``--check-arch`` the result is loaded strictly into the
classifier of that size.
"""
from _convert import run

from vssm.models.vmamba import convert_upstream_state_dict

if __name__ == '__main__':
    run(__doc__, convert_upstream_state_dict, 'VMamba')
