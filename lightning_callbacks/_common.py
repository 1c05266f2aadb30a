"""What the callbacks share: the ``sync_batchnorm=True`` guard, example inputs, choosing the weights.

References: arXiv:1803.01814
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from torch import Tensor, nn

import normdecouple
from normdecouple import LpBatchNorm

__all__: list[str] = []


def our_layers(module: nn.Module) -> list[str]:
    """Qualified names of the normdecouple batch-norm layers in ``module``."""
    return [name for name, m in module.named_modules() if isinstance(m, LpBatchNorm)]


def check_no_torch_layer_sync(trainer: pl.Trainer, pl_module: pl.LightningModule, owner: str) -> None:
    """Raises if ``Trainer(sync_batchnorm=True)`` would turn our layers into torch's (L2) ``SyncBatchNorm``.

    torch's converter accepts any ``_BatchNorm`` subclass, ours included, and silently replaces the L1/L∞ scale by
    the standard deviation; that is a different model, so it must not happen quietly.
    """
    # The connector holds the user's choice on every strategy; the strategy holds it only on parallel ones.
    layer_sync = getattr(getattr(trainer, "_accelerator_connector", None), "_layer_sync", None)
    if layer_sync is None:
        layer_sync = getattr(trainer.strategy, "_layer_sync", None)
    if type(layer_sync) is not TorchSyncBatchNorm:
        return
    found = our_layers(pl_module)
    if found:
        shown = ", ".join(found[:8]) + (f", ... ({len(found)} in all)" if len(found) > 8 else "")
        raise ValueError(
            f"{owner}: Trainer(sync_batchnorm=True) would convert the normdecouple L1/L-infinity batch norms "
            f"[{shown}] into torch's SyncBatchNorm, which normalises by the standard deviation (L2). Use "
            "Trainer(plugins=[SyncLpBatchNorm()]) from lightning_callbacks instead of sync_batchnorm=True"
        )


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


def check_positive(value: Any, what: str, owner: str, remedy: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{owner}: expected {what} to be a positive finite number (got {value!r}); {remedy}")
    return float(value)


def default_inputs(batch: Any) -> tuple:
    """The model's positional inputs in a training batch: the batch itself if a tensor, else its first item."""
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return (batch[0],)
    raise TypeError(
        f"params='auto' runs the model once on the first training batch, but cannot tell its inputs in a batch of "
        f"type {type(batch).__name__}; set pl_module.example_input_array, pass batch_to_inputs= (a function "
        "from a batch to the tuple of forward's positional arguments), or pass params= explicitly"
    )


def example_inputs(pl_module: pl.LightningModule, batch: Any, batch_to_inputs: Any) -> tuple | None:
    """``pl_module.example_input_array`` when set (as Lightning passes it to forward), else the batch's inputs.

    Returns ``None`` when there is neither yet (the caller waits for the first batch).
    """
    array = pl_module.example_input_array
    if array is not None:
        if isinstance(array, dict):
            raise TypeError(
                "params='auto' passes example_input_array to forward positionally; a dict of keyword inputs is "
                "not supported: pass params= explicitly"
            )
        inputs = tuple(array) if isinstance(array, (tuple, list)) else (array,)
        # example_input_array lives on the CPU in the module's construction dtype; the batch would be moved.
        return _to_device(inputs, pl_module)
    if batch is None:
        return None
    return tuple(batch_to_inputs(batch)) if batch_to_inputs is not None else default_inputs(batch)


def _to_device(inputs: tuple, pl_module: pl.LightningModule) -> tuple:
    return tuple(x.to(pl_module.device) if isinstance(x, Tensor) else x for x in inputs)


def scale_invariant_names(trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: tuple) -> list[str]:
    """:func:`normdecouple.scale_invariant_parameters` run the way Lightning runs the training step.

    The precision plugin converts the inputs and wraps the forward, so "16-true"/"bf16-true" models get inputs of
    their dtype and "bf16-mixed" runs under autocast, exactly as in training.
    """
    precision = trainer.precision_plugin
    inputs = precision.convert_input(inputs)
    with precision.forward_context():
        return normdecouple.scale_invariant_parameters(pl_module, *inputs)


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
