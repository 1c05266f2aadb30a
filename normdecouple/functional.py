r"""Functional L1 and L∞ batch normalization: the single dispatch point every layer goes through.

``l1_batch_norm`` and ``linf_batch_norm`` mirror :func:`torch.nn.functional.batch_norm`: in training they
normalise with the batch statistics and update the running statistics in place; otherwise they apply torch's
BatchNorm eval formula with the running statistics.

References: arXiv:1803.01814
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from ._constants import L1_SCALE, topk_constant
from ._torch_backend import LpBatchNormFunction, differentiable_batch_norm
from .stats import Norm, can_read_on_host

__all__ = ["l1_batch_norm", "linf_batch_norm", "topk_constant", "L1_SCALE", "BACKENDS", "NORMS"]

#: Accepted values of ``backend``.
BACKENDS = ("auto", "torch", "triton")
#: Accepted values of ``norm`` in the converters and layers (the values of :class:`~normdecouple.stats.Norm`).
NORMS = tuple(norm.value for norm in Norm)

_nonfinite_warned = False


def validate_backend(backend: str) -> str:
    """Check ``backend`` and return it.

    Raises:
        ValueError: for an unknown backend, or ``"triton"`` when Triton cannot be imported (naming the
            fallbacks ``"auto"`` and ``"torch"``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not _triton_available():
        raise ValueError(
            "backend='triton' needs the optional dependency Triton, which cannot be imported here "
            "(pip install 'normdecouple[triton]'); use backend='auto' (Triton on CUDA tensors when it is "
            "available, else the PyTorch path) or backend='torch'"
        )
    return backend


_triton_importable: bool | None = None


def _triton_available() -> bool:
    """Whether Triton can be imported; tried on first need only, so `import normdecouple` does not pay for it."""
    global _triton_importable
    if _triton_importable is None:
        # A plain module-level cache rather than functools.lru_cache: dynamo reads it as a constant.
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_importable = False
        else:
            _triton_importable = True
    return _triton_importable


def select_function(input: Tensor, backend: str) -> type[torch.autograd.Function]:
    """The autograd Function that computes training-mode batch norm for ``input`` with ``backend``.

    ``"torch"``: the PyTorch path. ``"auto"``: the Triton kernels for CUDA tensors when Triton is importable,
    else the PyTorch path. ``"triton"``: the Triton kernels, on CUDA tensors, or on CPU tensors when Triton's
    interpreter is on (``TRITON_INTERPRET=1``, set before Triton is imported; how the kernels are tested).
    """
    if backend == "torch" or (backend == "auto" and not (input.is_cuda and _triton_available())):
        return LpBatchNormFunction
    if backend == "triton" and not input.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"backend='triton' runs on CUDA tensors, got a tensor on {input.device} (CPU tensors need "
            "Triton's interpreter, TRITON_INTERPRET=1 set before Triton is imported); use backend='auto' "
            "or backend='torch' for this device"
        )
    from ._triton import TritonLpBatchNormFunction

    return TritonLpBatchNormFunction


