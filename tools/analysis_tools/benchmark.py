"""Speed and memory of the vssm models and their peers (Swin-T/S/B, ConvNeXt-T), one protocol for every family and
size.

    python tools/analysis_tools/benchmark.py [--models NAME ...] [--modes MODE ...] [--backends torch cuda]
        [--batch 128] [--size 224] [--warmup 10] [--iters 30] [--torch-batch B] [--torch-warmup 3] [--torch-iters 10]
        [--latency-models NAME ...] [--det-size 1333 800] [--seg-size 512] [--inference-graphs] [--order-size 512 512]
        [--order-batches 1 2 8] [--tf32 | --no-tf32] [--device cuda] [--profile N] [--no-recompute]
        [--json rows.json] [--markdown table.md]

Protocol:

* Models. Ours are the ImageNet classifiers built from our configs (classification/configs/<family>/*_in1k.py:
  backbone, global average pooling, 1000-way linear head); the peers are mmpretrain's Swin-T, Swin-S and Swin-B
  (``SwinTransformer`` archs tiny/small/base, ``pad_small_map=True`` so that sizes below 224 run too) and ConvNeXt-T
  with the same neck and head, built from dicts (``vssm.analysis.models.MODEL_SPECS``). Each of our models is
  compared with the Swin of its size (ConvNeXt-T with Swin-T). Weights are random: nothing is loaded or downloaded
  (``init_cfg`` Pretrained and ``*_pretrained`` are cleared, ``init_weights()`` is not called).
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
* Saved-activation modes ``saved-bf16`` and ``saved-fp32`` (on request): where the training memory goes. One
  training forward as in ``train-*`` (the loss, no backward) records every tensor autograd saves for the backward
  (``vssm.analysis.memory``: each storage once, parameters and buffers left out), by module type and module path.
  The row gives the saved bytes and the end-of-forward total (saved + weights, buffers and AdamW state: what a step
  holds before its backward; the measured ``train-*`` peak adds the backward's temporaries). The saves follow the
  device's autocast rules and the ops backend (the kernels save other tensors than the references).
* Spectral ordering modes ``order-fp32`` and ``order-bf16`` (on request; the Spectral VMamba models of
  ``--models``): what the ordering costs inside the backbone's forward. The backbone of the UPerNet config
  (``eval()``, ``torch.no_grad()``, fp32 or bf16 autocast) on ``--order-batches`` random images of
  ``--order-size`` H W: the median forward time, and the median time of the ordering alone on the features the
  forward orders (the k-NN graph and eigensolver on stage 0's features, replayed as a CUDA graph on a GPU, and the
  pooled eigenvector fields sorted for stages 1-3); the row's share is ordering / forward.
* Latency modes, batch 1, ``eval()``, ``torch.no_grad()``, fp32 and bf16 autocast: one random uint8 image through
  the model's ``data_preprocessor`` and ``predict`` (``model.test_step``); ms/image is the median over ``--iters``
  iterations (after ``--warmup``), each one timed with CUDA events and a synchronize. ``det-latency``: Mask R-CNN
  from detection/configs/<family>/mask-rcnn_<name>_fpn_1x_coco.py (peer: mmdet's
  swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py, for Swin-S and Swin-B with the backbone's and the FPN's widths,
  depths and heads of that size) at ``--det-size`` W H (1333 x 800, padded to a multiple of 32), with
  the box head's class-0 bias set to 10 so that its 1000 proposals pass the 0.05 score threshold and NMS sends up
  to 100 detections through the mask head (random weights would keep none); in bf16 only its backbone and neck
  (``extract_feat``) run under autocast and the heads stay in fp32 (mmcv's NMS and RoIAlign have no bf16 kernels).
  ``seg-latency``: UPerNet from segmentation/configs/<family>/*_upernet_*-512x512.py (peer: mmseg's
  swin/swin-{tiny,small,base}-patch4-window7-in1k-pre_upernet_*-512x512.py), 'whole' inference on a
  ``--seg-size`` square image.
  Only ``--latency-models`` take part (default: the T models and Swin-T). Batch-1 latency is bound by the host
  (kernel launches) as much as by the GPU. ``--inference-graphs`` adds, for our models, rows with backend
  ``<backend>+graphs``: the same model with its backbone's ``inference_graphs`` on (one CUDA-graph replay per input
  shape, captured in the warm-up; see ``vssm.models.layers.StagedBackbone``); not for Spectral VMamba, whose
  ordering synchronizes with the host in every forward.
* Task training modes (on request), the ``--latency-models`` too: ``det-train-fp16``, a Mask R-CNN
  ``model.train_step`` at ``--det-size`` with ``--det-train-batch`` images (default 2) under the configs' fp16
  ``AmpOptimWrapper`` (dynamic loss scale), and ``seg-train-bf16``, an UPerNet step at ``--seg-size`` with
  ``--seg-train-batch`` images (default 8) in bf16; random images and ground truth (8 boxes with box-shaped masks per
  image; a random label map), AdamW; images/s over the timed steps.
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
the Swin of the model's size in the same mode, and the kernel / reference speed-up of each of our models.
"""
import argparse
import contextlib
import importlib
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vssm.analysis.memory import record_saved_tensors, static_bytes
from vssm.analysis.models import (
    MODEL_SPECS,
    ModelSpec,
    build_backbone,
    build_spec_model,
    model_name_type,
    prepare_config,
)
from vssm.analysis.timing import (
    device_name,
    error_text,
    format_top_op,
    median_ms,
    peak_bytes,
    prepare_device,
    profile_top_ops,
    release,
    reset_peak,
    timed_span,
    write_results,
)
from vssm.ops._backend import triton_fusions_enabled

