"""What the callbacks share: the ``sync_batchnorm=True`` guard, choosing the weights (``params="auto"``).

References: arXiv:1803.01814
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.layer_sync import LayerSync, TorchSyncBatchNorm
from torch import Tensor, nn

from normdecouple import LpBatchNorm
from normdecouple.scale_invariance import ScaleInvarianceTrace, scale_invariant_parameters_as_set

__all__: list[str] = []


def our_layers(module: nn.Module) -> list[str]:
    """Qualified names of the normdecouple batch-norm layers in ``module``."""
    return [name for name, m in module.named_modules() if isinstance(m, LpBatchNorm)]


def check_no_torch_layer_sync(trainer: pl.Trainer, pl_module: pl.LightningModule, owner: str) -> None:
    """Raises if ``Trainer(sync_batchnorm=True)`` would turn our layers into torch's (L2) ``SyncBatchNorm``.

    torch's converter accepts any ``_BatchNorm`` subclass, ours included, and silently replaces the L1/L∞ scale by
    the standard deviation; that is a different model, so it must not happen quietly.
    """
    if type(_layer_sync(trainer)) is not TorchSyncBatchNorm:
        return
    found = our_layers(pl_module)
    if found:
        shown = ", ".join(found[:8]) + (f", ... ({len(found)} in all)" if len(found) > 8 else "")
        raise ValueError(
            f"{owner}: Trainer(sync_batchnorm=True) would convert the normdecouple L1/L-infinity batch norms "
            f"[{shown}] into torch's SyncBatchNorm, which normalises by the standard deviation (L2). Use "
            "Trainer(plugins=[SyncLpBatchNorm()]) from lightning_callbacks instead of sync_batchnorm=True"
        )


def _layer_sync(trainer: pl.Trainer) -> LayerSync | None:
    """The Trainer's ``LayerSync`` plugin (``sync_batchnorm=True`` is a ``TorchSyncBatchNorm``), or ``None``.

    Lightning has no public accessor for it (pytorch_lightning 2.x): neither ``Trainer`` nor ``Strategy`` exposes
    the plugin, and the strategy holds it only on parallel strategies. This is the one place that reads Lightning's
    private attributes, so that a Lightning upgrade that renames them is fixed here; ``getattr`` with a default
    keeps a rename from crashing (the guard then lets the run through, as with no plugin).
    """
    # The connector holds the user's choice on every strategy; the strategy holds it only on parallel ones.
    layer_sync = getattr(getattr(trainer, "_accelerator_connector", None), "_layer_sync", None)
    return layer_sync if layer_sync is not None else strategy_layer_sync(trainer)


def strategy_layer_sync(trainer: pl.Trainer) -> LayerSync | None:
    """The ``LayerSync`` plugin the strategy applies when fitting (parallel strategies hold it), or ``None``."""
    return getattr(trainer.strategy, "_layer_sync", None)


def should_log_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this training step's metrics (``self.log``, ``LearningRateMonitor``).

    Lightning's rule (``log_every_n_steps``): the step whose count of optimizer steps taken before it, plus one,
    is a multiple of ``log_every_n_steps``, or any step once the Trainer should stop; never with
    ``log_every_n_steps=0``. Read from the logger connector, as ``LearningRateMonitor`` does; recomputed from
    :func:`logging_step` if a Lightning upgrade renames it.
    """
    flag = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", None)
    if isinstance(flag, bool):
        return flag
    every = trainer.log_every_n_steps
    return bool(every) and ((logging_step(trainer) + 1) % every == 0 or trainer.should_stop)


