"""Converters between torch's BatchNorm layers and normdecouple's L1/L∞ layers.

Both walk the module tree like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: the converted layer takes
over the very same ``Parameter`` objects (so an optimizer built before the conversion still holds them) and
buffers, and the root itself may be replaced, which is why the new root is returned.

References: arXiv:1803.01814
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import batchnorm as bn
from .functional import NORMS, validate_backend, validate_k

__all__ = ["convert_batchnorm", "revert_batchnorm"]

_TORCH_TO_DIM: dict[type[nn.Module], int] = {
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    nn.SyncBatchNorm: 0,
}
_OURS: dict[tuple[str, int], type[bn.LpBatchNorm]] = {
    ("l1", 1): bn.L1BatchNorm1d,
    ("l1", 2): bn.L1BatchNorm2d,
    ("l1", 3): bn.L1BatchNorm3d,
    ("l1", 0): bn.L1BatchNormNd,
    ("linf", 1): bn.LinfBatchNorm1d,
    ("linf", 2): bn.LinfBatchNorm2d,
    ("linf", 3): bn.LinfBatchNorm3d,
    ("linf", 0): bn.LinfBatchNormNd,
}
_BACK: dict[int, type[_BatchNorm]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _source_dim(module: nn.Module) -> int | None:
    if isinstance(module, bn.LpBatchNorm):
        return None
    for cls, dim in _TORCH_TO_DIM.items():
        if isinstance(module, cls):
            return dim
    return None


def _move_state(source: _BatchNorm, target: _BatchNorm, stats_dtype: torch.dtype | None) -> None:
    """Give ``target`` the parameters, buffers and mode of ``source`` (the same objects where dtypes allow)."""
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    for name in ("running_mean", "running_var"):
        stat = getattr(source, name)
        if stat is not None and stats_dtype is not None and stat.dtype != stats_dtype:
            stat = stat.to(stats_dtype)
        setattr(target, name, stat)
    target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig


def _widened(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def convert_batchnorm(
    module: nn.Module,
    norm: str = "l1",
    *,
    low_precision: bool = False,
    backend: str = "auto",
    **norm_kwargs: Any,
) -> nn.Module:
    """Replace every torch BatchNorm (1d, 2d, 3d and ``SyncBatchNorm``) in ``module`` by an L1 or L∞ layer.

    The new layers take over the same ``weight``/``bias`` Parameter objects (``requires_grad`` and optimizer
    references kept), the running statistics (widened to float32 if they were fp16/bf16, see the layers'
    docs), ``num_batches_tracked``, the ``training`` flag, ``eps``, ``momentum``, ``affine``,
    ``track_running_stats``, device and dtype. ``BatchNorm{1,2,3}d`` become ``L1BatchNorm{1,2,3}d`` /
    ``LinfBatchNorm{1,2,3}d``; ``SyncBatchNorm``, which accepts any rank, becomes ``L1BatchNormNd`` /
    ``LinfBatchNormNd`` (unsynchronised). Layers that are already normdecouple layers are left alone.

    Args:
        module: the model, or a single BatchNorm layer.
        norm: ``"l1"`` or ``"linf"``. Default: ``"l1"``.
        low_precision: passed to every new layer. Default: ``False``.
        backend: passed to every new layer. Default: ``"auto"``.
        **norm_kwargs: extra arguments of the norm's layers: ``k`` for ``"linf"``.

    Returns:
        The converted module: ``module`` itself, changed in place, or a new layer if ``module`` was a BatchNorm.

    Raises:
        ValueError: for an unknown ``norm`` or ``backend``, or a bad ``k``.
        TypeError: for keyword arguments the chosen norm does not take.

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        >>> model = nd.convert_batchnorm(model, norm="linf", k=4)
        >>> type(model[1]).__name__
        'LinfBatchNorm2d'

    References: arXiv:1803.01814
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} (L1 or top-k L-infinity batch norm), got {norm!r}")
    validate_backend(backend)
    allowed = {"k"} if norm == "linf" else set()
    unexpected = sorted(set(norm_kwargs) - allowed)
    if unexpected:
        raise TypeError(
            f"convert_batchnorm(norm={norm!r}) got unexpected keyword arguments {unexpected}; "
            f"norm='l1' takes none, norm='linf' takes k"
        )
    if norm == "linf":
        validate_k(norm_kwargs.get("k", 1))
    return _convert(module, norm, low_precision, backend, norm_kwargs)


def _convert(module: nn.Module, norm: str, low_precision: bool, backend: str, norm_kwargs: dict) -> nn.Module:
    output = module
    dim = _source_dim(module)
    if dim is not None:
        output = _OURS[(norm, dim)](
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device="meta",
            bias=module.bias is not None if module.affine else True,
            low_precision=low_precision,
            backend=backend,
            **norm_kwargs,
        )
        stats_dtype = None if module.running_mean is None else _widened(module.running_mean.dtype)
        _move_state(module, output, stats_dtype)
    for name, child in module.named_children():
        output.add_module(name, _convert(child, norm, low_precision, backend, norm_kwargs))
    return output


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every normdecouple L1/L∞ layer in ``module`` by torch's BatchNorm, with identical eval outputs.

    Our running statistics are torch's (``running_var`` is variance-equivalent), so eval mode is unchanged and
    the model exports wherever torch's BatchNorm does (TorchScript, ONNX, folding into convolutions).
    ``L1BatchNorm{1,2,3}d``/``LinfBatchNorm{1,2,3}d`` become ``BatchNorm{1,2,3}d``; the any-rank layers made from
    ``SyncBatchNorm`` become ``SyncBatchNorm`` again. Parameters are the same objects; running statistics
    take the parameters' dtype when that is narrower (torch's BatchNorm needs them to match in half precision).

    Args:
        module: the model, or a single normdecouple layer.

    Returns:
        The reverted module: ``module`` itself, changed in place, or a new layer if ``module`` was one of ours.

    Raises:
        ValueError: if a running statistic does not fit the parameters' half-precision dtype (revert a
            ``.float()`` copy of the model instead).

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> model = nd.convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
        >>> type(nd.revert_batchnorm(model)[0]).__name__
        'BatchNorm1d'

    References: arXiv:1803.01814
    """
    output = module
    if isinstance(module, bn.LpBatchNorm):
        kwargs: dict[str, Any] = {"bias": module.bias is not None if module.affine else True}
        cls = _BACK.get(module._dim, nn.SyncBatchNorm)
        stats_dtype = None
        if module.affine and module.running_mean is not None and module.weight.dtype != module.running_mean.dtype:
            stats_dtype = module.weight.dtype
        if stats_dtype is not None and stats_dtype.itemsize < 4:
            for stat in (module.running_mean, module.running_var):
                if not torch.isfinite(stat.to(stats_dtype)).all():
                    raise ValueError(
                        f"revert_batchnorm: a running statistic of {module!r} does not fit in {stats_dtype}, "
                        "which torch's BatchNorm needs beside parameters of that dtype; revert a float32 copy "
                        "(model.float()) instead"
                    )
        output = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device="meta",
            **kwargs,
        )
        _move_state(module, output, stats_dtype)
    for name, child in module.named_children():
        output.add_module(name, revert_batchnorm(child))
    return output