CLS_MODES = ('infer-fp32', 'infer-bf16', 'train-bf16', 'train-fp32')
SAVED_MODES = ('saved-bf16', 'saved-fp32')
ORDER_MODES = ('order-fp32', 'order-bf16')
LATENCY_MODES = ('det-latency', 'seg-latency')
TASK_TRAIN_MODES = ('det-train-fp16', 'seg-train-bf16')
MODES = CLS_MODES + SAVED_MODES + ORDER_MODES + LATENCY_MODES + TASK_TRAIN_MODES
DEFAULT_MODES = ('infer-fp32', 'infer-bf16', 'train-bf16', 'det-latency', 'seg-latency')
BACKENDS = ('torch', 'cuda', 'auto')
LATENCY_DTYPES = ('fp32', 'bf16')
PEER_BACKEND = '-'  # the backend column of the peers, which have no ops backend
REFERENCE = 'swin-t'
ORDERED_FAMILY = 'SpectralVMamba'  # the family whose scan order the order-* modes time
GIB = float(2**30)

# The compiled extensions (vssm.ops.<name>.kernel_available()) each family calls with ops_backend='cuda'.
KERNELS = {
    'SpatialMamba': ('selective_scan', 'dwconv2d'),
    'VMamba': ('selective_scan', ),
    'SpectralVMamba': ('selective_scan', ),
}
DEFAULT_MODELS = tuple(MODEL_SPECS)
DEFAULT_LATENCY_MODELS = ('spatial-mamba-t', 'vmamba-t', 'spectral-vmamba-t', 'swin-t')


# --- building ----------------------------------------------------------------------------------------------------
def build_classifier(spec: ModelSpec, backend: str, size: int) -> torch.nn.Module:
    return build_spec_model(spec, 'cls', backend, size)


def build_task_model(spec: ModelSpec, task: str, backend: str) -> torch.nn.Module:
    """Mask R-CNN (``task='det'``) or UPerNet (``'seg'``) of ``spec``, set up as the protocol says."""
    model = build_spec_model(spec, task, backend)
    if task == 'det':
        # Random weights score every class about 1/81, below the 0.05 threshold: nothing would reach the mask head.
        # A trained detector's load instead: one class wins, its boxes go through NMS, up to 100 get masks.
        with torch.no_grad():
            model.roi_head.bbox_head.fc_cls.bias[0] = 10.0
    return model


def build_ordered_backbone(spec: ModelSpec, backend: str) -> torch.nn.Module:
    """The backbone of ``spec``'s UPerNet config (every stage's output)."""
    return build_backbone(prepare_config(spec.segmentor), ops_backend=backend)