def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning's loggers write a training batch's metrics at: the number of batches that stepped the
    optimizers before it (once per batch, whatever the number of optimizers); ``global_step`` if renamed."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def check_params(params: Any, owner: str) -> str | list[str]:
    """``"auto"`` or a list of parameter names; anything else is a clear error at construction."""
    if isinstance(params, str):
        if params != "auto":
            raise ValueError(
                f"{owner}: expected params to be 'auto' or an iterable of parameter names (got {params!r}); "
                "wrap a single name in a list"
            )
        return params
    if isinstance(params, Tensor) or not isinstance(params, Iterable):
        raise TypeError(
            f"{owner}: expected params to be 'auto' or an iterable of parameter names (got {type(params).__name__})"
        )
    names = list(params)
    bad = [n for n in names if not isinstance(n, str)]
    if bad or not names:
        raise TypeError(
            f"{owner}: expected params to be a non-empty iterable of parameter names, as in "
            f"pl_module.named_parameters() (got {[type(b).__name__ for b in bad] or 'an empty iterable'}); "
            "names rather than Parameter objects, because the callback outlives the module's conversion and "
            "is saved in checkpoints"
        )
    return names


def has_forward(pl_module: pl.LightningModule) -> bool:
    """Whether the module defines ``forward`` (many call ``self.net(x)`` in ``training_step`` instead)."""
    return type(pl_module).forward is not pl.LightningModule.forward


def default_inputs(batch: Any) -> tuple | None:
    """The model's positional inputs in a training batch: the batch itself if a tensor, else its first item if a
    tensor; ``None`` when the batch does not say (the weights are then found by tracing the training step)."""
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return (batch[0],)
    return None


def example_inputs(pl_module: pl.LightningModule) -> tuple:
    """``pl_module.example_input_array`` as ``forward``'s positional inputs, on the module's device."""
    array = pl_module.example_input_array
    if isinstance(array, dict):
        raise TypeError(
            "params='auto' passes example_input_array to forward positionally; a dict of keyword inputs is "
            "not supported: pass params= explicitly"
        )
    inputs = tuple(array) if isinstance(array, (tuple, list)) else (array,)
    # example_input_array lives on the CPU in the module's construction dtype; the batch would be moved.
    return _to_device(inputs, pl_module)


def _to_device(inputs: tuple, pl_module: pl.LightningModule) -> tuple:
    return tuple(x.to(pl_module.device) if isinstance(x, Tensor) else x for x in inputs)


def scale_invariant_names(trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: tuple) -> list[str]:
    """:func:`normdecouple.scale_invariant_parameters` run the way Lightning runs the training step.

    The precision plugin converts the inputs and wraps the forward, so "16-true"/"bf16-true" models get inputs of
    their dtype and "bf16-mixed" runs under autocast, exactly as in training. Every module is analysed in its
    ``training`` mode as set, as Lightning runs the step (it does not call ``train()`` when fitting starts):
    a BatchNorm frozen in eval mode is an affine map, not a normalisation, and a module left wholly in eval
    trains in eval. The traced step (a module without ``forward``) sees the same modes.
    """
    precision = trainer.precision_plugin
    inputs = precision.convert_input(inputs)
    with precision.forward_context():
        return scale_invariant_parameters_as_set(pl_module, *inputs)


def split_by_optimizer(
    names: list[str], pl_module: pl.LightningModule, optimizers: list[torch.optim.Optimizer], owner: str,
    strict: bool,
) -> list[list[str]]:
    """For each optimizer, the names among ``names`` of the parameters it holds.

    ``strict``: every name must exist in the module and be held by some optimizer (explicit ``params``).
    """
    by_name = dict(pl_module.named_parameters())
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(
            f"{owner}: expected parameter names of the LightningModule (got {unknown}); see "
            f"pl_module.named_parameters(), e.g. {list(by_name)[:5]}"
        )
    held = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in optimizers]
    split = [[n for n in names if id(by_name[n]) in ids] for ids in held]
    orphans = [n for n in names if not any(id(by_name[n]) in ids for ids in held)]
    if strict and orphans:
        raise ValueError(
            f"{owner}: expected every chosen parameter to be in one of the Trainer's optimizers (got {orphans}, "
            "in none); add them to configure_optimizers or leave them out of params"
        )
    if not any(split):
        raise ValueError(
            f"{owner}(params='auto') found no scale-invariant weight in the Trainer's optimizers (scale-invariant "
            f"in the module: {names}); a weight qualifies when its output channels reach the output only through "
            "a batch norm. Pass params= explicitly, or remove the callback"
        )
    return split


