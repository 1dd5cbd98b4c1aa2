"""Two "nodes" of one CPU process each on this machine: two tools/dist_train.sh calls with NNODES=2, NODE_RANK 0 and
1, MASTER_ADDR=127.0.0.1 and the same PORT (gloo over loopback), through training and a resume. The work dir is
given relative to the directory the nodes are started from."""
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_runs import (
    REPO_ROOT,
    config,
    data_options,
    free_port,
    make_demo_data,
    schedule_options,
    tiny_options,
    tool_env,  # noqa: E402
)

pytestmark = pytest.mark.slow


def _two_nodes(cwd: Path, name: str, *args: str) -> list:
    """Start both nodes, wait for both; returns their outputs (node 0 first)."""
    port = str(free_port())
    nodes = [subprocess.Popen([str(REPO_ROOT / 'tools/dist_train.sh'), config('classification'), '1', *args],
                              cwd=cwd, env=tool_env(NNODES='2', NODE_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                                                    PORT=port),
                              stdout=open(cwd / f'{name}.node{rank}.log', 'w'), stderr=subprocess.STDOUT)
             for rank in (0, 1)]
    codes = [node.wait(timeout=600) for node in nodes]
    logs = [(cwd / f'{name}.node{rank}.log').read_text() for rank in (0, 1)]
    assert codes == [0, 0], f'node exit codes {codes}:\n{logs[0][-3000:]}\n---\n{logs[1][-3000:]}'
    return logs


def test_two_nodes_train_and_resume(tmp_path):
    data = make_demo_data(tmp_path / 'data')
    options = ['--demo', '--work-dir', 'wd', '--cfg-options', *tiny_options('classification'),
               *data_options('classification', data)]
    node0, _ = _two_nodes(tmp_path, 'train', *options, *schedule_options(2, validate=False))
    assert 'Distributed training: True' in node0 and 'GPU number: 2' in node0  # one world of two processes
    assert (tmp_path / 'wd' / 'iter_2.pth').is_file()

    node0, _ = _two_nodes(tmp_path, 'resume', '--resume', *options, *schedule_options(3, validate=False))
    assert f'Load checkpoint from {tmp_path / "wd" / "iter_2.pth"}' in node0  # mmengine logs on rank 0 only
    assert 'resumed epoch: 0, iter: 2' in node0 and 'Iter(train) [3/3]' in node0
    assert (tmp_path / 'wd' / 'iter_3.pth').is_file()
