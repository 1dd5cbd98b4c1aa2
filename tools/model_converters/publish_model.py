"""Make a training checkpoint ready to publish: weights and metadata only, named after its content.

    python tools/model_converters/publish_model.py IN.pth OUT.pth [--no-ema]
    # -> OUT_<yyyymmdd>-<sha256[:8]>.pth

Keeps ``state_dict`` and ``meta`` (the config, the class names and palette that the Inferencers read) and drops what
only resuming needs (optimizer, schedulers, message hub, generator states, the EMA hook's second copy). With
mmengine's ``EMAHook`` the checkpoint's ``state_dict`` already holds the averaged weights (the raw ones are kept as
``ema_state_dict``): the published file has the EMA weights, or the raw ones with ``--no-ema``. The result loads with
``torch.load(weights_only=True)`` without any allowed classes, and the name carries the first 8 hex digits of its
SHA-256, as OpenMMLab's released checkpoints do.
"""
import argparse
import datetime
import hashlib
import io
import os.path as osp
from typing import Tuple

import torch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('in_file', help='checkpoint written by tools/train.py (or any mmengine checkpoint)')
    parser.add_argument('out_file', help='output name; the date and hash are appended: OUT_<yyyymmdd>-<sha8>.pth')
    parser.add_argument('--no-ema', action='store_true',
                        help="publish an EMA run's raw weights (its 'ema_state_dict') instead of the averaged ones")
    return parser.parse_args(argv)


def publishable(checkpoint: dict, no_ema: bool = False) -> Tuple[dict, str]:
    """The ``{'state_dict', 'meta'}`` to publish from a loaded checkpoint, and which weights it holds."""
    from vssm.fileio import CheckpointFileError, InvalidOptionError

    state = checkpoint.get('state_dict') if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise CheckpointFileError('the checkpoint has no state_dict: publish a checkpoint written by tools/train.py '
                                  '(or convert an upstream one first with tools/model_converters/<family>_to_vssm.py).')
    state = dict(state)
    ema = checkpoint.get('ema_state_dict')
    if ema is None:
        if no_ema:
            raise InvalidOptionError('--no-ema: the checkpoint has no ema_state_dict (not trained with EMAHook).')
        which = 'the weights (no EMA in this checkpoint)'
    elif no_ema:  # EMAHook swapped the two: ema_state_dict['module.<key>'] holds the raw weight of <key>
        raw = {k[len('module.'):]: v for k, v in ema.items() if k.startswith('module.')}
        missing = [k for k in raw if k not in state]
        if missing:
            raise CheckpointFileError(f'ema_state_dict names weights the model lacks ({missing[:3]}).')
        state.update(raw)
        which = f'the raw weights ({len(raw)} tensors from ema_state_dict, --no-ema)'
    else:
        which = 'the EMA weights (state_dict of an EMAHook run)'
    return {'state_dict': state, 'meta': dict(checkpoint.get('meta') or {})}, which


def publish(in_file: str, out_file: str, no_ema: bool = False, date: str = None) -> Tuple[str, str]:
    """Write the published checkpoint next to ``out_file`` (``<out_file without .pth>_<date>-<sha8>.pth``,
    atomically); returns its path and which weights it holds."""
    from vssm.fileio import atomic_write, load_checkpoint_file

    checkpoint = load_checkpoint_file(in_file, what='checkpoint to publish')
    published, which = publishable(checkpoint, no_ema)
    buffer = io.BytesIO()
    torch.save(published, buffer)
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()[:8]
    stem = out_file[:-len('.pth')] if out_file.endswith('.pth') else out_file
    date = date or datetime.datetime.now().strftime('%Y%m%d')
    final = f'{stem}_{date}-{sha}.pth'
    atomic_write(data, final)
    return final, which


def main() -> None:
    args = parse_args()
    import vssm  # noqa: F401  (the classes of mmengine checkpoints are allowed under weights_only=True)
    from vssm.engine.launch import caller_path

    final, which = publish(caller_path(args.in_file), caller_path(args.out_file), args.no_ema)
    size = osp.getsize(final) / 2**20
    print(f'published {final} ({size:.1f} MiB, {which})')


if __name__ == '__main__':
    from vssm.engine.launch import run_tool
    run_tool(main)