class _StepTrace:
    """One trace of the first training step per Trainer, shared by every callback that needs it."""

    def __init__(self) -> None:
        self.trace: ScaleInvarianceTrace | None = None
        self.names: list[str] | None = None

    def start(self, pl_module: pl.LightningModule, owner: str) -> None:
        if self.trace is not None or self.names is not None:
            return
        try:
            self.trace = ScaleInvarianceTrace(pl_module)
        except TypeError as error:
            raise ValueError(
                f"{owner}(params='auto') finds the weights by following the first training step, which is not "
                f"possible here ({error}). Set pl_module.example_input_array (with a forward), or pass params= "
                "explicitly"
            ) from error
        self.trace.start()

    def finish(self, loss: Any) -> list[str] | None:
        if self.trace is not None and self.trace.active:
            self.trace.stop()
            self.names = self.trace.invariant_parameters(loss)
        return self.names

    def abort(self) -> None:
        if self.trace is not None:
            self.trace.stop()
        self.trace = None


_STEP_TRACES: weakref.WeakKeyDictionary[pl.Trainer, _StepTrace] = weakref.WeakKeyDictionary()


class AutoWeights:
    """Finds the weights of ``params="auto"`` for one callback, in the modes the training step runs in.

    Found at the start of the first training batch, after every hook that runs before the first step (the
    module's own ``on_fit_start``, ``on_train_start``, ``on_train_epoch_start``, where users freeze BatchNorms or
    set other modes), so that each module is analysed in the ``training`` mode the step runs it in:

    - a ``forward`` and ``example_input_array``: an analysis forward on that array whose side effects are undone;
    - a ``forward`` and a batch whose inputs are known (``batch_to_inputs``, a tensor, or a tuple starting with
      one): the same on the batch's inputs;
    - otherwise (no ``forward``, or a batch it cannot read): by tracing the real first training step as it runs,
      from ``on_train_batch_start`` to the loss handed to ``on_before_backward`` (no extra forward, nothing run
      twice). The trace is shared by every callback of the Trainer.

    The forward paths analyse the modules' modes as set, as the traced step does (Lightning does not call
    ``train()`` when fitting starts), so both paths report the same weights.
    """

    def __init__(self, owner: str, batch_to_inputs: Callable[[Any], tuple] | None) -> None:
        if batch_to_inputs is not None and not callable(batch_to_inputs):
            raise TypeError(
                f"{owner}: expected batch_to_inputs to be a callable from a batch to forward's positional "
                f"arguments, or None (got {type(batch_to_inputs).__name__})"
            )
        self.owner = owner
        self.batch_to_inputs = batch_to_inputs

    def reset(self, trainer: pl.Trainer) -> None:
        shared = _STEP_TRACES.pop(trainer, None)
        if shared is not None:
            shared.abort()

    def at_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str] | None:
        """Checks the settings; the weights are found at the first batch (``None``), in the step's modes."""
        if self.batch_to_inputs is not None and not has_forward(pl_module):
            raise ValueError(
                f"{self.owner}: batch_to_inputs gives forward's inputs, but {type(pl_module).__name__} has no "
                "forward; drop batch_to_inputs (the weights are then found from the first training step), set "
                "example_input_array with a forward, or pass params= explicitly"
            )
        return None

    def at_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> list[str] | None:
        if has_forward(pl_module):
            if pl_module.example_input_array is not None:
                return scale_invariant_names(trainer, pl_module, example_inputs(pl_module))
            inputs = tuple(self.batch_to_inputs(batch)) if self.batch_to_inputs is not None else default_inputs(batch)
            if inputs is not None:
                return scale_invariant_names(trainer, pl_module, inputs)
        _STEP_TRACES.setdefault(trainer, _StepTrace()).start(pl_module, self.owner)
        return None

    def at_before_backward(self, trainer: pl.Trainer, loss: Any) -> list[str] | None:
        shared = _STEP_TRACES.get(trainer)
        return shared.finish(loss) if shared is not None else None

    def at_batch_end(self, trainer: pl.Trainer) -> None:
        # A step that returned no loss (training_step skipped the batch) ran no backward: try the next batch.
        shared = _STEP_TRACES.get(trainer)
        if shared is not None and shared.names is None:
            shared.abort()
