"""tools/model_converters/publish_model.py: weights and meta only, the EMA weights of an EMA run, a content-hashed
name, loadable with weights_only=True without any allowed class."""
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.logging import MessageHub

sys.path.insert(0, str(Path(__file__).parent))
from tiny_runs import REPO_ROOT, tool_env  # noqa: E402

from vssm.fileio import InvalidOptionError  # noqa: E402

RAW = {'backbone.w': torch.ones(3), 'head.b': torch.zeros(2)}
AVERAGED = {'backbone.w': torch.full((3, ), 0.5), 'head.b': torch.full((2, ), 0.25)}
META = {'experiment_name': 'x_20260101_000000', 'dataset_meta': {'classes': ('circle', 'square')}, 'cfg': 'a = 1'}


@pytest.fixture(scope='module')
def tool():
    from conftest import load_tool
    return load_tool('tools/model_converters/publish_model.py')


def _training_checkpoint(path: Path, ema: bool) -> Path:
    """What tools/train.py writes: mmengine's EMAHook swaps the averaged weights into state_dict and keeps the raw
    ones as ema_state_dict['module.<key>']."""
    hub = MessageHub.get_instance('publish-test')
    hub.update_scalar('train/loss', 0.5)
    checkpoint = {'meta': META, 'state_dict': dict(AVERAGED if ema else RAW), 'message_hub': hub.state_dict(),
                  'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1}]}, 'param_schedulers': [],
                  'rng_states': [{'torch': torch.get_rng_state()}]}
    if ema:
        checkpoint['ema_state_dict'] = {'steps': torch.tensor(3), **{f'module.{k}': v for k, v in RAW.items()}}
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize('ema, no_ema, expected', [(False, False, RAW), (True, False, AVERAGED), (True, True, RAW)],
                         ids=['plain', 'ema', 'ema-no-ema'])
def test_publish_keeps_weights_and_meta_and_names_the_file_by_its_hash(tool, tmp_path, ema, no_ema, expected):
    source = _training_checkpoint(tmp_path / 'iter_8.pth', ema)
    final, which = tool.publish(str(source), str(tmp_path / 'out' / 'model.pth'), no_ema=no_ema, date='20260102')
    match = re.fullmatch(r'model_20260102-([0-9a-f]{8})\.pth', Path(final).name)
    assert match and match.group(1) == hashlib.sha256(Path(final).read_bytes()).hexdigest()[:8]
    published = torch.load(final, weights_only=True)
    assert set(published) == {'state_dict', 'meta'} and published['meta'] == META
    assert {k: v.tolist() for k, v in published['state_dict'].items()} == {k: v.tolist() for k, v in expected.items()}
    assert which.startswith('the EMA weights') == (ema and not no_ema)


def test_published_file_loads_without_vssm(tool, tmp_path):
    """Released checkpoints hold plain tensors and builtins: torch.load(weights_only=True) needs no allowed class."""
    final, _ = tool.publish(str(_training_checkpoint(tmp_path / 'ckpt.pth', ema=True)), str(tmp_path / 'm.pth'))
    script = f'import torch; print(sorted(torch.load({final!r}, weights_only=True)))'
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "['meta', 'state_dict']", result.stderr


def test_no_ema_without_ema_weights_and_checkpoints_without_weights_are_errors(tool, tmp_path):
    with pytest.raises(InvalidOptionError, match='no ema_state_dict'):
        tool.publishable({'state_dict': RAW}, no_ema=True)
    with pytest.raises(ValueError, match='no state_dict'):
        tool.publishable({'meta': META})


def test_command_line_prints_the_published_name(tmp_path):
    source = _training_checkpoint(tmp_path / 'iter_8.pth', ema=False)
    result = subprocess.run([sys.executable, 'tools/model_converters/publish_model.py', str(source), 'model.pth'],
                            cwd=REPO_ROOT, env=tool_env(VSSM_CALLER_DIR=str(tmp_path)), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    published = list(tmp_path.glob('model_*-*.pth'))  # relative OUT: from the caller's directory
    assert len(published) == 1 and f'published {published[0]}' in result.stdout
