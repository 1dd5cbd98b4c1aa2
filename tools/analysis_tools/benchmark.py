"""Speed and memory of the vssm models and their peers (Swin-T, ConvNeXt-T), one protocol for every family and size.

    python tools/analysis_tools/benchmark.py [--models NAME ...] [--modes MODE ...] [--backends torch cuda]
        [--batch 128] [--size 224] [--warmup 10] [--iters 30] [--torch-batch B] [--torch-warmup 3] [--torch-iters 10]
        [--latency-models NAME ...] [--det-size 1333 800] [--seg-size 512] [--tf32 | --no-tf32] [--device cuda]
        [--json rows.json] [--markdown table.md]

Protocol:

* Models. Ours are the ImageNet classifiers built from our configs (classification/configs/<family>/*_in1k.py:
  backbone, global average pooling, 1000-way linear head); the peers are mmpretrain's Swin-T (``SwinTransformer``
  arch tiny, ``pad_small_map=True`` so that sizes below 224 run too) and ConvNeXt-T with the same neck and head,
  built from dicts. Weights are random: nothing is loaded or downloaded (``init_cfg`` Pretrained and
  ``*_pretrained`` are cleared, ``init_weights()`` is not called).
* Backends. Each of our models runs twice: ``ops_backend='torch'`` (the pure-PyTorch reference ops) and ``'cuda'``
  (the kernels built from kernels/; ``'auto'`` may be asked for too). The kernel rows are reported as skipped, with
  the reason, when there is no GPU or a kernel the family needs is not built. The references are slow, so they have
  their own batch and iteration counts (``--torch-batch``, ``--torch-warmup``, ``--torch-iters``), stated in every row.
* Classification modes, on ``--batch`` random images of ``--size`` x ``--size`` already on the device:
  ``infer-fp32`` and ``infer-bf16``: ``eval()``, ``torch.no_grad()``, the forward to the logits, in fp32 or under
  bf16 autocast. ``train-bf16`` (``train-fp32`` on request): ``train()`` (drop path on), forward under bf16 autocast,
  cross-entropy on random labels (in fp32), backward, an AdamW step (PyTorch's default implementation, lr 1e-4,
  weight decay 0.05, no gradient clipping) over the trainable parameters, ``zero_grad(set_to_none=True)``.
  ``--warmup`` untimed iterations, then ``--iters`` iterations timed as one span with CUDA events
  (``time.perf_counter`` on a CPU); images/s = batch x iters / span.
* Latency modes, batch 1, ``eval()``, ``torch.no_grad()``, fp32 and bf16 autocast: one random uint8 image through
  the model's ``data_preprocessor`` and ``predict`` (``model.test_step``); ms/image is the median over ``--iters``
  iterations (after ``--warmup``), each one timed with CUDA events and a synchronize. ``det-latency``: Mask R-CNN
  from detection/configs/<family>/mask-rcnn_<name>_fpn_1x_coco.py (peer: mmdet's
  swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py) at ``--det-size`` W H (1333 x 800, padded to a multiple of 32), with
  the box head's class-0 bias set to 10 so that its 1000 proposals pass the 0.05 score threshold and NMS sends up
  to 100 detections through the mask head (random weights would keep none); in bf16 only its backbone and neck
  (``extract_feat``) run under autocast and the heads stay in fp32 (mmcv's NMS and RoIAlign have no bf16 kernels).
  ``seg-latency``: UPerNet from segmentation/configs/<family>/*_upernet_*-512x512.py (peer: mmseg's
  swin/swin-tiny-patch4-window7-in1k-pre_upernet_*-512x512.py), 'whole' inference on a ``--seg-size`` square image.
  Only ``--latency-models`` take part (default: the T models and Swin-T). Batch-1 latency is bound by the host
  (kernel launches) as much as by the GPU.
* Memory: the peak of ``torch.cuda.max_memory_allocated()`` per mode (the caches emptied and the peak reset before
  each mode), weights, gradients and optimizer state included; not measured on a CPU.
* Numerics: TF32 for fp32 matmuls and cuDNN convolutions is on by default (``--no-tf32`` turns it off; the setting
  is printed and written with the results); ``torch.backends.cudnn.benchmark`` stays off. bf16 autocast also runs
  on a CPU (slowly), so every mode is testable there.
* Robustness: a model that fails (out of memory, a build error) gets the error in its rows and the run goes on; the
  CUDA cache is emptied between models. ``--json`` and ``--markdown`` are rewritten after every model, so a run cut
  short keeps the rows done so far. On an H200, the T models with both backends plus Swin-T and ConvNeXt-T, all
  default modes and counts, take about 200 s (the S and B models about 1.7x and 3x a T model each).

Output: a table on stdout; ``--json PATH``: the settings and every row; ``--markdown PATH``: tables for
docs/benchmarks.md with the device, torch version, TF32, batch and iterations, images/s and peak memory relative to
Swin-T in the same mode, and the kernel / reference speed-up of each of our models.
"""
import argparse
import contextlib
import gc
import importlib
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]

