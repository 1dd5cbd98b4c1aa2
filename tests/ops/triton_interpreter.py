"""Run a script with Triton's interpreter (CPU tensors): the kernels' own tests on machines without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_in_interpreter(script: str, timeout: int = 600) -> None:
    """Run ``script`` in a fresh process with ``TRITON_INTERPRET=1`` (read when Triton is imported); it must print
    ``ok`` last and exit with 0."""
    env = dict(os.environ, TRITON_INTERPRET='1',
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')])))
    result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=timeout)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines and lines[-1] == 'ok', result.stdout[-2000:] + result.stderr[-3000:]
