"""Effective receptive field (ERF) of a backbone stage, as the VMamba paper shows it (RepLKNet's protocol).

    python tools/analysis_tools/erf.py CONFIG [--checkpoint CKPT] [--images DIR_OR_FILE ...] [--num-images 50]
        [--size 1024] [--stage -1] [--out erf.png] [--save-map erf.npy] [--relu] [--device cpu]
        [--ops-backend torch] [--cfg-options k=v ...]

Any classification, detection or segmentation config works: only ``model.backbone`` is built (eval mode, batch 1,
``out_indices=(STAGE, )``, no ``init_cfg`` and no ``*_pretrained`` download). For each image (resized to
SIZE x SIZE, bicubic, normalized with ImageNet's mean/std) the tool takes the gradient of the sum over channels of
the central pixel of the stage's output with respect to the input image, its absolute value summed over the colour
channels, and averages these (SIZE, SIZE) maps over the images. The stage's output is taken before the backbone's
output norm ``outnorm{STAGE}`` (as RepLKNet takes its features before any norm): that LayerNorm over the channels
would, with uniform affine weights, make the channel sum a constant with no gradient at all. ``--relu`` uses
RepLKNet's exact variant instead (the ReLU of the central outputs, and the ReLU of the gradient in place of its
absolute value).

The heatmap shows ``log10(1 + map)`` divided by its maximum (RepLKNet's scaling, which makes models comparable).
The printed area ratios are RepLKNet's ``get_rectangle`` on that scaled map: for t = 20, 30, 50 and 99 %, the
smallest square centred on the input that holds a fraction t of the map's total, as a fraction of the input area
(1.0 when only the whole input holds it).

Without ``--checkpoint`` the weights are random; without ``--images`` the inputs are standard-normal noise (both are
said on stderr). A checkpoint may be a classifier, detector or segmentor of ours (``backbone.*`` keys) or a bare
backbone. Spectral VMamba needs sides that are multiples of 16; its RFN is frozen (no parameter gradients), but the
gradient with respect to the input flows through it. On a CPU the scan runs on the PyTorch reference
(``ops_backend='torch'``); 1024 x 1024 inputs take a while there, so try ``--size 256 --num-images 5`` first.
"""
import argparse
import os
import os.path as osp
import sys
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255
IMAGENET_STD = (58.395, 57.12, 57.375)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='a classification, detection or segmentation config')
    parser.add_argument('--checkpoint', help='a checkpoint of the whole model (backbone.* keys) or of the backbone')
    parser.add_argument('--images', nargs='+', help='image files and/or folders (searched recursively); '
                        'default: random noise inputs')
    parser.add_argument('--num-images', type=int, default=50, help='how many images (or noise inputs) to average')
    parser.add_argument('--size', type=int, default=1024, help='square input side (RepLKNet and VMamba use 1024)')
    parser.add_argument('--stage', type=int, default=-1, help='stage whose central output pixel is used (-1: last)')
    parser.add_argument('--out', default='erf.png', help='output heatmap (PNG)')
    parser.add_argument('--save-map', help='also save the averaged raw (SIZE, SIZE) map as .npy')
    parser.add_argument('--relu', action='store_true',
                        help="RepLKNet's exact variant: ReLU of the central outputs and of the gradient")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--ops-backend', choices=['auto', 'torch', 'cuda'],
                        help="the backbone's ops_backend (default: 'torch' on a CPU, the config's value on a GPU)")
    parser.add_argument('--seed', type=int, default=0, help='seed of the random weights and noise inputs')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys, e.g. a.b=1')
    return parser.parse_args(argv)


def build_backbone(config: str, stage: int, ops_backend: Optional[str] = None,
                   cfg_options: Optional[dict] = None) -> nn.Module:
    """The config's backbone returning only ``stage``'s output, with random weights, in eval mode.

    Args:
        config: path of a classification, detection or segmentation config.
        stage: the stage whose output is returned (negative values count from the last stage).
        ops_backend: overrides the backbone's ``ops_backend`` when given.
        cfg_options: ``--cfg-options`` overrides, applied before the backbone is built.
    """
    from vssm.analysis import models

    try:
        cfg = models.prepare_config(config, cfg_options)
        backbone = models.build_backbone(cfg, ops_backend, out_indices=(stage, ))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f'erf: {error}') from None
    return backbone.eval()


def drop_output_norm(backbone: nn.Module) -> None:
    """Make the returned stage's output the stage's own output, before its output norm ``outnorm{i}``.

    The output norm is a LayerNorm over the channels: with uniform affine weights (random init) the sum over the
    channels of its output is a constant, so the central pixel's sum would have no gradient at all. RepLKNet's ERF
    also uses the features before any output norm.
    """
    for i in backbone.out_indices:
        setattr(backbone, f'outnorm{i}', nn.Identity())