# --- measuring ---------------------------------------------------------------------------------------------------
def _autocast(device: torch.device, dtype: str):
    if dtype == 'bf16':
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def classification_throughput(model: torch.nn.Module, mode: str, batch: int, size: int, warmup: int, iters: int,
                              device: torch.device, profile_iters: int = 0,
                              profile_into: Optional[Dict[str, Any]] = None,
                              compile: bool = False) -> Tuple[float, Optional[int]]:
    """(images/s, peak bytes) of one classification mode, as the module docstring says. With ``profile_iters``,
    that many more steps run under torch.profiler afterwards and their top kernels go to
    ``profile_into['profile']``. ``compile``: the model runs through ``torch.compile`` (inductor, default mode;
    compiled during the warm-up iterations)."""
    reset_peak(device)
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
        seconds = timed_span(step, iters, device)
        peak = peak_bytes(device)
        if profile_iters > 0 and profile_into is not None:
            profile_into['profile'] = profile_top_ops(step, profile_iters, device)
        return batch * iters / seconds, peak
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def saved_activations(model: torch.nn.Module, dtype: str, batch: int, size: int, device: torch.device,
                      top: int = 5) -> Dict[str, Any]:
    """What one training forward of a classifier saves for the backward (the ``saved-*`` modes): saved bytes, the
    end-of-forward total with the weights, buffers and AdamW state, the ``top`` module types, the peak (GPU)."""
    reset_peak(device)
    model.train()
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, model.head.num_classes, (batch, ), device=device)

    def step() -> torch.Tensor:
        with _autocast(device, dtype):
            logits = model(images, mode='tensor')
        return F.cross_entropy(logits.float(), labels)

    try:
        saved = record_saved_tensors(model, step)
    finally:
        model.eval()
    static = static_bytes(model)
    held = saved.saved_bytes + static['parameters'] + static['buffers'] + static['adamw_state']
    return dict(saved_bytes=saved.saved_bytes, saved_gib=saved.saved_bytes / GIB, end_of_forward_gib=held / GIB,
                saved_top={k: v / GIB for k, v in list(saved.by_type.items())[:top]}, peak_mem_bytes=peak_bytes(device))


def spectral_ordering(backbone: torch.nn.Module, features: torch.Tensor) -> List[torch.Tensor]:
    """The orders a Spectral VMamba forward computes from its stage-0 features (B, C, h, w), as its forward does:
    the graph spectrum at stage 0, then the eigenvector fields pooled and sorted for every later stage."""
    from vssm.ops.spectral_order import pooled_order
    if backbone.upstream_compat:
        raise ValueError('the order-* modes time the default (fixed) ordering; upstream_compat=True propagates the '
                         'orders through the pooling instead.')
    first, details = backbone.layers[0].blocks[0].order_from_features(
        features, backbone.top_k, backbone.knn, False, backbone.eigensolver, return_details=True,
        graphs=backbone.order_graphs)
    fields = details['eigenvectors'].transpose(1, 2).reshape(features.shape[0], backbone.top_k, *features.shape[-2:])
    orders = [first]
    for _ in backbone.layers[1:]:
        order, fields = pooled_order(fields)
        orders.append(order)
    return orders


def ordering_cost(backbone: torch.nn.Module, dtype: str, batch: int, height: int, width: int, warmup: int,
                  iters: int, device: torch.device) -> Dict[str, Any]:
    """Median ms of the backbone's forward and of the ordering inside it (the ``order-*`` modes), and their ratio."""
    reset_peak(device)
    backbone.eval()
    images = torch.randn(batch, 3, height, width, device=device)
    with torch.no_grad(), _autocast(device, dtype):
        forward_ms = median_ms(lambda: backbone(images), device, warmup, iters)
        features = backbone.rfn(images)  # what the first stage orders its tokens by
        order_ms = median_ms(lambda: spectral_ordering(backbone, features), device, warmup, iters)
    return dict(forward_ms=forward_ms, order_ms=order_ms, order_share=order_ms / forward_ms,
                tokens=features.shape[-2] * features.shape[-1], peak_mem_bytes=peak_bytes(device))


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
    reset_peak(device)
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
            times.append(timed_span(step, 1, device))
    return statistics.median(times) * 1e3, peak_bytes(device)


