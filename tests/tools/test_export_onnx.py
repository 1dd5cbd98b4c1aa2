"""tools/deployment/export_onnx.py: ONNX files that onnxruntime runs with PyTorch's outputs, and the clear refusals.

Small archs (one block per stage) through the real T configs and ``--cfg-options``, 32 x 32 inputs: exporting and
checking a whole T model at 224 px takes 1-2 minutes per family on 2 CPU cores, the small ones a few seconds.
Outputs are compared relative to their largest magnitude: max |onnx - torch| <= TOLERANCE * max |torch| (fp32;
measured 2e-7 to 2e-6).
"""
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, load_tool

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

from vssm.ops import selective_scan  # noqa: E402  (after the skip above)

TOLERANCE = 1e-5
CONFIGS = {
    'SpatialMamba': 'classification/configs/spatial_mamba/spatial-mamba-tiny_8xb128_in1k.py',
    'VMamba': 'classification/configs/vmamba/vmamba-tiny_8xb128_in1k.py',
    'SpectralVMamba': 'classification/configs/spectral_vmamba/spectral-vmamba-tiny_8xb128_in1k.py',
}
DET_CONFIG = 'detection/configs/vmamba/mask-rcnn_vmamba-t_fpn_1x_coco.py'
SMALL_ARCH = ['model.backbone.arch._delete_=True', 'model.backbone.arch.dims=[8,16,32,64]',
              'model.backbone.arch.depths=[1,1,1,1]']
SMALL_CLASSIFIER = [*SMALL_ARCH, 'model.head.in_channels=64']


def _tool():
    return load_tool('tools/deployment/export_onnx.py')


@pytest.fixture(scope='module')
def tool():
    return _tool()


def _config(name: str) -> str:
    return str(REPO_ROOT / name)


def _build(tool, config: str, cfg_options, backbone_only: bool = False):
    from vssm.engine.launch import load_config
    cfg = load_config(_config(config), tool.parse_args([config, '--cfg-options', *cfg_options]).cfg_options)
    return tool.build_model(cfg, backbone_only)


def _assert_matches(model, onnx_file, images, names):
    session = ort.InferenceSession(str(onnx_file), providers=['CPUExecutionProvider'])
    got = session.run(list(names), {'images': images.numpy()})
    with torch.no_grad():
        expected = model(images)
    expected = expected if isinstance(expected, tuple) else (expected, )
    assert len(got) == len(expected)
    for name, onnx_out, torch_out in zip(names, got, expected):
        scale = torch_out.abs().max().item()
        torch.testing.assert_close(torch.from_numpy(onnx_out), torch_out, rtol=0, atol=TOLERANCE * scale,
                                   msg=lambda m, name=name: f'{name}: {m}')


def _plain_onnx_ops(onnx_file):
    model = onnx.load(str(onnx_file))
    return {(node.domain or 'ai.onnx', node.op_type) for node in model.graph.node}


class _Scan(torch.nn.Module):
    """The reference scan with a long memory (decay exp(dt * A) close to 1), so that an export that loses the
    recurrence cannot pass; state-returning (Spatial-Mamba) or output-returning (VMamba) form."""

    def __init__(self, with_output: bool) -> None:
        super().__init__()
        d, n, groups, length = 8, 2, 2, 37
        self.A = torch.nn.Parameter(-0.05 * torch.rand(d, n))
        self.B = torch.nn.Parameter(torch.randn(1, groups, n, length))
        self.C = torch.nn.Parameter(torch.randn(1, groups, n, length)) if with_output else None
        self.D = torch.nn.Parameter(torch.randn(d)) if with_output else None
        self.delta_bias = torch.nn.Parameter(torch.randn(d))

    def forward(self, u):
        b = u.shape[0]
        C = None if self.C is None else self.C.expand(b, -1, -1, -1)
        return selective_scan(u, 0.5 * u, self.A, self.B.expand(b, -1, -1, -1), C, self.D, self.delta_bias,
                              delta_softplus=True, backend='torch')


