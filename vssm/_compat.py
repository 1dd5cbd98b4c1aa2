"""Keep ``import vssm`` working with library versions that break mmpretrain 1.2.0 at import."""
import importlib.metadata
import importlib.util
import sys


def _major(version: str) -> int:
    head = version.split('.')[0]
    return int(head) if head.isdigit() else 0


def guard_mmpretrain_multimodal() -> bool:
    """Make mmpretrain skip its multimodal models when ``transformers>=5`` is installed.

    mmpretrain 1.2.0 imports its BLIP/Flamingo/... models whenever ``transformers>=4.28`` is
    installed, and they crash at import against transformers 5. Before mmpretrain is first imported,
    load its small ``mmpretrain.utils.dependency`` module on its own and set ``WITH_MULTIMODAL`` to
    False: mmpretrain then registers placeholders for those models instead. The backbones here never
    use them. Returns whether the guard was applied.
    """
    if 'mmpretrain' in sys.modules or 'mmpretrain.utils.dependency' in sys.modules:
        return False
    try:
        version = importlib.metadata.version('transformers')
    except importlib.metadata.PackageNotFoundError:
        return False
    if _major(version) < 5:
        return False
    spec = importlib.util.find_spec('mmpretrain')
    if spec is None or not spec.submodule_search_locations:
        return False
    path = f'{list(spec.submodule_search_locations)[0]}/utils/dependency.py'
    dep_spec = importlib.util.spec_from_file_location('mmpretrain.utils.dependency', path)
    module = importlib.util.module_from_spec(dep_spec)
    dep_spec.loader.exec_module(module)
    module.WITH_MULTIMODAL = False
    sys.modules['mmpretrain.utils.dependency'] = module
    return True
