r"""L1 and L∞ BatchNorm layers: drop-in replacements for ``torch.nn.BatchNorm{1,2,3}d``.

One private base owns what differs from torch (the norm, ``low_precision``, ``backend``, running statistics
kept at least float32); the six public classes only add the input-rank check and, for L∞, ``k``.

References: arXiv:1803.01814
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as F_nd
from .stats import Norm, accumulate_dtype

__all__ = [
    "LpBatchNorm",
    "L1BatchNorm1d",
    "L1BatchNorm2d",
    "L1BatchNorm3d",
    "LinfBatchNorm1d",
    "LinfBatchNorm2d",
    "LinfBatchNorm3d",
    "L1BatchNormNd",
    "LinfBatchNormNd",
]


class LpBatchNorm(_BatchNorm):
    """Base class of every normdecouple batch norm layer (L1, L∞, synchronised, fused with an activation).

    torch's ``_BatchNorm`` with another scale. Public so that other packages (the Lightning callbacks, user
    code) recognise our layers with ``isinstance(module, normdecouple.LpBatchNorm)``; not meant to be built
    directly: use ``L1BatchNorm2d``, ``LinfBatchNorm2d``, ... .

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias: torch's
            :class:`torch.nn.BatchNorm2d` arguments, with its defaults.
        low_precision: compute the statistics in the input dtype (fp16/bf16) without upcasting. Default:
            ``False``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``. Default: ``"auto"``.

    Raises:
        TypeError: if ``low_precision`` is not a bool.
        ValueError: for an unknown ``backend``, ``"triton"`` when Triton cannot be imported, or the wrong input
            rank in ``forward`` (``expected 4D input (got 3D input)``, torch's wording).
    """

    norm: Norm
    _dim: int = 0

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        low_precision: bool = False,
        backend: str = "auto",
    ) -> None:
        if not isinstance(low_precision, bool):
            raise TypeError(f"low_precision must be a bool, got {low_precision!r}")
        F_nd.validate_backend(backend)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        self.low_precision = low_precision
        self.backend = backend
        self._widen_running_stats()

    def _widen_running_stats(self) -> None:
        """Running statistics never narrower than float32 (:func:`~normdecouple.stats.accumulate_dtype`)."""
        for name in ("running_mean", "running_var"):
            stat = getattr(self, name)
            if stat is not None and stat.is_floating_point() and stat.dtype != accumulate_dtype(stat.dtype):
                setattr(self, name, stat.to(accumulate_dtype(stat.dtype)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # load_state_dict(..., assign=True) puts the checkpoint's own tensors in place, fp16 ones included.
        self._widen_running_stats()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LpBatchNorm:
        # Running statistics are never narrower than float32: `.half()` would overflow a variance-equivalent
        # running_var as soon as activations pass 256, exactly the regime the paper is about.
        stats = {id(t) for t in (self.running_mean, self.running_var) if t is not None}

        def keep_wide(t: Tensor) -> Tensor:
            out = fn(t)
            if id(t) in stats and out.is_floating_point() and out.dtype != accumulate_dtype(out.dtype):
                return t.to(device=out.device, dtype=accumulate_dtype(out.dtype))
            return out

        return super()._apply(keep_wide, recurse)

    def _check_input_dim(self, input: Tensor) -> None:
        _, rank_text, ranks, _, _ = INPUT_DIMS[self._dim]
        if input.dim() not in ranks:
            raise ValueError(f"expected {rank_text} input (got {input.dim()}D input)")

    def _functional_kwargs(self) -> dict[str, Any]:
        return {"low_precision": self.low_precision, "backend": self.backend}

    def _momentum_factor(self) -> float:
        """torch's running-average factor for this call; counts the batch in ``num_batches_tracked``."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def forward(self, input: Tensor) -> Tensor:
        return _layer_forward(self, input)

    def _forward_impl(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        exponential_average_factor = self._momentum_factor()
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        fn = F_nd.l1_batch_norm if self.norm is Norm.L1 else F_nd.linf_batch_norm
        return fn(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
            **self._functional_kwargs(),
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", low_precision={self.low_precision}, backend={self.backend!r}"

    def __prepare_scriptable__(self) -> LpBatchNorm:
        """Refuses ``torch.jit.script``, which calls this on every module first, with the way to export.

        TorchScript cannot compile our layers (their forward dispatches to Python autograd Functions and
        optional Triton kernels). The documented export path is :func:`normdecouple.revert_batchnorm`, which
        gives torch's BatchNorm with identical eval outputs; ``torch.jit.trace`` and ``torch.compile`` take
        the unsynchronised layers as they are.

        Raises:
            RuntimeError: always (the error ``torch.jit.script`` raises for what it cannot compile).
        """
        raise RuntimeError(
            f"torch.jit.script cannot compile normdecouple's {type(self).__name__} ({self.extra_repr()}): its "
            "forward runs Python autograd Functions. To export a trained model, convert its layers back to "
            "torch's BatchNorm first, which keeps eval outputs identical: "
            "model = normdecouple.revert_batchnorm(model.eval()); torch.jit.script(model)"
        )


def _layer_forward(layer: LpBatchNorm, input: Tensor) -> Tensor:
    """The layers' forward as one call that ``torch.fx.symbolic_trace`` records whole (it is ``fx.wrap``-ed).

    The traced graph calls it with the layer itself (a ``get_attr`` node), so the mode, the running statistics
    and ``num_batches_tracked`` are read and updated when the graph runs, exactly as calling the layer does.
    """
    return layer._forward_impl(input)


torch.fx.wrap("_layer_forward")


class LinfMixin:
    """Adds ``k``, the number of largest |x - mean| averaged by the L∞ scale."""

    norm = Norm.LINF

    def _init_k(self, k: int) -> None:
        self.k = F_nd.validate_k(k)

    def _functional_kwargs(self) -> dict[str, Any]:
        return {"k": self.k, **super()._functional_kwargs()}  # type: ignore[misc]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}"  # type: ignore[misc]


class L1BatchNormBase(LpBatchNorm):
    """The L1 layers' common class (the public layers add only their input ranks)."""

    norm = Norm.L1


class LinfBatchNormBase(LinfMixin, LpBatchNorm):
    """The L∞ layers' common class: the constructor with ``k`` (the public layers add only their input ranks)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        k: int = 1,
        low_precision: bool = False,
        backend: str = "auto",
    ) -> None:
        self._init_k(k)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            low_precision=low_precision,
            backend=backend,
        )


_SHAPE_NOTE = r"""
    The scale is computed per channel over the ``n = N * spatial`` values of the batch, with mean
    :math:`\mu` and deviations :math:`d = x - \mu`; the output in training is

    .. math::

        y = \frac{x - \mu}{\sqrt{s^2 + \epsilon}} \cdot \gamma + \beta

    Running statistics follow torch's rule ``new = (1 - momentum) * old + momentum * batch`` (a cumulative
    average with ``momentum=None``) with ``running_var`` tracking the variance-equivalent
    :math:`s^2 n / (n - 1)`, so eval mode is exactly :class:`torch.nn.BatchNorm${dim}d`'s eval and state dicts
    move between this layer and torch's in both directions. Running statistics are kept at least float32,
    also after ``.half()``; a batch whose statistics are not finite leaves them unchanged (with a warning, once).

    Args:
        num_features: ``C`` from an expected input of size ``${shape}``.
        eps: added to :math:`s^2` for numerical stability. Default: ``1e-5``.
        momentum: the running-average factor, or ``None`` for a cumulative average. Default: ``0.1``.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta). Default: ``True``.
        track_running_stats: keep running statistics (else batch statistics in eval too). Default: ``True``.
        device, dtype: factory arguments for the parameters and buffers.
        bias: with ``affine``, whether to learn ``bias`` (as torch's keyword). Default: ``True``.${extra}
        low_precision: compute the statistics in the input dtype (fp16/bf16) without upcasting: a pairwise
            mean of means, no squares. Default: ``False`` (float32 statistics, like cuDNN).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``. Default: ``"auto"``.

    Shape:
        - Input: ``${shape}``
        - Output: same shape (and memory format) as the input

    Raises:
        TypeError: if ``low_precision`` is not a bool${k_type}.
        ValueError: for the wrong input rank (``expected ${rank} input (got ...D input)``), one value per
            channel in training, or bad arguments.

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> layer = nd.${name}(${example_c}${example_kw})
        >>> layer(${example_input}).shape
        torch.Size(${example_shape})

    References: arXiv:1803.01814
"""

L1_FORMULA_DOC = r"""
    Here :math:`s = \sqrt{\pi/2}\,\operatorname{mean}|d|`, which estimates the standard deviation for
    Gaussian activations and needs no squares.
"""

LINF_FORMULA_DOC = r"""
    Here :math:`s = \operatorname{mean}(\text{top-}k\ |d|) / c(n, k)`, with :math:`c(n, k)` the expected mean
    of the k largest absolute values of n standard normal samples (computed exactly by numerical integration,
    :func:`normdecouple.functional.topk_constant`), so that :math:`s` estimates the batch's standard deviation
    for Gaussian activations (within 0.2% for n >= 16; below n = 16 a small k runs low, about 6% at n = 4,
    k = 1). Values tied at the k-th place share the scale's gradient evenly.
"""

K_ARG_DOC = """
        k: how many of the largest ``|x - mean|`` are averaged; ``k=1`` is the plain maximum. Default: ``1``."""

# dim -> (shape text, rank text, accepted ranks, example input, example output size); dim 0 accepts any rank
# >= 2, like torch.nn.SyncBatchNorm, whose conversions it receives.
INPUT_DIMS = {
    0: ("(N, C, *)", "at least 2D", tuple(range(2, 64)), "torch.randn(8, 16, 5, 5)", "[8, 16, 5, 5]"),
    1: ("(N, C) or (N, C, L)", "2D or 3D", (2, 3), "torch.randn(8, 16)", "[8, 16]"),
    2: ("(N, C, H, W)", "4D", (4,), "torch.randn(8, 16, 5, 5)", "[8, 16, 5, 5]"),
    3: ("(N, C, D, H, W)", "5D", (5,), "torch.randn(4, 16, 3, 5, 5)", "[4, 16, 3, 5, 5]"),
}


def _doc(title: str, name: str, dim: int, linf: bool) -> str:
    shape, rank, _, example_input, example_shape = INPUT_DIMS[dim]
    formula = LINF_FORMULA_DOC if linf else L1_FORMULA_DOC
    return (
        f"{title} over a {rank} input: a drop-in replacement for :class:`torch.nn.BatchNorm{dim}d`.\n"
        + formula
        + string.Template(_SHAPE_NOTE).substitute(
            dim=dim,
            shape=shape,
            rank=rank,
            extra=K_ARG_DOC if linf else "",
            k_type=" or ``k`` not an int" if linf else "",
            name=name,
            example_c="16",
            example_kw=", k=4" if linf else "",
            example_input=example_input,
            example_shape=example_shape,
        )
    )


class L1BatchNorm1d(L1BatchNormBase):
    __doc__ = _doc("L1 batch normalization", "L1BatchNorm1d", 1, False)
    _dim = 1


class L1BatchNorm2d(L1BatchNormBase):
    __doc__ = _doc("L1 batch normalization", "L1BatchNorm2d", 2, False)
    _dim = 2


class L1BatchNorm3d(L1BatchNormBase):
    __doc__ = _doc("L1 batch normalization", "L1BatchNorm3d", 3, False)
    _dim = 3


class L1BatchNormNd(L1BatchNormBase):
    __doc__ = _doc("L1 batch normalization", "L1BatchNormNd", 0, False).replace(
        ":class:`torch.nn.BatchNorm0d`", ":class:`torch.nn.SyncBatchNorm` (unsynchronised, any rank)"
    )
    _dim = 0


class LinfBatchNorm1d(LinfBatchNormBase):
    __doc__ = _doc("L∞ (top-k) batch normalization", "LinfBatchNorm1d", 1, True)
    _dim = 1


class LinfBatchNorm2d(LinfBatchNormBase):
    __doc__ = _doc("L∞ (top-k) batch normalization", "LinfBatchNorm2d", 2, True)
    _dim = 2


class LinfBatchNorm3d(LinfBatchNormBase):
    __doc__ = _doc("L∞ (top-k) batch normalization", "LinfBatchNorm3d", 3, True)
    _dim = 3


class LinfBatchNormNd(LinfBatchNormBase):
    __doc__ = _doc("L∞ (top-k) batch normalization", "LinfBatchNormNd", 0, True).replace(
        ":class:`torch.nn.BatchNorm0d`", ":class:`torch.nn.SyncBatchNorm` (unsynchronised, any rank)"
    )
    _dim = 0
