"""Export a vssm classifier or backbone to ONNX and check the file against PyTorch with onnxruntime.

    python tools/deployment/export_onnx.py CONFIG [--checkpoint CKPT] [--out model.onnx] [--shape H W] [--batch N]
        [--backbone-only] [--opset 18] [--dynamic-batch] [--no-verify] [--tolerance 1e-5] [--cfg-options k=v ...]

What is exported:

* a classification config: the whole ``ImageClassifier`` in ``mode='tensor'``, input ``images`` (B, 3, H, W) ->
  output ``logits`` (B, num_classes), before any softmax;
* ``--backbone-only``, or a detection/segmentation config: the backbone alone, input ``images`` -> one output
  ``stage{i}`` (B, C_i, H_i, W_i) per stage of ``out_indices``.

The images are the normalized ones: the data preprocessor (mean/std, BGR->RGB) is not part of the graph; the tool
prints the config's mean and std. The reference ops run (``ops_backend='torch'`` is forced): the CUDA kernels are not
ONNX operators. Weights are random unless ``--checkpoint`` is given; a checkpoint is loaded strictly (a classifier or
detector checkpoint into the backbone through its ``backbone.`` keys).

Exporter: torch.onnx's ``dynamo=True`` path (``torch.export``, then onnxscript's ATen-to-ONNX translation), the
default since torch 2.9. The reference selective scan is an ``autograd.Function`` whose forward becomes plain ONNX
ops (Exp, Softplus, Slice, Mul, Add, ScatterND: the log-depth scan unrolled for the traced length). The TorchScript
exporter (``dynamo=False``) must not be used: when it inlines that ``autograd.Function`` it drops the in-place slice
updates of ``linear_scan``, silently, so the file computes h_t = dt_t * B_t * u_t without the recurrence; with random
weights a VMamba-T's outputs then still differ from PyTorch by only ~1e-4 relative, hence the tight default tolerance
of the check here.

Opset: the dynamo exporter writes opset 18 (the default here). Opset 17 (the lowest with LayerNormalization) is
made from it with onnx's version converter, which handles a VMamba backbone but not every model: it has no 18 -> 17
adapter for the ``Pad`` of Spatial-Mamba's replicate padding and cannot move the classifier's reduction axes back
into attributes. The tool then stops with the converter's reason instead of writing another opset than asked for.

SpectralVMamba is refused: its scan orders come from ``torch.linalg.eigh`` (and Cholesky/triangular solves), and
ONNX has no eigendecomposition operator.

Check: unless ``--no-verify``, onnxruntime (CPU) runs the file on a random input and the tool prints, per output,
the max abs difference to PyTorch and that difference relative to the output's max magnitude; it exits with status 1
when the relative one exceeds ``--tolerance``. With ``--dynamic-batch`` it also checks a second batch size.

Needs ``onnx``, ``onnxruntime`` and ``onnxscript`` (``pip install onnx onnxruntime onnxscript``).
"""
import argparse
import logging
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.config import DictAction
from torch import Tensor, nn

MIN_OPSET = 17  # LayerNormalization
DEFAULT_OPSET = 18  # what torch.onnx's dynamo exporter writes without a version conversion
DEFAULT_TOLERANCE = 1e-5  # max |onnx - torch| / max |torch| per output; fp32 measures ~1e-6 (see the docstring)
INPUT_NAME = 'images'
NOT_EXPORTABLE = {
    'SpectralVMamba': ('its scan orders are computed in the forward pass from torch.linalg.eigh (eigenvectors of a '
                       'graph Laplacian; the iterative solver adds Cholesky and triangular solves), and ONNX has no '
                       'eigendecomposition operator in any opset. Export SpatialMamba or VMamba, or deploy '
                       'SpectralVMamba with PyTorch itself (eager, or torch.compile: see '
                       'tests/models/test_compile.py).'),
}


class ExportError(RuntimeError):
    """A model, checkpoint or option that cannot give a valid ONNX file; the message says why and what to do."""


