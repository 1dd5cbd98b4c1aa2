"""The command line shared by the upstream checkpoint converters (``<family>_to_vssm.py``)."""
import argparse
from pathlib import Path
from typing import Callable

import torch


def run(description: str, convert: Callable[[dict], dict], backbone_type: str) -> None:
    """Parse ``SRC DST [--ema] [--check-arch SIZE] [--num-classes N]``, convert and save an mmengine checkpoint.

    A missing, truncated or unreadable SRC fails with one message that says so (no traceback).
    """
    from vssm.engine.launch import run_tool
    run_tool(lambda: _run(description, convert, backbone_type))


def _run(description: str, convert: Callable[[dict], dict], backbone_type: str) -> None:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='upstream checkpoint (.pth)')
    parser.add_argument('dst', help='output checkpoint (.pth)')
    parser.add_argument('--ema', action='store_true', help="convert the 'model_ema' weights instead of 'model'")
    parser.add_argument('--check-arch', choices=['tiny', 'small', 'base'],
                        help='load the result strictly into an ImageClassifier of this size')
    parser.add_argument('--num-classes', type=int, default=1000, help='head size used by --check-arch')
    args = parser.parse_args()

    from mmpretrain.registry import MODELS

    import vssm  # noqa: F401  (registers the backbones)
    from vssm.fileio import load_checkpoint_file
    src = load_checkpoint_file(args.src, what='upstream checkpoint', fix='download it again')
    if args.ema:
        if 'model_ema' not in src:
            raise SystemExit(f"[vssm] error: {args.src} has no 'model_ema' entry (keys: {sorted(src)}); drop --ema.")
        src = {'model': src['model_ema']}
    state_dict = convert(src)
    if args.check_arch:
        backbone = MODELS.get(backbone_type)
        dim = backbone.arch_zoo[args.check_arch]['dims'][-1]
        model = MODELS.build(
            dict(type='ImageClassifier', backbone=dict(type=backbone_type, arch=args.check_arch),
                 neck=dict(type='GlobalAveragePooling'),
                 head=dict(type='LinearClsHead', num_classes=args.num_classes, in_channels=dim)))
        from vssm.engine.checkpoint import check_state_fits
        check_state_fits(model, {'state_dict': state_dict}, f'{args.src} (converted)', revise_keys=())
        model.load_state_dict(state_dict, strict=True)
        print(f'loaded strictly into {backbone_type}-{args.check_arch} ({len(state_dict)} tensors)')
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save({'state_dict': state_dict, 'meta': {'converted_from': str(args.src), 'ema': args.ema}}, args.dst)
    print(f'wrote {args.dst}')