CLS_MODES = ('infer-fp32', 'infer-bf16', 'train-bf16', 'train-fp32')
LATENCY_MODES = ('det-latency', 'seg-latency')
MODES = CLS_MODES + LATENCY_MODES
DEFAULT_MODES = ('infer-fp32', 'infer-bf16', 'train-bf16', 'det-latency', 'seg-latency')
BACKENDS = ('torch', 'cuda', 'auto')
LATENCY_DTYPES = ('fp32', 'bf16')
PEER_BACKEND = '-'  # the backend column of the peers, which have no ops backend
REFERENCE = 'swin-t'

# The compiled extensions (vssm.ops.<name>.kernel_available()) each family calls with ops_backend='cuda'.
KERNELS = {
    'SpatialMamba': ('selective_scan', 'dwconv2d'),
    'VMamba': ('selective_scan', ),
    'SpectralVMamba': ('selective_scan', ),
}


@dataclass(frozen=True)
class ModelSpec:
    """One model of the benchmark.

    Args:
        name: the command-line name, e.g. ``'vmamba-t'``.
        title: the name in tables, e.g. ``'VMamba-T'``.
        classifier: our classification config (relative to the repository), or a function of the image size that
            returns a model dict (the peers).
        detector: the Mask R-CNN config, relative to the repository or ``'mmdet::<path>'`` in mmdet's configs.
        segmentor: the UPerNet config, likewise (``'mmseg::<path>'``). A peer's config missing from the installed
            package makes its rows errors that say so; the run goes on.
        family: our backbone class (for the ops backends); ``None`` for the peers.
    """
    name: str
    title: str
    classifier: Union[str, Callable[[int], dict]]
    detector: str
    segmentor: str
    family: Optional[str] = None

    @property
    def ours(self) -> bool:
        return self.family is not None


def _cls_head(in_channels: int) -> dict:
    return dict(type='LinearClsHead', num_classes=1000, in_channels=in_channels,
                loss=dict(type='CrossEntropyLoss', loss_weight=1.0), cal_acc=False)


def _swin_t(size: int) -> dict:
    """mmpretrain's Swin-T ImageNet classifier (configs/_base_/models/swin_transformer/tiny_224.py)."""
    return dict(type='ImageClassifier',
                backbone=dict(type='SwinTransformer', arch='tiny', img_size=size, drop_path_rate=0.2,
                              pad_small_map=True),
                neck=dict(type='GlobalAveragePooling'), head=_cls_head(768))


def _convnext_t(size: int) -> dict:
    """mmpretrain's ConvNeXt-T ImageNet classifier (configs/_base_/models/convnext/convnext-tiny.py)."""
    return dict(type='ImageClassifier', backbone=dict(type='ConvNeXt', arch='tiny', drop_path_rate=0.1),
                head=_cls_head(768))


def _our_specs() -> List[ModelSpec]:
    families = (  # (name prefix, title, config folder, backbone class)
        ('spatial-mamba', 'Spatial-Mamba', 'spatial_mamba', 'SpatialMamba'),
        ('vmamba', 'VMamba', 'vmamba', 'VMamba'),
        ('spectral-vmamba', 'Spectral VMamba', 'spectral_vmamba', 'SpectralVMamba'),
    )
    specs = []
    for size, arch in (('t', 'tiny'), ('s', 'small'), ('b', 'base')):
        for prefix, title, folder, family in families:
            specs.append(ModelSpec(
                name=f'{prefix}-{size}', title=f'{title}-{size.upper()}', family=family,
                classifier=f'classification/configs/{folder}/{prefix}-{arch}_8xb128_in1k.py',
                detector=f'detection/configs/{folder}/mask-rcnn_{prefix}-{size}_fpn_1x_coco.py',
                segmentor=f'segmentation/configs/{folder}/{prefix}-{arch}_upernet_8xb2-160k_ade20k-512x512.py'))
    return specs


