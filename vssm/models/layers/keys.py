"""Renaming upstream classification checkpoints to the keys of an mmpretrain ``ImageClassifier``."""
from typing import Dict, Sequence, Tuple

_TASK_PREFIXES = ('backbone.', 'neck.', 'head.fc.', 'decode_head.', 'auxiliary_head.', 'rpn_head.', 'roi_head.')


def unwrap_state_dict(checkpoint: dict, key: str = 'model') -> dict:
    """The state dict inside an upstream (``{'model': ...}``) or mmengine (``{'state_dict': ...}``) checkpoint."""
    for name in (key, 'state_dict'):
        if isinstance(checkpoint.get(name), dict):
            return checkpoint[name]
    return checkpoint


def to_classifier_keys(state_dict: Dict, head_renames: Sequence[Tuple[str, str]]) -> Dict:
    """Put an upstream trunk under ``backbone.`` and rename its final norm and head.

    ``head_renames`` maps upstream prefixes to ours, e.g. ``('norm.', 'backbone.outnorm3.')`` and
    ``('head.', 'head.fc.')``. Keys already in mmpretrain/mmdet/mmseg layout pass through unchanged.
    """
    converted = {}
    for key, value in state_dict.items():
        for old, new in head_renames:
            if key.startswith(old):
                converted[new + key[len(old):]] = value
                break
        else:
            converted[key if key.startswith(_TASK_PREFIXES) else 'backbone.' + key] = value
    return converted