@pytest.mark.parametrize('with_output', [False, True], ids=['states', 'outputs'])
def test_reference_scan_exports_as_plain_onnx_ops(tool, tmp_path, with_output):
    scan = _Scan(with_output).eval()
    u = torch.randn(2, 8, 37)
    with torch.no_grad():  # the recurrence matters: the last state is far from the last step's own term dt * B * u
        states = selective_scan(u, 0.5 * u, scan.A, scan.B.expand(2, -1, -1, -1), None, None, scan.delta_bias,
                                backend='torch')  # (2, 8, 2, 37)
        last_step = selective_scan(u[..., -1:], 0.5 * u[..., -1:], scan.A, scan.B[..., -1:].expand(2, -1, -1, -1),
                                   None, None, scan.delta_bias, backend='torch')
    assert (states[..., -1] - last_step[..., 0]).abs().max() > 0.1 * states.abs().max()
    out = tmp_path / 'scan.onnx'
    tool.export(scan, u, str(out), ['y'])
    ops = _plain_onnx_ops(out)
    assert {domain for domain, _ in ops} == {'ai.onnx'}, ops
    assert ('ai.onnx', 'Exp') in ops and ('ai.onnx', 'Softplus') in ops
    _assert_matches(scan, out, u, ['y'])


# Whole classifiers (about 20 s each on 2 cores) under slow; the quick suite exports the reference scans above.
@pytest.mark.parametrize('family', [pytest.param('SpatialMamba', marks=pytest.mark.slow),
                                    pytest.param('VMamba', marks=pytest.mark.slow)])
def test_classifier_export_matches_pytorch(tool, tmp_path, capsys, monkeypatch, family):
    torch.manual_seed(1)
    model, what = _build(tool, CONFIGS[family], SMALL_CLASSIFIER)
    assert what == 'classifier'
    ckpt = tmp_path / 'cls.pth'
    torch.save({'state_dict': model.classifier.state_dict(), 'meta': {}}, ckpt)
    out = tmp_path / 'cls.onnx'
    tool.main([_config(CONFIGS[family]), '--checkpoint', str(ckpt), '--out', str(out), '--shape', '32',
               '--cfg-options', *SMALL_CLASSIFIER])
    log = capsys.readouterr().out
    assert 'logits: max abs diff' in log and '(ok, tolerance 1e-05)' in log, log
    loaded = onnx.load(str(out))
    assert [o.version for o in loaded.opset_import if o.domain == ''] == [18]
    assert [o.name for o in loaded.graph.output] == ['logits']
    images = torch.randn(1, 3, 32, 32)
    _assert_matches(model, out, images, ['logits'])  # the checkpoint's weights, not a fresh random model's

    # --backbone-only takes the backbone.* weights of the same classifier checkpoint.
    backbone, what = _build(tool, CONFIGS[family], SMALL_ARCH, backbone_only=True)
    assert what == 'backbone' and tool.output_names(backbone, what) == ['stage3']
    tool.load_weights(backbone, str(ckpt))
    for key, value in model.classifier.backbone.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[key], value, rtol=0, atol=0)

    # A model that differs from the file fails the check with a non-zero exit (no new export).
    torch.manual_seed(2)
    other, _ = _build(tool, CONFIGS[family], SMALL_CLASSIFIER)
    torch.save({'state_dict': other.classifier.state_dict()}, ckpt)
    monkeypatch.setattr(tool, 'export', lambda *args, **kwargs: None)
    with pytest.raises(SystemExit, match='does not match PyTorch within 1e-05'):
        tool.main([_config(CONFIGS[family]), '--checkpoint', str(ckpt), '--out', str(out), '--shape', '32',
                   '--cfg-options', *SMALL_CLASSIFIER])


