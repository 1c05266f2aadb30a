r"""L1/L∞ BatchNorm fused with its activation (and an optional residual): half the activation memory.

``L1BatchNormAct{1,2,3}d`` and ``LinfBatchNormAct{1,2,3}d`` compute ``act(BN(x) + residual)`` and keep for the
backward only the output (which the next layer keeps anyway), per-channel vectors and, for L1, one bit per
value (for L∞, the top-k positions); see :mod:`normdecouple._act_backend` for the derivation. They are
:class:`normdecouple.LpBatchNorm` layers (same parameters, buffers, ``state_dict`` keys, running statistics and
eval as ``L1BatchNorm2d``...) but deliberately not subclasses of ``L1BatchNorm2d``, so that the converters and
the tools that match BatchNorm classes exactly (``torch.fx.experimental.optimization.fuse``,
``torch.ao.quantization.fuse_modules``) do not take one for a plain BatchNorm.

**Folding into a convolution.** They are still instances of torch's ``_BatchNorm``, and
``torch.nn.utils.fusion.fuse_conv_bn_eval(conv, layer)`` accepts any such instance and reads only its running
statistics and affine parameters: given a fused layer, it folds the normalisation and silently drops the
activation and the residual (torch's helper cannot be intercepted). Deploy through
:func:`normdecouple.revert_batchnorm` first (torch's BatchNorm and the activation module back, identical eval
outputs), then fold: ``torch.fx.experimental.optimization.fuse(revert_batchnorm(model.eval()))``.

**In-place ops after the layer.** The output is saved for the backward, as torch's ReLU saves its output: an
in-place op on it (``y += r``, ``relu_``) makes the backward raise torch's "modified by an inplace operation"
error, as after ``BatchNorm2d`` + ``ReLU``. With ``activation="identity"`` this differs from a plain BatchNorm,
after which in-place ops are allowed: pass the residual as ``residual=`` instead.

References: arXiv:1803.01814
"""

from __future__ import annotations

import string
from typing import Any

import torch
from torch import Tensor

from ._act_backend import lp_batch_norm_act, validate_activation
from .batchnorm import INPUT_DIMS, LpBatchNorm, LinfMixin
from .stats import Norm

__all__ = [
    "L1BatchNormAct1d",
    "L1BatchNormAct2d",
    "L1BatchNormAct3d",
    "LinfBatchNormAct1d",
    "LinfBatchNormAct2d",
    "LinfBatchNormAct3d",
]


class _LpBatchNormAct(LpBatchNorm):
    """The fused layers' base: ``LpBatchNorm`` plus the activation, ``negative_slope`` and ``double_backward``."""

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
        activation: str = "relu",
        negative_slope: float = 0.01,
        double_backward: bool = False,
        low_precision: bool = False,
        backend: str = "auto",
    ) -> None:
        self.activation, self.negative_slope = validate_activation(activation, negative_slope)
        if not isinstance(double_backward, bool):
            raise TypeError(f"double_backward must be a bool, got {double_backward!r}")
        self.double_backward = double_backward
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
            low_precision=low_precision, backend=backend,
        )

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return _act_layer_forward(self, input, residual)

    def _forward_impl(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return batch_norm_act_forward(self, input, residual, self.activation, self.negative_slope,
                                      self.double_backward)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        if self.double_backward:
            text += ", double_backward=True"
        return text


def batch_norm_act_forward(layer: LpBatchNorm, input: Tensor, residual: Tensor | None, activation: str,
                           negative_slope: float, keep_input: bool) -> Tensor:
    """``act(BN(input) + residual)`` with ``layer``'s norm, statistics and settings, as the fused layers compute it.

    Shared by the fused layers and by the forwards that :mod:`normdecouple.fuse` rewrites, which call it with a
    plain ``L1BatchNorm2d``/``LinfBatchNorm2d`` (or a converted subclass proven to be one) and the activation
    that follows it in the model: ``layer`` is counted in ``num_batches_tracked`` and its running statistics
    updated exactly as its own forward does.
    """
    layer._check_input_dim(input)
    exponential_average_factor = layer._momentum_factor()
    bn_training = layer.training or (layer.running_mean is None and layer.running_var is None)
    track = not layer.training or layer.track_running_stats
    return lp_batch_norm_act(
        input,
        residual,
        layer.running_mean if track else None,
        layer.running_var if track else None,
        layer.weight,
        layer.bias,
        bn_training,
        exponential_average_factor,
        layer.eps,
        layer.norm,
        getattr(layer, "k", 1),
        layer.low_precision,
        layer.backend,
        activation,
        negative_slope,
        keep_input,
    )


def _act_layer_forward(layer: _LpBatchNormAct, input: Tensor, residual: Tensor | None) -> Tensor:
    """The fused layers' forward as one call that ``torch.fx.symbolic_trace`` records whole (``fx.wrap``-ed)."""
    return layer._forward_impl(input, residual)


torch.fx.wrap("_act_layer_forward")


class _L1Act(_LpBatchNormAct):
    norm = Norm.L1


class _LinfAct(LinfMixin, _LpBatchNormAct):
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
        activation: str = "relu",
        negative_slope: float = 0.01,
        double_backward: bool = False,
        low_precision: bool = False,
        backend: str = "auto",
    ) -> None:
        self._init_k(k)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
            activation=activation, negative_slope=negative_slope, double_backward=double_backward,
            low_precision=low_precision, backend=backend,
        )


