"""tools/analysis_tools/block_profile.py on a CPU with tiny settings: the rows, the minimal bytes, the Markdown, the
error rows and the ncu CSV summary (the numbers of a GPU run mean nothing here; the plumbing does)."""
import json
from types import ModuleType

import pytest
import torch
from conftest import load_tool
from torch import nn

TINY = ['--batch', '1', '--size', '64', '--warmup', '0', '--iters', '1', '--device', 'cpu']
T_MODELS = ('vmamba-t', 'spatial-mamba-t', 'spectral-vmamba-t')
PARTS = ('fwd-fp32', 'fwd-bf16', 'train-bf16')


@pytest.fixture(scope='module', autouse=True)
def _keep_tf32_settings():
    """The tool's main() sets the TF32 switches (on by default); the tests after these keep theirs."""
    settings = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = settings


@pytest.fixture(scope='module')
def block_profile() -> ModuleType:
    return load_tool('tools/analysis_tools/block_profile.py')


QUICK_MODELS = T_MODELS[:1]  # Spatial-Mamba-T and Spectral VMamba-T: test_other_blocks, slow


@pytest.fixture(scope='module')
def full_run(block_profile, tmp_path_factory):
    """Every part of VMamba-T's block at batch 1, 64x64."""
    folder = tmp_path_factory.mktemp('block_profile')
    rows = block_profile.main(TINY + ['--models', *QUICK_MODELS, '--json', str(folder / 'rows.json'), '--markdown',
                                      str(folder / 'rows.md')])
    return rows, json.loads((folder / 'rows.json').read_text()), (folder / 'rows.md').read_text()


def _tiny_vmamba(backend: str = 'torch') -> nn.Module:
    from vssm.models import VMamba
    return VMamba(dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], ssm_ratio=1.0), ops_backend=backend)


def test_help_states_the_protocol_and_the_ncu_commands(block_profile, capsys):
    with pytest.raises(SystemExit):
        block_profile.parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    for phrase in ('ncu --profile-from-start off', 'dram__bytes_read.sum,dram__bytes_write.sum', '--page raw',
                   '--ncu-part vmamba-t:train-bf16', '--summarize vmamba-t:train-bf16=vmamba-train.csv',
                   'torch.cuda.profiler.start()', 'storage dtype (fp32) also under autocast', 'ScanIndex'):
        assert phrase in text, phrase


@pytest.mark.parametrize('argv, message', [
    (['--ncu-part', 'vmamba-t:train'], 'fwd-fp32, fwd-bf16, train-bf16'),
    (['--ncu-part', 'swin-t:fwd-fp32'], 'spectral-vmamba-t'),
    (['--summarize', 'vmamba-t:fwd-fp32'], 'MODEL:PART=CSV'),
    (['--models', 'vmamba-xl'], 'spatial-mamba-t'),
])
def test_bad_options_say_what_is_valid(block_profile, capsys, argv, message):
    with pytest.raises(SystemExit):
        block_profile.parse_args(argv)
    assert message in capsys.readouterr().err


def test_every_part_of_every_t_model_has_a_row(full_run):
    rows, data, _ = full_run
    assert [(r['model'], r['part']) for r in rows] == [(m, p) for m in QUICK_MODELS for p in PARTS]
    assert data['meta']['count'] == 'ops' and len(data['rows']) == 3
    for row in rows:
        assert row['status'] == 'ok', row
        assert row['ops'] > 0 and row['kernels'] is None and row['ms'] > 0, row
        assert row['minimal_bytes'] == sum(row['bytes'].values()) > 0
    by_key = {(r['model'], r['part']): r for r in rows}
    for model in QUICK_MODELS:
        train, forward = by_key[model, 'train-bf16'], by_key[model, 'fwd-bf16']
        assert train['minimal_bytes'] > forward['minimal_bytes']
        assert train['ops'] > forward['ops']  # the backward's nodes come on top
    assert by_key['vmamba-t', 'fwd-fp32']['block'] == 'VSSBlock'
    assert by_key['vmamba-t', 'fwd-fp32']['input_layout'] == 'channels_last'  # the recorded map's memory


