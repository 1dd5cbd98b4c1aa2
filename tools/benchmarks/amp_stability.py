"""Mixed-precision stability: train Mask R-CNN and UPerNet with each T backbone in bf16 and fp16 for N iterations at
full resolution and check that no loss goes non-finite, that the fp16 loss scaler does not keep skipping steps, and
that the selective scan stays in float32 where it must.

    python tools/benchmarks/amp_stability.py [--models spatial-mamba-t vmamba-t spectral-vmamba-t] [--tasks det seg]
        [--dtypes bf16 fp16] [--iters 500] [--det-size 1333 800] [--seg-size 512] [--batch B] [--device cuda]
        [--backend auto] [--det-autocast auto|whole|features] [--lr-schedule config|constant]
        [--max-skipped-frac 0.05] [--stop-after-nonfinite 10] [--time-limit SECONDS] [--seed 0] [--json out.json]

Protocol:

* Models: Mask R-CNN from detection/configs/<family>/mask-rcnn_<name>_fpn_1x_coco.py (``det``) and UPerNet from
  segmentation/configs/<family>/<name>_upernet_8xb2-160k_ade20k-512x512.py (``seg``), built from the configs with
  random weights: every ``Pretrained`` ``init_cfg`` and ``*_pretrained`` argument is cleared (nothing is loaded or
  downloaded), then ``model.init_weights()`` runs and SyncBN becomes BN, as the Runner does in a single process.
  ``--backend`` sets the backbone's ``ops_backend`` (default: the config's, ``auto`` = the kernels when they are
  built and the tensors are on CUDA).
* Optimizer: the config's ``optim_wrapper`` (AdamW, its ``paramwise_cfg``, its ``clip_grad`` if any) with
  ``type='AmpOptimWrapper'``, ``dtype`` bfloat16 or float16 and ``loss_scale='dynamic'``: exactly what
  ``tools/train.py --amp`` builds, with the dtype set. Both dtypes therefore go through torch's GradScaler (for bf16
  it is harmless: bf16 has float32's range). Learning rate (``--lr-schedule config``, the default): the config's
  iteration-based schedulers (the linear warm-up of the first 1000 (det) / 1500 (seg) iterations), i.e. what the
  first N iterations of a real run see; epoch-based ones (Mask R-CNN's MultiStepLR, first milestone at epoch 8) are
  left out. ``--lr-schedule constant`` trains at the config's full learning rate from the first step (a harder test).
* Steps: ``model.train_step(data, optim_wrapper)``, the Runner's own training step: the data preprocessor
  (normalisation, padding, mask padding), the forward under mmengine's autocast, the losses, the scaled backward,
  unscaling, clipping, the scaler's step (skipped when a gradient is inf/NaN) and its update.
* Mask R-CNN in bf16 (``--det-autocast auto``): autocast covers the backbone and the neck, and the heads run in fp32
  on float32 maps, because mmcv 2.1.0 has no bf16 RoIAlign (CPU or CUDA) nor bf16 CPU NMS and mmdet gives the RoIs
  the features' dtype: a whole-model bf16 autocast (``--det-autocast whole``) stops at the RPN's NMS on a CPU and at
  the first RoIAlign on CUDA, and so would ``tools/train.py --amp`` with ``optim_wrapper.dtype='bfloat16'``. In fp16
  the whole model runs under autocast (mmdet's own AMP recipe; mmcv has fp16 kernels). UPerNet always runs whole
  under autocast.
* Data: synthetic batches made on the device every iteration from ``--seed`` and the iteration (fresh data each
  step; the same for every model and dtype). Each image is a noisy colour gradient with 3-8 filled rectangles and
  ellipses whose colour depends on their class. ``det``: ``--batch`` (default: the config's, 2) images of
  ``--det-size`` W H (1333 x 800, padded by the config's preprocessor to a multiple of 32, 1344 x 800), each shape an
  instance (box, label of the 80 COCO classes, mask as ``BitmapMasks`` as mmdet's pipeline makes them).
  ``seg``: ``--batch`` (the config's, 2) crops of ``--seg-size`` (512), label maps of the 150 ADE20K classes (the
  background one random class, each shape its own) with a band of ignore pixels (255). Why not the real pipeline on
  files: tools/make_demo_data.py writes fixed small sizes (160 x 128, 128 x 128; the configs' pipelines would upscale
  them to 1000 x 800, blurred), and decoding full-resolution files on the host would time the data loader, not the
  model; what the model sees (uint8 images, boxes, bitmap masks, label maps with ignore pixels, the preprocessor's
  normalisation and padding) is what the real pipeline hands it.
* Per iteration: the total loss and every loss term, whether any of them is non-finite, whether any parameter
  gradient is non-finite (checked before the scaler's step: unscaling multiplies by 1/scale, so the finite/non-finite
  verdict is the one the scaler takes), the gradient norm (unscaled), whether the optimizer step was skipped by the
  scaler, and the loss scale before the step.
* Per run: max, first and final loss (final = mean of the last 10), the iterations with a non-finite loss, the
  skipped steps (a few at the start are normal for fp16: the scaler starts at 2**16 and halves on each overflow), the
  longest run of consecutive skips, the smallest loss scale, the median time per iteration, the wall time, the peak
  GPU memory (``torch.cuda.max_memory_allocated``), and the dtype report of the selective scan.
* Selective scan dtypes: while a run trains, the ``selective_scan`` the backbones call (and Spatial-Mamba's
  ``state_fusion``, and the reference scan's ``linear_scan``) are wrapped to record the dtypes of every call. The scan
  is "in fp32 where needed" when, in every call, A, D and delta_bias are float32, the output is float32, the
  gradient flowing back into the output is float32, and on the reference ops every state recurrence (forward and
  backward) runs in float32 (on the kernels the states are float32 by the kernel's contract: its chunk states are
  float32 for every input dtype). u, delta, B and C may be bf16/fp16 under autocast; the report shows that they are
  (so the check is exercised). Spatial-Mamba's state-fusion dtypes are reported, not checked: its reference
  (``F.conv2d``) is autocast to bf16/fp16 on the float32 states, its kernel (a custom op, not autocast) keeps them
  float32.
* Failure: a run fails on an error (out of memory, ...), any non-finite loss, more than ``--max-skipped-frac`` of its
  iterations skipped by the scaler, or a scan dtype violation. ``--stop-after-nonfinite`` consecutive non-finite
  losses end a run early (diverged).
* ``--time-limit SECONDS`` bounds the whole invocation: a run that reaches it stops after the iteration in progress
  and is reported with the iterations done (status ``time-limit``); the runs after it are listed as ``not-run``.
  Split the work over several calls with ``--models``/``--tasks``/``--dtypes``.

Output: a table on stdout; ``--json PATH``: the settings, every run's summary and its per-iteration losses, loss
scales, gradient norms and flags (rewritten after every run, so a call cut short keeps what it did). Exit status: 0
when every run completed and is stable, 1 when any run failed, 2 when none failed but some were cut short or not run.

On a CPU (for tests) only bf16 runs (autocast on a CPU has no fp16); mmengine's ``AmpOptimWrapper`` refuses to be
built without an accelerator, so its check is bypassed there, and torch's CUDA GradScaler then disables itself
(no loss scaling: the scale is reported as None).
"""
import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

