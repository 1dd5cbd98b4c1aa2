"""FLOPs and parameters of a vssm model built from a config (mmengine.analysis, fvcore's counting rules).

    python tools/analysis_tools/get_flops.py CONFIG [--shape 224 224] [--mode train|eval]

Classification configs: the whole classifier. Detection/segmentation configs: the backbone only
(the rest are mmdet/mmseg heads whose cost depends on the number of proposals). One multiply-add
counts as one FLOP; the selective scan is counted with the upstream papers' rule (see vssm/analysis.py).
The papers count in train mode (``--mode train``, the default).
"""
import argparse
import warnings

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Count FLOPs and parameters of a vssm model.')
    parser.add_argument('config', help='config file')
    parser.add_argument('--shape', type=int, nargs='+', default=[224, 224], help='input H W (or one side)')
    parser.add_argument('--mode', choices=['train', 'eval'], default='train',
                        help='module mode while tracing (BatchNorm counts differ)')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import vssm  # noqa: F401  (registers the backbones)
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    from vssm.analysis import count_flops

    if len(args.shape) not in (1, 2):
        raise SystemExit(f'--shape takes one or two integers (H W), got {args.shape}')
    height, width = (args.shape * 2)[:2]
    cfg = Config.fromfile(args.config)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    if cfg.get('default_scope') == 'mmpretrain':
        model, what = MODELS.build(cfg.model), 'classifier'
    else:
        backbone_cfg = dict(cfg.model.backbone)
        backbone_cfg['init_cfg'] = None
        model, what = MODELS.build(backbone_cfg), 'backbone'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        flops = count_flops(model, (3, height, width), mode=args.mode)
    params = sum(p.numel() for p in model.parameters())
    print(f'{args.config}\n  {what}: input 3x{height}x{width}, {flops / 1e9:.3f} GFLOPs ({args.mode} mode), '
          f'{params / 1e6:.2f} M parameters ({params:,})')


if __name__ == '__main__':
    main()