def validate_k(k: int) -> int:
    """Check the top-k count of the L∞ scale."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int (how many of the largest |x - mean| are averaged), got {k!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1 (k=1 is the plain maximum of |x - mean|), got k={k}")
    return k


def _sizes(input: Tensor) -> tuple[int, int, int]:
    """(N, C, spatial) of ``input`` as ints (spatial: the product of the sizes after C, 1 for none).

    While ``torch.jit.trace`` records, the items of a shape are traced tensors, and a Python condition on them
    bakes the example's sizes into the trace with a warning; ``Size.numel()`` stays an int.
    """
    size = input.shape
    return size[:1].numel(), size[1:2].numel(), size[2:].numel()


def verify_batch_size(input: Tensor) -> None:
    batch, _, spatial = _sizes(input)
    if batch * spatial == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


def check_input(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                 bias: Tensor | None) -> None:
    """torch's own errors (type and text) for an input dtype or channel count that batch norm cannot take."""
    if not input.is_floating_point():
        # torch's kernel names the dtype in its own words ("batch_norm" not implemented for 'Long'); a
        # two-value call raises exactly that error (an empty input would skip the dtype dispatch).
        torch.nn.functional.batch_norm(input.new_zeros(2, 1, device="cpu"), None, None, training=True)
    channels = _sizes(input)[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None and t.shape.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")


def needs_differentiable_path(input: Tensor, weight: Tensor | None, bias: Tensor | None = None) -> bool:
    """Inputs that an autograd.Function with a hand-written backward cannot serve: ``torch.func`` transforms
    (their wrapped tensors) and forward-mode AD (dual tensors); :func:`differentiable_batch_norm` does.
    Under ``torch.compile`` the Function is traced (and differentiated) by the compiler itself.

    Also ``torch.jit.trace``: it would record the Function as a call back into Python (a graph that
    ``torch.jit.save`` refuses), while the differentiable form is recorded as torch ops whose sizes follow the
    input, so the traced graph is exact for every batch size and saves like torch's BatchNorm's.
    """
    if torch.compiler.is_compiling():
        return False
    if torch.jit.is_tracing():
        return True
    tensors = [t for t in (input, weight, bias) if t is not None]
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return True
    if torch.autograd.forward_ad._current_level >= 0:
        return any(torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_scale: Tensor,
    count: int | Tensor,
    momentum: float,
) -> None:
    """The one place running statistics change: ``new = (1 - momentum) * old + momentum * batch``.

    ``running_var`` follows the variance-equivalent ``s^2 * n / (n - 1)``, with ``count`` (n) an int, or an
    integer tensor where ``torch.jit.trace`` records it. A channel whose batch statistics are not finite keeps
    its old values, and a warning is issued once per process: at once for CPU tensors, a few calls later for
    CUDA tensors (:class:`DeferredNonfiniteCount`: no host synchronisation).
    """
    with torch.no_grad():
        dtype = running_mean.dtype
        mean = batch_mean.to(dtype)
        scale = batch_scale.to(dtype)
        # n / (n - 1) in float64. Under torch.jit.trace, n is a traced integer tensor (so that the traced model
        # follows its batch size), whose true division would round to float32; a float64 0-dim tensor then
        # multiplies exactly as the Python float of eager mode does.
        bessel = count.double() / (count - 1) if isinstance(count, Tensor) else count / (count - 1)
        var = scale * scale * bessel
        finite = torch.isfinite(mean) & torch.isfinite(var)
        running_mean.copy_(torch.where(finite, torch.lerp(running_mean, mean, momentum), running_mean))
        running_var.copy_(torch.where(finite, torch.lerp(running_var, var, momentum), running_var))
        # The check needs the value on the host; traced graphs (compile, export, meta and fake tensors,
        # torch.func) and CUDA graph capture skip the warning, not the protection.
        if _nonfinite_warned or not can_read_on_host(finite):
            return
        if finite.is_cuda:
            if torch.cuda.is_current_stream_capturing():
                return
            monitor = _nonfinite_monitors.get(finite.device)
            if monitor is None:
                monitor = _nonfinite_monitors[finite.device] = DeferredNonfiniteCount(finite.device)
            bad = monitor.add(finite)
        else:
            bad = int((~finite).sum())
        if bad:
            _warn_nonfinite(bad)


def _warn_nonfinite(bad: int) -> None:
    global _nonfinite_warned
    _nonfinite_warned = True
    warnings.warn(
        f"normdecouple batch norm: the batch statistics of {bad} channel(s) are not finite "
        "(overflow or NaN input); their running statistics were left unchanged. "
        "This warning is shown once.",
        RuntimeWarning,
        stacklevel=5,
    )


class DeferredNonfiniteCount:
    """The count of non-finite channels of a device, read on the host only once the device has produced it.

    Reading a CUDA value on the host (``bool(t)``, ``.item()``) waits for every queued kernel: once per batch
    norm call that drains the stream and forbids CUDA-graph capture. Instead each call adds its count to a
    device counter (one asynchronous kernel) and, when the previous snapshot's event has completed, reads that
    snapshot from pinned host memory and takes a new one (an asynchronous copy and an event). So the warning
    comes a few calls after the batch that caused it, never at the cost of a synchronisation, and no batch is
    missed (the counter is cumulative).

    Args:
        device: the device of the statistics.
        make_event: the event type (``torch.cuda.Event``); tests pass a stand-in to run it on the CPU.
        pin: allocate the host snapshot in pinned memory (needed for an asynchronous copy from CUDA).
    """

    def __init__(self, device: torch.device, make_event=None, pin: bool = True) -> None:
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.host = torch.zeros((), dtype=torch.int64, pin_memory=pin)
        self.make_event = make_event if make_event is not None else torch.cuda.Event
        self.event = None

    def add(self, finite: Tensor) -> int:
        """Adds the non-finite channels of ``finite``; returns the count of the last snapshot the device has
        completed (0 while none has)."""
        self.count.add_((~finite).sum())
        seen = 0
        if self.event is None or self.event.query():
            if self.event is not None:
                seen = int(self.host)
            self.host.copy_(self.count, non_blocking=True)
            self.event = self.make_event()
            self.event.record()
        return seen


#: One deferred counter per CUDA device.
_nonfinite_monitors: dict[torch.device, DeferredNonfiniteCount] = {}


def check_arguments(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                    weight: Tensor | None, bias: Tensor | None, training: bool, eps: float, backend: str) -> None:
    """Every check of a batch-norm call that does not depend on the norm, in torch's order and words."""
    validate_backend(backend)
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    check_input(input, running_mean, running_var, weight, bias)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (both tensors or both None)")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def training_count(input: Tensor, norm: Norm, k: int) -> int:
    """n, the values per channel of a training batch (0 for an empty one), after the checks that need it."""
    verify_batch_size(input)
    batch, channels, spatial = _sizes(input)
    count = batch * spatial if channels else 0
    if norm is Norm.LINF and 0 < count < k:
        raise ValueError(
            f"linf_batch_norm: k={k} exceeds the n={count} values per channel of this batch "
            f"(input size {tuple(input.shape)}); use k <= {count} or a larger batch"
        )
    return count


def lp_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    norm: Norm,
    k: int,
    low_precision: bool,
    backend: str,
) -> Tensor:
    """The batch norm of :func:`l1_batch_norm` / :func:`linf_batch_norm` with the norm as an argument
    (a :class:`~normdecouple.stats.Norm`): checks, empty batches, backend dispatch, running statistics.

    Every argument is required (the two public functions hold the defaults); shared with the fused
    BatchNorm + activation layers, which take the same path wherever they cannot save memory.
    """
    check_arguments(input, running_mean, running_var, weight, bias, training, eps, backend)
    if not training:
        if running_mean is None:
            raise ValueError(
                "running_mean and running_var are required when training=False; pass training=True to "
                "normalise with the batch statistics"
            )
        stat_dtype = running_mean.dtype
        w = None if weight is None else weight.to(stat_dtype)
        b = None if bias is None else bias.to(stat_dtype)
        return torch.nn.functional.batch_norm(input, running_mean, running_var, w, b, False, 0.0, eps)
    count = training_count(input, norm, k)
    if count == 0:
        # torch's behaviour: the (empty) output, the running statistics untouched.
        return _empty_output(input, weight, bias)
    if needs_differentiable_path(input, weight, bias):
        y, batch_mean, batch_scale = differentiable_batch_norm(input, weight, bias, eps, norm, k)
    else:
        y, batch_mean, batch_scale = select_function(input, backend).apply(
            input, weight, bias, eps, norm, k, low_precision
        )
    if running_mean is not None:
        if torch.jit.is_tracing():
            # Recorded from the input's sizes, so that a traced model's running_var follows its batch size.
            count = input.numel() // input.shape[1]
        update_running_stats(running_mean, running_var, batch_mean, batch_scale, count, momentum)
    return y


