"""`import vssm` works even when transformers>=5 would crash mmpretrain 1.2.0's multimodal imports."""
import subprocess
import sys
import textwrap

from conftest import REPO_ROOT


def test_import_with_transformers_5(tmp_path):
    # A stand-in transformers 5 whose import fails the way the real one fails for mmpretrain 1.2.0.
    pkg = tmp_path / 'transformers'
    pkg.mkdir()
    (pkg / '__init__.py').write_text("raise ImportError('simulated transformers 5: mmpretrain must not import me')\n")
    meta = tmp_path / 'transformers-5.0.0.dist-info'
    meta.mkdir()
    (meta / 'METADATA').write_text('Metadata-Version: 2.1\nName: transformers\nVersion: 5.0.0\n')
    code = textwrap.dedent("""
        import vssm
        from mmpretrain.registry import MODELS
        from mmpretrain.utils.dependency import WITH_MULTIMODAL
        assert MODELS.get('SpatialMamba') is vssm.models.SpatialMamba
        assert not WITH_MULTIMODAL
        print('ok')
    """)
    env = {'PYTHONPATH': str(tmp_path), 'PATH': '/usr/bin:/bin'}
    control = subprocess.run([sys.executable, '-c', 'import mmpretrain.models'], cwd=REPO_ROOT, capture_output=True,
                             text=True, env=env)
    assert control.returncode != 0 and 'simulated transformers 5' in control.stderr  # the failure is real
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith('ok')
