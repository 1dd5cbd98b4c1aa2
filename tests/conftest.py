"""Shared pytest helpers: devices, kernel availability, tolerances, fixtures' folder on sys.path, fuzzing options,
and the demo data (generated once per session into a temporary folder; tests never write into the repository)."""
import functools
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator, List, Optional

import pytest
import torch

# Shared test helpers are plain modules: tests/ (fixture_utils, launches) and tests/tools/ (tiny_runs). There is one
# conftest on purpose: pytest imports every conftest as the module `conftest`, so a second one would shadow this one
# for `from conftest import ...`.
sys.path.insert(0, str(Path(__file__).parent / 'tools'))
sys.path.insert(0, str(Path(__file__).parent))

REPO_ROOT = Path(__file__).resolve().parents[1]

from launches import BackgroundLaunches  # noqa: E402  (tests/ is on sys.path from here on)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup('vssm', 'vssm kernel fuzzing (tests/ops/test_fuzz_kernels_cuda.py)')
    group.addoption('--fuzz-cases', type=int, default=int(os.environ.get('VSSM_FUZZ_CASES', 20)),
                    help='random cases per op for the kernel fuzzing tests (default: $VSSM_FUZZ_CASES or 20)')
    group.addoption('--fuzz-seed', type=int, default=int(os.environ.get('VSSM_FUZZ_SEED', 0)),
                    help='seed of the fuzzing cases (default: $VSSM_FUZZ_SEED or 0)')


def load_tool(relative: str) -> ModuleType:
    """A script of the repository (tools/ is no package) imported by path, e.g. ``load_tool('tools/train.py')``."""
    path = REPO_ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# (rtol, atol) per dtype for kernel-vs-reference comparisons; gradients use GRAD_TOLERANCES.
TOLERANCES = {
    torch.float32: (6e-4, 2e-3),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (3e-2, 5e-2),
    torch.float64: (1e-10, 1e-12),
}
GRAD_TOLERANCES = {
    torch.float32: (1e-3, 5e-3),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (5e-2, 1e-1),
    torch.float64: (1e-9, 1e-11),
}

DEVICES = [
    'cpu',
    pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')),
]


def has_kernel(name: str) -> bool:
    """Whether the compiled vssm_<name> extension is installed."""
    from vssm.ops._backend import try_import_extension
    return try_import_extension(f'vssm_{name}') is not None


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope='session')
def _one_intra_op_thread():
    """One intra-op thread for the tests run in this process. Their tensors are small: a second thread gains little,
    and on 2 cores shared with other processes (the end-to-end runs in the background, other jobs) the threads wait
    for each other. On 2 shared cores the backbone tests took 40% less CPU time with one thread, and a benchmark
    tool's test 0.8 s instead of 12 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope='session')
def _exact_cuda_references():
    """The PyTorch references on a GPU must not use TF32 (cuDNN convolutions default to it)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True, scope='session')
def _metafiles_read_once() -> Iterator[None]:
    """mmengine's ``Config.fromfile`` resolves each ``mmpretrain::``, ``mmdet::`` or ``mmseg::`` base config by
    reading every metafile of the installed package (``mmengine.config.utils._get_cfg_metainfo``: tens of YAML files,
    0.16 s per base); the configs of the tests in this process name about 150 such bases. The installed files do not
    change during the session, so each is read once; the configs are resolved by mmengine's own code as before."""
    import mmengine.config.utils as config_utils
    read = functools.lru_cache(maxsize=None)(config_utils.load)  # its one caller there only reads the result
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config_utils, 'load', lambda file, *args, **kwargs: read(file, *args, **kwargs))
        yield


# Where tools/make_demo_data.py puts each task's data under its --out root (the demo overrides'
# <task>/configs/_base_/demo.py read it from data/demo).
DEMO_SUBDIRS = {'classification': 'imagenet', 'detection': 'coco', 'segmentation': 'ade/ADEChallengeData2016'}


@pytest.fixture(scope='session')
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The root of the demo data (tools/make_demo_data.py), generated once per session in a temporary folder."""
    root = tmp_path_factory.mktemp('demo_data')
    load_tool('tools/make_demo_data.py').make_demo_data(str(root))
    return root


def demo_data_options(task: str, root: Path) -> List[str]:
    """``--cfg-options`` items that point a ``--demo`` run of ``task`` at the demo data under ``root``: every
    dataloader's data root and, for detection, the COCO evaluators' annotation file."""
    data_root = Path(root) / DEMO_SUBDIRS[task]
    options = [f'{split}_dataloader.dataset.data_root={data_root}' for split in ('train', 'val', 'test')]
    if task == 'detection':
        annotations = data_root / 'annotations' / 'instances_val2017.json'
        options += [f'{split}_evaluator.ann_file={annotations}' for split in ('val', 'test')]
    return options


@pytest.fixture(scope='session', autouse=True)
def background_launches(request: pytest.FixtureRequest,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Optional[BackgroundLaunches]]:
    """The pipelines of the selected tests marked ``@pytest.mark.launches(pipeline=...)``, started in a background
    thread when the session starts (tests/launches.py):
    ``pipeline(launches, run_dir, demo_root, **test_parameters)``, with a temporary folder of its own. ``demo_root``
    is the session's demo data, or None for the pipelines marked ``launches(pipeline=..., demo_data=False)`` (the
    data is made only when a selected pipeline reads it). None when no such test was selected."""
    items = [item for item in request.session.items if item.get_closest_marker('launches')]
    if not items:
        yield None
        return
    launches = BackgroundLaunches(REPO_ROOT)
    for item in items:
        marker = item.get_closest_marker('launches')
        demo_root = request.getfixturevalue('demo_data') if marker.kwargs.get('demo_data', True) else None
        run_dir = tmp_path_factory.mktemp(re.sub(r'\W+', '-', item.name)[:60])
        params = item.callspec.params if hasattr(item, 'callspec') else {}
        launches.submit(item.nodeid, marker.kwargs['pipeline'], run_dir, demo_root, **params)
    yield launches
    launches.close()
