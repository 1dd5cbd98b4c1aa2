"""The build backend of vssm: setuptools' ``build_meta``, plus one check before pip resolves the dependencies.

vssm needs mmcv 2.1 with its compiled ops. mmcv 2.1 is published as source only, and pip cannot build it in the
isolated environment it builds in (mmcv's ``setup.py`` imports ``pkg_resources`` and torch; with torch >= 2.14 it also
needs ``-std=c++20``). Without this check ``pip install -e .`` in a fresh environment would download mmcv and fail
deep inside its build. Here the install stops at once, before anything is downloaded, and says what to run instead.

The check asks the interpreter that pip installs into (in a clean environment, outside pip's build isolation)
whether mmcv with ops is installed. ``VSSM_SKIP_INSTALL_CHECK=1`` skips it (e.g. to build a wheel of vssm alone).
"""
import os
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook not redefined below)

_PROBE = ('import importlib.metadata as m, importlib.util as u; v = m.version("mmcv"); '
          'assert v.startswith(("2.0.", "2.1.")), v; assert u.find_spec("mmcv._ext"), "without ops"')

_MESSAGE = """
vssm needs mmcv 2.1 with its compiled ops, which pip cannot build here ({reason}).
Install the tested stack with the repository's set-up script, which builds mmcv the way that works and then installs
vssm (a .venv at the repository root; about 10-20 minutes without a prebuilt mmcv wheel):

    bash tools/setup.sh

Into an environment of your own: install torch (and torchvision) for your CUDA, build mmcv 2.1.0 without isolation
as README.md "Install" describes, then

    pip install -r requirements.txt && pip install --no-build-isolation -e .

(VSSM_SKIP_INSTALL_CHECK=1 skips this check.)
"""


def _check_environment() -> None:
    if os.environ.get('VSSM_SKIP_INSTALL_CHECK') == '1':
        return
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONNOUSERSITE', 'PYTHONHOME')}
    probe = subprocess.run([sys.executable, '-c', _PROBE], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ['mmcv not found'])[-1]
        reason = 'mmcv is not installed' if 'PackageNotFoundError' in last else last.split(':', 1)[-1].strip()
        raise SystemExit(_MESSAGE.format(reason=f'{reason} in {sys.executable}'))


def get_requires_for_build_wheel(config_settings=None):
    _check_environment()
    return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _check_environment()
    return _setuptools.get_requires_for_build_editable(config_settings)
