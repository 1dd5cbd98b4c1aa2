"""tools/model_converters/publish_model.py: weights and meta only, the EMA weights of an EMA run, a content-hashed
name, loadable with weights_only=True without any allowed class."""
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
import torch
from conftest import load_tool
from launches import BackgroundLaunches
from mmengine.logging import MessageHub
from tiny_runs import tool_env

from vssm.fileio import InvalidOptionError

RAW = {'backbone.w': torch.ones(3), 'head.b': torch.zeros(2)}
AVERAGED = {'backbone.w': torch.full((3, ), 0.5), 'head.b': torch.full((2, ), 0.25)}
META = {'experiment_name': 'x_20260101_000000', 'dataset_meta': {'classes': ('circle', 'square')}, 'cfg': 'a = 1'}


@pytest.fixture(scope='module')
def tool():
    return load_tool('tools/model_converters/publish_model.py')


def _training_checkpoint(path: Path, ema: bool) -> Path:
    """What tools/train.py writes: mmengine's EMAHook swaps the averaged weights into state_dict and keeps the raw
    ones as ema_state_dict['module.<key>']."""
    hub = MessageHub.get_instance(f'publish-test:{path}')  # one per file: pipelines write theirs in the background
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


def _load_published_file_in_plain_torch(launches: BackgroundLaunches, run_dir: Path,
                                        demo_root: None) -> subprocess.CompletedProcess:
    final, _ = load_tool('tools/model_converters/publish_model.py').publish(
        str(_training_checkpoint(run_dir / 'ckpt.pth', ema=True)), str(run_dir / 'm.pth'))
    script = f'import torch; print(sorted(torch.load({final!r}, weights_only=True)))'
    return launches.call([sys.executable, '-c', script], cwd=run_dir, env=dict(os.environ))


@pytest.mark.launches(pipeline=_load_published_file_in_plain_torch, demo_data=False)
def test_published_file_loads_without_vssm(background_launches, request):
    """Released checkpoints hold plain tensors and builtins: torch.load(weights_only=True) needs no allowed class."""
    result = background_launches.result(request.node.nodeid)
    assert result.returncode == 0 and result.stdout.strip() == "['meta', 'state_dict']", result.stderr


def test_no_ema_without_ema_weights_and_checkpoints_without_weights_are_errors(tool, tmp_path):
    with pytest.raises(InvalidOptionError, match='no ema_state_dict'):
        tool.publishable({'state_dict': RAW}, no_ema=True)
    with pytest.raises(ValueError, match='no state_dict'):
        tool.publishable({'meta': META})


def _publish_from_the_command_line(launches: BackgroundLaunches, run_dir: Path,
                                  demo_root: None) -> Tuple[Path, subprocess.CompletedProcess]:
    """The tool run from the repository for a caller in ``run_dir``; returns that folder and the run."""
    source = _training_checkpoint(run_dir / 'iter_8.pth', ema=False)
    return run_dir, launches.call([sys.executable, 'tools/model_converters/publish_model.py', str(source),
                                   'model.pth'], env=tool_env(VSSM_CALLER_DIR=str(run_dir)), timeout=120)


@pytest.mark.launches(pipeline=_publish_from_the_command_line, demo_data=False)
def test_command_line_prints_the_published_name(background_launches, request):
    caller_dir, result = background_launches.result(request.node.nodeid)
    assert result.returncode == 0, result.stderr
    published = list(caller_dir.glob('model_*-*.pth'))  # relative OUT: from the caller's directory
    assert len(published) == 1 and f'published {published[0]}' in result.stdout