def load_backbone_weights(backbone: nn.Module, checkpoint: str) -> None:
    """Load a whole-model (``backbone.*`` keys) or backbone checkpoint into ``backbone``.

    The output norms' keys (``outnorm{i}``) are neither required nor used (see :func:`drop_output_norm`); a
    classifier holds only the last stage's.
    """
    from vssm.analysis.models import backbone_state_dict
    try:
        state = backbone_state_dict(checkpoint)
    except FileNotFoundError as error:
        raise SystemExit(f'erf: {error}') from None
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise SystemExit(f'erf: {checkpoint} does not fit the config\'s {type(backbone).__name__}: {error}') from None
    missing = [k for k in missing if not k.startswith('outnorm')]
    unexpected = [k for k in unexpected if not k.startswith('outnorm')]
    if missing or unexpected:
        raise SystemExit(f'erf: {checkpoint} does not fit the config\'s {type(backbone).__name__}: '
                         f'missing {missing[:5]}, unexpected {unexpected[:5]} ({len(missing)} / {len(unexpected)}).')


def find_images(paths: Sequence[str]) -> List[str]:
    """Image files among ``paths``; folders are searched recursively (sorted, so the choice is reproducible)."""
    found = []
    for path in paths:
        if osp.isdir(path):
            for root, _, files in sorted(os.walk(path)):
                found += [osp.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif osp.isfile(path):
            found.append(path)
        else:
            raise SystemExit(f'erf: {path!r} is neither an image file nor a folder.')
    if not found:
        raise SystemExit(f'erf: no images ({", ".join(IMAGE_EXTENSIONS)}) in {list(paths)}.')
    return found


def load_image(path: str, size: int) -> Tensor:
    """(1, 3, size, size): the RGB image resized with bicubic interpolation, normalized with ImageNet's mean/std."""
    from PIL import Image
    with Image.open(path) as image:
        rgb = np.asarray(image.convert('RGB').resize((size, size), Image.BICUBIC), dtype=np.float32)
    rgb = (rgb - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()  # (H, W, 3) -> (1, 3, H, W)


def input_gradient(backbone: nn.Module, x: Tensor, relu: bool = False) -> Tensor:
    """(H, W) contribution of every input pixel to the central pixel of the backbone's (only) output.

    Args:
        backbone: returns a one-element tuple of (1, C, h, w) maps.
        x: (1, 3, H, W) input image.
        relu: RepLKNet's variant (ReLU of the central outputs and of the gradient) instead of |gradient|.
    """
    x = x.detach().clone().requires_grad_(True)
    out = backbone(x)[0]  # (1, C, h, w)
    centre = out[:, :, out.shape[2] // 2, out.shape[3] // 2]  # (1, C)
    target = torch.relu(centre).sum() if relu else centre.sum()
    grad, = torch.autograd.grad(target, x)  # (1, 3, H, W)
    grad = torch.relu(grad) if relu else grad.abs()
    return grad.sum(dim=(0, 1))  # sum over the batch and the colour channels: (H, W)


def scale_map(erf: np.ndarray) -> np.ndarray:
    """RepLKNet's display scaling: ``log10(1 + map)`` divided by its maximum (all zeros stay zeros)."""
    scaled = np.log10(erf.astype(np.float64) + 1.0)
    peak = scaled.max()
    return scaled / peak if peak > 0 else scaled


def area_ratios(data: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> Dict[float, Tuple[int, float]]:
    """For each threshold t: (side, area ratio) of the smallest centred square holding a fraction t of the total.

    RepLKNet's ``get_rectangle``: squares of odd side 2i + 1 around the centre pixel, clipped to the map; a threshold
    that no such square reaches (only the whole map) gives the whole map's side and ratio 1.0.

    Args:
        data: (H, W) non-negative map, usually the output of :func:`scale_map`.
        thresholds: fractions of the total in (0, 1].
    """
    height, width = data.shape
    total = data.sum()
    cy, cx = height // 2, width // 2
    results = {}
    for thresh in thresholds:
        side, ratio = max(height, width), 1.0
        if total > 0:
            for i in range(max(height, width) // 2 + 1):
                window = data[max(cy - i, 0):cy + i + 1, max(cx - i, 0):cx + i + 1]
                if window.sum() / total > thresh:
                    side, ratio = max(window.shape), window.size / data.size
                    break
        results[thresh] = (side, ratio)
    return results


def compute_erf(backbone: nn.Module, inputs: Iterable[Tuple[str, Tensor]], device: str = 'cpu',
                relu: bool = False) -> Tuple[np.ndarray, int]:
    """Average :func:`input_gradient` over ``inputs``; maps with NaNs are skipped (as RepLKNet does).

    Args:
        backbone: a backbone returning one stage's output, in eval mode.
        inputs: an iterable of (name, (1, 3, H, W) tensor).
        device: where to run.
        relu: see :func:`input_gradient`.

    Returns:
        The averaged (H, W) map and the number of inputs it averages.
    """
    backbone = backbone.to(device)
    total, count = None, 0
    for name, x in inputs:
        try:
            grad = input_gradient(backbone, x.to(device), relu).double().cpu()
        except ValueError as error:  # e.g. SpectralVMamba's multiple-of-16 check
            raise SystemExit(f'erf: {error}') from None
        if torch.isnan(grad).any():
            print(f'erf: NaN gradient for {name}, skipped.', file=sys.stderr)
            continue
        total = grad if total is None else total + grad
        count += 1
    if count == 0:
        raise SystemExit('erf: every input gave NaN gradients; nothing to average.')
    return (total / count).numpy(), count


def draw(data: np.ndarray, path: str, title: str) -> None:
    """Heatmap of the scaled map, coloured like RepLKNet's (seaborn ``RdYlGn`` centred at 0, so 0 is yellow)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    upper_half = ListedColormap(plt.get_cmap('RdYlGn')(np.linspace(0.5, 1.0, 256)))  # RdYlGn over [-1, 1], 0..1 part
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(data, cmap=upper_half, vmin=0.0, vmax=1.0, interpolation='nearest')
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _inputs(args: argparse.Namespace) -> Tuple[Iterator[Tuple[str, Tensor]], str]:
    """(name, (1, 3, SIZE, SIZE) tensor) pairs, made one at a time: the first ``--num-images`` images, or noise."""
    if args.images:
        files = find_images(args.images)
        if len(files) < args.num_images:
            print(f'erf: only {len(files)} images found, averaging over all of them.', file=sys.stderr)
        files = files[:args.num_images]
        return ((f, load_image(f, args.size)) for f in files), f'{len(files)} images'
    print(f'erf: no --images, the inputs are {args.num_images} standard-normal noise images.', file=sys.stderr)
    generator = torch.Generator().manual_seed(args.seed)
    noise = ((f'noise {i}', torch.randn(1, 3, args.size, args.size, generator=generator))
             for i in range(args.num_images))
    return noise, f'{args.num_images} noise inputs'


def main(argv: Optional[Sequence[str]] = None) -> Dict[float, Tuple[int, float]]:
    args = parse_args(argv)
    if args.num_images < 1 or args.size < 1:
        raise SystemExit(f'erf: --num-images and --size must be positive, got {args.num_images} and {args.size}.')
    inputs, what = _inputs(args)  # finds the images first: a wrong path fails before the model is built
    torch.manual_seed(args.seed)
    ops_backend = args.ops_backend or ('torch' if args.device == 'cpu' else None)
    backbone = build_backbone(args.config, args.stage, ops_backend, args.cfg_options)
    stage = backbone.out_indices[0]
    name = type(backbone).__name__
    if args.checkpoint:
        load_backbone_weights(backbone, args.checkpoint)
        weights = osp.basename(args.checkpoint)
    else:
        print(f'erf: no --checkpoint, the {name} weights are random.', file=sys.stderr)
        weights = 'random weights'
    drop_output_norm(backbone)
    erf, count = compute_erf(backbone, inputs, args.device, args.relu)
    if args.save_map:
        np.save(args.save_map, erf)
    data = scale_map(erf)
    ratios = area_ratios(data)
    print(f'{args.config}: {name} stage {stage}, {count} inputs of {args.size}x{args.size}, {weights}')
    print(f'  raw map: max {erf.max():.4g}, min {erf.min():.4g}; high-contribution area ratio (RepLKNet):')
    for thresh, (side, ratio) in ratios.items():
        print(f'  {100 * thresh:>4.0f}%: side {side:>5d}, area ratio {ratio:.4f}')
    summary = ', '.join(f'{100 * t:.0f}%: {r:.3f}' for t, (_, r) in ratios.items())
    title = (f'{osp.splitext(osp.basename(args.config))[0]}\n{name} stage {stage}, {what} at {args.size} px, '
             f'{weights}\narea ratios {summary}')
    draw(data, args.out, title)
    print(f'erf: wrote {args.out}')
    return ratios


if __name__ == '__main__':
    main()
