"""FLOPs and parameters of a vssm model built from a config (mmengine.analysis, fvcore's counting rules).

    python tools/analysis_tools/get_flops.py CONFIG [--shape 224 224] [--mode train|eval] [--cfg-options k=v ...]

Classification configs: the whole classifier. Detection/segmentation configs: the backbone only
(the rest are mmdet/mmseg heads whose cost depends on the number of proposals). One multiply-add
counts as one FLOP; the selective scan is counted with the upstream papers' rule (see vssm/analysis/flops.py).
The papers count in train mode (``--mode train``, the default).
"""
import argparse
import warnings
from typing import Optional, Sequence

from mmengine.config import DictAction


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Count FLOPs and parameters of a vssm model.')
    parser.add_argument('config', help='config file')
    parser.add_argument('--shape', type=int, nargs='+', default=[224, 224], help='input H W (or one side)')
    parser.add_argument('--mode', choices=['train', 'eval'], default='train',
                        help='module mode while tracing (BatchNorm counts differ)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys, e.g. a.b=1')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    import vssm  # noqa: F401  (registers the backbones)
    from vssm.analysis import build_backbone, build_model, count_flops, prepare_config

    if len(args.shape) not in (1, 2):
        raise SystemExit(f'--shape takes one or two integers (H W), got {args.shape}')
    height, width = (args.shape * 2)[:2]
    cfg = prepare_config(args.config, args.cfg_options)
    if cfg.get('default_scope') == 'mmpretrain':
        model, what = build_model(cfg), 'classifier'
    else:
        model, what = build_backbone(cfg), 'backbone'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        flops = count_flops(model, (3, height, width), mode=args.mode)
    params = sum(p.numel() for p in model.parameters())
    print(f'{args.config}\n  {what}: input 3x{height}x{width}, {flops / 1e9:.3f} GFLOPs ({args.mode} mode), '
          f'{params / 1e6:.2f} M parameters ({params:,})')


if __name__ == '__main__':
    main()
