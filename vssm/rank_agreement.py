"""``RankAgreementHook``: check that every rank of a distributed run holds the same model.

DDP keeps the replicas equal by construction (one all-reduced gradient, the same optimizer step on every rank); a
bug in a custom op, a parameter left out of the gradient all-reduce, a rank-dependent branch or a broken resume
breaks that silently: each rank trains its own model and only rank 0's is saved. The hook compares a float64
checksum (sum and sum of absolute values) of every parameter and buffer across ranks with one all-gather, at the
end of training and, with ``interval > 0``, every ``interval`` iterations. Rank 0 appends one JSON line per check to
``<work_dir>/rank_agreement.jsonl``; parameters that differ raise an error naming them (``strict=True``).

Buffers are reported, not enforced: BatchNorm running statistics legitimately differ across ranks after the last
forward unless the layer is a SyncBN (DDP broadcasts rank 0's buffers at the start of every forward, then each
rank updates them with its own batch).

Use it from a config: ``custom_hooks = [..., dict(type='mmengine.RankAgreementHook')]``
(``tools/benchmarks/multi_gpu_check.py`` does).
"""
import json
import os.path as osp
from typing import Dict, List, Tuple

import torch
from mmengine.dist import all_gather, get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

__all__ = ['RankAgreementHook', 'model_checksums', 'compare_checksums']


def model_checksums(model: torch.nn.Module) -> Tuple[List[str], List[str], torch.Tensor]:
    """Names of the parameters and of the buffers, and an (N, 2) float64 tensor of (sum, sum of |x|) per tensor, in
    that order (parameters first), on the model's device."""
    params = [(name, p) for name, p in model.named_parameters()]
    buffers = [(name, b) for name, b in model.named_buffers()]
    tensors = params + buffers
    if not tensors:
        raise ValueError('RankAgreementHook: the model has no parameters or buffers to compare')
    device = tensors[0][1].device
    sums = torch.stack([
        torch.stack([t.detach().double().sum(), t.detach().double().abs().sum()]).to(device) for _, t in tensors
    ])
    return [n for n, _ in params], [n for n, _ in buffers], sums


def compare_checksums(gathered: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per tensor, the largest difference of any rank's checksums from rank 0's: (absolute, relative to rank 0's
    sum of |x|)."""
    reference = gathered[0]
    diff = torch.stack([(g - reference).abs().amax(dim=1) for g in gathered]).amax(dim=0)
    scale = reference[:, 1].abs().clamp_min(torch.finfo(torch.float64).tiny)
    return diff, diff / scale


@HOOKS.register_module()
class RankAgreementHook(Hook):
    """Compare the model's parameters and buffers across ranks (see the module doc).

    Args:
        interval: Also check every ``interval`` training iterations (0: only at the end of training).
        rtol: The largest relative checksum difference of a parameter that still counts as equal (default 0: DDP
            replicas are bit-identical).
        strict: Raise when parameters differ (else only log an error).
        out_file: The JSON-lines file in the work dir that rank 0 appends every check to.
    """

    priority = 'LOW'

    def __init__(self, interval: int = 0, rtol: float = 0.0, strict: bool = True,
                 out_file: str = 'rank_agreement.jsonl') -> None:
        if interval < 0:
            raise ValueError(f'RankAgreementHook: interval must be >= 0 (0 = only at the end), got {interval}')
        if rtol < 0:
            raise ValueError(f'RankAgreementHook: rtol must be >= 0, got {rtol}')
        self.interval = interval
        self.rtol = rtol
        self.strict = strict
        self.out_file = out_file
        self._last_checked = None

    def before_train(self, runner) -> None:
        self._last_checked = None

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.interval and self.every_n_train_iters(runner, self.interval):
            self.check(runner, runner.iter + 1)

    def after_train(self, runner) -> None:
        if getattr(self, '_last_checked', None) != runner.iter:
            self.check(runner, runner.iter)

    def check(self, runner, iteration: int) -> Dict:
        """One check after ``iteration`` training iterations: gather, compare, record; returns the record (on every
        rank)."""
        self._last_checked = iteration
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        params, buffers, sums = model_checksums(model)
        gathered = all_gather(sums) if get_world_size() > 1 else [sums]
        diff, rel = compare_checksums([g.cpu() for g in gathered])
        n = len(params)
        bad = [params[i] for i in torch.nonzero(rel[:n] > self.rtol).flatten().tolist()]
        moved = [buffers[i] for i in torch.nonzero(rel[n:] > self.rtol).flatten().tolist()]
        record = dict(iter=iteration, world_size=get_world_size(), parameters=n, buffers=len(buffers),
                      params_agree=not bad, params_max_rel_diff=float(rel[:n].max()) if n else 0.0,
                      params_differing=bad[:20], buffers_max_rel_diff=float(rel[n:].max()) if buffers else 0.0,
                      buffers_differing=moved[:20])
        if get_rank() == 0:
            with open(osp.join(runner.work_dir, self.out_file), 'a') as f:
                f.write(json.dumps(record) + '\n')
        message = (f'RankAgreementHook after iteration {iteration}: {record["world_size"]} rank(s), {n} parameters '
                   f'{"agree" if not bad else f"DIFFER ({len(bad)}: {bad[:5]})"} (max rel. diff '
                   f'{record["params_max_rel_diff"]:.2e}), buffers max rel. diff {record["buffers_max_rel_diff"]:.2e}')
        print_log(message, logger='current', level=40 if bad else 20)
        if bad and self.strict:
            raise RuntimeError(f'{message}. The ranks train different models: look for parameters without gradient '
                               'all-reduce (find_unused_parameters), rank-dependent code or a partial resume.')
        return record
