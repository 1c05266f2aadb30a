"""The state transplant shared by the converters (:mod:`normdecouple.convert`) and the fusion (:mod:`normdecouple.fuse`).

A converter builds each new layer empty on the meta device (:func:`blank_like`) and moves the source's state into
it (:func:`transplant_state`) without touching the source, so that a conversion can be planned completely before
anything in the model changes. It lives below both users so that the dependency runs one way:
``convert -> fuse -> _transplant``.

References: arXiv:1803.01814
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from .batchnorm import LpBatchNorm

__all__ = ["blank_like", "transplant_state", "has_bias", "TRANSIENT_MARK"]

# Constructor arguments of our layer families: set by the converter from its own arguments, so a source of
# ours does not carry them over as extra attributes (a reverted torch layer has no `backend`).
_OWN_ATTRIBUTES = frozenset({"low_precision", "backend", "k", "process_group", "_unsync_class",
                             # the fused BatchNorm + activation layers' (normdecouple.batchnorm_act, fuse)
                             "activation", "negative_slope", "double_backward", "_fused_from"})
# The hook dictionaries every nn.Module owns; moved as objects so the user's handles still remove the hooks.
_HOOK_ATTRIBUTES = tuple(name for name in vars(nn.Module()) if "hook" in name)
#: An instance attribute whose value has this attribute set to True belongs to the source object only and is
#: not carried over (the forward that ``normdecouple.fuse`` gives a layer refers to that very layer).
TRANSIENT_MARK = "_normdecouple_transient"


def has_bias(module: _BatchNorm) -> bool:
    """Whether ``module`` has a ``bias`` (a Parameter, or a parametrization of one)."""
    return parametrize.is_parametrized(module, "bias") or module._parameters.get("bias") is not None


def blank_like(cls: type[_BatchNorm], source: _BatchNorm, **kwargs: Any) -> _BatchNorm:
    """A ``cls`` layer on the meta device with ``source``'s hyperparameters, to receive its state."""
    return cls(source.num_features, source.eps, source.momentum, source.affine, source.track_running_stats,
               device="meta", bias=has_bias(source) if source.affine else True, **kwargs)


def transplant_state(source: _BatchNorm, target: _BatchNorm, stats_dtype: torch.dtype | None = None) -> _BatchNorm:
    """Move everything ``source`` holds into ``target`` (built by :func:`blank_like`) without changing ``source``.

    Kept as the same objects: the ``Parameter`` objects (optimizers keep them; ``requires_grad``, device and
    dtype with them), the buffers, the hook dictionaries and the ``parametrizations`` ModuleDict. Kept as
    values: ``training`` and every instance attribute of the source that ``target`` lacks (``qconfig``, a
    subclass's own attributes), except, for a source of ours, our constructor arguments
    (:data:`_OWN_ATTRIBUTES`), and values marked :data:`TRANSIENT_MARK`; attributes both have (the
    hyperparameters) are ``target``'s. The children are the source's; the caller replaces the converted ones.
    ``running_mean``/``running_var`` are cast to ``stats_dtype`` when given (new tensors; the source keeps its
    own).
    """
    if parametrize.is_parametrized(source):
        # register_parametrization gives target the Parametrized class and the properties; the placeholder
        # list is then replaced by the source's own (same parametrizations, same `original`).
        for name in source.parametrizations:
            if name in target._parameters or name in target._buffers:
                parametrize.register_parametrization(target, name, nn.Identity(), unsafe=True)
    state = vars(source)
    mine = vars(target)
    mine["_parameters"] = OrderedDict(source._parameters)
    buffers = OrderedDict(source._buffers)
    for name in ("running_mean", "running_var"):
        stat = buffers.get(name)
        if stat is not None and stats_dtype is not None and stat.dtype != stats_dtype:
            buffers[name] = stat.to(stats_dtype)
    mine["_buffers"] = buffers
    mine["_non_persistent_buffers_set"] = set(source._non_persistent_buffers_set)
    mine["_modules"] = OrderedDict(source._modules)
    for name in _HOOK_ATTRIBUTES:
        if name in state:
            mine[name] = state[name]
    skip = _OWN_ATTRIBUTES if isinstance(source, LpBatchNorm) else frozenset()
    for name, value in state.items():
        if name not in mine and name not in skip and getattr(value, TRANSIENT_MARK, False) is not True:
            mine[name] = value
    mine["training"] = source.training
    return target