@pytest.mark.slow
def test_backbone_export_opset17_dynamic_batch(tool, tmp_path, capsys):
    """A detection config: the backbone alone, its four stage maps, opset 17 (converted from 18), a dynamic batch, and
    a detector checkpoint (backbone.* next to other modules' keys)."""
    torch.manual_seed(3)
    backbone, what = _build(tool, DET_CONFIG, SMALL_ARCH)
    assert what == 'backbone' and backbone.out_indices == (0, 1, 2, 3)
    ckpt = tmp_path / 'det.pth'
    state = {f'backbone.{k}': v for k, v in backbone.state_dict().items()}
    torch.save({'state_dict': {**state, 'neck.lateral_convs.0.conv.weight': torch.zeros(4, 8, 1, 1)}}, ckpt)
    out = tmp_path / 'backbone.onnx'
    tool.main([_config(DET_CONFIG), '--checkpoint', str(ckpt), '--out', str(out), '--shape', '32', '48', '--opset',
               '17', '--dynamic-batch', '--cfg-options', *SMALL_ARCH])
    log = capsys.readouterr().out
    for batch in (1, 2):
        assert f'batch {batch}, stage3: max abs diff' in log, log
    names = [f'stage{i}' for i in range(4)]
    loaded = onnx.load(str(out))
    assert [o.version for o in loaded.opset_import if o.domain == ''] == [17]
    assert [o.name for o in loaded.graph.output] == names
    _assert_matches(backbone, out, torch.randn(3, 3, 32, 48), names)


def test_opset_below_17_is_an_error(tool, tmp_path):
    out = tmp_path / 'm.onnx'
    with pytest.raises(SystemExit, match='opset >= 17'):
        tool.main([_config(CONFIGS['VMamba']), '--out', str(out), '--shape', '32', '--opset', '16', '--no-verify',
                   '--cfg-options', *SMALL_CLASSIFIER])
    assert not out.exists()


@pytest.mark.slow
def test_opset_the_converter_cannot_write_is_an_error(tool, tmp_path):
    out = tmp_path / 'm.onnx'
    with pytest.raises(SystemExit, match=r"--opset 17: the exporter produced opset 18\. .*version converter, which "
                                         r"cannot convert this model \(.+\)\. Use --opset 18"):
        tool.main([_config(CONFIGS['SpatialMamba']), '--out', str(out), '--shape', '32', '--opset', '17',
                   '--no-verify', '--cfg-options', *SMALL_CLASSIFIER])
    assert not out.exists()


@pytest.mark.slow  # a subprocess (8 s); test_spectral_vmamba_subclass_is_refused checks the same in process
def test_spectral_vmamba_is_refused_with_the_reason(tmp_path):
    out = tmp_path / 'spectral.onnx'
    result = subprocess.run([sys.executable, 'tools/deployment/export_onnx.py', CONFIGS['SpectralVMamba'], '--out',
                             str(out)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith('export_onnx: SpectralVMamba cannot be exported to ONNX'), result.stderr
    assert 'torch.linalg.eigh' in message and 'no eigendecomposition operator' in message
    assert 'Export SpatialMamba or VMamba' in message and 'torch.compile' in message
    assert not out.exists()


def test_spectral_vmamba_subclass_is_refused(tool):
    from vssm.models import SpectralVMamba

    class Renamed(SpectralVMamba):
        pass

    with pytest.raises(tool.ExportError, match='SpectralVMamba cannot be exported'):
        tool.check_exportable('mmpretrain.SpectralVMamba')
    with pytest.raises(tool.ExportError, match='torch.linalg.eigh'):
        tool._check_built_backbone(Renamed.__new__(Renamed))


def test_missing_config_or_checkpoint_is_a_clear_error(tool, tmp_path):
    out = tmp_path / 'm.onnx'
    with pytest.raises(SystemExit, match=r"config file 'nope.py' does not exist"):
        tool.main(['nope.py', '--out', str(out)])
    args = [_config(CONFIGS['VMamba']), '--out', str(out), '--cfg-options', *SMALL_CLASSIFIER]
    with pytest.raises(SystemExit, match=r"checkpoint '.*missing.pth' does not exist"):
        tool.main([*args, '--checkpoint', str(tmp_path / 'missing.pth')])
    model, _ = _build(tool, CONFIGS['VMamba'], SMALL_CLASSIFIER)
    state = model.classifier.state_dict()
    del state['head.fc.bias']
    torch.save({'state_dict': state}, tmp_path / 'partial.pth')
    with pytest.raises(SystemExit, match=r"(?s)partial.pth' does not fit the model .*missing keys.*head\.fc\.bias"):
        tool.main([*args, '--checkpoint', str(tmp_path / 'partial.pth')])
    assert not out.exists()