def _train_batch(task: str, batch: int, width: int, height: int, num_classes: int, device: torch.device) -> dict:
    """A ``train_step`` input of ``batch`` random uint8 images with random ground truth: 8 boxes per image with
    their box-shaped masks (Mask R-CNN), or a random label map (UPerNet)."""
    images = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, device=device) for _ in range(batch)]
    samples = []
    for i in range(batch):
        meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                    scale_factor=(1.0, 1.0), flip=False, img_id=i, img_path='benchmark.jpg')
        if task == 'det':
            import numpy as np
            from mmdet.structures import DetDataSample
            from mmdet.structures.mask import BitmapMasks
            from mmengine.structures import InstanceData
            corners = torch.rand(8, 2) * torch.tensor([width - 64, height - 64])
            sizes = 32 + torch.rand(8, 2) * torch.tensor([width, height]) / 4
            boxes = torch.cat([corners, (corners + sizes).minimum(torch.tensor([width - 1, height - 1]))], dim=1)
            masks = np.zeros((8, height, width), dtype=np.uint8)
            for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
                m[y1:y2, x1:x2] = 1
            sample = DetDataSample(metainfo=meta)
            sample.gt_instances = InstanceData(bboxes=boxes, labels=torch.randint(0, num_classes, (8, )),
                                               masks=BitmapMasks(masks, height, width))
        else:
            from mmengine.structures import PixelData
            from mmseg.structures import SegDataSample
            sample = SegDataSample(metainfo=meta)
            sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, height, width)))
        samples.append(sample)
    return dict(inputs=images, data_samples=samples)