class ClassifierLogits(nn.Module):
    """An mmpretrain classifier as a plain module: ``forward(images)`` is ``classifier(images, mode='tensor')``."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(images, mode='tensor')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Export a vssm classifier or backbone to ONNX and check it.')
    parser.add_argument('config', help='config file (classification, detection or segmentation)')
    parser.add_argument('--checkpoint', help='weights to load (strictly); random weights without it')
    parser.add_argument('--out', default='model.onnx', help='the ONNX file to write')
    parser.add_argument('--shape', type=int, nargs='+', default=[224, 224], help='input H W (or one side)')
    parser.add_argument('--batch', type=int, default=1, help='batch size of the example input')
    parser.add_argument('--backbone-only', action='store_true',
                        help='export the backbone of a classification config (always the case for det/seg configs)')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help=f'ONNX opset, >= {MIN_OPSET} (default {DEFAULT_OPSET}, what the exporter writes natively)')
    parser.add_argument('--dynamic-batch', action='store_true', help='make the batch dimension dynamic')
    parser.add_argument('--no-verify', action='store_true', help='skip the onnxruntime check')
    parser.add_argument('--tolerance', type=float, default=DEFAULT_TOLERANCE,
                        help='largest accepted max|onnx - torch| / max|torch| per output')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys, e.g. a.b=1')
    return parser.parse_args(argv)


def _registered_name(type_) -> str:
    """'mmpretrain.VMamba' -> 'VMamba'; a class -> its name."""
    return type_.__name__ if isinstance(type_, type) else str(type_).split('.')[-1]


def check_exportable(backbone_type) -> None:
    """Raise :class:`ExportError` for a backbone (registered name, or class) whose forward ONNX cannot express."""
    name = _registered_name(backbone_type)
    if name in NOT_EXPORTABLE:
        raise ExportError(f'{name} cannot be exported to ONNX: {NOT_EXPORTABLE[name]}')


def _check_built_backbone(backbone: nn.Module) -> None:
    """The same check on the built module, for subclasses registered under another name."""
    for cls in type(backbone).__mro__:
        check_exportable(cls)


def build_model(cfg, backbone_only: bool = False) -> Tuple[nn.Module, str]:
    """Build the module to export from a loaded config, in eval mode, on the reference ops.

    Args:
        cfg: an mmengine ``Config`` of vssm (``default_scope`` mmpretrain, mmdet or mmseg).
        backbone_only: export the backbone of a classification config.

    Returns:
        The module (its forward takes the images only) and what it is: ``'classifier'`` or ``'backbone'``.
    """
    from vssm.analysis import models

    backbone_cfg = cfg.model.get('backbone')
    if backbone_cfg is None:
        raise ExportError('the config has no model.backbone; export_onnx takes vssm classification, detection or '
                          'segmentation configs.')
    check_exportable(backbone_cfg.get('type'))
    # The CUDA kernels are not ONNX operators: the reference ops. No weights are loaded here (--checkpoint does).
    if cfg.get('default_scope', 'mmpretrain') == 'mmpretrain' and not backbone_only:
        model, what = ClassifierLogits(models.build_model(cfg, ops_backend='torch')), 'classifier'
        backbone = model.classifier.backbone
    else:
        model = backbone = models.build_backbone(cfg, ops_backend='torch')
        what = 'backbone'
    _check_built_backbone(backbone)
    return model.eval(), what


def load_weights(model: nn.Module, checkpoint: str) -> None:
    """Load ``checkpoint`` strictly into the classifier, or into the backbone (through the ``backbone.`` keys of a
    classifier/detector/segmentor checkpoint, or a backbone's own keys)."""
    from mmengine.runner.checkpoint import load_checkpoint, load_state_dict

    from vssm.analysis.models import backbone_state_dict
    from vssm.fileio import register_safe_globals

    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist.')
    register_safe_globals()
    try:
        if isinstance(model, ClassifierLogits):
            load_checkpoint(model.classifier, checkpoint, map_location='cpu', strict=True)
        else:
            load_state_dict(model, backbone_state_dict(checkpoint), strict=True)
    except RuntimeError as error:  # mmengine's strict loading lists the missing, unexpected and mis-shaped keys
        raise ExportError(f'checkpoint {checkpoint!r} does not fit the model of the config (strict loading): '
                          f'{str(error).strip()}') from error


def _as_tuple(outputs) -> Tuple[Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs, )


def output_names(model: nn.Module, what: str) -> List[str]:
    """``['logits']`` for a classifier, ``['stage{i}', ...]`` (``out_indices``) for a backbone."""
    if what == 'classifier':
        return ['logits']
    return [f'stage{i}' for i in model.out_indices]


class _ConverterErrors(logging.Handler):
    """Collects why onnx's version converter failed: torch.onnx logs it as a warning and keeps opset 18."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: List[str] = []
        self.logger = logging.getLogger('onnxscript.version_converter')

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(str(record.exc_info[1]).strip())

    def __enter__(self) -> List[str]:
        self.logger.addHandler(self)
        return self.errors

    def __exit__(self, *exc_info) -> None:
        self.logger.removeHandler(self)


def export(model: nn.Module, images: Tensor, out: str, names: Sequence[str], opset: int = DEFAULT_OPSET,
           dynamic_batch: bool = False) -> None:
    """Export ``model(images)`` to ``out`` with torch.onnx's dynamo exporter.

    Args:
        model: the module from :func:`build_model`, in eval mode.
        images: example input (B, 3, H, W); H and W are fixed in the file, B too unless ``dynamic_batch``.
        out: path of the ONNX file.
        names: the outputs' names.
        opset: ONNX opset (>= 17). The exporter writes 18; a lower one is converted with onnx's version converter,
            and when that fails nothing is written.
        dynamic_batch: make dim 0 of the input and of every output dynamic.
    """
    if opset < MIN_OPSET:
        raise ExportError(f'--opset {opset}: the models need opset >= {MIN_OPSET} (LayerNormalization).')
    dynamic_shapes = None
    if dynamic_batch:
        if images.shape[0] < 2:  # torch.export specializes a size-1 dimension: trace with two images
            images = images.expand(2, -1, -1, -1).contiguous()
        dynamic_shapes = ({0: torch.export.Dim('batch', min=1)}, )
    with torch.no_grad(), _ConverterErrors() as converter_errors:
        program = torch.onnx.export(model, (images, ), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                    output_names=list(names), dynamic_shapes=dynamic_shapes, verbose=False)
    written = program.model.opset_imports.get('')
    if written != opset:
        reason = f' ({"; ".join(converter_errors)})' if converter_errors else ''
        raise ExportError(f'--opset {opset}: the exporter produced opset {written}. torch.onnx writes opset '
                          f'{DEFAULT_OPSET} and converts lower ones with onnx\'s version converter, which cannot '
                          f'convert this model{reason}. Use --opset {written}; {out} was not written.')
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    program.save(out)


def _max_abs(x: Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def compare_with_onnxruntime(model: nn.Module, onnx_file: str, images: Tensor,
                             names: Sequence[str]) -> Dict[str, Tuple[float, float]]:
    """Run the file with onnxruntime (CPU) and ``model`` in PyTorch on ``images``.

    Returns:
        For every output name, (max |onnx - torch|, the same divided by max |torch|).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_file, providers=['CPUExecutionProvider'])
    got = session.run(list(names), {INPUT_NAME: images.numpy()})
    with torch.no_grad():
        expected = _as_tuple(model(images))
    if len(got) != len(expected):
        raise ExportError(f'the ONNX file has {len(got)} outputs, PyTorch gives {len(expected)}.')
    diffs = {}
    for name, onnx_out, torch_out in zip(names, got, expected):
        onnx_out = torch.from_numpy(onnx_out)
        if onnx_out.shape != torch_out.shape:
            raise ExportError(f'output {name}: ONNX shape {tuple(onnx_out.shape)}, PyTorch {tuple(torch_out.shape)}.')
        max_abs = _max_abs(onnx_out.float() - torch_out.float())
        diffs[name] = (max_abs, max_abs / max(_max_abs(torch_out.float()), 1e-12))
    return diffs


