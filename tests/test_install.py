"""Installing vssm: the build backend's check (_build_backend/vssm_build.py) stops `pip install -e .` at once, pointing
to tools/setup.sh, in an environment without mmcv's compiled ops, and passes in the set-up one; the installed
metadata (version, Python floor, dependencies, extras)."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

import vssm


@pytest.fixture(scope='module')
def backend():
    spec = importlib.util.spec_from_file_location('vssm_build', REPO_ROOT / '_build_backend' / 'vssm_build.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fresh_environment_stops_at_once_with_the_set_up_command(backend, tmp_path, monkeypatch):
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(tmp_path / 'env')], check=True)
    monkeypatch.delenv('VSSM_SKIP_INSTALL_CHECK', raising=False)
    monkeypatch.setattr(backend.sys, 'executable', str(tmp_path / 'env' / 'bin' / 'python'))
    for hook in (backend.get_requires_for_build_editable, backend.get_requires_for_build_wheel):
        with pytest.raises(SystemExit) as stop:
            hook()
        message = str(stop.value)
        assert 'mmcv is not installed in' in message and 'bash tools/setup.sh' in message
        assert 'pip install --no-build-isolation -e .' in message


def test_set_up_environment_passes_and_the_check_can_be_skipped(backend, tmp_path, monkeypatch):
    monkeypatch.delenv('VSSM_SKIP_INSTALL_CHECK', raising=False)
    backend._check_environment()  # this interpreter: tools/setup.sh's, with mmcv 2.1 and its ops
    monkeypatch.setenv('VSSM_SKIP_INSTALL_CHECK', '1')
    monkeypatch.setattr(backend.sys, 'executable', str(tmp_path / 'no-such-python'))
    backend._check_environment()


def test_installed_metadata():
    meta = importlib.metadata.metadata('vssm')
    assert meta['Version'] == vssm.__version__ and meta['Requires-Python'] == '>=3.9'
    assert meta['Summary'].startswith('Visual state space models')
    requires = meta.get_all('Requires-Dist')
    assert any(r.startswith('torch>=2.4') for r in requires) and any(r.startswith('mmcv') for r in requires)
    assert set(meta.get_all('Provides-Extra')) >= {'det', 'seg', 'tests', 'plot', 'export'}
    assert any('mmdet' in r and 'extra == "det"' in r for r in requires)


@pytest.mark.slow
def test_set_up_keeps_the_packages_of_the_interpreter(tmp_path):
    """`VSSM_SYSTEM_PACKAGES=1 bash tools/setup.sh` from this (set-up) environment's interpreter, offline: a venv
    that sees this venv's packages, keeps them (nothing to download), and ends with the import check and the backend
    report."""
    venv = tmp_path / 'venv'
    env = dict(os.environ, VSSM_VENV=str(venv), VSSM_SYSTEM_PACKAGES='1', VSSM_PYTHON=sys.executable,
               PIP_NO_INDEX='1')
    result = subprocess.run(['bash', str(REPO_ROOT / 'tools' / 'setup.sh')], env=env, capture_output=True, text=True,
                            timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    requirements = [line for line in (REPO_ROOT / 'requirements.txt').read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith('#')]
    assert f'keeping {len(requirements)} installed package(s)' in log and '[setup] ok: torch' in log
    assert 'vssm models on cpu' in log
    probe = subprocess.run([str(venv / 'bin' / 'python'), '-c', 'import torch, vssm; print(vssm.__file__)'],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip().startswith(str(REPO_ROOT))
    again = subprocess.run(['bash', str(REPO_ROOT / 'tools' / 'setup.sh')], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and 'environment up to date' in again.stdout


def test_requirements_kept_from_the_interpreter(monkeypatch, capsys):
    """tools/_requirements.py (setup.sh with VSSM_SYSTEM_PACKAGES=1): installed packages are kept at any version,
    another build of opencv counts, setuptools >= 81 is replaced, and unmet dependencies are found through the
    installed ones (markers evaluated)."""
    spec = importlib.util.spec_from_file_location('vssm_requirements', REPO_ROOT / 'tools' / '_requirements.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    versions = {'torch': '2.11.0', 'setuptools': '81.0.0', 'opencv-python-headless': '5.0.0.93', 'mmengine': '0.10.7',
                'addict': '2.4.0'}
    requires = {'mmengine': ['addict', 'opencv-python>=3', 'rich', 'pywin32; sys_platform == "win32"',
                             'pytest; extra == "tests"'],
                'torch': ['filelock'], 'opencv-python-headless': ['numpy>=2']}

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(module.md, 'version', version)
    monkeypatch.setattr(module.md, 'requires', lambda name: requires.get(name, []))
    module.missing(['torch==2.14.1', 'setuptools==80.10.2', 'opencv-python==5.0.0.93', 'einops==0.8.2'])
    out, err = capsys.readouterr()
    assert out.split() == ['setuptools==80.10.2', 'einops==0.8.2']
    assert 'keeping 2 installed package(s), untested versions: torch 2.11.0 (tested: torch==2.14.1)' in err
    module.unmet(['mmengine==0.10.7', 'torch==2.14.1'])
    assert sorted(capsys.readouterr().out.split()) == ['filelock', 'numpy>=2', 'rich']