DTYPES = {'bf16': 'bfloat16', 'fp16': 'float16'}
TASKS = ('det', 'seg')
NONFINITE_LIMIT = 10
FINAL_WINDOW = 10


@dataclass(frozen=True)
class ModelSpec:
    """One T model: its configs relative to the repository root."""
    name: str
    detector: str
    segmentor: str

    def config(self, task: str) -> str:
        return self.detector if task == 'det' else self.segmentor


def _spec(name: str, folder: str) -> ModelSpec:
    return ModelSpec(name, f'detection/configs/{folder}/mask-rcnn_{name}_fpn_1x_coco.py',
                     f'segmentation/configs/{folder}/{name[:-2]}-tiny_upernet_8xb2-160k_ade20k-512x512.py')


SPECS: Dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (_spec('spatial-mamba-t', 'spatial_mamba'), _spec('vmamba-t', 'vmamba'),
                 _spec('spectral-vmamba-t', 'spectral_vmamba'))
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', choices=list(SPECS), default=list(SPECS))
    parser.add_argument('--tasks', nargs='+', choices=TASKS, default=list(TASKS))
    parser.add_argument('--dtypes', nargs='+', choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument('--iters', type=int, default=500, help='training iterations per run (default 500)')
    parser.add_argument('--det-size', type=int, nargs=2, default=(1333, 800), metavar=('W', 'H'),
                        help='Mask R-CNN image size before padding (default 1333 800)')
    parser.add_argument('--seg-size', type=int, default=512, help='UPerNet crop size (default 512)')
    parser.add_argument('--batch', type=int, default=None, help="images per step (default: the config's, 2)")
    parser.add_argument('--device', default=None, help='cuda (default when available) or cpu')
    parser.add_argument('--backend', choices=['auto', 'torch', 'cuda'], default=None,
                        help="the backbone's ops_backend (default: the config's)")
    parser.add_argument('--det-autocast', choices=['auto', 'whole', 'features'], default='auto',
                        help="Mask R-CNN: autocast over the whole model, or over the backbone and neck only with the "
                        "heads in fp32 ('features'); auto: whole for fp16, features for bf16 (default)")
    parser.add_argument('--lr-schedule', choices=['config', 'constant'], default='config',
                        help="the config's iteration-based schedulers (warm-up) or its full lr from the start")
    parser.add_argument('--max-skipped-frac', type=float, default=0.05,
                        help='a run fails when more than this fraction of its iterations is skipped (default 0.05)')
    parser.add_argument('--stop-after-nonfinite', type=int, default=NONFINITE_LIMIT,
                        help=f'end a run after this many consecutive non-finite losses (default {NONFINITE_LIMIT})')
    parser.add_argument('--time-limit', type=float, default=None,
                        help='seconds for the whole call; runs stop cleanly when it is reached')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', help='write the settings, summaries and per-iteration records here')
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(args.device)
    if device.type not in ('cuda', 'cpu'):
        parser.error(f'--device {args.device}: cuda or cpu')
    if device.type == 'cpu' and torch.cuda.is_available():
        parser.error("--device cpu on a machine with CUDA: mmengine's autocast would act on CUDA, not the CPU.")
    if device.type == 'cpu' and 'fp16' in args.dtypes:
        parser.error('fp16 needs CUDA (autocast on a CPU is bf16 only); use --dtypes bf16 on a CPU.')
    if args.iters < 1:
        parser.error('--iters must be >= 1')
    return args


# --- building ----------------------------------------------------------------------------------------------------
def load_config(path: str, backend: Optional[str]):
    """The config with no pretrained weights, SyncBN as BN on a CPU, and the ops backend set."""
    from mmengine.config import Config

    from vssm.engine.launch import clear_pretrained, prepare_for_device
    file = REPO_ROOT / path
    if not file.is_file():
        raise FileNotFoundError(f'config {path!r} not found (looked at {file}).')
    cfg = Config.fromfile(str(file))
    prepare_for_device(cfg, 'none')
    clear_pretrained(cfg.model)
    if backend is not None:
        cfg.model.backbone.ops_backend = backend
    return cfg


@contextlib.contextmanager
def _amp_on_cpu(device: torch.device) -> Iterator[None]:
    """mmengine's AmpOptimWrapper asserts an accelerator; on a CPU (tests) that check is bypassed for its build."""
    if device.type != 'cpu':
        yield
        return
    import warnings

    from mmengine.optim.optimizer import amp_optimizer_wrapper as module
    original = module.is_cuda_available
    module.is_cuda_available = lambda: True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*GradScaler.*')  # "CUDA is not available. Disabling"
            yield
    finally:
        module.is_cuda_available = original


@contextlib.contextmanager
def _quiet_logger() -> Iterator[None]:
    import logging

    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_training(cfg, dtype: str, device: torch.device, lr_schedule: str):
    """(model, AmpOptimWrapper, iteration-based schedulers, notes) from a config."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, PARAM_SCHEDULERS, DefaultScope
    scope = cfg.get('default_scope', 'mmengine')
    notes = []
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg.model)
        model.init_weights()
        model = revert_sync_batchnorm(model).to(device)  # as the Runner does for a single-process run
        ow_cfg = cfg.optim_wrapper.copy()
        ow_cfg.update(type='AmpOptimWrapper', dtype=DTYPES[dtype])
        ow_cfg.setdefault('loss_scale', 'dynamic')
        with _amp_on_cpu(device), _quiet_logger():  # one warning per frozen parameter (Spectral VMamba's RFN)
            optim_wrapper = build_optim_wrapper(model, ow_cfg)
        schedulers = []
        if lr_schedule == 'config':
            for sched in cfg.get('param_scheduler') or []:
                if sched.get('by_epoch', True):
                    notes.append(f"{sched['type']} (by epoch) left out")
                    continue
                schedulers.append(PARAM_SCHEDULERS.build(dict(sched, optimizer=optim_wrapper)))
    return model, optim_wrapper, schedulers, notes


def det_autocast_mode(requested: str, dtype: str) -> str:
    """'whole' or 'features' for a Mask R-CNN run (``--det-autocast auto``: features for bf16, whole for fp16)."""
    if requested != 'auto':
        return requested
    return 'features' if dtype == 'bf16' else 'whole'


def autocast_features_only(model: torch.nn.Module, device: torch.device, dtype: str) -> None:
    """Run a detector's backbone and neck (``extract_feat``) under autocast and its heads in fp32.

    mmcv 2.1.0 has no bf16 kernels for RoIAlign (CPU and CUDA) nor NMS (CPU), and mmdet hands the heads the
    features' dtype (``rois.type_as(feats[0])``), so a whole-model bf16 autocast stops at the first RoI extraction.
    The optimizer wrapper's autocast stays on around ``train_step``; ``loss`` switches it off for the heads and
    ``extract_feat`` switches it back on for the backbone and neck, whose maps reach the heads as float32.
    """
    loss, extract_feat = model.loss, model.extract_feat
    cast = getattr(torch, DTYPES[dtype])

    def features(inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        with torch.autocast(device.type, dtype=cast):
            feats = extract_feat(inputs)
        return tuple(f.float() for f in feats)

    def heads_in_fp32(inputs: torch.Tensor, data_samples: list) -> dict:
        with torch.autocast(device.type, enabled=False):
            return loss(inputs, data_samples)

    model.extract_feat = features
    model.loss = heads_in_fp32


# --- synthetic data ----------------------------------------------------------------------------------------------
def _shapes(n: int, height: int, width: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` filled rectangles or ellipses as (n, H, W) bool masks, each at least 8 px and at most half the image."""
    ys = torch.arange(height, device=device, dtype=torch.float32)[:, None]
    xs = torch.arange(width, device=device, dtype=torch.float32)[None, :]
    masks = []
    for _ in range(n):
        r = torch.rand(5, generator=g).tolist()
        w = 8 + r[0] * (width / 2 - 8)
        h = 8 + r[1] * (height / 2 - 8)
        x0 = r[2] * (width - w)
        y0 = r[3] * (height - h)
        if r[4] < 0.5:
            mask = (xs >= x0) & (xs < x0 + w) & (ys >= y0) & (ys < y0 + h)
        else:
            cx, cy = x0 + w / 2, y0 + h / 2
            mask = ((xs - cx) / (w / 2))**2 + ((ys - cy) / (h / 2))**2 <= 1
        masks.append(mask)
    return torch.stack(masks)


def _palette(labels: torch.Tensor) -> torch.Tensor:
    """A fixed colour (3,) uint8-valued float per class id."""
    ids = labels.long()[:, None]
    return ((ids * torch.tensor([97, 57, 31], device=labels.device) + 40) % 256).float()


def _paint(masks: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A uint8 (3, H, W) image: a noisy gradient with each mask filled in its class colour (later masks on top)."""
    n, height, width = masks.shape
    device = masks.device
    corners = torch.rand(3, 2, 2, generator=g) * 255
    image = torch.nn.functional.interpolate(corners[None].to(device), size=(height, width), mode='bilinear',
                                            align_corners=True)[0]
    colours = _palette(labels)
    for i in range(n):
        image = torch.where(masks[i], colours[i][:, None, None], image)
    noise = torch.randn(3, height, width, generator=torch.Generator(device).manual_seed(int(g.initial_seed()) + 1),
                        device=device) * 12
    return (image + noise).clamp(0, 255).to(torch.uint8)


def det_batch(batch: int, width: int, height: int, num_classes: int, seed: int, device: torch.device) -> dict:
    """One Mask R-CNN training batch as ``model.train_step`` takes it (what PackDetInputs and the collate give)."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    inputs, samples = [], []
    for i in range(batch):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        n = int(torch.randint(3, 9, (1, ), generator=g))
        masks = _shapes(n, height, width, g, device)
        labels = torch.randint(0, num_classes, (n, ), generator=g).to(device)
        inputs.append(_paint(masks, labels, g))
        # Later shapes cover earlier ones: keep each instance's visible part, drop the fully covered ones.
        visible = masks.clone()
        for j in range(n - 1):
            visible[j] &= ~masks[j + 1:].any(0)
        keep = visible.flatten(1).sum(1) >= 16
        visible, labels = visible[keep], labels[keep]
        ys = visible.any(2)
        xs = visible.any(1)
        idx_y = torch.arange(height, device=device)
        idx_x = torch.arange(width, device=device)
        big = torch.iinfo(torch.long).max
        x1 = torch.where(xs, idx_x, big).min(1).values
        x2 = torch.where(xs, idx_x, -1).max(1).values + 1
        y1 = torch.where(ys, idx_y, big).min(1).values
        y2 = torch.where(ys, idx_y, -1).max(1).values + 1
        gt = InstanceData()
        gt.bboxes = HorizontalBoxes(torch.stack([x1, y1, x2, y2], 1).float())
        gt.labels = labels
        gt.masks = BitmapMasks(visible.to(torch.uint8).cpu().numpy(), height, width)
        sample = DetDataSample(metainfo=dict(img_id=seed * 1000 + i, img_path=f'synthetic_{seed}_{i}.jpg',
                                             ori_shape=(height, width), img_shape=(height, width),
                                             scale_factor=(1.0, 1.0), flip=False, flip_direction=None))
        sample.gt_instances = gt
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def seg_batch(batch: int, size: int, num_classes: int, ignore_index: int, seed: int, device: torch.device) -> dict:
    """One UPerNet training batch as ``model.train_step`` takes it (what PackSegInputs and the collate give)."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    inputs, samples = [], []
    for i in range(batch):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        n = int(torch.randint(3, 9, (1, ), generator=g))
        masks = _shapes(n, size, size, g, device)
        labels = torch.randint(0, num_classes, (n + 1, ), generator=g).to(device)  # [0]: the background class
        seg = torch.full((size, size), int(labels[0]), dtype=torch.long, device=device)
        for j in range(n):
            seg[masks[j]] = labels[j + 1]
        inputs.append(_paint(torch.cat([torch.ones_like(masks[:1]), masks]), labels, g))
        band = int(torch.randint(0, size // 8 + 1, (1, ), generator=g))  # unlabelled border, as ADE20K has
        if band:
            seg[:band] = ignore_index
        sample = SegDataSample(metainfo=dict(img_path=f'synthetic_{seed}_{i}.jpg', ori_shape=(size, size),
                                             img_shape=(size, size), scale_factor=(1.0, 1.0), flip=False,
                                             flip_direction=None, reduce_zero_label=True))
        sample.gt_sem_seg = PixelData(data=seg[None])
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def batch_maker(cfg, task: str, args: argparse.Namespace, device: torch.device) -> Tuple[Callable[[int], dict], int]:
    """(iteration -> batch, batch size) for a config."""
    batch = args.batch or cfg.train_dataloader.batch_size
    if task == 'det':
        num_classes = cfg.model.roi_head.bbox_head.num_classes
        width, height = args.det_size
        return lambda it: det_batch(batch, width, height, num_classes, args.seed * 100003 + it, device), batch
    if cfg.model.data_preprocessor.get('size') is not None:  # the preprocessor pads every image to the crop size
        cfg.model.data_preprocessor.size = (args.seg_size, args.seg_size)
    head = cfg.model.decode_head
    num_classes, ignore_index = head.num_classes, head.get('ignore_index', 255)
    return lambda it: seg_batch(batch, args.seg_size, num_classes, ignore_index, args.seed * 100003 + it,
                                device), batch


# --- probes ------------------------------------------------------------------------------------------------------
def _name(dtype: Optional[torch.dtype]) -> str:
    return '-' if dtype is None else str(dtype).replace('torch.', '')


class ScanProbe:
    """Wraps the selective scan the backbones call (and the reference's state recurrence, Spatial-Mamba's state
    fusion) to record the dtypes of every call while a run trains."""

    FP32_ARGS = ('A', 'D', 'delta_bias')

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.calls: Dict[str, int] = {}
        self.recurrences: Dict[str, int] = {}
        self.grads: Dict[str, int] = {}
        self._grad_nonfinite: Optional[torch.Tensor] = None  # a count kept on the device: no sync per call
        self.fusion: Dict[str, int] = {}
        self.violations: Dict[str, int] = {}
        self._in_scan = False
        self._saw_recurrence = False
        self._patched: List[Tuple[Any, str, Any]] = []

    @staticmethod
    def _count(table: Dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def _scan(self, original: Callable) -> Callable:
        names = ('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias')

        def selective_scan(*args, **kwargs):
            values = dict(zip(names, args))
            values.update({k: v for k, v in kwargs.items() if k in names})
            self._saw_recurrence = False
            out = original(*args, **kwargs)
            path = 'torch' if self._saw_recurrence else 'kernel'
            autocast = torch.is_autocast_enabled(self.device_type)
            dtypes = {k: _name(getattr(values.get(k), 'dtype', None)) for k in names}
            key = (f"{path} autocast={'on' if autocast else 'off'} "
                   + ' '.join(f'{k}={v}' for k, v in dtypes.items() if v != '-') + f' -> out={_name(out.dtype)}')
            self._count(self.calls, key)
            for k in self.FP32_ARGS:
                if dtypes[k] not in ('-', 'float32', 'float64'):
                    self._count(self.violations, f'{k} is {dtypes[k]}')
            if out.dtype not in (torch.float32, torch.float64):
                self._count(self.violations, f'output is {_name(out.dtype)}')
            if out.requires_grad:
                out.register_hook(self._grad_hook)
            return out

        return selective_scan

    def _grad_hook(self, grad: torch.Tensor) -> None:
        self._count(self.grads, _name(grad.dtype))
        if grad.dtype not in (torch.float32, torch.float64):
            self._count(self.violations, f'gradient into the output is {_name(grad.dtype)}')
        bad = (~torch.isfinite(grad).all()).long()
        self._grad_nonfinite = bad if self._grad_nonfinite is None else self._grad_nonfinite + bad

    def _recurrence(self, original: Callable) -> Callable:

        def linear_scan(a, b):
            self._saw_recurrence = True
            self._count(self.recurrences, f'a={_name(a.dtype)} b={_name(b.dtype)}')
            if a.dtype not in (torch.float32, torch.float64) or b.dtype not in (torch.float32, torch.float64):
                self._count(self.violations, f'state recurrence in {_name(b.dtype)}')
            return original(a, b)

        return linear_scan

    def _state_fusion(self, original: Callable) -> Callable:

        def state_fusion(h, *args, **kwargs):
            out = original(h, *args, **kwargs)
            self._count(self.fusion, f'in={_name(h.dtype)} -> out={_name(out.dtype)}')
            return out

        return state_fusion

    def _patch(self, owner: Any, attr: str, make: Callable[[Callable], Callable]) -> None:
        original = getattr(owner, attr)
        self._patched.append((owner, attr, original))
        setattr(owner, attr, make(original))

    def __enter__(self) -> 'ScanProbe':
        import importlib

        from vssm.models import spatial_mamba, vmamba
        scan_module = importlib.import_module('vssm.ops.selective_scan')  # the module, not the function
        self._patch(vmamba, 'selective_scan', self._scan)  # VMamba's and Spectral VMamba's SS2D.scan
        self._patch(spatial_mamba, 'selective_scan', self._scan)
        self._patch(spatial_mamba, 'state_fusion', self._state_fusion)
        self._patch(scan_module, 'linear_scan', self._recurrence)  # the reference's forward and backward
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched.clear()

    def report(self) -> Dict[str, Any]:
        return dict(fp32_ok=not self.violations and bool(self.calls), calls=self.calls,
                    state_recurrences=self.recurrences, output_grads=self.grads,
                    output_grads_nonfinite=0 if self._grad_nonfinite is None else int(self._grad_nonfinite),
                    state_fusion=self.fusion, violations=self.violations)


class StepProbe:
    """Wraps the optimizer wrapper's step (gradients before the scaler's step: finite or not, unscaled norm, loss
    scale) and the inner optimizer's step (called by the scaler only when every gradient is finite)."""

    def __init__(self, optim_wrapper) -> None:
        self.ow = optim_wrapper
        self.scaler = getattr(optim_wrapper, 'loss_scaler', None)
        self.params = [p for group in optim_wrapper.optimizer.param_groups for p in group['params']]
        self.stepped = False
        self.grad_finite = True
        self.grad_norm: Optional[float] = None
        self.scale: Optional[float] = None
        ow_step, opt_step = optim_wrapper.step, optim_wrapper.optimizer.step

        def step(**kwargs):
            self._inspect()
            return ow_step(**kwargs)

        def optimizer_step(*args, **kwargs):
            self.stepped = True
            return opt_step(*args, **kwargs)

        if getattr(ow_step, '_with_counter', False):  # mmengine's schedulers check that their counter is in place
            step._with_counter = True
        optim_wrapper.step = step
        optim_wrapper.optimizer.step = optimizer_step

    def scaler_enabled(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def _inspect(self) -> None:
        self.scale = float(self.scaler.get_scale()) if self.scaler_enabled() else None
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            self.grad_finite, self.grad_norm = True, 0.0
            return
        norm = float(torch.nn.utils.get_total_norm(grads)) / (self.scale or 1.0)
        self.grad_finite = math.isfinite(norm)
        self.grad_norm = norm if self.grad_finite else None

    def begin(self) -> None:
        self.stepped, self.grad_finite, self.grad_norm, self.scale = False, True, None, None


# --- one run -----------------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _error_text(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return 'out of memory'
    lines = str(error).strip().splitlines() or ['']
    return f'{type(error).__name__}: {lines[0]}'[:300]


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(f'{x:.5g}')


def _loss_value(x: Any) -> float:
    return float(x.detach().float().mean()) if isinstance(x, torch.Tensor) else float(x)


def train_run(spec: ModelSpec, task: str, dtype: str, args: argparse.Namespace, device: torch.device,
              deadline: Optional[float]) -> Dict[str, Any]:
    """Build, train ``args.iters`` iterations (or until the deadline), and summarise one (model, task, dtype)."""
    row: Dict[str, Any] = dict(model=spec.name, task=task, dtype=dtype, config=spec.config(task),
                               iters_requested=args.iters, iters_done=0, status='ok', note='')
    _release(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(args.seed)
    probe = ScanProbe(device.type)
    losses: List[Optional[float]] = []
    records: Dict[str, list] = dict(loss_scale=[], grad_norm=[], seconds=[])
    nonfinite_iters: List[int] = []
    nonfinite_terms: Dict[str, int] = {}
    grad_nonfinite_iters: List[int] = []
    skipped_iters: List[int] = []
    last_terms: Dict[str, float] = {}
    model = optim_wrapper = None
    begin = time.perf_counter()
    try:
        cfg = load_config(spec.config(task), args.backend)
        make_batch, batch = batch_maker(cfg, task, args, device)
        size = f'{args.det_size[0]}x{args.det_size[1]}' if task == 'det' else f'{args.seg_size}x{args.seg_size}'
        row.update(batch=batch, size=size)
        model, optim_wrapper, schedulers, notes = build_training(cfg, dtype, device, args.lr_schedule)
        from vssm.ops._backend import describe_backends
        row.update(ops=describe_backends(cfg.model.backbone.get('ops_backend', 'auto'),
                                         torch.empty(1, device=device)),
                   params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2), notes=notes,
                   base_lr=optim_wrapper.optimizer.param_groups[0].get('initial_lr',
                                                                      optim_wrapper.optimizer.param_groups[0]['lr']))
        if task == 'det':
            row['autocast'] = det_autocast_mode(args.det_autocast, dtype)
            if row['autocast'] == 'features':
                autocast_features_only(model, device, dtype)
        else:
            row['autocast'] = 'whole'
        steps = StepProbe(optim_wrapper)
        row['loss_scaler'] = 'dynamic' if steps.scaler_enabled() else 'off (no CUDA GradScaler on a CPU)'
        model.train()
        consecutive_nonfinite = 0
        with probe:
            for it in range(args.iters):
                if deadline is not None and time.perf_counter() >= deadline:
                    row.update(status='time-limit', note=f'--time-limit reached after {it} iterations')
                    break
                start = time.perf_counter()
                data = make_batch(it)
                steps.begin()
                log_vars = model.train_step(data, optim_wrapper)
                for sched in schedulers:
                    sched.step()
                terms = {k: _loss_value(v) for k, v in log_vars.items()}
                _synchronize(device)
                records['seconds'].append(time.perf_counter() - start)
                loss = terms['loss']
                bad = [k for k, v in terms.items() if 'loss' in k and not math.isfinite(v)]  # not 'acc'
                losses.append(_round(loss))
                records['loss_scale'].append(steps.scale)
                records['grad_norm'].append(_round(steps.grad_norm))
                if bad:
                    nonfinite_iters.append(it)
                    for k in bad:
                        nonfinite_terms[k] = nonfinite_terms.get(k, 0) + 1
                    consecutive_nonfinite += 1
                else:
                    consecutive_nonfinite = 0
                    last_terms = terms
                if not steps.grad_finite:
                    grad_nonfinite_iters.append(it)
                if not steps.stepped:
                    skipped_iters.append(it)
                row['iters_done'] = it + 1
                if consecutive_nonfinite >= args.stop_after_nonfinite:
                    row.update(status='diverged', note=f'{consecutive_nonfinite} consecutive non-finite losses')
                    break
    except Exception as exc:  # noqa: BLE001  (one failing run must not stop the others)
        row.update(status='error', note=_error_text(exc))
        traceback.print_exc()
    _synchronize(device)
    row['wall_s'] = round(time.perf_counter() - begin, 1)
    row['peak_mem_gib'] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == 'cuda' else None
    finite = [x for x in losses if x is not None]
    times = records['seconds'][1:] or records['seconds']  # the first step includes cuDNN / allocator warm-up
    scales = [s for s in records['loss_scale'] if s is not None]
    row.update(
        first_loss=finite[0] if finite else None, max_loss=max(finite) if finite else None,
        final_loss=_round(statistics.mean(finite[-FINAL_WINDOW:])) if finite else None,
        nonfinite_losses=len(nonfinite_iters), nonfinite_terms=nonfinite_terms, nonfinite_iters=nonfinite_iters,
        grad_nonfinite_steps=len(grad_nonfinite_iters), grad_nonfinite_iters=grad_nonfinite_iters,
        skipped_steps=len(skipped_iters), skipped_iters=skipped_iters,
        max_consecutive_skips=_longest_run(skipped_iters), min_loss_scale=min(scales) if scales else None,
        final_loss_scale=scales[-1] if scales else None, last_terms={k: _round(v) for k, v in last_terms.items()},
        s_per_iter=round(statistics.median(times), 4) if times else None, scan=probe.report(),
        losses=losses, loss_scale=records['loss_scale'], grad_norm=records['grad_norm'])
    row['failed'], row['why'] = _verdict(row, args)
    if optim_wrapper is not None:
        row['final_lr'] = _round(optim_wrapper.optimizer.param_groups[0]['lr'])
    del model, optim_wrapper
    _release(device)
    return row


def _longest_run(iters: Sequence[int]) -> int:
    best = run = 0
    for i, it in enumerate(iters):
        run = run + 1 if i and it == iters[i - 1] + 1 else 1
        best = max(best, run)
    return best


def _verdict(row: Dict[str, Any], args: argparse.Namespace) -> Tuple[bool, List[str]]:
    why = []
    if row['status'] in ('error', 'diverged'):
        why.append(row['status'])
    if row['nonfinite_losses']:
        why.append(f"{row['nonfinite_losses']} non-finite losses")
    done = row['iters_done']
    if done and row['skipped_steps'] > args.max_skipped_frac * done:
        why.append(f"{row['skipped_steps']}/{done} steps skipped (> {args.max_skipped_frac:.0%})")
    if done and not row['scan']['fp32_ok']:
        why.append('selective scan dtypes: ' + (', '.join(row['scan']['violations']) or 'no scan call seen'))
    return bool(why), why


# --- output ------------------------------------------------------------------------------------------------------
COLUMNS = (('model', 18), ('task', 4), ('dtype', 5), ('iters', 9), ('status', 10), ('first', 8), ('final', 8),
           ('max', 8), ('nonfin', 6), ('skip', 5), ('scale min', 9), ('s/it', 7), ('wall s', 7), ('peak GiB', 8),
           ('scan fp32', 9), ('verdict', 7))


def _fmt(x: Any) -> str:
    if x is None:
        return '-'
    if isinstance(x, float):
        return f'{x:.4g}'
    return str(x)


def format_row(row: Dict[str, Any]) -> str:
    scan = row.get('scan') or {}
    values = (row['model'], row['task'], row['dtype'], f"{row['iters_done']}/{row['iters_requested']}", row['status'],
              row.get('first_loss'), row.get('final_loss'), row.get('max_loss'), row.get('nonfinite_losses'),
              row.get('skipped_steps'), row.get('min_loss_scale'), row.get('s_per_iter'), row.get('wall_s'),
              row.get('peak_mem_gib'), '-' if not scan or not row['iters_done'] else 'yes' if scan['fp32_ok'] else 'NO',
              'FAIL' if row.get('failed') else 'ok' if row['status'] == 'ok' else '-')
    return '  '.join(_fmt(v).rjust(w) if i >= 3 else _fmt(v).ljust(w)
                     for i, ((_, w), v) in enumerate(zip(COLUMNS, values)))


def header() -> str:
    return '  '.join(name.rjust(w) if i >= 3 else name.ljust(w) for i, (name, w) in enumerate(COLUMNS))


def describe_scan(row: Dict[str, Any]) -> List[str]:
    scan = row.get('scan') or {}
    lines = [f"    scan call: {n}x {key}" for key, n in scan.get('calls', {}).items()]
    lines += [f"    state recurrence: {n}x {key}" for key, n in scan.get('state_recurrences', {}).items()]
    lines += [f"    gradient into the scan output: {n}x {key}" for key, n in scan.get('output_grads', {}).items()]
    lines += [f"    state fusion: {n}x {key}" for key, n in scan.get('state_fusion', {}).items()]
    if scan.get('output_grads_nonfinite'):
        lines.append(f"    non-finite gradients into the scan output: {scan['output_grads_nonfinite']}")
    if row.get('why'):
        lines.append(f"    FAILED: {'; '.join(row['why'])}")
    if row.get('note'):
        lines.append(f"    note: {row['note']}")
    return lines


def _device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        return f'{props.name} ({props.total_memory / 2**30:.0f} GiB)'
    return f'CPU ({torch.get_num_threads()} threads)'


def write_json(path: str, meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    summary = dict(runs=len(rows), failed=sum(bool(r.get('failed')) for r in rows),
                   incomplete=sum(r['status'] in ('time-limit', 'not-run') for r in rows))
    text = json.dumps(dict(meta=meta, summary=summary, runs=rows), separators=(',', ':'))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path + '.tmp')
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import vssm  # noqa: F401  (registers the backbones; keeps mmpretrain importable next to transformers>=5)
    from mmengine.logging import MMLogger
    MMLogger.get_instance('amp_stability', log_level='WARNING')  # no per-parameter optimizer log lines
    start = time.perf_counter()
    deadline = None if args.time_limit is None else start + args.time_limit
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.cuda.set_device(device.index if device.index is not None else torch.cuda.current_device())
    meta = dict(device=_device_name(device), torch=torch.__version__, cuda=torch.version.cuda, iters=args.iters,
                det_size=list(args.det_size), seg_size=args.seg_size, batch=args.batch, backend=args.backend,
                lr_schedule=args.lr_schedule, max_skipped_frac=args.max_skipped_frac, seed=args.seed,
                tf32_matmul=torch.backends.cuda.matmul.allow_tf32, cudnn_tf32=torch.backends.cudnn.allow_tf32,
                command=' '.join(['python tools/benchmarks/amp_stability.py'] + args.argv),
                date=time.strftime('%Y-%m-%d %H:%M'))
    print(f"device: {meta['device']}, torch {meta['torch']}, {args.iters} iterations per run, det "
          f"{args.det_size[0]}x{args.det_size[1]}, seg {args.seg_size}x{args.seg_size}, lr schedule "
          f'{args.lr_schedule}', flush=True)
    print(header(), flush=True)
    rows: List[Dict[str, Any]] = []
    for task in args.tasks:
        for name in args.models:
            for dtype in args.dtypes:
                spec = SPECS[name]
                if deadline is not None and time.perf_counter() >= deadline:
                    row = dict(model=name, task=task, dtype=dtype, config=spec.config(task),
                               iters_requested=args.iters, iters_done=0, status='not-run',
                               note='--time-limit reached before this run', failed=False, why=[])
                else:
                    row = train_run(spec, task, dtype, args, device, deadline)
                rows.append(row)
                print(format_row(row), flush=True)
                for line in describe_scan(row):
                    print(line, flush=True)
                if args.json:
                    write_json(args.json, meta, rows)
    meta['wall_s'] = round(time.perf_counter() - start, 1)
    if args.json:
        write_json(args.json, meta, rows)
    failed = [r for r in rows if r.get('failed')]
    incomplete = [r for r in rows if r['status'] in ('time-limit', 'not-run')]
    print(f'{len(rows)} runs in {meta["wall_s"]:.0f} s: {len(failed)} failed, {len(incomplete)} cut short or not run',
          flush=True)
    if failed:
        return 1
    return 2 if incomplete else 0


if __name__ == '__main__':
    sys.exit(main())
