"""Parsing of the ``arch`` argument shared by every backbone."""
from typing import Dict, Sequence, Union


def parse_arch(family: str, arch: Union[str, dict], arch_zoo: Dict[str, dict], required: Sequence[str],
               optional: Sequence[str] = (), num_stages: int = 4) -> dict:
    """Resolve ``arch`` (a name or alias from ``arch_zoo``, or a dict) into a settings dict.

    A dict must hold every key of ``required``; ``dims`` may be an int (the first stage's width,
    doubled at each stage) or one width per stage. ``depths`` must have ``num_stages`` entries.
    Keys outside ``required`` and ``optional`` are rejected.
    """
    if isinstance(arch, str):
        key = arch.lower()
        if key not in arch_zoo:
            names = sorted({k for k in arch_zoo if len(k) > 1})
            raise ValueError(f'{family}: unknown arch {arch!r}. Valid names: {names} '
                             f'(or a dict with the keys {list(required)}).')
        settings = dict(arch_zoo[key])
    elif isinstance(arch, dict):
        missing = [k for k in required if k not in arch]
        if missing:
            raise ValueError(f'{family}: a custom arch dict needs the keys {list(required)}; missing {missing}.')
        unknown = [k for k in arch if k not in required and k not in optional]
        if unknown:
            raise ValueError(f'{family}: unknown arch keys {unknown}; allowed: {list(required) + list(optional)}.')
        settings = dict(arch)
    else:
        raise TypeError(f'{family}: arch must be a name or a dict, got {type(arch).__name__}.')
    dims = settings.get('dims')
    if isinstance(dims, int):
        settings['dims'] = [dims * 2**i for i in range(num_stages)]
    if 'dims' in settings and len(settings['dims']) != num_stages:
        raise ValueError(f'{family}: arch dims must have {num_stages} entries, got {settings["dims"]}.')
    if 'depths' in settings and len(settings['depths']) != num_stages:
        raise ValueError(f'{family}: arch depths must have {num_stages} entries, got {settings["depths"]}.')
    settings['dims'] = [int(d) for d in settings['dims']]
    settings['depths'] = [int(d) for d in settings['depths']]
    return settings