def _empty_output(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The output for a batch without values: empty, but in the autograd graph of input, weight and bias
    (whose gradients are then zeros, as torch's)."""
    y = input.clone()
    if weight is not None:
        y = y * weight.to(input.dtype).view([1, -1] + [1] * (input.dim() - 2))
    if bias is not None:
        y = y + bias.to(input.dtype).view([1, -1] + [1] * (input.dim() - 2))
    return y


def l1_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    low_precision: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""L1 batch normalization, mirroring :func:`torch.nn.functional.batch_norm`.

    .. math::

        \mu = \tfrac1n \sum_i x_i,\quad s = \sqrt{\tfrac{\pi}{2}}\;\tfrac1n \sum_i |x_i - \mu|,\quad
        y = \frac{x - \mu}{\sqrt{s^2 + \epsilon}}\,\gamma + \beta

    per channel over the ``n = N * spatial`` values. In training the running statistics (if given) are
    updated in place: ``running_mean`` towards ``mu`` and ``running_var`` towards the variance-equivalent
    ``s^2 n / (n - 1)``; channels whose batch statistics are not finite are left unchanged (with a warning,
    once). With ``training=False`` it is exactly torch's BatchNorm eval.

    Args:
        input: ``(N, C, *)`` tensor, contiguous or channels_last.
        running_mean: ``(C,)`` running mean or ``None``; kept at least float32.
        running_var: ``(C,)`` running variance or ``None``.
        weight: ``(C,)`` scale gamma or ``None``. Default: ``None``.
        bias: ``(C,)`` shift beta or ``None``. Default: ``None``.
        training: use and update batch statistics. Default: ``False``.
        momentum: running-average factor. Default: ``0.1``.
        eps: added to ``s^2``. Default: ``1e-5``.
        low_precision: compute the statistics in the input's dtype (fp16/bf16) without upcasting: a pairwise
            mean of means, no squares. Default: ``False`` (statistics accumulated in float32).
        backend: ``"auto"`` (the Triton kernels for CUDA tensors when Triton is importable, else the PyTorch
            path), ``"torch"`` or ``"triton"``. Default: ``"auto"``.

    Returns:
        The normalised tensor, same shape, dtype and memory format as ``input``.

    Raises:
        ValueError: for an input with fewer than 2 dimensions, one value per channel in training, a
            non-positive ``eps`` in training, missing running statistics in eval, or an unknown ``backend``.

    Example::

        >>> import torch
        >>> from normdecouple.functional import l1_batch_norm
        >>> x = torch.randn(8, 3, 4, 4)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = l1_batch_norm(x, rm, rv, training=True)
        >>> y.shape
        torch.Size([8, 3, 4, 4])

    References: arXiv:1803.01814
    """
    return lp_batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, Norm.L1, 1, low_precision, backend
    )


def linf_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    k: int = 1,
    low_precision: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""L∞ (top-k) batch normalization, mirroring :func:`torch.nn.functional.batch_norm`.

    .. math::

        s = \frac{1}{c(n, k)}\;\frac1k \sum_{j=1}^{k} |x - \mu|_{(n-j+1)},\qquad
        y = \frac{x - \mu}{\sqrt{s^2 + \epsilon}}\,\gamma + \beta

    where ``|x - mu|_(n-j+1)`` is the j-th largest absolute deviation of the channel and ``c(n, k)``
    (:func:`topk_constant`) the expected mean of the k largest of n absolute standard normal values, so that
    ``s`` estimates the batch's standard deviation for Gaussian input. Running statistics as in
    :func:`l1_batch_norm`. In the backward, the gradient of the scale flows into the k largest |x - mu|; values
    tied at the k-th place share it evenly.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps, low_precision, backend:
            as in :func:`l1_batch_norm`.
        k: how many of the largest ``|x - mu|`` are averaged; ``k=1`` is the plain maximum. Must not exceed
            the number of values per channel in training. Default: ``1``.

    Returns:
        The normalised tensor, same shape, dtype and memory format as ``input``.

    Raises:
        ValueError: as :func:`l1_batch_norm`, and for ``k < 1`` or ``k`` larger than the values per channel.
        TypeError: if ``k`` is not an int.

    Example::

        >>> import torch
        >>> from normdecouple.functional import linf_batch_norm
        >>> x = torch.randn(8, 3, 4, 4)
        >>> y = linf_batch_norm(x, None, None, training=True, k=4)
        >>> y.shape
        torch.Size([8, 3, 4, 4])

    References: arXiv:1803.01814
    """
    validate_k(k)
    return lp_batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, Norm.LINF, k, low_precision, backend
    )
