"""Host launchers of the Triton batch-norm kernels: they execute the plans of :mod:`.plan`.

Each launcher takes and returns plain tensors and never touches running statistics (those are updated by
``normdecouple.functional.update_running_stats``, the one shared function). What runs is decided by
:func:`.plan.plan_forward` / :func:`.plan.plan_backward` from shapes, strides and dtypes alone (cached), so a
launch reads nothing back from the device: host constants travel as kernel arguments, never as tensors
built per call, and every launch runs under the input's CUDA device.

References: arXiv:1803.01814
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
from torch import Tensor

from ..stats import Norm, hypot_eps, pairwise_mean
from . import act_kernels, kernels
from .plan import (
    GPU_CONFIG,
    INTERPRETER_CONFIG,
    MAX_KERNEL_K,
    TL_DTYPES,
    HostTopk,
    Launch,
    Plan,
    Ref,
    Spec,
    TileConfig,
    plan_backward,
    plan_forward,
)

__all__ = ["TileConfig", "tile_config", "forward", "backward", "execute", "device_guard", "MAX_KERNEL_K",
           "TL_DTYPES"]

_MODULES = {"kernels": kernels, "act_kernels": act_kernels}


def is_interpreter() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``, read when the kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _gpu_config(index: int) -> TileConfig:
    return GPU_CONFIG.for_device(torch.cuda.get_device_properties(index).multi_processor_count)


def tile_config(device: torch.device) -> TileConfig:
    """The tile sizes for tensors on ``device``."""
    if device.type != "cuda" or is_interpreter():
        return INTERPRETER_CONFIG
    return _gpu_config(device.index if device.index is not None else torch.cuda.current_device())


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """The context every launch runs in: Triton launches on the *current* CUDA device (and its current
    stream), so a tensor on cuda:1 while cuda:0 is current needs cuda:1 made current first."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _allocate_like(t: Tensor) -> Tensor:
    """An output: ``torch.empty_like(t)``, the layout the plans (and the custom ops' fake kernels) assume."""
    return torch.empty_like(t)


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, fill: int | None) -> Tensor:
    """A plan buffer (contiguous)."""
    if fill is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, fill, dtype=dtype, device=device)


def execute(plan: Plan, tensors: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Run ``plan`` on ``tensors`` (its inputs and outputs by name): copies, buffers, then the launches.

    Returns ``tensors`` with the plan's buffers added (and its copied inputs replaced by their copies).
    """
    for name in plan.copies:
        source = tensors[name]
        tensors[name] = torch.empty_like(tensors[plan.like], dtype=source.dtype).copy_(source)
    for buf in plan.buffers:
        tensors[buf.name] = _allocate(buf.shape, buf.dtype, device, buf.fill)
    with device_guard(device):
        for step in plan.steps:
            if isinstance(step, Launch):
                kernel = getattr(_MODULES[step.module], step.kernel)
                args = {name: tensors[v.name] if isinstance(v, Ref) else v for name, v in step.args}
                kernel[step.grid](**args, **dict(step.constexprs), num_warps=step.num_warps, enable_fp_fusion=True)
            else:
                _host_topk(step, tensors)
    return tensors


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, norm: Norm, k: int,
            low_precision: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode L1/L∞ batch norm forward.

    Args:
        x: ``(N, C, *)`` input on a CUDA device (or the CPU under ``TRITON_INTERPRET=1``), fp16, bf16, fp32
            or fp64, in any layout: read in place with its own strides (copied once only when its batch and
            spatial dims cannot be addressed as two strided groups, e.g. a cropped spatial dim).
        weight: ``(C,)`` contiguous or None.
        bias: ``(C,)`` contiguous or None.
        eps: added to ``s^2``.
        norm: :class:`~normdecouple.stats.Norm`.
        k: top-k count of the L∞ scale (ignored for L1).
        low_precision: statistics in the input dtype (fp16/bf16 only).

    Returns:
        ``(y, mean, scale, inv_std, threshold, sign_sum)``: y like ``torch.empty_like(x)``; per-channel mu, s and
        1/s_e in float32 (float64 for float64 input); t, the k-th largest |d| (L∞, else empty); and the int32
        sum of sign(d) (L1, else empty).
    """
    device = x.device
    plan = plan_forward(Spec.of(x), None if weight is None else weight.dtype, None if bias is None else bias.dtype,
                        norm, k, low_precision, eps, tile_config(device))
    y = _allocate_like(x)
    tensors = {"x": x, "y": y}
    if weight is not None:
        tensors["w"] = weight
    if bias is not None:
        tensors["b"] = bias
    t = execute(plan, tensors, device)
    return y, t["mean"], t["scale"], t["inv_std"], t["threshold"], t["sign_sum"]


def _host_topk(step: HostTopk, t: dict[str, Tensor]) -> None:
    """L∞ statistics with ``torch.topk``, in the kernels' arithmetic (see kernels.py)."""
    x, mean, weight = t["x"], t["mean"], t.get("w")
    c = x.shape[1]
    per_channel = x.transpose(0, 1).reshape(c, -1)
    if step.lowp:
        abs_dev = (per_channel - mean.to(x.dtype)[:, None]).abs()
        top = abs_dev.topk(step.k, dim=1).values
        s = pairwise_mean(top) * step.factor
        s_e = hypot_eps(s, math.sqrt(step.eps))
        gamma = torch.ones_like(s) if weight is None else weight.to(x.dtype)
        t["mult"].copy_(gamma / s_e)
        t["inv_std"].copy_(1.0 / s_e.to(t["inv_std"].dtype))
    else:
        abs_dev = (per_channel.to(mean.dtype) - mean[:, None]).abs()
        top = abs_dev.topk(step.k, dim=1).values
        s = top.mean(dim=1) * step.factor
        t["inv_std"].copy_(torch.rsqrt(s * s + step.eps))
        t["mult"].copy_(t["inv_std"] if weight is None else weight.to(mean.dtype) * t["inv_std"])
    t["scale"].copy_(s)
    t["threshold"].copy_(top[:, -1])


def backward(grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, scale: Tensor, inv_std: Tensor,
             threshold: Tensor, sign_sum: Tensor, norm: Norm, k: int,
             low_precision: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`forward`: one reduction pass, one elementwise pass (or one persistent kernel).

    Args:
        grad_y: gradient of y, any layout (read in place, or copied once into x's layout when its memory order
            differs from x's, which would make its loads scattered).
        x, weight, norm, k, low_precision: as given to :func:`forward`.
        mean, scale, inv_std, threshold, sign_sum: the per-channel tensors :func:`forward` returned.

    Returns:
        ``(grad_x, sum(dy * x_hat), sum(dy))``: grad_x like ``torch.empty_like(x)`` in x's dtype, the other two
        per channel in the accumulator dtype (the weight and bias gradients before casting).
    """
    device = x.device
    plan = plan_backward(Spec.of(x), Spec.of(grad_y), None if weight is None else weight.dtype, norm, k,
                         low_precision, tile_config(device))
    dx = _allocate_like(x)
    tensors = {"x": x, "dy": grad_y, "dx": dx, "mean": mean, "scale": scale, "inv_std": inv_std,
               "threshold": threshold, "sign_sum": sign_sum}
    if weight is not None:
        tensors["w"] = weight
    t = execute(plan, tensors, device)
    return dx, t["sum_dy_xhat"], t["sum_dy"]