_DOC = r"""${title} fused with its activation: ``act(BN(input) + residual)``, saving the output only.

    The layer of :class:`normdecouple.${plain}` (same constructor, parameters, buffers, ``state_dict`` keys,
    running statistics, eval), followed by an optional residual addition and the activation:

    .. math::

        y = \operatorname{act}\Big(\frac{x - \mu}{\sqrt{s^2 + \epsilon}} \cdot \gamma + \beta + r\Big)

    with ${scale}. Outputs, input, residual and parameter gradients equal those of ``${plain}`` followed by
    ``+ residual`` and the activation; eval mode is torch's BatchNorm eval, then ``+ residual`` and the
    activation.

    Saved for the backward (training): the output ``y`` (the next layer's saved input: the same storage), the
    residual if given (the block's input, which its first convolution saves: the same storage), per-channel
    vectors, and ${saved}. Never the input, except for channels whose gradient could not be recovered from
    the output exactly enough: channels with ``|beta| + max|residual| > G |gamma|`` (G = 4 in fp16/bf16, 1024
    in float32/64: :func:`normdecouple._act_backend.max_gain`; so every gamma = 0 channel) and ${own}.
    They keep their input values and get the unfused layer's gradients.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias, low_precision, backend:
            as :class:`normdecouple.${plain}`.${extra}
        activation: ``"relu"``, ``"leaky_relu"`` or ``"identity"``. Default: ``"relu"``.
        negative_slope: slope of ``"leaky_relu"`` for negative inputs, positive. Default: ``0.01``.
        double_backward: also save the input so that ``create_graph=True`` (gradient penalties,
            ``gradgradcheck``) works, without the memory saving. Without it, ``create_graph=True`` through the
            layer is a ``RuntimeError`` naming this fix. Default: ``False``.

    The output is saved for the backward (as torch's ReLU saves its output): an in-place op on it makes the
    backward raise torch's "modified by an inplace operation" error; add a residual through ``residual=``.
    ``torch.nn.utils.fusion.fuse_conv_bn_eval`` reads only this layer's statistics and would drop the
    activation and the residual: fold after :func:`normdecouple.revert_batchnorm` instead.

    Where the plain layer would run Triton (``backend="triton"``, or ``"auto"`` on CUDA), the fused layer runs
    the Triton batch-norm forward, then a Triton epilogue (residual, activation, L1 sign bits) and, for L1, a
    Triton input-gradient kernel; ``low_precision=True`` and layouts other than contiguous/channels_last use
    the PyTorch path. ``torch.compile``, ``torch.func``, forward-mode AD, meta and fake tensors run the unfused
    layer and the activation (same values, no memory saving); so does ``torch.jit.trace``, which records it as
    torch ops.

    Shape:
        - Input: ``${shape}``; residual: ``None`` or the input's shape and dtype
        - Output: same shape (and memory format) as the input

    Raises:
        TypeError: if ``double_backward`` or ``low_precision`` is not a bool, ``negative_slope`` not a
            number${k_type}; in ``forward``, for a ``residual`` that is not a tensor, or
            has another dtype or device than the input.
        ValueError: for an unknown ``activation`` or ``backend``, a ``"leaky_relu"`` slope that is not positive
            and finite; in ``forward``, the wrong input rank, a ``residual`` of another shape (no
            broadcasting), or one value per channel in training.
        RuntimeError: in the backward with ``create_graph=True`` unless ``double_backward=True`` (the message
            names the fixes).

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> layer = nd.${name}(16${example_kw})
        >>> x = ${example_input}
        >>> layer(x, residual=torch.randn_like(x)).shape
        torch.Size(${example_shape})

    References: arXiv:1803.01814
"""


def _doc(name: str, dim: int, linf: bool) -> str:
    shape, _, _, example_input, example_shape = INPUT_DIMS[dim]
    return string.Template(_DOC).substitute(
        title="L∞ (top-k) batch normalization" if linf else "L1 batch normalization",
        plain=f"LinfBatchNorm{dim}d" if linf else f"L1BatchNorm{dim}d",
        scale=(r":math:`s = \operatorname{mean}(\text{top-}k\ |d|) / c(n, k)`" if linf
               else r":math:`s = \sqrt{\pi/2}\,\operatorname{mean}|d|`"),
        saved=("the positions and signs of the k largest ``|x - mean|`` per channel" if linf
               else "one bit per value (the sign of ``x - mean``, packed 8 per byte)"),
        own=("channels with a value tied at the k-th largest ``|x - mean|``" if linf
             else "channels with a value exactly at the mean (its sign, 0, has no bit)"),
        extra="\n        k: as :class:`normdecouple.LinfBatchNorm2d`. Default: ``1``." if linf else "",
        k_type=", or ``k`` not an int" if linf else "",
        shape=shape,
        name=name,
        example_kw=", k=4" if linf else "",
        example_input=example_input,
        example_shape=example_shape,
    )


class L1BatchNormAct1d(_L1Act):
    __doc__ = _doc("L1BatchNormAct1d", 1, False)
    _dim = 1


class L1BatchNormAct2d(_L1Act):
    __doc__ = _doc("L1BatchNormAct2d", 2, False)
    _dim = 2


class L1BatchNormAct3d(_L1Act):
    __doc__ = _doc("L1BatchNormAct3d", 3, False)
    _dim = 3


class LinfBatchNormAct1d(_LinfAct):
    __doc__ = _doc("LinfBatchNormAct1d", 1, True)
    _dim = 1


class LinfBatchNormAct2d(_LinfAct):
    __doc__ = _doc("LinfBatchNormAct2d", 2, True)
    _dim = 2


class LinfBatchNormAct3d(_LinfAct):
    __doc__ = _doc("LinfBatchNormAct3d", 3, True)
    _dim = 3