@pytest.mark.slow
def test_other_blocks(block_profile):
    """Spatial-Mamba-T's block gets its channels-last (B, H, W, C) map; Spectral VMamba-T's the RFN features at
    stride 16 with the ScanIndex of its own ordering, and its frozen RFN gives the block no input gradient."""
    rows = block_profile.main(TINY + ['--models', 'spatial-mamba-t', 'spectral-vmamba-t'])
    assert [(r['model'], r['part'], r['status']) for r in rows] == [
        (m, p, 'ok') for m in ('spatial-mamba-t', 'spectral-vmamba-t') for p in PARTS]
    by_key = {(r['model'], r['part']): r for r in rows}
    spatial = by_key['spatial-mamba-t', 'fwd-fp32']
    assert spatial['block'] == 'SpatialMambaBlock' and spatial['input_shape'] == [1, 16, 16, 64]
    by_part = {p: by_key['spectral-vmamba-t', p] for p in PARTS}
    spectral = by_part['train-bf16']
    assert spectral['block'] == 'SpectralBlock' and spectral['minimal_bytes'] > by_part['fwd-bf16']['minimal_bytes']
    assert spectral['input_shape'] == [1, 256, 4, 4] and spectral['other_inputs'].startswith('ScanIndex(')
    assert spectral['bytes']['index'] > 0 and spectral['bytes']['grad_input'] == 0


def test_stage_picks_the_first_block_of_that_stage(block_profile, tmp_path):
    """--stage 3: VMamba-T's first stage-3 block, with the map it receives there (stride 16, 384 channels); the
    stage goes into the rows, the JSON and the Markdown; a stage the backbone lacks is one clear error."""
    rows = block_profile.main(TINY + ['--models', 'vmamba-t', '--parts', 'fwd-fp32', '--stage', '3', '--markdown',
                                      str(tmp_path / 'rows.md')])
    assert [(r['block'], r['stage'], r['status']) for r in rows] == [('VSSBlock', 3, 'ok')]
    assert rows[0]['input_shape'] == [1, 384, 4, 4]
    assert 'One stage-3 block per model' in (tmp_path / 'rows.md').read_text()
    with pytest.raises(ValueError, match='--stage 5: VMamba has stages 1 to 4'):
        block_profile.stage_block(_tiny_vmamba(), 5)


def test_markdown_table(full_run):
    text = full_run[2]
    assert 'batch 1 at 64x64' in text and 'top-level CPU operators' in text
    assert '| model | block | part | block input | ops | ms | minimal (MB) | minimal / time (GB/s) | note |' in text
    lines = [line for line in text.splitlines() if line.startswith('| VMamba-T | VSSBlock |')]
    assert [line.split(' | ')[2] for line in lines] == list(PARTS)


def _record_first_block_input(backbone: nn.Module, images: torch.Tensor, train: bool) -> torch.Tensor:
    """The first block's input in a backbone forward, recorded here with a plain forward hook (not the tool's)."""
    seen = []
    handle = backbone.layers[0].blocks[0].register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    backbone.train(train)
    with torch.set_grad_enabled(train), torch.autocast('cpu', dtype=torch.bfloat16, enabled=train):
        backbone(images)
    handle.remove()
    return seen[0]


