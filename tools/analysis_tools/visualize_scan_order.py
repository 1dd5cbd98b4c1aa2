"""Draw Spectral VMamba's token traversal orders on an image and on its 90/180/270-degree rotations.

    python tools/analysis_tools/visualize_scan_order.py IMAGE [--checkpoint CKPT] [--arch tiny] [--size 224]
        [--stage 0] [--upstream-compat] [--out scan_order.png]

One row per rotation (0, 90, 180, 270 degrees), one column per eigenvector (orders 1..top_k): each panel shows the
rotated image with every token coloured by its position in the traversal (dark: first, bright: last) and the path
through the first tokens. In the default (fixed) mode the orders rotate with the image, so the rows are rotated
copies of each other; each panel's title gives the share of tokens whose rank equals the unrotated image's rank at
the same (rotated-back) place. ``--upstream-compat`` shows upstream's behaviour (not equivariant past stage 0).

Without ``--checkpoint`` the weights are random (the RFN too) and the orders follow colour and layout only; pass a
classifier or backbone checkpoint of ours (or one converted with tools/model_converters/spectral_vmamba_to_vssm.py).
"""
import argparse
import json
import os.path as osp
import sys

import numpy as np
import torch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('image', help='an image file (any format PIL reads)')
    parser.add_argument('--checkpoint', help='a classifier (backbone.* keys) or backbone checkpoint')
    parser.add_argument('--arch', default='tiny', help="tiny/small/base or a JSON dict, e.g. '{\"dims\": [256, 32, "
                        "64, 128], \"depths\": [1, 1, 1, 1]}'")
    parser.add_argument('--size', type=int, default=224, help='square input side (multiple of 16)')
    parser.add_argument('--stage', type=int, default=0, choices=range(4), help='stage whose orders are drawn')
    parser.add_argument('--upstream-compat', action='store_true', help="upstream's ordering (see the module)")
    parser.add_argument('--path-tokens', type=int, default=40, help='draw the path through this many first tokens')
    parser.add_argument('--out', default='scan_order.png', help='output PNG')
    return parser.parse_args(argv)


def load_image(path: str, size: int) -> torch.Tensor:
    """(1, 3, size, size) normalized with ImageNet's mean/std, and the resized RGB image as uint8 (size, size, 3)."""
    from PIL import Image
    if not osp.isfile(path):
        raise SystemExit(f'visualize_scan_order: image {path!r} does not exist.')
    if size % 16:
        raise SystemExit(f'visualize_scan_order: --size must be a multiple of 16 (the RFN\'s stride), got {size}.')
    rgb = np.asarray(Image.open(path).convert('RGB').resize((size, size), Image.BICUBIC))
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    x = torch.from_numpy(((rgb - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]
    return x, rgb


def build_model(args: argparse.Namespace):
    import vssm  # noqa: F401
    from vssm.analysis.models import backbone_state_dict
    from vssm.models import SpectralVMamba
    arch = json.loads(args.arch) if args.arch.lstrip().startswith('{') else args.arch
    model = SpectralVMamba(arch, out_indices=(0, 1, 2, 3), upstream_compat=args.upstream_compat)
    if args.checkpoint:
        try:
            state = backbone_state_dict(args.checkpoint)
        except FileNotFoundError as error:
            raise SystemExit(f'visualize_scan_order: {error}') from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith('outnorm')]  # classifiers keep only the last stage's norm
        if missing or unexpected:
            raise SystemExit(f'visualize_scan_order: {args.checkpoint} is not a SpectralVMamba-{args.arch} '
                             f'checkpoint: missing {missing[:5]}, unexpected {unexpected[:5]}.')
    else:
        print('visualize_scan_order: no --checkpoint, the weights (the RFN\'s too) are random.', file=sys.stderr)
    return model.eval()


def rank_maps(model, x: torch.Tensor, stage: int):
    """For rotations k = 0..3: the (top_k, h, w) rank of every token of stage ``stage``'s grid, in the rotated frame."""
    maps = []
    with torch.no_grad():
        for k in range(4):
            _, orders = model.forward_with_orders(torch.rot90(x, k, dims=(2, 3)))
            order = orders[stage][0]  # (L, top_k)
            length, top_k = order.shape
            rank = torch.empty_like(order)
            rank.scatter_(0, order, torch.arange(length)[:, None].expand(-1, top_k))
            side = int(round(length**0.5))
            maps.append(rank.T.reshape(top_k, side, side))
    return maps


def draw(rgb: np.ndarray, maps, args: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    top_k = maps[0].shape[0]
    fig, axes = plt.subplots(4, top_k + 1, figsize=(2.6 * (top_k + 1), 10.4), squeeze=False)
    size = rgb.shape[0]
    for k in range(4):
        image = np.rot90(rgb, k).copy()
        axes[k, 0].imshow(image)
        axes[k, 0].set_title(f'rotated {90 * k} deg', fontsize=9)
        for t in range(top_k):
            rank = maps[k][t].numpy()
            side = rank.shape[0]
            back = torch.rot90(maps[k][t], -k).numpy()  # in the unrotated frame
            agreement = (back == maps[0][t].numpy()).mean()
            ax = axes[k, t + 1]
            ax.imshow(image)
            ax.imshow(rank, cmap='viridis', alpha=0.6, extent=(0, size, size, 0), interpolation='nearest')
            cell = size / side
            first = np.argsort(rank.flatten())[:args.path_tokens]
            rows, cols = np.divmod(first, side)
            ax.plot((cols + 0.5) * cell, (rows + 0.5) * cell, color='white', linewidth=1.0)
            ax.plot((cols[0] + 0.5) * cell, (rows[0] + 0.5) * cell, 'o', color='red', markersize=4)
            ax.set_title(f'order {t + 1}: {100 * agreement:.0f}% as unrotated', fontsize=9)
        for ax in axes[k]:
            ax.set_xticks([])
            ax.set_yticks([])
    mode = 'upstream_compat' if args.upstream_compat else 'fixed'
    fig.suptitle(f'Spectral VMamba traversal orders, stage {args.stage} ({mode} mode; colour = rank, white = the '
                 f'first {args.path_tokens} tokens, red = start)', fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    x, rgb = load_image(args.image, args.size)
    model = build_model(args)
    maps = rank_maps(model, x, args.stage)
    draw(rgb, maps, args)
    print(f'visualize_scan_order: wrote {args.out}')


if __name__ == '__main__':
    main()
