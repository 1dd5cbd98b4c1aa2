"""tools/analysis_tools/activation_memory.py on tiny classifiers: the report's sums agree, scaling is linear, and the
fake-CUDA kernel path records what the kernels' autograd saves."""
import importlib
import json
from types import ModuleType

import pytest
import torch
from conftest import REPO_ROOT, load_tool

BATCH, CHECK_BATCH, SCALE_BATCH, SIZE = 2, 4, 16, 64


@pytest.fixture(scope='module')
def tool() -> ModuleType:
    return load_tool('tools/analysis_tools/activation_memory.py')


def _classifier(backbone: dict, width: int) -> torch.nn.Module:
    import vssm  # noqa: F401  (registers the backbones)
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):  # other tests may leave mmdet's or mmseg's scope
        return MODELS.build(dict(type='ImageClassifier', backbone=backbone, neck=dict(type='GlobalAveragePooling'),
                                 head=dict(type='LinearClsHead', num_classes=10, in_channels=width)))


def _spatial_mamba() -> torch.nn.Module:
    return _classifier(dict(type='SpatialMamba', arch=dict(dims=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
                            ops_backend='auto'), 128)


def _vmamba() -> torch.nn.Module:
    return _classifier(dict(type='VMamba', arch=dict(dims=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
                            ops_backend='auto'), 128)


def _report(tool, model, device='cpu', autocast='bf16'):
    storages = tool.record_forward(model, BATCH, SIZE, autocast, device)
    check = tool.record_forward(model, CHECK_BATCH, SIZE, autocast, device)
    settings = dict(batch=BATCH, check_batch=CHECK_BATCH, scale_batch=SCALE_BATCH, size=SIZE, autocast=autocast,
                    device=device, ops_path='reference', ops_backend='auto')
    return tool.build_report('tiny', 'Tiny', model, storages, check, settings, top=5), storages, check


@pytest.mark.parametrize('device', ['cpu', 'fake-cuda'])
def test_totals_add_up_and_scale_linearly(tool, device):
    model = _spatial_mamba()
    report, storages, check = _report(tool, model, device)
    total = report.saved_bytes_scaled
    assert report.saved_bytes > 0 and total > report.saved_bytes
    for table in (report.by_type, report.by_op, report.by_type_op):
        assert sum(table.values()) == pytest.approx(total, rel=1e-9)
    assert sum(m['bytes_scaled'] for m in report.top_modules) <= total * (1 + 1e-9)
    lin = report.linearity
    assert lin['checked'] and lin['linear'] and not lin['unmatched_check_bytes'], lin
    assert lin['ratio'] == pytest.approx(CHECK_BATCH / BATCH)
    # Every activation is batch-independent or proportional: extrapolating from the check run gives the same total.
    constant = lin['constant_bytes']
    assert total == pytest.approx(constant + (report.saved_bytes - constant) * SCALE_BATCH / BATCH)
    assert report.saved_bytes_check == pytest.approx(constant + (report.saved_bytes - constant) * CHECK_BATCH / BATCH)
    if device == 'fake-cuda':  # no data: the scale batch itself runs in no time, and matches the extrapolation
        direct = tool.record_forward(model, SCALE_BATCH, SIZE, 'bf16', device)
        assert sum(s.nbytes for s in direct if not s.parameter) == pytest.approx(total)
    # The state fusion's input (saved by the checkpoint that recomputes the fusion in the backward) and the scan are
    # found, and every storage is counted once.
    assert any(s.op == 'checkpoint' and s.module_type == 'StructureAwareSSM' for s in storages)
    assert any('_SelectiveScanRef' in t for t in report.by_type)
    assert len({s.index for s in storages}) == len(storages)
    assert report.parameters['adamw_state_bytes'] == 2 * report.parameters['trainable_bytes'] > 0


def test_views_of_one_storage_count_once(tool):
    recorder = tool.SavedTensorRecorder(torch.nn.Identity())
    x = torch.randn(4, 8, requires_grad=True)
    with recorder.record():
        base = x * 2  # saves nothing (a product with a constant)
        loss = (base[:, :4] * base[:, 4:]).sum()  # saves two views of `base`
    recorder.name_ops(loss)
    assert len(recorder.storages) == 1
    saved = recorder.storages[0]
    assert (saved.nbytes, saved.saves, saved.op, saved.shape) == (4 * 8 * 4, 2, 'Mul', (4, 4))


def test_checkpointed_inputs_are_attributed_to_checkpoint(tool):
    model = _classifier(dict(type='VMamba', arch=dict(dims=[16, 32, 64, 128], depths=[1, 1, 1, 1]), with_cp=True,
                             ops_backend='auto'), 128)
    storages = tool.record_forward(model, BATCH, SIZE, 'none', 'cpu')
    assert any(s.op == 'checkpoint' and s.module_type == 'VSSBlock' for s in storages)
    assert not any(s.module_type == 'SS2D' for s in storages)  # inside the checkpointed blocks: not saved


def test_fake_cuda_kernel_path_saves_the_kernel_inputs(tool):
    model = _vmamba()
    with tool.kernel_path_on_fake_cuda():
        storages = tool.record_forward(model, BATCH, SIZE, 'bf16', 'fake-cuda')
    assert importlib.import_module('vssm.ops.selective_scan')._EXT is None  # restored afterwards
    scan = [s for s in storages if s.op == 'vssm_selective_scan_fwd']
    assert scan and all(s.custom_function for s in scan)
    # u and delta in bf16 (B, K*D, L), the float32 chunk states (B, K*D, n_chunks, N).
    assert {'bfloat16', 'float32'} <= {s.dtype for s in scan}
    # CUDA autocast rules: layer_norm runs (and saves) in float32.
    assert any(s.op == 'NativeLayerNorm' and s.dtype == 'float32' and not s.parameter for s in storages)


def test_kernel_schemas_are_read_from_the_sources(tool):
    for _, source in tool.KERNEL_OPS:
        schemas = tool._kernel_schemas(REPO_ROOT / source)
        assert any(schema.startswith('fwd(') for schema in schemas), schemas


def test_command_line_writes_json(tool, tmp_path, capsys):
    out = tmp_path / 'report.json'
    config = tmp_path / 'tiny-vmamba_in1k.py'
    config.write_text("model = dict(type='ImageClassifier', backbone=dict(type='VMamba', arch=dict(dims=[16, 32, 64, "
                      "128], depths=[1, 1, 1, 1])), neck=dict(type='GlobalAveragePooling'), head=dict(type="
                      "'LinearClsHead', num_classes=10, in_channels=128))\n")
    reports = tool.main(['--models', str(config), '--batch', '2', '--size', '32', '--scale-batch', '8', '--top', '3',
                         '--json', str(out)])
    text = capsys.readouterr().out
    assert 'by module type' in text and 'summary' in text
    assert out.is_file() and reports[0].saved_bytes > 0
    data = json.loads(out.read_text())
    assert data[0]['storages'] and sum(data[0]['by_type'].values()) == pytest.approx(data[0]['saved_bytes_scaled'])


def test_unknown_model_lists_the_valid_names(tool, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(['--models', 'vmamba-xl'])
    assert 'vmamba-t' in capsys.readouterr().err


def test_scaling_separates_constant_and_proportional_storages(tool):
    def storage(i, nbytes, module='m', op='Mm'):
        return tool.SavedStorage(index=i, nbytes=nbytes, dtype='bfloat16', shape=(), module=module, module_type='X',
                                 op=op)

    run = [storage(0, 100), storage(1, 64)]  # a weight copy, then an activation
    check = [storage(0, 100), storage(1, 128)]
    scaled, lin = tool.scale_storages(run, check, 2, 4, 128)
    assert scaled == [100, 64 * 64] and lin['matching'] == 'storage' and lin['linear']
    assert (lin['constant_bytes'], lin['proportional_bytes']) == (100, 64)
    # Different sequences (e.g. a reshape that is a view at one batch only): per (module, op, dtype) group.
    scaled, lin = tool.scale_storages(run, [storage(0, 100), storage(1, 64), storage(2, 64)], 2, 4, 128)
    assert lin['matching'] == 'group' and not lin['linear']
    assert sum(scaled) == pytest.approx(164 + (228 - 164) / 2 * 126)
