"""Model-zoo metadata: every config is in exactly one metafile, model-index.yml imports them all, the files load.

The metafiles follow the OpenMMLab model-index format with paths relative to the repository root (as mmpretrain,
mmdet and mmseg write them; ``modelindex`` itself resolves README paths relative to the metafile, so its README
check is replaced here by one against the root). The configs in ``<task>/configs/baselines/`` (other libraries'
backbones, for comparisons) are not part of the model zoo.
"""
import os
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from models.families import BY_NAME

TASKS = ('classification', 'detection', 'segmentation')
CONFIGS = sorted(p.relative_to(REPO_ROOT).as_posix() for task in TASKS
                 for p in (REPO_ROOT / task / 'configs').glob('*/*.py') if p.parent.name not in ('_base_', 'baselines'))
METAFILES = sorted(p.relative_to(REPO_ROOT).as_posix() for task in TASKS
                   for p in (REPO_ROOT / task / 'configs').glob('*/metafile.yml'))


def _load(path: str) -> dict:
    with open(REPO_ROOT / path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope='module')
def metafiles():
    return {path: _load(path) for path in METAFILES}


def _models(metafiles):
    return [(path, model) for path, data in metafiles.items() for model in data.get('Models') or []]


def test_every_config_folder_has_a_metafile():
    folders = {os.path.dirname(p) for p in CONFIGS}
    assert {os.path.dirname(p) for p in METAFILES} == folders


def test_every_config_is_in_exactly_one_metafile_its_own_folders(metafiles):
    listed = Counter(model['Config'] for _, model in _models(metafiles))
    assert sorted(listed) == CONFIGS, 'configs missing from the metafiles or entries without a config file'
    assert [c for c, n in listed.items() if n > 1] == []
    for path, model in _models(metafiles):
        assert os.path.dirname(model['Config']) == os.path.dirname(path), f'{model["Name"]} is listed in {path}'
        assert (REPO_ROOT / model['Config']).is_file()


def test_names_are_unique_and_collections_exist(metafiles):
    names = [model['Name'] for _, model in _models(metafiles)]
    assert [n for n, k in Counter(names).items() if k > 1] == []
    collections = [c['Name'] for data in metafiles.values() for c in data.get('Collections') or []]
    assert [n for n, k in Counter(collections).items() if k > 1] == []
    for path, model in _models(metafiles):
        assert model['Name'] == Path(model['Config']).stem
        assert model['In Collection'] in collections, f'{path}: unknown collection {model["In Collection"]!r}'


def test_collections_are_complete(metafiles):
    for path, data in metafiles.items():
        for collection in data['Collections']:
            assert {'Name', 'Metadata', 'Paper', 'README', 'Code'} <= set(collection), path
            assert collection['Metadata']['Training Data'] and collection['Metadata']['Architecture']
            assert collection['Paper']['URL'].startswith('https://arxiv.org/abs/') and collection['Paper']['Title']
            assert (REPO_ROOT / collection['README']).is_file()
            assert (REPO_ROOT / collection['Code']['URL']).is_file()


def test_model_metadata(metafiles):
    for path, model in _models(metafiles):
        metadata = model['Metadata']
        assert isinstance(metadata['Parameters'], int) and metadata['Training Data'], model['Name']
        assert ('Epochs' in metadata) != ('Iterations' in metadata), model['Name']
        if model.get('Results'):  # no numbers without the weights that produced them
            assert model.get('Weights'), f'{model["Name"]} has Results but no Weights'


@pytest.mark.parametrize('family', ['SpatialMamba', 'VMamba'])
def test_classifier_numbers_match_the_measured_ones(metafiles, family):
    """Parameters and FLOPs of the 1000-class classifiers against tests/models/families.py (measured there)."""
    folder = {'SpatialMamba': 'spatial_mamba', 'VMamba': 'vmamba'}[family]
    models = metafiles[f'classification/configs/{folder}/metafile.yml']['Models']
    for size, (params, _) in BY_NAME[family].params.items():
        entry = next(m for m in models if m['Name'] == f'{folder.replace("_", "-")}-{size}_8xb128_in1k')
        assert entry['Metadata']['Parameters'] == params
        assert entry['Metadata']['FLOPs'] / 1e9 == pytest.approx(BY_NAME[family].gflops[size], abs=1e-3)


def test_model_index_imports_every_metafile_and_loads():
    index = _load('model-index.yml')
    assert sorted(index['Import']) == METAFILES
    from modelindex.load_model_index import load
    model_index = load(str(REPO_ROOT / 'model-index.yml'))
    assert len(model_index.models) == len(CONFIGS)
    errors = [e for e in model_index.check(silent=True) or [] if 'Path to README file' not in e]
    assert errors == []
