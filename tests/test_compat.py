"""`import vssm` works even when transformers>=5 would crash mmpretrain 1.2.0's multimodal imports."""
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Tuple

import pytest
from launches import BackgroundLaunches

CODE = textwrap.dedent("""
    import vssm
    from mmpretrain.registry import MODELS
    from mmpretrain.utils.dependency import WITH_MULTIMODAL
    assert MODELS.get('SpatialMamba') is vssm.models.SpatialMamba
    assert not WITH_MULTIMODAL
    print('ok')
""")


def _import_with_transformers_5(launches: BackgroundLaunches, run_dir: Path,
                                demo_root: None) -> Tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """A stand-in transformers 5 in ``run_dir`` whose import fails the way the real one fails for mmpretrain 1.2.0;
    then, with it on the path, the control (mmpretrain's models alone) and ``import vssm``."""
    pkg = run_dir / 'transformers'
    pkg.mkdir()
    (pkg / '__init__.py').write_text("raise ImportError('simulated transformers 5: mmpretrain must not import me')\n")
    meta = run_dir / 'transformers-5.0.0.dist-info'
    meta.mkdir()
    (meta / 'METADATA').write_text('Metadata-Version: 2.1\nName: transformers\nVersion: 5.0.0\n')
    env = {'PYTHONPATH': str(run_dir), 'PATH': '/usr/bin:/bin'}
    control, result = [launches.call([sys.executable, '-c', c], env=env, timeout=300)
                       for c in ('import mmpretrain.models', CODE)]
    return control, result


@pytest.mark.launches(pipeline=_import_with_transformers_5, demo_data=False)
def test_import_with_transformers_5(background_launches, request):
    control, result = background_launches.result(request.node.nodeid)
    assert control.returncode != 0 and 'simulated transformers 5' in control.stderr  # the failure is real
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith('ok')
