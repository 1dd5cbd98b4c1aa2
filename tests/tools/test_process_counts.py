"""On CPUs (gloo), through the launchers, tiny Spatial-Mamba models on the demo data: a test-time-augmented test of
one checkpoint gives the same metric on 1 and 2 processes, and the config's ``compile`` option trains on 2 processes
(StrictRunner compiles the backbone in place, see vssm/engine/runner.py)."""
import json

import pytest
from tiny_runs import config, data_options, make_demo_data, run, schedule_options, tiny_options

pytestmark = pytest.mark.slow


def _train(task: str, tmp_path, data, processes: int, *extra: str):
    work = tmp_path / f'train-{processes}'
    run(['tools/dist_train.sh', config(task), str(processes), '--demo', '--work-dir', work, '--cfg-options',
         *tiny_options(task), *data_options(task, data, eval_images=4), *schedule_options(2, validate=False), *extra],
        tmp_path / f'train-{processes}.log')
    return work / 'iter_2.pth'


def test_tta_metric_is_the_same_on_one_and_two_processes(tmp_path):
    data = make_demo_data(tmp_path / 'data')
    checkpoint = _train('segmentation', tmp_path, data, 1)
    metrics = []
    for processes in (1, 2):
        work = tmp_path / f'test-{processes}'
        run(['tools/dist_test.sh', config('segmentation'), checkpoint, str(processes), '--demo', '--tta', '--work-dir',
             work, '--cfg-options', *tiny_options('segmentation'), *data_options('segmentation', data, eval_images=4)],
            tmp_path / f'test-{processes}.log')
        metrics.append(json.loads((work / 'metrics.json').read_text()))
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-6) and 'mIoU' in metrics[0]


def test_training_with_the_compile_option_on_two_processes(tmp_path):
    """``--cfg-options compile.backend=aot_eager`` (``compile=True`` takes inductor, minutes of C++ builds on a CPU)."""
    data = make_demo_data(tmp_path / 'data')
    checkpoint = _train('classification', tmp_path, data, 2, 'compile.backend=aot_eager')
    assert checkpoint.is_file()
    log = (tmp_path / 'train-2.log').read_text()
    assert "SpatialMamba compiled with torch.compile({'backend': 'aot_eager'})" in log
    dumped = list(checkpoint.parent.glob('*.py'))  # the config the run used, as mmengine dumps it
    assert dumped and "backend='aot_eager'" in dumped[0].read_text()