SPECS: Dict[str, ModelSpec] = {spec.name: spec for spec in _our_specs() + [
    ModelSpec('swin-t', 'Swin-T', _swin_t, 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
              'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'),
    ModelSpec('convnext-t', 'ConvNeXt-T', _convnext_t,
              'mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py',
              'mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py'),
]}
DEFAULT_MODELS = tuple(SPECS)
DEFAULT_LATENCY_MODELS = ('spatial-mamba-t', 'vmamba-t', 'spectral-vmamba-t', 'swin-t')


# --- building ----------------------------------------------------------------------------------------------------
def _config_file(path: str) -> Path:
    """A repository-relative config path, or ``'<package>::<path>'`` inside that package's ``.mim/configs``."""
    if '::' in path:
        package, relative = path.split('::', 1)
        return Path(importlib.import_module(package).__file__).parent / '.mim' / 'configs' / relative
    return REPO_ROOT / path


def _load_model_config(path: str):
    """The ``model`` dict of a config (and its scope), with SyncBN as BN on a CPU and no pretrained weights."""
    from mmengine.config import Config

    from vssm.engine.launch import clear_pretrained, prepare_for_device
    file = _config_file(path)
    if not file.is_file():
        raise FileNotFoundError(f'config {path!r} not found (looked at {file}).')
    cfg = Config.fromfile(str(file))
    prepare_for_device(cfg, 'none')
    model_cfg = cfg.model
    clear_pretrained(model_cfg)
    return model_cfg, cfg.get('default_scope', 'mmpretrain')


def _build(model_cfg, scope: str) -> torch.nn.Module:
    from mmengine.registry import MODELS, DefaultScope
    with DefaultScope.overwrite_default_scope(scope):
        return MODELS.build(model_cfg)


def build_classifier(spec: ModelSpec, backend: str, size: int) -> torch.nn.Module:
    if spec.ours:
        model_cfg, scope = _load_model_config(spec.classifier)
        model_cfg.backbone.ops_backend = backend
    else:
        model_cfg, scope = spec.classifier(size), 'mmpretrain'
    return _build(model_cfg, scope)


def build_task_model(spec: ModelSpec, task: str, backend: str) -> torch.nn.Module:
    """Mask R-CNN (``task='det'``) or UPerNet (``'seg'``) of ``spec``, set up as the protocol says."""
    model_cfg, scope = _load_model_config(spec.detector if task == 'det' else spec.segmentor)
    if spec.ours:
        model_cfg.backbone.ops_backend = backend
    model = _build(model_cfg, scope)
    if task == 'det':
        # Random weights score every class about 1/81, below the 0.05 threshold: nothing would reach the mask head.
        # A trained detector's load instead: one class wins, its boxes go through NMS, up to 100 get masks.
        with torch.no_grad():
            model.roi_head.bbox_head.fc_cls.bias[0] = 10.0
    return model


