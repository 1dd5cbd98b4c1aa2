"""tools/setup.sh's helper for VSSM_SYSTEM_PACKAGES=1: which requirements to install next to the packages the
interpreter already has.

    python tools/_requirements.py missing LINE...   requirement lines not installed yet (one per line)
    python tools/_requirements.py unmet NAME...     dependencies of the installed NAMEs (walked recursively) that are
                                                    not installed, as pip requirement strings

A requirement counts as installed at any version (the point is to keep the environment's own torch), except
setuptools >= 81 (no pkg_resources, which mmcv's build and mmengine need). Other builds
of a package that provide the same modules count too (opencv-python-headless for opencv-python): pip's resolver does
not know that, which is why setup.sh installs with --no-deps and asks for the unmet dependencies here.
"""
import importlib.metadata as md
import re
import sys

try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement

OTHER_BUILDS = {'opencv-python': ['opencv-python-headless', 'opencv-contrib-python', 'opencv-contrib-python-headless']}


def _normalize(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def installed(name: str):
    """(distribution name, version) of ``name`` or of another build of it; None when absent."""
    for candidate in [name, *OTHER_BUILDS.get(_normalize(name), [])]:
        try:
            return candidate, md.version(candidate)
        except md.PackageNotFoundError:
            continue
    return None


def _acceptable(name: str, version: str) -> bool:
    return not (_normalize(name) == 'setuptools' and int(version.split('.')[0]) >= 81)


def missing(lines):
    kept, untested = 0, []
    for line in lines:
        req = Requirement(line)
        have = installed(req.name)
        if have is None or not _acceptable(req.name, have[1]):
            print(line)
            continue
        kept += 1
        if line != f'{have[0]}=={have[1]}':
            untested.append(f'{have[0]} {have[1]} (tested: {line})')
    if kept:
        print(f'[setup] keeping {kept} installed package(s)' +
              (', untested versions: ' + ', '.join(untested) if untested else ''), file=sys.stderr)


def unmet(names):
    seen, todo, wanted = set(), [Requirement(n).name for n in names], {}
    while todo:
        name = todo.pop()
        have = installed(name)
        if have is None or _normalize(have[0]) in seen:
            continue
        seen.add(_normalize(have[0]))
        for text in md.requires(have[0]) or []:
            dep = Requirement(text)
            if dep.marker is not None and not dep.marker.evaluate({'extra': ''}):
                continue
            if installed(dep.name) is None:
                wanted.setdefault(_normalize(dep.name), f'{dep.name}{dep.specifier}')
            else:
                todo.append(dep.name)
    for requirement in wanted.values():
        print(requirement)


if __name__ == '__main__':
    {'missing': missing, 'unmet': unmet}[sys.argv[1]](sys.argv[2:])