def task_train_throughput(model: torch.nn.Module, task: str, dtype: str, batch: int, width: int, height: int,
                          warmup: int, iters: int, device: torch.device) -> Tuple[float, Optional[int]]:
    """(images/s, peak bytes) of ``model.train_step`` on random batches: the configs' mixed precision
    (mmengine's ``AmpOptimWrapper``, dynamic loss scale for fp16) around AdamW (lr 1e-4, weight decay 0.05). On a
    CPU (tests) the step runs under CPU autocast for bf16 and in fp32 for fp16, without a loss scaler."""
    from mmengine.optim import AmpOptimWrapper, OptimWrapper
    reset_peak(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    amp_dtype = torch.float16 if dtype == 'fp16' else torch.bfloat16
    if device.type == 'cuda':
        wrapper = AmpOptimWrapper(optimizer=optimizer, dtype=amp_dtype,
                                  loss_scale='dynamic' if dtype == 'fp16' else 512.)
        context = contextlib.nullcontext
    else:
        wrapper = OptimWrapper(optimizer=optimizer)
        context = (lambda: torch.autocast('cpu', dtype=torch.bfloat16)) if dtype == 'bf16' else contextlib.nullcontext
    head = model.roi_head.bbox_head if task == 'det' else model.decode_head
    batches = [_train_batch(task, batch, width, height, head.num_classes, device) for _ in range(2)]

    def step(data: dict) -> None:
        with context():
            model.train_step(data, wrapper)

    try:
        for i in range(warmup):
            step(batches[i % 2])
        counter = iter(range(iters))
        seconds = timed_span(lambda: step(batches[next(counter) % 2]), iters, device)
        return batch * iters / seconds, peak_bytes(device)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


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


class Benchmark:
    """Runs the selected models and modes and keeps the rows."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.rows: List[Dict[str, Any]] = []
        self.meta = self._meta()

    def _meta(self) -> Dict[str, Any]:
        args = self.args
        return dict(
            device=device_name(self.device), torch=torch.__version__, cuda=torch.version.cuda, tf32=args.tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark, batch=args.batch, size=args.size, warmup=args.warmup,
            iters=args.iters, torch_batch=args.torch_batch, torch_warmup=args.torch_warmup,
            torch_iters=args.torch_iters, det_size=list(args.det_size), seg_size=args.seg_size,
            det_train_batch=args.det_train_batch, seg_train_batch=args.seg_train_batch,
            order_size=list(args.order_size), order_batches=list(args.order_batches), modes=list(args.modes),
            backends=list(args.backends), reference='swin of the same size', recompute=not args.no_recompute,
            compile=args.compile, inference_graphs=args.inference_graphs, triton_fusions=triton_fusions_enabled(),
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
            print(f'    {format_top_op(op)}', flush=True)

    def run(self, on_model_done: Callable[[], None]) -> None:
        args = self.args
        cls_modes = [m for m in args.modes if m in CLS_MODES + SAVED_MODES]
        if cls_modes:
            for name in args.models:
                for backend in self._backends(MODEL_SPECS[name]):
                    self._classification(MODEL_SPECS[name], backend, cls_modes)
                    on_model_done()
        order_modes = [m for m in args.modes if m in ORDER_MODES]
        if order_modes:
            for name in ordered_models(args.models):
                for backend in self._backends(MODEL_SPECS[name]):
                    self._ordering(MODEL_SPECS[name], backend, order_modes)
                    on_model_done()
        for mode in [m for m in args.modes if m in LATENCY_MODES + TASK_TRAIN_MODES]:
            for name in args.latency_models:
                for backend in self._backends(MODEL_SPECS[name]):
                    if mode in LATENCY_MODES:
                        self._latency(MODEL_SPECS[name], backend, mode)
                    else:
                        self._task_train(MODEL_SPECS[name], backend, mode)
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
        size = self.args.size
        rows = [self._row(spec, backend, mode, mode.rsplit('-', 1)[1], batch, f'{size}x{size}', warmup, iters)
                for mode in modes]

        def measure(model: torch.nn.Module, row: Dict[str, Any]) -> Dict[str, Any]:
            if row['mode'] in SAVED_MODES:
                row.update(warmup=0, iters=1)
                return saved_activations(model, row['dtype'], batch, size, self.device)
            images_per_s, peak = classification_throughput(model, row['mode'], batch, size, warmup, iters,
                                                           self.device, self.args.profile, row, self.args.compile)
            return dict(images_per_s=images_per_s, peak_mem_bytes=peak)

        self._measure(spec, backend, rows, lambda: build_classifier(spec, backend, size), measure)

    def _ordering(self, spec: ModelSpec, backend: str, modes: Sequence[str]) -> None:
        _, warmup, iters = self._settings(spec, backend)
        height, width = self.args.order_size
        rows = [self._row(spec, backend, mode, mode.rsplit('-', 1)[1], batch, f'{width}x{height}', warmup, iters)
                for mode in modes for batch in self.args.order_batches]

        def measure(backbone: torch.nn.Module, row: Dict[str, Any]) -> Dict[str, Any]:
            cost = ordering_cost(backbone, row['dtype'], row['batch'], height, width, warmup, iters, self.device)
            return dict(cost, images_per_s=row['batch'] * 1e3 / cost['forward_ms'])

        self._measure(spec, backend, rows, lambda: build_ordered_backbone(spec, backend), measure)

    def _latency(self, spec: ModelSpec, backend: str, mode: str) -> None:
        task = mode.split('-')[0]
        _, warmup, iters = self._settings(spec, backend)
        width, height = self.args.det_size if task == 'det' else (self.args.seg_size, self.args.seg_size)

        def measure(model: torch.nn.Module, row: Dict[str, Any]) -> Dict[str, Any]:
            ms, peak = task_latency(model, task, row['dtype'], width, height, warmup, iters, self.device)
            return dict(images_per_s=1e3 / ms, peak_mem_bytes=peak)

        def build(graphs: bool) -> torch.nn.Module:
            model = build_task_model(spec, task, backend)
            if graphs:  # only our backbones have the switch (the peers' rows are eager)
                model.backbone.inference_graphs.enabled = True
            return model

        with_graphs = self.args.inference_graphs and spec.supports_inference_graphs
        for graphs in (False, True) if with_graphs else (False, ):
            label = f'{backend}+graphs' if graphs else backend
            rows = [self._row(spec, label, mode, dtype, 1, f'{width}x{height}', warmup, iters)
                    for dtype in LATENCY_DTYPES]
            self._measure(spec, backend, rows, lambda graphs=graphs: build(graphs), measure)

    def _task_train(self, spec: ModelSpec, backend: str, mode: str) -> None:
        task, dtype = mode.split('-')[0], mode.rsplit('-', 1)[1]
        _, warmup, iters = self._settings(spec, backend)
        batch = self.args.det_train_batch if task == 'det' else self.args.seg_train_batch
        width, height = self.args.det_size if task == 'det' else (self.args.seg_size, self.args.seg_size)
        rows = [self._row(spec, backend, mode, dtype, batch, f'{width}x{height}', warmup, iters)]

        def measure(model: torch.nn.Module, row: Dict[str, Any]) -> Dict[str, Any]:
            images_per_s, peak = task_train_throughput(model, task, dtype, batch, width, height, warmup, iters,
                                                       self.device)
            return dict(images_per_s=images_per_s, peak_mem_bytes=peak)

        self._measure(spec, backend, rows, lambda: build_spec_model(spec, task, backend), measure)

    def _measure(self, spec: ModelSpec, backend: str, rows: List[Dict[str, Any]],
                 build: Callable[[], torch.nn.Module],
                 measure: Callable[[torch.nn.Module, Dict[str, Any]], Dict[str, Any]]) -> None:
        """Build once, fill each row with what ``measure`` returns (a failure goes into that row), free the model."""
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
                row.update(measure(model, row))
                if row['images_per_s']:
                    row['ms_per_image'] = 1e3 / row['images_per_s']
                if row['peak_mem_bytes'] is not None:
                    row['peak_mem_gib'] = row['peak_mem_bytes'] / GIB
            except Exception as exc:  # noqa: BLE001
                row.update(status='error', note=self._failure(row['mode'], spec, exc))
            row['seconds'] = round(time.perf_counter() - begin, 1)
            release(self.device)
            self._add(row)
        del model
        release(self.device)

    @staticmethod
    def _failure(what: str, spec: ModelSpec, exc: BaseException) -> str:
        text = error_text(exc)
        if not isinstance(exc, torch.OutOfMemoryError):
            print(f'--- {spec.name} {what} failed:', file=sys.stderr)
            traceback.print_exc()
        return text


def ordered_models(names: Sequence[str]) -> List[str]:
    """The models among ``names`` that the order-* modes measure (Spectral VMamba's)."""
    return [name for name in names if MODEL_SPECS[name].family == ORDERED_FAMILY]


# --- output ------------------------------------------------------------------------------------------------------
_COLUMNS = (('model', 18), ('backend', 11), ('mode', 11), ('dtype', 5), ('batch', 5), ('size', 9), ('iters', 6),
            ('images/s', 9), ('ms/image', 9), ('peak GiB', 8), ('params M', 8), ('s', 6))


def format_header() -> str:
    return '  '.join(f'{name:>{width}}' if i >= 4 else f'{name:<{width}}'
                     for i, (name, width) in enumerate(_COLUMNS)) + '  status'


def _details(row: Dict[str, Any]) -> str:
    """What the saved-* and order-* rows measure beyond the common columns."""
    if row.get('saved_gib') is not None:
        top = ', '.join(f'{name} {gib:.2f}' for name, gib in row['saved_top'].items())
        return (f"saved {row['saved_gib']:.2f} GiB, with weights + AdamW {row['end_of_forward_gib']:.2f} GiB "
                f'(largest, GiB: {top})')
    if row.get('order_ms') is not None:
        return (f"ordering {row['order_ms']:.2f} ms of a {row['forward_ms']:.2f} ms forward "
                f"({100 * row['order_share']:.1f}%, {row['tokens']} tokens at stage 0)")
    return ''


def format_row(row: Dict[str, Any]) -> str:
    def num(value: Optional[float], fmt: str) -> str:
        return '-' if value is None else format(value, fmt)

    cells = [row['model'], row['backend'], row['mode'], row['dtype'], str(row['batch']), row['size'],
             f"{row['warmup']}+{row['iters']}", num(row['images_per_s'], '.1f'), num(row['ms_per_image'], '.2f'),
             num(row['peak_mem_gib'], '.2f'), num(row['params_m'], '.1f'), num(row['seconds'], '.1f')]
    status = row['status'] + (f": {row['note']}" if row['note'] else '')
    details = _details(row)
    return '  '.join(f'{cell:>{width}}' if i >= 4 else f'{cell:<{width}}'
                     for i, (cell, (_, width)) in enumerate(zip(cells, _COLUMNS))) + '  ' + status + \
        (f'  {details}' if details else '')


def _reference(model: str) -> str:
    """The peer a row's ratios compare with: the Swin of the model's size."""
    return MODEL_SPECS[model].reference if model in MODEL_SPECS else REFERENCE


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    return '-' if value is None or not base else f'{value / base:.2f}x'


def _find(rows: Sequence[Dict[str, Any]], model: str, mode: str, dtype: str, backend: str) -> Optional[Dict]:
    for row in rows:
        if (row['model'], row['mode'], row['dtype'], row['backend']) == (model, mode, dtype, backend) and \
                row['status'] == 'ok':
            return row
    return None


def _note(row: Dict[str, Any]) -> str:
    return '' if row['status'] == 'ok' else f"{row['status']}: {row['note']}".replace('|', '/')


def _number(value: Optional[float], fmt: str) -> str:
    return '-' if value is None else format(value, fmt)


RefFinder = Callable[[Dict[str, Any]], Optional[Dict[str, Any]]]


def _saved_table(rows: Sequence[Dict[str, Any]], refs: RefFinder, ref_title: str) -> List[str]:
    lines = [f'| model | backend | batch | saved for backward (GiB) | + weights, AdamW (GiB) | saved vs {ref_title} | '
             'largest module types (GiB) | note |', '|---|---|---:|---:|---:|---:|---|---|']
    for row in rows:
        ref = refs(row)
        top = ', '.join(f'{name} {gib:.2f}' for name, gib in (row.get('saved_top') or {}).items())
        lines.append(f"| {row['title']} | {row['backend']} | {row['batch']} | {_number(row.get('saved_gib'), '.2f')} | "
                     f"{_number(row.get('end_of_forward_gib'), '.2f')} | "
                     f"{_ratio(row.get('saved_gib'), ref and ref.get('saved_gib'))} | {top} | {_note(row)} |")
    return lines


def _order_table(rows: Sequence[Dict[str, Any]]) -> List[str]:
    lines = ['| model | backend | batch | size | forward (ms) | ordering (ms) | ordering share | note |',
             '|---|---|---:|---|---:|---:|---:|---|']
    for row in rows:
        share = row.get('order_share')
        lines.append(f"| {row['title']} | {row['backend']} | {row['batch']} | {row['size']} | "
                     f"{_number(row.get('forward_ms'), '.2f')} | {_number(row.get('order_ms'), '.2f')} | "
                     f"{'-' if share is None else f'{100 * share:.1f}%'} | {_note(row)} |")
    return lines


def _speed_table(rows: Sequence[Dict[str, Any]], refs: RefFinder, ref_title: str) -> List[str]:
    lines = [f'| model | backend | batch | images/s | ms/image | images/s vs {ref_title} | peak memory (GiB) | '
             f'memory vs {ref_title} | kernel vs torch | note |', '|---|---|---:|---:|---:|---:|---:|---:|---:|---|']
    for row in rows:
        ref = refs(row)
        speedup = '-'
        if row['backend'] == 'cuda':
            reference_ops = _find(rows, row['model'], row['mode'], row['dtype'], 'torch')
            speedup = _ratio(row['images_per_s'], reference_ops and reference_ops['images_per_s'])
        ips, mem = row['images_per_s'], row['peak_mem_gib']
        lines.append(
            f"| {row['title']} | {row['backend']} | {row['batch']} | {_number(ips, '.1f')} | "
            f"{_number(row['ms_per_image'], '.2f')} | {_ratio(ips, ref and ref['images_per_s'])} | "
            f"{_number(mem, '.2f')} | {_ratio(mem, ref and ref['peak_mem_gib'])} | {speedup} | {_note(row)} |")
    return lines


def markdown(meta: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> str:
    """Tables for docs/benchmarks.md: one per mode and dtype, with ratios to the Swin of each model's size (Swin-T
    for the T models and ConvNeXt-T) and kernel / reference."""
    det_w, det_h = meta['det_size']
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']} (CUDA {meta['cuda']}); TF32 "
        f"{'on' if meta['tf32'] else 'off'} (fp32 matmuls and cuDNN convolutions); cuDNN benchmark "
        f"{'on' if meta['cudnn_benchmark'] else 'off'}; memory-saving recomputation "
        f"{'on' if meta.get('recompute', True) else 'off'}; Triton fusions "
        f"{'on' if meta.get('triton_fusions', True) else 'off'}; {meta['date']}.",
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
        'saved-bf16': 'Saved for backward by a training forward, bf16 autocast',
        'saved-fp32': 'Saved for backward by a training forward, fp32',
        'order-fp32': 'Spectral ordering inside the backbone forward, fp32',
        'order-bf16': 'Spectral ordering inside the backbone forward, bf16 autocast',
        'det-latency': 'Mask R-CNN latency', 'seg-latency': 'UPerNet latency',
        'det-train-fp16': 'Mask R-CNN training step, fp16 (AmpOptimWrapper)',
        'seg-train-bf16': 'UPerNet training step, bf16 (AmpOptimWrapper)',
    }
    sections = []
    for row in rows:
        if (row['mode'], row['dtype']) not in sections:
            sections.append((row['mode'], row['dtype']))
    for mode, dtype in sections:
        title = titles[mode] + (f', {dtype}' if mode in LATENCY_MODES else '')
        section = [r for r in rows if (r['mode'], r['dtype']) == (mode, dtype)]
        references = sorted({_reference(r['model']) for r in section})
        ref_title = MODEL_SPECS[references[0]].title if len(references) == 1 else 'Swin of its size'

        def refs(row, mode=mode, dtype=dtype):
            return _find(rows, _reference(row['model']), mode, dtype, PEER_BACKEND)

        if mode in SAVED_MODES:
            table = _saved_table(section, refs, ref_title)
        elif mode in ORDER_MODES:
            table = _order_table(section)
        else:
            table = _speed_table(section, refs, ref_title)
        lines += ['', f'### {title}', ''] + table
    return '\n'.join(lines) + '\n'


def write_outputs(args: argparse.Namespace, meta: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> None:
    write_results(args.json, args.markdown, meta, rows, markdown)


# --- command line ------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_name = model_name_type(list(MODEL_SPECS))
    parser.add_argument('--models', nargs='+', type=model_name, default=list(DEFAULT_MODELS), metavar='NAME',
                        help=f'classification models, in order (default: all): {", ".join(MODEL_SPECS)}')
    parser.add_argument('--latency-models', nargs='+', type=model_name, default=list(DEFAULT_LATENCY_MODELS),
                        metavar='NAME', help='models of the task modes (det-/seg-latency, det-/seg-train; default: '
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
    parser.add_argument('--det-train-batch', type=int, default=2,
                        help='images per Mask R-CNN training step (det-train-fp16; default: %(default)s)')
    parser.add_argument('--seg-train-batch', type=int, default=8,
                        help='images per UPerNet training step (seg-train-bf16; default: %(default)s)')
    parser.add_argument('--order-size', type=int, nargs=2, default=[512, 512], metavar=('H', 'W'),
                        help='input height and width of the order-* modes, multiples of 16 (default: 512 512)')
    parser.add_argument('--order-batches', type=int, nargs='+', default=[1, 2, 8], metavar='B',
                        help='batches of the order-* modes, one row each (default: 1 2 8)')
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
    parser.add_argument('--inference-graphs', action='store_true',
                        help="latency modes: our models also with the backbone's inference_graphs on (rows with "
                        "backend '<backend>+graphs'; the graphs are captured in the warm-up, which needs 2 or more)")
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
    if any(side < 16 or side % 16 for side in args.order_size):
        parser.error(f'--order-size: sides must be multiples of 16 (Spectral VMamba\'s stride), got {args.order_size}')
    if min(args.order_batches) < 1:
        parser.error(f'--order-batches must be at least 1, got {args.order_batches}')
    if set(args.modes) & set(ORDER_MODES) and not ordered_models(args.models):
        parser.error('--modes order-*: time the ordering of a Spectral VMamba model; add e.g. spectral-vmamba-t to '
                     '--models.')
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    import vssm  # noqa: F401  (registers the backbones; before mmpretrain, see README "transformers >= 5")
    device = prepare_device(args.device, args.tf32)

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
