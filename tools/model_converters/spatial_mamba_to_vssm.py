"""Convert an upstream Spatial-Mamba checkpoint to vssm's key layout.

    python tools/model_converters/spatial_mamba_to_vssm.py UPSTREAM.pth OUT.pth [--ema] [--check-arch tiny]

Upstream classification checkpoints (``{'model': state_dict}``, from EdwardChasel/Spatial-Mamba) become
mmpretrain ``ImageClassifier`` checkpoints (``backbone.*``, ``head.fc.*``; the final ``norm`` becomes
``backbone.outnorm3``), loadable with ``tools/test.py`` or as detection/segmentation pretraining through
``init_cfg=dict(type='Pretrained', checkpoint=OUT, prefix='backbone.')``. Upstream mmdet/mmseg checkpoints
already use our keys (``backbone.*``) and load directly; they pass through unchanged. With ``--check-arch``
the result is loaded strictly into the classifier of that size, so a wrong or truncated file fails here.
"""
import argparse
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='upstream checkpoint (.pth)')
    parser.add_argument('dst', help='output checkpoint (.pth)')
    parser.add_argument('--ema', action='store_true', help="convert the 'model_ema' weights instead of 'model'")
    parser.add_argument('--check-arch', choices=['tiny', 'small', 'base'],
                        help='load the result strictly into an ImageClassifier of this size')
    parser.add_argument('--num-classes', type=int, default=1000, help='head size used by --check-arch')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from vssm.models.spatial_mamba import SpatialMamba, convert_upstream_state_dict
    src = torch.load(args.src, map_location='cpu', weights_only=True)
    if args.ema:
        if 'model_ema' not in src:
            raise SystemExit(f"{args.src} has no 'model_ema' entry (keys: {sorted(src)}); drop --ema.")
        src = {'model': src['model_ema']}
    state_dict = convert_upstream_state_dict(src)
    if args.check_arch:
        from mmpretrain.registry import MODELS
        dim = SpatialMamba.arch_zoo[args.check_arch]['dims'][-1]
        model = MODELS.build(
            dict(type='ImageClassifier', backbone=dict(type='SpatialMamba', arch=args.check_arch),
                 neck=dict(type='GlobalAveragePooling'),
                 head=dict(type='LinearClsHead', num_classes=args.num_classes, in_channels=dim)))
        model.load_state_dict(state_dict, strict=True)
        print(f'loaded strictly into SpatialMamba-{args.check_arch} ({len(state_dict)} tensors)')
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save({'state_dict': state_dict, 'meta': {'converted_from': str(args.src), 'ema': args.ema}}, args.dst)
    print(f'wrote {args.dst}')


if __name__ == '__main__':
    main()
