"""Mixed precision: a few training steps per task under the optimizer wrapper ``tools/train.py --amp`` builds.

The T configs of each family (classification, Mask R-CNN, UPerNet) with a tiny arch, random weights and small
random batches; the config's AdamW, its parameter-wise settings and clipping, as ``AmpOptimWrapper`` with a dynamic
loss scale and ``dtype`` bf16 or fp16; ``model.train_step`` as the Runner calls it. Every loss term must stay finite,
the parameters too, and every selective scan the backbones call must return float32 under autocast.

Mask R-CNN in bf16 autocasts only its backbone and neck: mmcv 2.1.0 has no bf16 RoIAlign (CPU or CUDA) nor CPU NMS,
and mmdet gives the RoIs the features' dtype. In fp16 the whole detector runs under autocast (mmcv has fp16 kernels).

On a GPU (the ops on the kernels when built): every family, task and dtype. On a CPU: bf16 only (autocast on a CPU
is bf16; fp16 needs CUDA), VMamba per task; the other families' CPU runs are marked slow.
"""
import contextlib
import math
import warnings
from typing import Callable, Dict, Iterator, List

import pytest
import torch
from mmengine.structures import InstanceData, PixelData

from vssm.analysis.models import MODEL_SPECS, build_model, prepare_config

TINY_ARCHS = {  # spec name prefix -> a tiny arch of that family
    'spatial-mamba': dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1]),
    'vmamba': dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], ssm_ratio=1.0),
    'spectral-vmamba': dict(dims=[256, 32, 64, 128], depths=[1, 1, 1, 1]),
}
SIZES = dict(cls=32, det=64, seg=64)  # image sides (multiples of the 16-px stride Spectral VMamba needs)
BATCH, STEPS = 2, 3
HEAD_WIDTH = 32  # channels of the FPN, RPN, RoI and UPerNet heads
DTYPES = dict(bf16='bfloat16', fp16='float16')
FAST_ON_CPU = 'vmamba'
CUDA = torch.cuda.is_available()


def _cases() -> List:
    cases = []
    for family in TINY_ARCHS:
        for task in SIZES:
            for dtype in DTYPES:
                marks = [pytest.mark.skipif(not CUDA, reason='needs a CUDA device')]
                cases.append(pytest.param(family, task, dtype, 'cuda', marks=marks, id=f'{family}-{task}-{dtype}-cuda'))
            cpu_marks = [pytest.mark.skipif(CUDA, reason="mmengine's autocast acts on CUDA when there is one")]
            if family != FAST_ON_CPU:
                cpu_marks.append(pytest.mark.slow)
            cases.append(pytest.param(family, task, 'bf16', 'cpu', marks=cpu_marks, id=f'{family}-{task}-bf16-cpu'))
    return cases


# --- model and optimizer -----------------------------------------------------------------------------------------
def _tiny_config(family: str, task: str):
    """The family's T config of ``task`` with a tiny arch and narrow heads (the heads are mmdet's and mmseg's; the
    backbones are what is tested)."""
    arch, width = TINY_ARCHS[family], HEAD_WIDTH
    cfg = prepare_config(MODEL_SPECS[f'{family}-t'].config(task))
    model = cfg.model
    model.backbone.arch = arch
    if task == 'cls':
        model.head.in_channels = arch['dims'][-1]
    elif task == 'det':
        model.neck.update(in_channels=arch['dims'], out_channels=width)
        model.rpn_head.update(in_channels=width, feat_channels=width)
        roi = model.roi_head
        roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = width
        roi.bbox_head.update(in_channels=width, fc_out_channels=2 * width)
        roi.mask_head.update(in_channels=width, conv_out_channels=width)
    else:
        model.decode_head.update(in_channels=arch['dims'], channels=width)
        model.auxiliary_head.update(in_channels=arch['dims'][2], channels=width)
        model.data_preprocessor.size = (SIZES['seg'], SIZES['seg'])  # the crop size the preprocessor pads to
    return cfg


@contextlib.contextmanager
def _amp_wrapper_on_cpu(device: str) -> Iterator[None]:
    """mmengine's AmpOptimWrapper refuses to be built without an accelerator; on a CPU the check is bypassed (its
    GradScaler then disables itself, and mmengine's autocast runs bf16 on the CPU)."""
    if device != 'cpu':
        yield
        return
    from mmengine.optim.optimizer import amp_optimizer_wrapper as module
    original = module.is_cuda_available
    module.is_cuda_available = lambda: True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*GradScaler.*')  # "CUDA is not available. Disabling"
            yield
    finally:
        module.is_cuda_available = original


