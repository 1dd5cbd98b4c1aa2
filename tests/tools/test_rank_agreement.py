"""vssm.engine.hooks.RankAgreementHook: the checksum comparison, the hook on one process, and two gloo processes
training a tiny VMamba under DDP (the ranks agree; a parameter changed on one rank is named in the error)."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from launches import free_port
from mmengine.registry import HOOKS

from vssm.engine.hooks import RankAgreementHook, compare_checksums, model_checksums
from vssm.models import VMamba

WORLD_SIZE = 2
TINY_ARCH = dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], ssm_ratio=1.0)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def test_checksums_name_parameters_then_buffers_and_flag_the_rank_that_differs():
    params, buffers, sums = model_checksums(_model())
    assert params == ['0.weight', '0.bias', '1.weight', '1.bias']
    assert buffers == ['1.running_mean', '1.running_var', '1.num_batches_tracked']
    assert sums.shape == (7, 2) and sums.dtype == torch.float64
    other = sums.clone()
    other[1, 0] += 1e-3
    diff, rel = compare_checksums([sums, sums.clone(), other])
    assert torch.nonzero(diff).flatten().tolist() == [1]
    assert rel[1] == pytest.approx(1e-3 / float(sums[1, 1]))


def test_hook_records_every_check_once_and_raises_on_differing_parameters(tmp_path, monkeypatch):
    assert HOOKS.get('RankAgreementHook') is RankAgreementHook  # registered by importing vssm.engine
    model, hook = _model(), RankAgreementHook(interval=2)
    runner = SimpleNamespace(model=model, work_dir=str(tmp_path), iter=3)
    hook.before_train(runner)
    hook.after_train_iter(runner, 3)  # iteration 4: a multiple of 2
    runner.iter = 4
    hook.after_train(runner)  # iteration 4 again: not checked twice
    records = [json.loads(line) for line in (tmp_path / 'rank_agreement.jsonl').read_text().splitlines()]
    assert [(r['iter'], r['world_size'], r['params_agree'], r['parameters'], r['buffers']) for r in records] == [
        (4, 1, True, 4, 3)]

    import vssm.engine.hooks as module

    def two_ranks_one_off(sums):
        off = sums.clone()
        off[2, 1] *= 1.5  # '1.weight' differs on "rank 1"
        return [sums, off]

    monkeypatch.setattr(module, 'get_world_size', lambda: 2)
    monkeypatch.setattr(module, 'all_gather', two_ranks_one_off)
    with pytest.raises(RuntimeError, match=r"DIFFER \(1: \['1.weight'\]\).*find_unused_parameters"):
        hook.check(runner, 5)
    record = RankAgreementHook(strict=False).check(runner, 6)
    assert not record['params_agree'] and record['params_differing'] == ['1.weight']


@pytest.mark.parametrize('kwargs, message', [(dict(interval=-1), 'interval must be >= 0'),
                                             (dict(rtol=-1.0), 'rtol must be >= 0')])
def test_hook_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankAgreementHook(**kwargs)


# --- two processes -----------------------------------------------------------------------------------------------
class _TinyClassifier(torch.nn.Module):
    """A tiny VMamba (reference ops) and a linear head on its pooled last stage."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = VMamba(TINY_ARCH, out_indices=(3, ), ops_backend='torch')
        self.head = torch.nn.Linear(TINY_ARCH['dims'][-1], 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[-1].mean((2, 3)))


def _train_two_ranks(rank: int, port: int, work_dir: str) -> None:
    """One rank: the tiny classifier under DDP (gloo), 2 SGD steps on rank-dependent data with the hook checking
    after every step, then one more check after a parameter changed on rank 1 only; the error (if any) goes to
    ``rank<r>.json``."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(_TinyClassifier())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        hook = RankAgreementHook(interval=1)
        runner = SimpleNamespace(model=model, work_dir=work_dir, iter=0)
        hook.before_train(runner)
        torch.manual_seed(1 + rank)  # each rank its own batches
        for step in range(2):
            loss = model(torch.randn(2, 3, 32, 32)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            hook.after_train_iter(runner, step)
            runner.iter = step + 1
        hook.after_train(runner)  # the last iteration is checked already: no second record
        if rank == 1:
            with torch.no_grad():
                next(model.module.parameters()).add_(1.0)
        error = ''
        try:
            hook.check(runner, 3)
        except RuntimeError as exc:
            error = str(exc)
        with open(f'{work_dir}/rank{rank}.json', 'w') as f:
            json.dump(dict(error=error), f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_agree_and_a_changed_parameter_is_named(tmp_path):
    # spawn: the children start clean whatever the test process ran before (a child forked from a process whose
    # autograd engine has started its threads cannot run a backward, so fork made this test depend on test order);
    # each child sets one intra-op thread before any work, as DataLoader workers do.
    mp.start_processes(_train_two_ranks, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True,
                       start_method='spawn')
    records = [json.loads(line) for line in (tmp_path / 'rank_agreement.jsonl').read_text().splitlines()]
    assert [(r['iter'], r['world_size'], r['params_agree']) for r in records] == [(1, 2, True), (2, 2, True),
                                                                                  (3, 2, False)]
    assert records[0]['parameters'] > 10 and records[1]['params_max_rel_diff'] == 0.0
    first_param = records[2]['params_differing']
    assert len(first_param) == 1 and first_param[0].startswith('backbone.')
    for rank in range(WORLD_SIZE):  # the verdict is the same on every rank: both raise, naming the parameter
        error = json.loads((tmp_path / f'rank{rank}.json').read_text())['error']
        assert 'DIFFER' in error and first_param[0] in error