def _print_preprocessing(cfg) -> None:
    pre = cfg.get('data_preprocessor') or cfg.model.get('data_preprocessor') or {}
    if 'mean' in pre and 'std' in pre:
        print(f'  inputs: normalized images (x - mean) / std, mean={list(pre["mean"])}, std={list(pre["std"])}'
              + (', RGB' if pre.get('to_rgb', pre.get('bgr_to_rgb')) else ''))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    import vssm  # noqa: F401  (registers the backbones; keeps mmpretrain importable next to transformers>=5)
    from vssm.analysis.models import prepare_config

    if len(args.shape) not in (1, 2):
        raise SystemExit(f'export_onnx: --shape takes one or two integers (H W), got {args.shape}.')
    if args.batch < 1:
        raise SystemExit(f'export_onnx: --batch must be >= 1, got {args.batch}.')
    height, width = (args.shape * 2)[:2]
    try:
        cfg = prepare_config(args.config, args.cfg_options)
        model, what = build_model(cfg, args.backbone_only)
        if args.checkpoint:
            load_weights(model, args.checkpoint)
        names = output_names(model, what)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(args.batch, 3, height, width, generator=generator)
        export(model, images, args.out, names, args.opset, args.dynamic_batch)
    except (ExportError, FileNotFoundError) as error:
        raise SystemExit(f'export_onnx: {error}')
    print(f'export_onnx: wrote {args.out}: {what} of {args.config}, input {INPUT_NAME} '
          f'({"N" if args.dynamic_batch else args.batch}, 3, {height}, {width}), outputs {names}, opset {args.opset}'
          + ('' if args.checkpoint else ', random weights'))
    _print_preprocessing(cfg)
    if args.no_verify:
        return
    batches = [args.batch, args.batch + 1] if args.dynamic_batch else [args.batch]
    failed = []
    for batch in batches:
        images = torch.randn(batch, 3, height, width, generator=generator)
        for name, (max_abs, max_rel) in compare_with_onnxruntime(model, args.out, images, names).items():
            ok = max_rel <= args.tolerance
            print(f'  onnxruntime vs PyTorch, batch {batch}, {name}: max abs diff {max_abs:.3e}, '
                  f'relative to max |output| {max_rel:.3e} ({"ok" if ok else "FAILED"}, tolerance {args.tolerance:g})')
            if not ok:
                failed.append(f'{name} (batch {batch})')
    if failed:
        raise SystemExit(f'export_onnx: {args.out} does not match PyTorch within {args.tolerance:g} for '
                         f'{", ".join(failed)}.')


if __name__ == '__main__':
    main()
