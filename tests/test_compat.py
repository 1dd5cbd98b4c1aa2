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
    # Both interpreters at once: each spends seconds importing the OpenMMLab libraries.
    control, result = [subprocess.Popen([sys.executable, '-c', c], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env)
                       for c in ('import mmpretrain.models', code)]
    control_err = control.communicate()[1]
    out, err = result.communicate()
    assert control.returncode != 0 and 'simulated transformers 5' in control_err  # the failure is real
    assert result.returncode == 0, err[-2000:]
    assert out.strip().endswith('ok')
