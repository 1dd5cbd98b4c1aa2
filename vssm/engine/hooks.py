"""mmengine hooks of vssm's training runs.

``RNGStateHook`` saves the Python, NumPy, torch and CUDA generator states in each checkpoint (rank 0's: mmengine
saves on rank 0) and restores them right before the first iteration after a resume, so a resumed single-process run
in deterministic mode draws the same random numbers (drop path, mixup, ...) as an uninterrupted one.

``RankAgreementHook`` checks that every rank of a distributed run holds the same model.

DDP keeps the replicas equal by construction (one all-reduced gradient, the same optimizer step on every rank); a
bug in a custom op, a parameter left out of the gradient all-reduce, a rank-dependent branch or a broken resume
breaks that silently: each rank trains its own model and only rank 0's is saved. The hook compares a float64
checksum (sum and sum of absolute values) of every parameter and buffer across ranks with one all-gather, at the
end of training and, with ``interval > 0``, every ``interval`` iterations. Rank 0 appends one JSON line per check to
``<work_dir>/rank_agreement.jsonl``; parameters that differ raise an error naming them (``strict=True``).

Buffers are reported, not enforced: BatchNorm running statistics legitimately differ across ranks after the last
forward unless the layer is a SyncBN (DDP broadcasts rank 0's buffers at the start of every forward, then each
rank updates them with its own batch).

``SyncNormBuffersHook`` makes what is validated what is saved: in a distributed run each rank updates the running
statistics of its BatchNorm layers with its own batches, so after training iterations the ranks hold different
buffers; validation then runs every rank on its own buffers while the checkpoint holds rank 0's. The hook averages the
floating-point buffers of every normalization layer that tracks running statistics across the ranks (one coalesced
all-reduce) before each validation, before each checkpoint is saved (on the iterations or epochs where the
``CheckpointHook`` saves) and at the end of training; the EMA model of an ``EMAHook`` is averaged too. SyncBN layers
already agree; averaging leaves them unchanged. tools/train.py adds it to every distributed run.

All three register in mmengine's root ``HOOKS`` when ``vssm.engine`` is imported (tools/train.py does; a config adds
``'vssm.engine'`` to its ``custom_imports``): ``custom_hooks = [..., dict(type='mmengine.RankAgreementHook')]``.
"""
import json
import os.path as osp
import random
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from mmengine.dist import all_gather, all_reduce_params, get_rank, get_world_size
from mmengine.hooks import CheckpointHook, EMAHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch.nn.modules.batchnorm import _NormBase

__all__ = ['RNGStateHook', 'RankAgreementHook', 'SyncNormBuffersHook', 'norm_buffers', 'model_checksums',
           'compare_checksums']


# ---------------------------------------------------------------------------------------------------------------------
def _capture_rng() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(
        python=random.getstate(),
        numpy=(name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def _restore_rng(state: dict) -> None:
    """Restore ``_capture_rng()``'s states. The tensors may be on a GPU: mmengine's resume loads the checkpoint with
    ``map_location='default'`` (the current device), and the generators take CPU byte tensors."""
    random.setstate(state['python'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'].cpu())
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save the generator states in checkpoints; restore them when training resumes (see the module doc).

    mmengine saves checkpoints on rank 0 only, so a checkpoint holds rank 0's states: a single-process run resumes
    bit-reproducibly; in a multi-process run rank 0 gets its states back and the other ranks keep their seeded
    generators (a warning says so). No collective is added to the training loop.
    """

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._pending: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint['rng_states'] = [_capture_rng()]

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        states = checkpoint.get('rng_states')
        if not states:
            return
        if get_world_size() > 1:
            print_log(f'RNGStateHook: the checkpoint holds rank 0\'s generator states; restoring them on rank 0 only '
                      f'({get_world_size()} processes: the run is not bit-reproducible on the other ranks).',
                      logger='current', level=30)
        if get_rank() == 0:
            self._pending = states[0]

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._pending is not None:  # after the data loader was rebuilt and advanced: as in the first run
            _restore_rng(self._pending)
            self._pending = None


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


def norm_buffers(*models: torch.nn.Module) -> List[torch.Tensor]:
    """The floating-point buffers (running mean and variance) of the normalization layers of ``models`` that track
    running statistics (BatchNorm, SyncBatchNorm, InstanceNorm with ``track_running_stats``), each tensor once."""
    buffers, seen = [], set()
    for model in models:
        for module in model.modules():
            if not isinstance(module, _NormBase) or not module.track_running_stats:
                continue
            for buffer in module.buffers(recurse=False):
                if buffer is not None and buffer.is_floating_point() and id(buffer) not in seen:
                    seen.add(id(buffer))
                    buffers.append(buffer)
    return buffers


@HOOKS.register_module()
class SyncNormBuffersHook(Hook):
    """Average the normalization layers' running statistics across ranks before validation, before checkpoints are
    saved and at the end of training (see the module doc). Does nothing in a single-process run."""

    priority = 'LOW'  # after EMAHook's update (NORMAL), before CheckpointHook saves (VERY_LOW)

    def _sync(self, runner) -> None:
        if get_world_size() < 2:
            return
        models = [runner.model.module if is_model_wrapper(runner.model) else runner.model]
        models += [hook.ema_model for hook in runner.hooks if isinstance(hook, EMAHook) and hasattr(hook, 'ema_model')]
        buffers = norm_buffers(*models)
        if buffers:
            all_reduce_params(buffers, op='mean')

    def _checkpoint_hooks(self, runner) -> List[CheckpointHook]:
        return [hook for hook in runner.hooks if isinstance(hook, CheckpointHook)]

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if any(not hook.by_epoch and (self.every_n_train_iters(runner, hook.interval, hook.save_begin)
                                      or (hook.save_last and self.is_last_train_iter(runner)))
               for hook in self._checkpoint_hooks(runner)):
            self._sync(runner)

    def after_train_epoch(self, runner) -> None:
        if any(hook.by_epoch and (self.every_n_epochs(runner, hook.interval, hook.save_begin)
                                  or (hook.save_last and self.is_last_train_epoch(runner)))
               for hook in self._checkpoint_hooks(runner)):
            self._sync(runner)

    def before_val_epoch(self, runner) -> None:
        self._sync(runner)

    def after_train(self, runner) -> None:
        self._sync(runner)
