"""Run a script with Triton's interpreter (CPU tensors): the kernels' own tests on machines without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Makes ``vssm`` a bare package before anything imports it, so ``import vssm.ops`` skips ``vssm/__init__.py``, which
# imports the models and mmpretrain with them (5 of the 8 s a fresh interpreter takes to import ``vssm.ops``).
_OPS_ONLY = f"""import sys, types
_vssm = types.ModuleType('vssm')
_vssm.__path__ = [{str(REPO_ROOT / 'vssm')!r}]
sys.modules['vssm'] = _vssm
"""


def run_in_interpreter(script: str, timeout: int = 600, ops_only: bool = False) -> None:
    """Run ``script`` in a fresh process with ``TRITON_INTERPRET=1`` (read when Triton is imported); it must print
    ``ok`` last and exit with 0. ``ops_only``: the script imports ``vssm.ops`` and nothing else of vssm (its
    start-up then skips the models)."""
    if ops_only:
        script = _OPS_ONLY + script
    env = dict(os.environ, TRITON_INTERPRET='1',
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')])))
    result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=timeout)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines and lines[-1] == 'ok', result.stdout[-2000:] + result.stderr[-3000:]