def test_minimal_bytes_match_the_recorded_tensors(full_run):
    """VMamba-T: the minimal bytes of each part from the block's real input and output tensors, counted here."""
    from vssm.analysis.models import MODEL_SPECS, build_backbone, prepare_config
    rows = {r['part']: r for r in full_run[0] if r['model'] == 'vmamba-t'}
    torch.manual_seed(0)
    backbone = build_backbone(prepare_config(MODEL_SPECS['vmamba-t'].classifier), ops_backend='auto')
    params = list(backbone.layers[0].blocks[0].parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    images = torch.randn(1, 3, 64, 64)

    x, out = _record_first_block_input(backbone, images, train=False)
    assert x.dtype == out.dtype == torch.float32 and x.shape == (1, 96, 16, 16)
    assert rows['fwd-fp32']['minimal_bytes'] == 2 * x.numel() * 4 + weights

    x, out = _record_first_block_input(backbone, images, train=True)
    assert x.requires_grad and all(p.requires_grad for p in params)
    x_bytes, out_bytes = x.numel() * x.element_size(), out.numel() * out.element_size()
    # forward (x read, out written, weights read) + out's gradient read + x's gradient written + weight gradients
    assert rows['train-bf16']['minimal_bytes'] == (x_bytes + out_bytes + weights) + out_bytes + x_bytes + weights
    assert rows['train-bf16']['input_dtype'] == str(x.dtype).replace('torch.', '')


def test_a_failing_model_is_recorded_and_the_run_goes_on(block_profile, monkeypatch, tmp_path):
    def build(spec, backend):
        if spec.name == 'vmamba-t':
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 1 TiB')
        return _tiny_vmamba(backend)

    monkeypatch.setattr(block_profile, 'build_trunk', build)
    rows = block_profile.main(['--models', 'vmamba-t', 'spatial-mamba-t', '--parts', 'fwd-fp32', 'train-bf16',
                               '--markdown', str(tmp_path / 'rows.md')] + TINY)
    by_key = {(r['model'], r['part']): r for r in rows}
    assert [by_key['vmamba-t', p]['status'] for p in ('fwd-fp32', 'train-bf16')] == ['error', 'error']
    assert by_key['vmamba-t', 'fwd-fp32']['note'] == 'out of memory'
    assert by_key['vmamba-t', 'fwd-fp32']['minimal_bytes'] is None
    assert all(by_key['spatial-mamba-t', p]['status'] == 'ok' and by_key['spatial-mamba-t', p]['ops'] > 0
               for p in ('fwd-fp32', 'train-bf16'))
    assert 'error: out of memory' in (tmp_path / 'rows.md').read_text()


def test_ncu_part_runs_one_call_and_keeps_stdout_for_ncu(block_profile, monkeypatch, capsys):
    monkeypatch.setattr(block_profile, 'build_trunk', lambda spec, backend: _tiny_vmamba(backend))
    rows = block_profile.main(['--ncu-part', 'vmamba-t:train-bf16'] + TINY)
    assert [(r['model'], r['part'], r['status']) for r in rows] == [('vmamba-t', 'train-bf16', 'ok')]
    assert rows[0]['minimal_bytes'] > 0 and rows[0]['ms'] is None and 'profiler.start()' in rows[0]['note']
    out, err = capsys.readouterr()
    assert 'train-bf16' in err and 'train-bf16' not in out  # ncu writes its CSV to stdout


def test_count_launches_counts_top_level_operators_on_a_cpu(block_profile):
    layer, x = nn.Linear(8, 8), torch.randn(4, 8)
    assert block_profile.count_launches(lambda: layer(x).relu(), torch.device('cpu')) == 2  # linear, relu


NCU_HEADER = ['ID', 'Process ID', 'Process Name', 'Host Name', 'Kernel Name', 'Context', 'Stream', 'Device', 'CC',
              'dram__bytes_read.sum', 'dram__bytes_write.sum']
NCU_KERNELS = [  # (name, bytes read in bytes, bytes written in Kbyte), as ncu writes them
    ('void at::native::(anonymous namespace)::elementwise_kernel<128, 4>(int, T1)', '1,500,000', '500'),
    ('void selective_scan_fwd_kernel<Ktraits<4>>(Params)', '12,000,000', '8,000.5'),
    ('ampere_sgemm_128x64_nn', '250,000', '0'),
    ('void layer_norm_kernel<float>(const float *)', '3,000,000', '1,000'),
]


def _ncu_csv(units=('byte', 'Kbyte'), kernels=NCU_KERNELS) -> str:
    """An ``ncu --csv --page raw`` report after the program's own output and ncu's ``==PROF==`` lines."""
    def line(cells):
        return ','.join(f'"{cell}"' for cell in cells)

    lines = ['==PROF== Connected to process 4242 (/usr/bin/python3.12)', 'a log line with a stray " quote',
             '==PROF== Profiling "elementwise_kernel" - 0: 0%....50%....100% - 1 pass', line(NCU_HEADER),
             line([''] * 9 + list(units))]
    lines += [line([str(i), '4242', 'python3.12', '127.0.0.1', name, '1', '7', '0', '9.0', read, write])
              for i, (name, read, write) in enumerate(kernels)]
    return '\n'.join(lines) + '\n'


def test_summarize_totals_ratio_and_largest_kernels(block_profile, full_run, tmp_path, capsys):
    """A synthetic ncu raw CSV (program output before it, a units row, thousands separators) against the minimal
    bytes the tool recomputes for the part (the same settings as the full run: the same number)."""
    path = tmp_path / 'vmamba-fwd.csv'
    path.write_text(_ncu_csv())
    torch.manual_seed(0)
    rows = block_profile.main(['--summarize', f'vmamba-t:fwd-fp32={path}', '--markdown',
                               str(tmp_path / 'dram.md')] + TINY)
    (row, ) = rows
    read, write = 1_500_000 + 12_000_000 + 250_000 + 3_000_000, (500 + 8_000.5 + 0 + 1_000) * 1000
    assert row['kernels'] == 4
    assert row['dram_read_bytes'] == pytest.approx(read) and row['dram_write_bytes'] == pytest.approx(write)
    minimal = next(r['minimal_bytes'] for r in full_run[0] if (r['model'], r['part']) == ('vmamba-t', 'fwd-fp32'))
    assert row['minimal_bytes'] == minimal
    assert row['ratio'] == pytest.approx((read + write) / minimal)
    assert [k['bytes'] for k in row['top_kernels']] == pytest.approx([20_000_500, 4_000_000, 2_000_000])
    text = (tmp_path / 'dram.md').read_text()
    assert text in capsys.readouterr().out  # printed too
    line = next(line for line in text.splitlines() if line.startswith('| vmamba-t:fwd-fp32 |'))
    cells = [c.strip() for c in line.strip('|').split('|')]
    assert cells[1:5] == ['4', f'{(read + write) / 1e6:.2f}', f'{minimal / 1e6:.2f}',
                          f'{(read + write) / minimal:.2f}x']
    assert cells[5].startswith('selective_scan_fwd_kernel 20.0, layer_norm_kernel 4.0, at::native::elementwise_kernel')


def test_read_ncu_csv_says_what_is_wrong(block_profile, tmp_path):
    path = tmp_path / 'empty.csv'
    path.write_text('==PROF== No kernels were profiled.\n')
    with pytest.raises(ValueError, match='--csv --page raw'):
        block_profile.read_ncu_csv(str(path))
    path.write_text(_ncu_csv(units=('byte', 'furlong')))
    with pytest.raises(ValueError, match="unknown unit 'furlong'"):
        block_profile.read_ncu_csv(str(path))
    path.write_text(_ncu_csv(kernels=NCU_KERNELS[:2] + [('ampere_sgemm_128x64_nn', 'n/a', '0')]))
    with pytest.raises(ValueError, match='ampere_sgemm'):
        block_profile.read_ncu_csv(str(path))


def test_top_lists_each_parts_kernels_with_their_call_sites(block_profile, tmp_path, capsys):
    """--top N: each part's N heaviest kernels (on a CPU: operators) after its row, in the JSON rows and as a second
    Markdown table, with their call sites in the repository; without --top no such lines."""
    rows = block_profile.main(TINY + ['--models', 'vmamba-t', '--parts', 'fwd-fp32', '--top', '4', '--markdown',
                                      str(tmp_path / 'rows.md')])
    (row, ) = rows
    assert 1 <= len(row['top']) <= 4 and all(op['ms'] >= 0 and 0 <= op['share'] <= 1 for op in row['top'])
    assert row['top'] == sorted(row['top'], key=lambda op: op['ms'], reverse=True)
    assert any(op['where'].startswith(('vssm/', 'tools/')) for op in row['top']), row['top']
    printed = capsys.readouterr().out
    top = row['top'][0]
    assert block_profile.format_top_op(top, block_profile.short_kernel_name(top['name'])) in printed
    text = (tmp_path / 'rows.md').read_text()
    assert '| model | part | kernel | ms | share | launches | called from |' in text
    assert sum(line.startswith('| VMamba-T | fwd-fp32 | `') for line in text.splitlines()) == len(row['top'])
    assert 'Top kernels' not in block_profile.markdown(block_profile.BlockProfiler(
        block_profile.parse_args(TINY), torch.device('cpu'), None).meta, [dict(row, top=[])])
