"""Trained checkpoints used as OpenMMLab users use them: the libraries' own Inferencers after ``import vssm`` alone,
demo/image_demo.py for each task, tools/test.py's --show-dir and --out in each library's format, and a --tta test
that leaves the training config of the work dir as it was.

The checkpoints come from tools/train.py (one iteration of a tiny Spatial-Mamba per task on the demo data), so they
hold what real ones hold (optimizer, message hub with HistoryBuffers, generator states, dataset meta)."""
import json
import pickle
import sys
from pathlib import Path
from typing import Dict

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_runs import REPO_ROOT, config, data_options, make_demo_data, run, schedule_options, tiny_options  # noqa: E402

pytestmark = pytest.mark.slow
TASKS = ('classification', 'detection', 'segmentation')
DEMO_IMAGE = REPO_ROOT / 'demo' / 'demo.jpg'


@pytest.fixture(scope='module')
def trained(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """task -> work dir of one training iteration (``iter_1.pth`` and the config the run dumped)."""
    root = tmp_path_factory.mktemp('inference')
    data = make_demo_data(root / 'data')
    work_dirs = {}
    for task in TASKS:
        work_dir = root / task
        run([sys.executable, 'tools/train.py', config(task), '--demo', '--work-dir', work_dir, '--cfg-options',
             *tiny_options(task), *data_options(task, data), *schedule_options(1, validate=False)],
            root / f'{task}.train.log')
        work_dirs[task] = work_dir
    work_dirs['data'] = data
    return work_dirs


def _work_dir_config(work_dir: Path) -> Path:
    return work_dir / Path(config(work_dir.name)).name


def test_import_vssm_alone_lets_the_three_inferencers_load_runner_checkpoints(trained, tmp_path):
    """The libraries' Inferencers load checkpoints with torch.load(weights_only=True): `import vssm` must allow the
    message hub's HistoryBuffer and numpy objects (the engine's tools are not imported by it)."""
    script = f'''
import json, sys
import vssm
assert 'vssm.engine' not in sys.modules
from mmdet.apis import DetInferencer
from mmpretrain.apis import ImageClassificationInferencer
from mmseg.apis import MMSegInferencer
image = {str(DEMO_IMAGE)!r}
cls = ImageClassificationInferencer({str(_work_dir_config(trained["classification"]))!r},
                                    pretrained={str(trained["classification"] / "iter_1.pth")!r}, device='cpu')
det = DetInferencer({str(_work_dir_config(trained["detection"]))!r},
                    weights={str(trained["detection"] / "iter_1.pth")!r}, device='cpu', show_progress=False)
seg = MMSegInferencer({str(_work_dir_config(trained["segmentation"]))!r},
                      weights={str(trained["segmentation"] / "iter_1.pth")!r}, device='cpu')
c = cls(image)[0]
d = det(image, no_save_vis=True, no_save_pred=True)['predictions'][0]
s = seg(image)['predictions']
print(json.dumps(dict(cls=c['pred_class'], det=len(d['labels']), seg=list(s.shape))))
'''
    result = run([sys.executable, '-c', script], tmp_path / 'inferencers.log')
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary['cls'] in ('circle', 'square', 'triangle', 'cross')  # the demo classes, from the checkpoint
    assert summary['seg'] == [256, 320]  # the label map of the whole demo image
    assert 'pkg_resources is deprecated' not in result.stderr


@pytest.mark.parametrize('task', TASKS)
def test_image_demo_writes_a_png_and_prints_the_predictions(trained, tmp_path, task):
    out_file = tmp_path / 'vis.png'
    result = run([sys.executable, 'demo/image_demo.py', DEMO_IMAGE, _work_dir_config(trained[task]),
                  trained[task] / 'iter_1.pth', '--out-file', out_file, '--device', 'cpu'], tmp_path / 'demo.log')
    summary = json.loads([line for line in result.stdout.splitlines() if line.startswith('{')][-1])
    assert summary['task'] == task
    assert {'classification': 'pred_class', 'detection': 'detections', 'segmentation': 'pixels'}[task] in summary
    import cv2
    image = cv2.imread(str(out_file))
    assert image is not None and image.shape[:2] == (256, 320)


def test_image_demo_with_a_checkpoint_of_another_task_names_the_config_to_use(trained, tmp_path):
    result = run([sys.executable, 'demo/image_demo.py', DEMO_IMAGE, _work_dir_config(trained['segmentation']),
                  trained['detection'] / 'iter_1.pth'], tmp_path / 'demo.log', check=False)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'holds a detection model' in result.stderr and 'mask-rcnn_spatial-mamba-t_fpn_1x_coco.py' in result.stderr


def _test(trained, task: str, tmp_path: Path, *extra: str):
    return run([sys.executable, 'tools/test.py', config(task), trained[task] / 'iter_1.pth', '--demo', '--work-dir',
                trained[task], *extra, '--cfg-options', *tiny_options(task), *data_options(task, trained['data'])],
               tmp_path / 'test.log')


def test_detection_out_holds_rle_masks_and_show_dir_draws_each_image(trained, tmp_path):
    _test(trained, 'detection', tmp_path, '--out', tmp_path / 'preds.pkl', '--show-dir', tmp_path / 'vis')
    predictions = pickle.loads((tmp_path / 'preds.pkl').read_bytes())
    assert len(predictions) == 2
    masks = [m for p in predictions for m in p['pred_instances']['masks']]
    assert masks and all(isinstance(m, dict) and {'size', 'counts'} <= set(m) for m in masks)  # RLE, as mmdet's
    assert len(list((tmp_path / 'vis').glob('*.jpg'))) == 2


def test_segmentation_tta_out_writes_label_pngs_and_keeps_the_training_config(trained, tmp_path):
    work_dir = trained['segmentation']
    dumped = _work_dir_config(work_dir)
    before = dumped.read_text()
    _test(trained, 'segmentation', tmp_path, '--tta', '--out', tmp_path / 'labels', '--show-dir', tmp_path / 'vis')
    assert dumped.read_text() == before  # the TTA test config went to the run's own folder
    assert list(work_dir.glob('*/' + dumped.name))
    import cv2
    labels = sorted((tmp_path / 'labels').glob('*.png'))
    assert [p.name for p in labels] == ['ADE_val_00000001.png', 'ADE_val_00000002.png']
    assert cv2.imread(str(labels[0]), cv2.IMREAD_UNCHANGED).ndim == 2  # one label per pixel, as mmseg writes them
    assert len(list((tmp_path / 'vis').rglob('*.png'))) == 2


def test_classification_out_and_show_dir(trained, tmp_path):
    _test(trained, 'classification', tmp_path, '--out', tmp_path / 'preds.pkl', '--show-dir', tmp_path / 'vis')
    predictions = pickle.loads((tmp_path / 'preds.pkl').read_bytes())
    assert len(predictions) == 2 and 'pred_score' in predictions[0]
    assert len(list((tmp_path / 'vis').glob('*.png'))) == 2


def test_published_checkpoint_runs_in_the_inferencer(trained, tmp_path):
    result = run([sys.executable, 'tools/model_converters/publish_model.py', trained['segmentation'] / 'iter_1.pth',
                  tmp_path / 'seg.pth'], tmp_path / 'publish.log')
    published = result.stdout.split()[1]
    run([sys.executable, 'demo/image_demo.py', DEMO_IMAGE, _work_dir_config(trained['segmentation']), published,
         '--out-file', tmp_path / 'vis.png'], tmp_path / 'demo.log')
    assert (tmp_path / 'vis.png').is_file()