# --- measuring ---------------------------------------------------------------------------------------------------
def _autocast(device: torch.device, dtype: str):
    if dtype == 'bf16':
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _timed_span(step: Callable[[], None], iters: int, device: torch.device) -> float:
    """Seconds for ``iters`` calls of ``step``, timed as one span."""
    _synchronize(device)
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    for _ in range(iters):
        step()
    return time.perf_counter() - begin


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    _release(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None


def profile_top_ops(step: Callable[[], None], iters: int, device: torch.device, top: int = 15) -> List[Dict[str, Any]]:
    """Where the time of ``step`` goes: torch.profiler over ``iters`` calls, the ``top`` kernels (GPU) or operators
    (CPU) by self time, each with its time per call of ``step`` (ms), share of the total and count per call."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        _synchronize(device)
    gpu = device.type == 'cuda'
    events = [e for e in prof.key_averages() if (e.device_type.name == 'CUDA' if gpu else True)]
    self_us = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    total = sum(self_us(e) for e in events) or 1.0
    events = sorted(events, key=self_us, reverse=True)[:top]
    return [dict(name=e.key[:120], ms=self_us(e) / 1e3 / iters, share=self_us(e) / total, calls=e.count / iters)
            for e in events]


def classification_throughput(model: torch.nn.Module, mode: str, batch: int, size: int, warmup: int, iters: int,
                              device: torch.device, profile_iters: int = 0,
                              profile_into: Optional[Dict[str, Any]] = None,
                              compile: bool = False) -> Tuple[float, Optional[int]]:
    """(images/s, peak bytes) of one classification mode, as the module docstring says. With ``profile_iters``,
    that many more steps run under torch.profiler afterwards and their top kernels go to
    ``profile_into['profile']``. ``compile``: the model runs through ``torch.compile`` (inductor, default mode;
    compiled during the warm-up iterations)."""
    _reset_peak(device)
    forward = torch.compile(model) if compile else model
    dtype = mode.rsplit('-', 1)[1]
    images = torch.randn(batch, 3, size, size, device=device)
    if mode.startswith('infer'):
        model.eval()

        def step() -> None:
            with torch.no_grad(), _autocast(device, dtype):
                forward(images, mode='tensor')
    else:
        model.train()
        labels = torch.randint(0, model.head.num_classes, (batch, ), device=device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                      weight_decay=0.05)

        def step() -> None:
            with _autocast(device, dtype):
                logits = forward(images, mode='tensor')
            F.cross_entropy(logits.float(), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    try:
        for _ in range(warmup):
            step()
        seconds = _timed_span(step, iters, device)
        peak = _peak_bytes(device)
        if profile_iters > 0 and profile_into is not None:
            profile_into['profile'] = profile_top_ops(step, profile_iters, device)
        return batch * iters / seconds, peak
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def _task_inputs(task: str, width: int, height: int, device: torch.device) -> Callable[[], dict]:
    """A function returning one batch-1 ``test_step`` input: a uint8 image and its data sample."""
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, device=device)
    meta = dict(img_shape=(height, width), ori_shape=(height, width), scale_factor=(1.0, 1.0), flip=False,
                img_id=0, img_path='benchmark.jpg')
    if task == 'det':
        from mmdet.structures import DetDataSample
        return lambda: dict(inputs=[image], data_samples=[DetDataSample(metainfo=meta)])
    from mmseg.structures import SegDataSample
    meta.update(pad_shape=(height, width), padding_size=[0, 0, 0, 0])
    return lambda: dict(inputs=[image], data_samples=[SegDataSample(metainfo=meta)])


def task_latency(model: torch.nn.Module, task: str, dtype: str, width: int, height: int, warmup: int, iters: int,
                 device: torch.device) -> Tuple[float, Optional[int]]:
    """(median ms per image, peak bytes) of ``model.test_step`` on one image."""
    _reset_peak(device)
    model.eval()
    make_inputs = _task_inputs(task, width, height, device)
    data = make_inputs()
    # Mask R-CNN's heads stay in fp32 (mmcv's NMS and RoIAlign have no bf16 kernels): only its features are bf16.
    bf16_features = task == 'det' and dtype == 'bf16'

    def step() -> None:
        with torch.no_grad(), _autocast(device, 'fp32' if task == 'det' else dtype):
            model.test_step(data)

    with _bf16_features(model, device) if bf16_features else contextlib.nullcontext():
        for _ in range(warmup):
            step()
        times = []
        for _ in range(iters):
            data = make_inputs()  # fresh data samples, built outside the timed call
            times.append(_timed_span(step, 1, device))
    return statistics.median(times) * 1e3, _peak_bytes(device)


@contextlib.contextmanager
def _bf16_features(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Run ``model.extract_feat`` (backbone and neck) under bf16 autocast and hand fp32 maps to the heads."""
    extract_feat = model.extract_feat

    def bf16_extract_feat(inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        with _autocast(device, 'bf16'):
            feats = extract_feat(inputs)
        return tuple(f.float() for f in feats)

    model.extract_feat = bf16_extract_feat
    try:
        yield
    finally:
        del model.extract_feat


# --- the run -----------------------------------------------------------------------------------------------------
def _skip_reason(spec: ModelSpec, backend: str, device: torch.device) -> Optional[str]:
    if not spec.ours or backend != 'cuda':
        return None
    if device.type != 'cuda':
        return f"ops_backend='cuda' needs a CUDA device (running on {device})"
    missing = [name for name in KERNELS[spec.family]
               if not importlib.import_module(f'vssm.ops.{name}').kernel_available()]
    if missing:
        folders = ' '.join(f'kernels/{name}' for name in missing)
        return (f"{', '.join('vssm_' + name for name in missing)} not built: "
                f'TORCH_CUDA_ARCH_LIST="9.0" pip install --no-build-isolation -v {folders}')
    return None


def _ops_description(spec: ModelSpec, backend: str, device: torch.device) -> str:
    if not spec.ours:
        return '-'
    from vssm.ops._backend import describe_backends
    return describe_backends(backend, torch.empty(1, device=device))


def _error_text(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return 'out of memory'
    lines = str(error).strip().splitlines() or ['']
    return f'{type(error).__name__}: {lines[0]}'[:300]


class Benchmark:
    """Runs the selected models and modes and keeps the rows."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.rows: List[Dict[str, Any]] = []
        self.meta = self._meta()

    def _meta(self) -> Dict[str, Any]:
        args, device = self.args, self.device
        if device.type == 'cuda':
            props = torch.cuda.get_device_properties(device)
            name = f'{props.name} ({props.total_memory / 2**30:.0f} GiB)'
        else:
            name = f'CPU ({torch.get_num_threads()} threads)'
        return dict(
            device=name, torch=torch.__version__, cuda=torch.version.cuda, tf32=args.tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark, batch=args.batch, size=args.size, warmup=args.warmup,
            iters=args.iters, torch_batch=args.torch_batch, torch_warmup=args.torch_warmup,
            torch_iters=args.torch_iters, det_size=list(args.det_size), seg_size=args.seg_size,
            modes=list(args.modes), backends=list(args.backends), reference=REFERENCE, recompute=not args.no_recompute, compile=args.compile,
            command=' '.join(['python tools/analysis_tools/benchmark.py'] + list(args.argv)),
            date=time.strftime('%Y-%m-%d %H:%M'))

    def _settings(self, spec: ModelSpec, backend: str) -> Tuple[int, int, int]:
        """(batch, warm-up, iterations) for a model and backend: the reference ops have their own."""
        args = self.args
        if spec.ours and backend == 'torch':
            return args.torch_batch, args.torch_warmup, args.torch_iters
        return args.batch, args.warmup, args.iters

    def _add(self, row: Dict[str, Any]) -> None:
        self.rows.append(row)
        print(format_row(row), flush=True)
        for op in row.get('profile', ()):
            print(f"    {op['ms']:9.3f} ms {100 * op['share']:5.1f}% {op['calls']:6.1f}x  {op['name']}", flush=True)

    def run(self, on_model_done: Callable[[], None]) -> None:
        args = self.args
        cls_modes = [m for m in args.modes if m in CLS_MODES]
        if cls_modes:
            for name in args.models:
                for backend in self._backends(SPECS[name]):
                    self._classification(SPECS[name], backend, cls_modes)
                    on_model_done()
        for mode in [m for m in args.modes if m in LATENCY_MODES]:
            for name in args.latency_models:
                for backend in self._backends(SPECS[name]):
                    self._latency(SPECS[name], backend, mode)
                    on_model_done()

    def _backends(self, spec: ModelSpec) -> Sequence[str]:
        return self.args.backends if spec.ours else (PEER_BACKEND, )

    def _row(self, spec: ModelSpec, backend: str, mode: str, dtype: str, batch: int, size: str, warmup: int,
             iters: int) -> Dict[str, Any]:
        return dict(model=spec.name, title=spec.title, backend=backend, mode=mode, dtype=dtype, batch=batch,
                    size=size, warmup=warmup, iters=iters, images_per_s=None, ms_per_image=None, peak_mem_bytes=None,
                    peak_mem_gib=None, params_m=None, ops=None, status='ok', note='', seconds=None)

    def _classification(self, spec: ModelSpec, backend: str, modes: Sequence[str]) -> None:
        batch, warmup, iters = self._settings(spec, backend)
        size = f'{self.args.size}x{self.args.size}'
        rows = [self._row(spec, backend, mode, mode.rsplit('-', 1)[1], batch, size, warmup, iters) for mode in modes]
        self._measure(spec, backend, rows, lambda: build_classifier(spec, backend, self.args.size),
                      lambda model, row: classification_throughput(model, row['mode'], batch, self.args.size,
                                                                   warmup, iters, self.device,
                                                                   self.args.profile, row, self.args.compile))

    def _latency(self, spec: ModelSpec, backend: str, mode: str) -> None:
        task = mode.split('-')[0]
        _, warmup, iters = self._settings(spec, backend)
        width, height = self.args.det_size if task == 'det' else (self.args.seg_size, self.args.seg_size)
        rows = [self._row(spec, backend, mode, dtype, 1, f'{width}x{height}', warmup, iters)
                for dtype in LATENCY_DTYPES]

        def measure(model: torch.nn.Module, row: Dict[str, Any]) -> Tuple[float, Optional[int]]:
            ms, peak = task_latency(model, task, row['dtype'], width, height, warmup, iters, self.device)
            return 1e3 / ms, peak

        self._measure(spec, backend, rows, lambda: build_task_model(spec, task, backend), measure)

    def _measure(self, spec: ModelSpec, backend: str, rows: List[Dict[str, Any]],
                 build: Callable[[], torch.nn.Module],
                 measure: Callable[[torch.nn.Module, Dict[str, Any]], Tuple[float, Optional[int]]]) -> None:
        """Build once, fill each row (a failure goes into that row), free the model."""
        reason = _skip_reason(spec, backend, self.device)
        if reason is not None:
            for row in rows:
                row.update(status='skipped', note=reason)
                self._add(row)
            return
        model, error = None, None
        try:
            model = build().to(self.device)
        except Exception as exc:  # noqa: BLE001  (a broken model must not stop the others)
            error = self._failure('build', spec, exc)
        if model is not None:
            params = sum(p.numel() for p in model.parameters()) / 1e6
            ops = _ops_description(spec, backend, self.device)
        for row in rows:
            if model is None:
                row.update(status='error', note=error)
                self._add(row)
                continue
            row.update(params_m=round(params, 2), ops=ops)
            begin = time.perf_counter()
            try:
                images_per_s, peak = measure(model, row)
                row.update(images_per_s=images_per_s, ms_per_image=1e3 / images_per_s, peak_mem_bytes=peak,
                           peak_mem_gib=None if peak is None else peak / 2**30)
            except Exception as exc:  # noqa: BLE001
                row.update(status='error', note=self._failure(row['mode'], spec, exc))
            row['seconds'] = round(time.perf_counter() - begin, 1)
            _release(self.device)
            self._add(row)
        del model
        _release(self.device)

    @staticmethod
    def _failure(what: str, spec: ModelSpec, exc: BaseException) -> str:
        text = _error_text(exc)
        if not isinstance(exc, torch.OutOfMemoryError):
            print(f'--- {spec.name} {what} failed:', file=sys.stderr)
            traceback.print_exc()
        return text


# --- output ------------------------------------------------------------------------------------------------------
_COLUMNS = (('model', 18), ('backend', 7), ('mode', 11), ('dtype', 5), ('batch', 5), ('size', 9), ('iters', 6),
            ('images/s', 9), ('ms/image', 9), ('peak GiB', 8), ('params M', 8), ('s', 6))


def format_header() -> str:
    return '  '.join(f'{name:>{width}}' if i >= 4 else f'{name:<{width}}'
                     for i, (name, width) in enumerate(_COLUMNS)) + '  status'


def format_row(row: Dict[str, Any]) -> str:
    def num(value: Optional[float], fmt: str) -> str:
        return '-' if value is None else format(value, fmt)

    cells = [row['model'], row['backend'], row['mode'], row['dtype'], str(row['batch']), row['size'],
             f"{row['warmup']}+{row['iters']}", num(row['images_per_s'], '.1f'), num(row['ms_per_image'], '.2f'),
             num(row['peak_mem_gib'], '.2f'), num(row['params_m'], '.1f'), num(row['seconds'], '.1f')]
    status = row['status'] + (f": {row['note']}" if row['note'] else '')
    return '  '.join(f'{cell:>{width}}' if i >= 4 else f'{cell:<{width}}'
                     for i, (cell, (_, width)) in enumerate(zip(cells, _COLUMNS))) + '  ' + status


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    return '-' if value is None or not base else f'{value / base:.2f}x'


def _find(rows: Sequence[Dict[str, Any]], model: str, mode: str, dtype: str, backend: str) -> Optional[Dict]:
    for row in rows:
        if (row['model'], row['mode'], row['dtype'], row['backend']) == (model, mode, dtype, backend) and \
                row['status'] == 'ok':
            return row
    return None


def markdown(meta: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> str:
    """Tables for docs/benchmarks.md: one per mode and dtype, with ratios to Swin-T and kernel / reference."""
    ref_title = SPECS[REFERENCE].title
    det_w, det_h = meta['det_size']
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']} (CUDA {meta['cuda']}); TF32 "
        f"{'on' if meta['tf32'] else 'off'} (fp32 matmuls and cuDNN convolutions); cuDNN benchmark "
        f"{'on' if meta['cudnn_benchmark'] else 'off'}; memory-saving recomputation "
        f"{'on' if meta.get('recompute', True) else 'off'}; {meta['date']}.",
        '',
        f"Classification: batch {meta['batch']} at {meta['size']}x{meta['size']}, {meta['warmup']} warm-up + "
        f"{meta['iters']} timed iterations; ops_backend='torch' rows (the pure-PyTorch reference ops): batch "
        f"{meta['torch_batch']}, {meta['torch_warmup']} + {meta['torch_iters']} iterations. Latency: batch 1, "
        f"Mask R-CNN at {det_w}x{det_h}, UPerNet at {meta['seg_size']}x{meta['seg_size']}, median of the timed "
        'iterations (same counts). Random weights; protocol in `tools/analysis_tools/benchmark.py --help`.',
        '',
        f"`{meta['command']}`",
    ]
    titles = {
        'infer-fp32': 'Inference, fp32', 'infer-bf16': 'Inference, bf16 autocast',
        'train-bf16': 'Training step (forward + backward + AdamW), bf16 autocast',
        'train-fp32': 'Training step (forward + backward + AdamW), fp32',
        'det-latency': 'Mask R-CNN latency', 'seg-latency': 'UPerNet latency',
    }
    sections = []
    for row in rows:
        if (row['mode'], row['dtype']) not in sections:
            sections.append((row['mode'], row['dtype']))
    for mode, dtype in sections:
        latency = mode in LATENCY_MODES
        title = titles[mode] + (f', {dtype}' if latency else '')
        lines += ['', f'### {title}', '',
                  f'| model | backend | batch | images/s | ms/image | images/s vs {ref_title} | peak memory (GiB) | '
                  f'memory vs {ref_title} | kernel vs torch | note |',
                  '|---|---|---:|---:|---:|---:|---:|---:|---:|---|']
        ref = _find(rows, REFERENCE, mode, dtype, PEER_BACKEND)
        for row in [r for r in rows if (r['mode'], r['dtype']) == (mode, dtype)]:
            speedup = '-'
            if row['backend'] == 'cuda':
                reference_ops = _find(rows, row['model'], mode, dtype, 'torch')
                speedup = _ratio(row['images_per_s'], reference_ops and reference_ops['images_per_s'])
            ips, ms, mem = row['images_per_s'], row['ms_per_image'], row['peak_mem_gib']
            note = '' if row['status'] == 'ok' else f"{row['status']}: {row['note']}".replace('|', '/')
            lines.append(
                f"| {row['title']} | {row['backend']} | {row['batch']} | {'-' if ips is None else f'{ips:.1f}'} | "
                f"{'-' if ms is None else f'{ms:.2f}'} | {_ratio(ips, ref and ref['images_per_s'])} | "
                f"{'-' if mem is None else f'{mem:.2f}'} | {_ratio(mem, ref and ref['peak_mem_gib'])} | "
                f'{speedup} | {note} |')
    return '\n'.join(lines) + '\n'


def write_outputs(args: argparse.Namespace, meta: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=list(rows)), indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(meta, rows))


# --- command line ------------------------------------------------------------------------------------------------
def _model_names(value: str) -> str:
    if value not in SPECS:
        raise argparse.ArgumentTypeError(f'unknown model {value!r}; choose from {", ".join(SPECS)}')
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', type=_model_names, default=list(DEFAULT_MODELS), metavar='NAME',
                        help=f'classification models, in order (default: all): {", ".join(SPECS)}')
    parser.add_argument('--latency-models', nargs='+', type=_model_names, default=list(DEFAULT_LATENCY_MODELS),
                        metavar='NAME', help='models for det-latency and seg-latency (default: '
                        f'{" ".join(DEFAULT_LATENCY_MODELS)})')
    parser.add_argument('--modes', nargs='+', choices=MODES, default=list(DEFAULT_MODES), metavar='MODE',
                        help=f'what to measure, from {", ".join(MODES)} (default: {" ".join(DEFAULT_MODES)})')
    parser.add_argument('--backends', nargs='+', choices=BACKENDS, default=['torch', 'cuda'],
                        help="ops_backend values for our models (default: torch cuda; the peers have none)")
    parser.add_argument('--batch', type=int, default=128, help='classification batch (default: %(default)s)')
    parser.add_argument('--size', type=int, default=224, help='classification image side (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=10, help='untimed iterations (default: %(default)s)')
    parser.add_argument('--iters', type=int, default=30, help='timed iterations (default: %(default)s)')
    parser.add_argument('--torch-batch', type=int, help="classification batch of the ops_backend='torch' rows "
                        '(default: --batch)')
    parser.add_argument('--torch-warmup', type=int, default=3,
                        help="warm-up iterations of the ops_backend='torch' rows (default: %(default)s)")
    parser.add_argument('--torch-iters', type=int, default=10,
                        help="timed iterations of the ops_backend='torch' rows (default: %(default)s)")
    parser.add_argument('--det-size', type=int, nargs=2, default=[1333, 800], metavar=('W', 'H'),
                        help='Mask R-CNN input width and height (default: 1333 800)')
    parser.add_argument('--seg-size', type=int, default=512, help='UPerNet input side (default: %(default)s)')
    parser.add_argument('--tf32', action=argparse.BooleanOptionalAction, default=True,
                        help='TF32 for fp32 matmuls and cuDNN convolutions (default: on)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='torch device (default: cuda when there is one, else cpu)')
    parser.add_argument('--profile', type=int, default=0, metavar='N',
                        help='after timing each classification mode, profile N more steps with torch.profiler and '
                        'print the top 15 kernels (their time per step and share; also in the JSON rows)')
    parser.add_argument('--compile', action='store_true',
                        help='classification modes through torch.compile (inductor, default mode), ours and the '
                        'peers alike; compilation happens in the warm-up iterations')
    parser.add_argument('--no-recompute', action='store_true',
                        help="our models without their memory-saving recomputations in the backward "
                        "(vssm.models.layers.set_recompute(False)): what they cost in training time and save in memory")
    parser.add_argument('--json', metavar='PATH', help='write the settings and all rows as JSON')
    parser.add_argument('--markdown', metavar='PATH', help='write Markdown tables (for docs/benchmarks.md)')
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.torch_batch is None:
        args.torch_batch = args.batch
    for name in ('batch', 'size', 'iters', 'torch_batch', 'torch_iters', 'seg_size'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    for name in ('warmup', 'torch_warmup', 'profile'):
        if getattr(args, name) < 0:
            parser.error(f'--{name.replace("_", "-")} must be at least 0, got {getattr(args, name)}')
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    import vssm  # noqa: F401  (registers the backbones; before mmpretrain, see README "transformers >= 5")
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'--device {args.device}: no CUDA device here; use --device cpu.')
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)

    if args.no_recompute:
        from vssm.models.layers import set_recompute
        set_recompute(False)
    bench = Benchmark(args, device)
    meta = bench.meta
    print(f"device {meta['device']}, torch {meta['torch']} (CUDA {meta['cuda']}), TF32 "
          f"{'on' if args.tf32 else 'off'}, cuDNN benchmark off; classification batch {args.batch} at "
          f"{args.size}x{args.size}, {args.warmup}+{args.iters} iterations; ops_backend='torch': batch "
          f'{args.torch_batch}, {args.torch_warmup}+{args.torch_iters} iterations', flush=True)
    print(format_header(), flush=True)
    started = time.perf_counter()
    bench.run(lambda: write_outputs(args, meta, bench.rows))
    meta['total_seconds'] = round(time.perf_counter() - started, 1)
    write_outputs(args, meta, bench.rows)

    print(f"\n{len(bench.rows)} rows in {meta['total_seconds']} s")
    print(format_header())
    for row in bench.rows:
        print(format_row(row))
    return bench.rows


if __name__ == '__main__':
    main()