def _optim_wrapper(cfg, model: torch.nn.Module, dtype: str, device: str):
    """What ``tools/train.py --amp`` makes of the config's optim_wrapper, with the dtype set."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    ow_cfg = cfg.optim_wrapper.copy()
    ow_cfg.update(type='AmpOptimWrapper', dtype=DTYPES[dtype], loss_scale='dynamic')
    with DefaultScope.overwrite_default_scope(cfg.default_scope), _amp_wrapper_on_cpu(device):
        return build_optim_wrapper(model, ow_cfg)


def _autocast_features_only(model: torch.nn.Module, device: str, dtype: str) -> None:
    """A detector's backbone and neck under autocast, its heads in fp32 on float32 maps: the wrapper's autocast is
    switched off around ``loss`` and back on around ``extract_feat``."""
    loss, extract_feat = model.loss, model.extract_feat

    def features(inputs: torch.Tensor):
        with torch.autocast(device, dtype=getattr(torch, DTYPES[dtype])):
            return tuple(f.float() for f in extract_feat(inputs))

    def heads_in_fp32(inputs: torch.Tensor, data_samples: list) -> dict:
        with torch.autocast(device, enabled=False):
            return loss(inputs, data_samples)

    model.extract_feat, model.loss = features, heads_in_fp32


# --- data --------------------------------------------------------------------------------------------------------
def _boxes(g: torch.Generator, count: int, size: int) -> torch.Tensor:
    """``count`` random (x1, y1, x2, y2) integer boxes of 8 px to half the image inside a ``size`` square."""
    wh = torch.randint(8, size // 2 + 1, (count, 2), generator=g)
    xy = (torch.rand(count, 2, generator=g) * (size - wh)).long()
    return torch.cat([xy, xy + wh], 1)


def _image(g: torch.Generator, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)


def _meta(size: int, index: int) -> dict:
    return dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size), scale_factor=(1.0, 1.0),
                flip=False, flip_direction=None, img_id=index, img_path=f'random_{index}.png')


def _cls_batch(g: torch.Generator, num_classes: int) -> dict:
    from mmpretrain.structures import DataSample
    size = SIZES['cls']
    samples = [DataSample().set_gt_label(int(torch.randint(num_classes, (1, ), generator=g))) for _ in range(BATCH)]
    return dict(inputs=[_image(g, size) for _ in range(BATCH)], data_samples=samples)


def _det_batch(g: torch.Generator, num_classes: int) -> dict:
    """Rectangles as instances: each box is its mask's extent (what mmdet's pipeline hands the model)."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks
    size, samples = SIZES['det'], []
    for i in range(BATCH):
        boxes = _boxes(g, 3, size)
        masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.tolist()):
            mask[y1:y2, x1:x2] = 1
        sample = DetDataSample(metainfo=_meta(size, i))
        sample.gt_instances = InstanceData(bboxes=HorizontalBoxes(boxes.float()),
                                           labels=torch.randint(num_classes, (len(boxes), ), generator=g),
                                           masks=BitmapMasks(masks.numpy(), size, size))
        samples.append(sample)
    return dict(inputs=[_image(g, size) for _ in range(BATCH)], data_samples=samples)


def _seg_batch(g: torch.Generator, num_classes: int, ignore_index: int) -> dict:
    """A background class, rectangles of other classes, and a band of ignored pixels."""
    from mmseg.structures import SegDataSample
    size, samples = SIZES['seg'], []
    for i in range(BATCH):
        labels = torch.randint(num_classes, (4, ), generator=g)
        seg = torch.full((size, size), int(labels[0]))
        for label, (x1, y1, x2, y2) in zip(labels[1:].tolist(), _boxes(g, 3, size).tolist()):
            seg[y1:y2, x1:x2] = label
        seg[:4] = ignore_index
        sample = SegDataSample(metainfo=dict(_meta(size, i), reduce_zero_label=True))
        sample.gt_sem_seg = PixelData(data=seg[None])
        samples.append(sample)
    return dict(inputs=[_image(g, size) for _ in range(BATCH)], data_samples=samples)


def _batches(cfg, task: str) -> Callable[[int], dict]:
    model = cfg.model
    if task == 'cls':
        return lambda step: _cls_batch(torch.Generator().manual_seed(step), model.head.num_classes)
    if task == 'det':
        return lambda step: _det_batch(torch.Generator().manual_seed(step), model.roi_head.bbox_head.num_classes)
    head = model.decode_head
    return lambda step: _seg_batch(torch.Generator().manual_seed(step), head.num_classes,
                                   head.get('ignore_index', 255))


# --- the scan's dtypes -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _scan_output_dtypes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Dict[str, int]]:
    """Count the output dtypes of the scans the backbones call: Spatial-Mamba's ``selective_scan_low_rank``,
    VMamba's (and Spectral VMamba's) ``cross_selective_scan``."""
    from vssm.models import spatial_mamba, vmamba
    seen: Dict[str, int] = {}

    def recording(original):

        def scan(*args, **kwargs):
            out = original(*args, **kwargs)
            key = str(out.dtype).replace('torch.', '')
            seen[key] = seen.get(key, 0) + 1
            return out

        return scan

    for module, name in ((spatial_mamba, 'selective_scan_low_rank'), (vmamba, 'cross_selective_scan')):
        monkeypatch.setattr(module, name, recording(getattr(module, name)))
    yield seen


# --- the test ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('family, task, dtype, device', _cases())
def test_amp_steps_keep_losses_finite_and_the_scan_in_float32(family, task, dtype, device, monkeypatch):
    torch.manual_seed(0)
    cfg = _tiny_config(family, task)
    model = build_model(cfg, ops_backend='auto').to(device).train()
    optim_wrapper = _optim_wrapper(cfg, model, dtype, device)
    if task == 'det' and dtype == 'bf16':
        _autocast_features_only(model, device, dtype)
    make_batch = _batches(cfg, task)
    losses = []
    with _scan_output_dtypes(monkeypatch) as scan_dtypes:
        for step in range(STEPS):
            log_vars = model.train_step(make_batch(step), optim_wrapper)
            terms = {k: float(v) for k, v in log_vars.items() if 'loss' in k}
            assert terms and all(math.isfinite(v) for v in terms.values()), (step, terms)
            losses.append(terms['loss'])
    assert len(losses) == STEPS
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert scan_dtypes and set(scan_dtypes) == {'float32'}, scan_dtypes
