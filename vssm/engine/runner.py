"""A Runner whose checkpoint loading is strict, checks the file first and says in one sentence what does not fit.

mmengine's ``Runner.load_checkpoint`` (``load_from``, ``--resume``, the checkpoint of ``tools/test.py``) loads with
``strict=False``: a checkpoint of another family or size "loads" with warnings and the run goes on from noise; with
``strict=True`` it lists every missing and unexpected key (tens of thousands of characters for a whole detector).
``StrictRunner`` loads strictly; a missing, truncated or corrupt file, and weights that do not fit the model, fail
at once with a short message naming the model the weights fit and the config to use
(:func:`vssm.engine.checkpoint.check_state_fits`).

The config's ``compile`` option (``True`` or ``torch.compile``'s keyword arguments) compiles the model's backbone in
place (``nn.Module.compile``) instead of mmengine's whole ``train_step``: the backbones compile as one graph, the
state dict keeps its keys, and it works the same on one process and under DDP (where compiling mmengine's
``MMDistributedDataParallel.train_step`` fails in dynamo on its data dict). Necks and heads (NMS, sampling, losses)
run eagerly. A model without a ``backbone`` gets mmengine's behaviour.

Tools that test a checkpoint build ``StrictTestRunner``: the same, except that the test config (with ``--tta`` the
test-time augmentation wrapper and pipeline) is written into the run's timestamped folder, so the config of the
training run in the work dir, which the Inferencers and ``--resume`` read, is never replaced by it.
"""
import os.path as osp

from mmengine.config import Config
from mmengine.dist import master_only
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint, _load_checkpoint_to_model

from ..fileio import check_checkpoint_file
from .checkpoint import check_state_fits

__all__ = ['StrictRunner', 'StrictTestRunner', 'build_runner']


def _unwrap(model):
    """The model whose state dict a checkpoint holds: inside DDP wrappers and test-time augmentation wrappers."""
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    return model


@RUNNERS.register_module()
class StrictRunner(Runner):
    """mmengine's ``Runner`` with strict checkpoint loading (see the module docstring)."""

    def load_checkpoint(self, filename: str, map_location='cpu', strict: bool = True,
                        revise_keys=[(r'^module\.', '')]):
        if '://' not in filename:
            check_checkpoint_file(filename, fix='copy it again, or resume from an earlier checkpoint')
        checkpoint = _load_checkpoint(filename, map_location=map_location)
        model = _unwrap(self.model)
        if strict:  # before the hooks: EMAHook loads the same weights into its copy of the model
            check_state_fits(model, checkpoint, filename, revise_keys, self.cfg)
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        _load_checkpoint_to_model(model, checkpoint, strict, revise_keys=revise_keys)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint

    def _maybe_compile(self, target: str) -> None:
        options = self.cfg.get('compile', None)
        if options is None or options is False:
            return
        backbone = getattr(_unwrap(self.model), 'backbone', None)
        if backbone is None:
            return super()._maybe_compile(target)
        if options is True:
            options = {}
        if not isinstance(options, dict):
            raise TypeError(f'compile: expected True, False or torch.compile keyword arguments (a dict, e.g. '
                            f'compile=dict(backend="inductor", mode="max-autotune")), got {options!r}.')
        backbone.compile(**options)
        self.logger.info(f'{type(backbone).__name__} compiled with torch.compile({dict(options)}); the first '
                         'iterations (and the first validation, in eval mode) compile and are slow.')


@RUNNERS.register_module()
class StrictTestRunner(StrictRunner):
    """:class:`StrictRunner` that writes its config into the run's log folder, not over the work dir's."""

    @master_only
    def dump_config(self) -> None:
        name = osp.basename(self.cfg.filename) if self.cfg.filename else f'{self.timestamp}.py'
        self.cfg.dump(osp.join(self.log_dir, name))


def build_runner(cfg: Config, test: bool = False) -> Runner:
    """The config's own ``runner_type`` when it names one, else :class:`StrictRunner` (:class:`StrictTestRunner`
    with ``test=True``)."""
    if 'runner_type' not in cfg:
        cfg.runner_type = 'StrictTestRunner' if test else 'StrictRunner'
    return RUNNERS.build(cfg)
