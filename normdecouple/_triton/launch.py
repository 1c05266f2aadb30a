"""Host launchers of the Triton batch-norm kernels: layouts, tile sizes, grids, and the kernel sequences.

Each launcher takes and returns plain tensors and never touches running statistics (those are updated by
``normdecouple.functional.update_running_stats``, the one shared function). Tile sizes are fixed per device
kind (:class:`TileConfig`); there is no ``@triton.autotune``, which the interpreter cannot run and which would
re-run kernels with side effects while timing them.

References: arXiv:1803.01814
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._constants import L1_SCALE, topk_constant
from ..stats import Norm, accumulate_dtype, computes_in_input_dtype, hypot_eps, pairwise_mean
from . import kernels

__all__ = ["TileConfig", "tile_config", "forward", "backward", "MAX_KERNEL_K"]

#: Largest k whose top-k the kernels keep in registers (next power of two of k candidates per row). Larger k,
#: a rare choice (the paper uses small k), take the top-k statistics from ``torch.topk`` on the host; the
#: normalising pass and the backward still run in Triton.
MAX_KERNEL_K = 64

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@dataclass(frozen=True)
class TileConfig:
    """Fixed tile sizes of one device kind (no autotuning: the interpreter cannot run it).

    Attributes:
        stream_elems: values per program and loop step in the streaming (2-D grid) kernels.
        channels_last_block_c: channels per tile when channels are contiguous (channels_last).
        fused_max_n: largest per-channel count handled by the persistent single-pass kernels.
        fused_elems: largest tile (channels x padded count) of the persistent kernels.
        target_programs: programs the 2-D grid aims for (enough to fill the device).
        finalize_block_c: channels per program of the per-channel finalising kernel.
        finalize_block_q: candidates (or partials) it reads per step.
        num_warps: warps per program.
    """

    stream_elems: int
    channels_last_block_c: int
    fused_max_n: int
    fused_elems: int
    target_programs: int
    finalize_block_c: int
    finalize_block_q: int
    num_warps: int

    @property
    def launch_options(self) -> dict:
        """Triton launch options. FMA contraction is allowed: it only touches the ACC arithmetic, since in low
        precision every product is rounded to the input dtype (a conversion) before it is added."""
        return {"num_warps": self.num_warps, "enable_fp_fusion": True}


# The interpreter runs every program as numpy calls: tiny tiles keep the tests fast and make small shapes
# span several blocks, splits and tree levels, so the looping code runs.
INTERPRETER_CONFIG = TileConfig(
    stream_elems=16, channels_last_block_c=4, fused_max_n=16, fused_elems=64, target_programs=6,
    finalize_block_c=4, finalize_block_q=16, num_warps=1,
)
# GPU: 2048 values of 4 bytes per program step is 16 registers per thread at 4 warps, wide enough for 128-bit
# loads; 4096-value persistent tiles stay in registers; ~4 programs per SM hide memory latency.
GPU_CONFIG = TileConfig(
    stream_elems=2048, channels_last_block_c=32, fused_max_n=4096, fused_elems=4096, target_programs=528,
    finalize_block_c=64, finalize_block_q=256, num_warps=4,
)


def is_interpreter() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``, read when the kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile_config(device: torch.device) -> TileConfig:
    """The tile sizes for tensors on ``device``."""
    if device.type != "cuda" or is_interpreter():
        return INTERPRETER_CONFIG
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return replace(GPU_CONFIG, target_programs=4 * sms)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@dataclass(frozen=True)
class _Layout:
    """The (A, C, B) addressing of a tensor: element (i, c) at c*stride_c + (i//inner)*stride_a + (i%inner)*stride_b."""

    inner: int
    stride_a: int
    stride_b: int
    stride_c: int


def _layout(t: Tensor) -> _Layout | None:
    """The (A, C, B) view of ``t`` without a copy, or None when its strides allow none.

    The non-channel dims (N, *spatial), in order and without size-1 dims, must merge into at most two groups
    of uniform stride: one group is a channels_last-like tensor (inner = 1, no division in the kernels), two are
    NCHW-like (inner = spatial size).
    """
    dims = [(t.shape[0], t.stride(0))] + [(t.shape[i], t.stride(i)) for i in range(2, t.dim())]
    groups: list[list[int]] = []
    for size, stride in dims:
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        return None
    if len(groups) <= 1:
        return _Layout(1, groups[0][1] if groups else 1, 1, t.stride(1))
    return _Layout(groups[1][0], groups[0][1], groups[1][1], t.stride(1))


def _kernel_input(t: Tensor) -> tuple[Tensor, _Layout]:
    layout = _layout(t)
    if layout is None:
        # Only exotic layouts (e.g. a cropped spatial dim) get here: one contiguous copy.
        t = t.contiguous()
        layout = _layout(t)
    return t, layout


def _like(t: Tensor, target: Tensor, layout: _Layout) -> Tensor:
    """``t`` with ``layout`` (a copy only when its strides differ from the kernel's)."""
    if _layout(t) == layout:
        return t
    return torch.empty_like(target).copy_(t)


def _output_for(x: Tensor, x_kernel: Tensor, layout: _Layout) -> tuple[Tensor, Tensor]:
    """(returned output, buffer the kernel writes): ``empty_like(x)``, as the fake implementation allocates."""
    out = torch.empty_like(x)
    return out, (out if _layout(out) == layout else torch.empty_like(x_kernel))


@dataclass(frozen=True)
class _Grid:
    block_c: int
    block_n: int
    c_tiles: int
    splits: int
    blocks_per_split: int


def _stream_grid(c: int, n: int, layout: _Layout, config: TileConfig, min_block_n: int = 1,
                 tree: bool = False) -> _Grid:
    """Tiles and splits of a streaming pass over ``n`` values per channel.

    A tile holds about ``config.stream_elems`` values: many channels by few values when channels are contiguous
    (coalesced loads along C), else one row of values (several rows when the channel is short). In SUM mode the
    splits are chosen to fill the device and each program loops over its blocks; in TREE mode (a level of the
    pairwise mean) every program reduces one block. Blocks never exceed next_pow2(n), so each tree level's
    block is a power of two <= the padded width, which keeps the levels one binary tree (see kernels.py).
    """
    width = _next_pow2(n)
    if layout.inner == 1 and layout.stride_c == 1:
        block_c = min(_next_pow2(c), config.channels_last_block_c)
        block_n = min(max(config.stream_elems // block_c, min_block_n), width)
    else:
        block_n = max(min(config.stream_elems, width), min_block_n)
        block_c = max(1, min(_next_pow2(c), config.stream_elems // block_n))
    c_tiles = triton.cdiv(c, block_c)
    n_blocks = triton.cdiv(n, block_n)
    if tree:
        return _Grid(block_c, block_n, c_tiles, n_blocks, 1)
    splits = min(n_blocks, max(1, triton.cdiv(config.target_programs, c_tiles)))
    per_split = triton.cdiv(n_blocks, splits)
    return _Grid(block_c, block_n, c_tiles, triton.cdiv(n_blocks, per_split), per_split)


def _fused_block_c(c: int, block_n: int, config: TileConfig) -> int:
    return max(1, min(_next_pow2(c), config.fused_elems // block_n))


def _forward_constants(dtype: torch.dtype, norm: Norm, n: int, k: int, eps: float, lowp: bool,
                       device: torch.device) -> Tensor:
    """[scale factor, eps, sqrt(eps) rounded to the input dtype, width / n, KPAD / k] in float64, from the host."""
    factor = L1_SCALE if norm is Norm.L1 else 1.0 / topk_constant(n, k)
    root_eps = math.sqrt(eps)
    if lowp:
        root_eps = float(torch.tensor(root_eps, dtype=torch.float64).to(dtype))
    return torch.tensor([factor, eps, root_eps, _next_pow2(n) / n, _next_pow2(k) / k], dtype=torch.float64,
                        device=device)


def _common(x: Tensor, low_precision: bool) -> tuple[bool, torch.dtype, tl.dtype, tl.dtype, bool]:
    """(statistics in the input dtype, accumulator dtype, Triton input and accumulator dtypes, 64-bit offsets)."""
    lowp = computes_in_input_dtype(x.dtype, low_precision)
    acc = accumulate_dtype(x.dtype)
    return lowp, acc, TL_DTYPES[x.dtype], TL_DTYPES[acc], x.numel() >= 2**31


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, norm: Norm, k: int,
            low_precision: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode L1/L∞ batch norm forward.

    Args:
        x: ``(N, C, *)`` input on a CUDA device (or the CPU under ``TRITON_INTERPRET=1``), fp16, bf16, fp32
            or fp64; contiguous or channels_last are read in place, other layouts are copied once.
        weight: ``(C,)`` or None.
        bias: ``(C,)`` or None.
        eps: added to ``s^2``.
        norm: :class:`~normdecouple.stats.Norm`.
        k: top-k count of the L∞ scale (ignored for L1).
        low_precision: statistics in the input dtype (fp16/bf16 only).

    Returns:
        ``(y, mean, scale, inv_std, threshold, sign_sum)``: y like ``torch.empty_like(x)``; per-channel mu, s and
        1/s_e in float32 (float64 for float64 input); t, the k-th largest |d| (L∞, else empty); and the int32
        sum of sign(d) (L1, else empty).
    """
    lowp, acc, dt, acc_tl, index_64 = _common(x, low_precision)
    c = x.shape[1]
    n = x.numel() // c
    l1 = norm is Norm.L1
    kpad = _next_pow2(k) if not l1 else 0
    device = x.device
    config = tile_config(device)
    consts = _forward_constants(x.dtype, norm, n, k, eps, lowp, device)
    xk, layout = _kernel_input(x)
    y, yk = _output_for(x, xk, layout)
    scale = torch.empty(c, dtype=acc, device=device)
    inv_std = torch.empty(c, dtype=acc, device=device)
    threshold = torch.empty(0 if l1 else c, dtype=acc, device=device)
    sign_sum = torch.empty(c if l1 else 0, dtype=torch.int32, device=device)
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    strides = (layout.inner, layout.stride_a, layout.stride_b, layout.stride_c)
    flags = dict(LOWP=lowp, HAS_W=weight is not None, DT=dt, ACC=acc_tl, **config.launch_options)
    if n <= config.fused_max_n:
        mean = torch.empty(c, dtype=acc, device=device)
        block_n = _next_pow2(n)
        block_c = _fused_block_c(c, block_n, config)
        kernels.forward_fused_kernel[(triton.cdiv(c, block_c),)](
            xk, yk, w, b, consts, mean, scale, inv_std, mean if l1 else threshold, sign_sum if l1 else mean,
            c, n, k, *strides,
            L1=l1, HAS_B=bias is not None, KPAD=max(kpad, 1), INDEX_64=index_64, BLOCK_C=block_c,
            BLOCK_N=block_n, **flags,
        )
    else:
        kernel_kpad = kpad if kpad <= MAX_KERNEL_K else 0
        first = _reduce_channels(xk, layout, c, n, config, lowp, dt, acc_tl, acc, index_64, consts,
                                 centered=None, kpad=kernel_kpad)
        mean = first.result
        mult = torch.empty(c, dtype=acc, device=device)
        fin_grid = (triton.cdiv(c, config.finalize_block_c),)
        if l1:
            dev = _reduce_channels(xk, layout, c, n, config, lowp, dt, acc_tl, acc, index_64, consts,
                                   centered=mean, kpad=0)
            kernels.forward_finalize_kernel[fin_grid](
                mean, dev.result, dev.signs, mean, w, consts, scale, inv_std, mult, mean, sign_sum,
                c, n, 1, dev.splits, dev.chunk,
                L1=True, KPAD=1, BLOCK_C=config.finalize_block_c,
                BLOCK_Q=min(_next_pow2(dev.splits), config.finalize_block_q), **flags,
            )
        elif kernel_kpad:
            count = first.splits * 2 * kpad
            kernels.forward_finalize_kernel[fin_grid](
                mean, mean, mean, first.candidates, w, consts, scale, inv_std, mult, threshold, mean,
                c, n, k, first.splits, first.chunk,
                L1=False, KPAD=kpad, BLOCK_C=config.finalize_block_c,
                BLOCK_Q=max(kpad, min(_next_pow2(count), config.finalize_block_q)), **flags,
            )
        else:
            _host_topk_statistics(xk, mean, weight, consts, k, lowp, x.dtype, scale, inv_std, mult, threshold)
        grid = _stream_grid(c, n, layout, config)
        kernels.normalize_kernel[(grid.c_tiles, grid.splits)](
            xk, yk, mean, mult, b, c, n, *strides, grid.blocks_per_split,
            LOWP=lowp, HAS_B=bias is not None, DT=dt, ACC=acc_tl, INDEX_64=index_64,
            BLOCK_C=grid.block_c, BLOCK_N=grid.block_n, **config.launch_options,
        )
    if yk is not y:
        y.copy_(yk)
    return y, mean, scale, inv_std, threshold, sign_sum


@dataclass
class _Reduced:
    result: Tensor  # (C,) finished per-channel value
    signs: Tensor | None  # (C, splits) int32 partial sign sums of the first level (centered)
    candidates: Tensor | None  # (C, splits, 2 * KPAD) of the first level
    splits: int  # splits of the first level
    chunk: int  # values per split of the first level


def _reduce_channels(xk: Tensor, layout: _Layout, c: int, n: int, config: TileConfig, lowp: bool, dt: tl.dtype,
                     acc_tl: tl.dtype, acc: torch.dtype, index_64: bool, consts: Tensor, centered: Tensor | None,
                     kpad: int) -> _Reduced:
    """Per-channel mean of x (or of |x - mu| when ``centered`` is mu) by levels of channel_reduce_kernel.

    Level 1 reads x over a 2-D grid (and, with ``kpad``, keeps the L∞ candidates); every further level reduces
    the previous level's (C, splits) partials, read as a (splits, C, 1) array, until one value per channel is left.
    """
    device = xk.device
    src, src_layout, count = xk, layout, n
    first: _Reduced | None = None
    while True:
        level_one = first is None
        grid = _stream_grid(c, count, src_layout, config, min_block_n=max(kpad, 1) if level_one else 1, tree=lowp)
        final = grid.splits == 1
        out = torch.empty((c, grid.splits), dtype=acc, device=device)
        use_center = centered is not None and level_one
        signs = torch.empty((c, grid.splits), dtype=torch.int32, device=device) if use_center else out
        level_kpad = kpad if level_one else 0
        cand = (torch.empty((c, grid.splits, 2 * kpad), dtype=acc, device=device) if level_kpad else out)
        kernels.channel_reduce_kernel[(grid.c_tiles, grid.splits)](
            src, centered if use_center else out, consts, out, signs, cand,
            c, count, src_layout.inner, src_layout.stride_a, src_layout.stride_b, src_layout.stride_c,
            grid.blocks_per_split, grid.splits, n,
            CENTERED=use_center, TREE=lowp, FINAL=final, DT=dt, ACC=acc_tl, KPAD=level_kpad,
            INDEX_64=index_64 and level_one, BLOCK_C=grid.block_c, BLOCK_N=grid.block_n,
            **config.launch_options,
        )
        if level_one:
            first = _Reduced(out[:, 0], signs if use_center else None, cand if level_kpad else None, grid.splits,
                             grid.blocks_per_split * grid.block_n)
        if final:
            first.result = out[:, 0]
            return first
        # The partials of the level just done, (C, splits) contiguous, as a (splits, C, 1) array.
        src, src_layout, count = out, _Layout(1, 1, 1, grid.splits), grid.splits


def _host_topk_statistics(xk: Tensor, mean: Tensor, weight: Tensor | None, consts: Tensor, k: int,
                          lowp: bool, dtype: torch.dtype, scale: Tensor, inv_std: Tensor, mult: Tensor,
                          threshold: Tensor) -> None:
    """L∞ statistics for k > MAX_KERNEL_K with ``torch.topk``, in the kernels' arithmetic (see kernels.py)."""
    c = xk.shape[1]
    per_channel = xk.transpose(0, 1).reshape(c, -1)
    if lowp:
        abs_dev = (per_channel - mean.to(dtype)[:, None]).abs()
        top = abs_dev.topk(k, dim=1).values
        s = pairwise_mean(top) * float(consts[0])
        s_e = hypot_eps(s, math.sqrt(float(consts[1])))
        gamma = torch.ones_like(s) if weight is None else weight.to(dtype)
        mult.copy_(gamma / s_e)
        inv_std.copy_(1.0 / s_e.to(inv_std.dtype))
    else:
        abs_dev = (per_channel.to(mean.dtype) - mean[:, None]).abs()
        top = abs_dev.topk(k, dim=1).values
        s = top.mean(dim=1) * float(consts[0])
        inv_std.copy_(torch.rsqrt(s * s + float(consts[1])))
        mult.copy_(inv_std if weight is None else weight.to(inv_std.dtype) * inv_std)
    scale.copy_(s)
    threshold.copy_(top[:, -1])


def backward(grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, scale: Tensor, inv_std: Tensor,
             threshold: Tensor, sign_sum: Tensor, norm: Norm, k: int,
             low_precision: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`forward`: one reduction pass, one elementwise pass (or one persistent kernel).

    Args:
        grad_y: gradient of y, any layout (copied to x's layout if it differs).
        x, weight, norm, k, low_precision: as given to :func:`forward`.
        mean, scale, inv_std, threshold, sign_sum: the per-channel tensors :func:`forward` returned.

    Returns:
        ``(grad_x, sum(dy * x_hat), sum(dy))``: grad_x like ``torch.empty_like(x)`` in x's dtype, the other two
        per channel in the accumulator dtype (the weight and bias gradients before casting).
    """
    lowp, acc, dt, acc_tl, index_64 = _common(x, low_precision)
    c = x.shape[1]
    n = x.numel() // c
    l1 = norm is Norm.L1
    device = x.device
    config = tile_config(device)
    factor = L1_SCALE if l1 else n / (k * topk_constant(n, k))
    consts = torch.tensor([factor], dtype=torch.float64, device=device)
    xk, layout = _kernel_input(x)
    dyk = _like(grad_y, xk, layout)
    dx, dxk = _output_for(x, xk, layout)
    sum_dy_xhat = torch.empty(c, dtype=acc, device=device)
    sum_dy = torch.empty(c, dtype=acc, device=device)
    w = weight if weight is not None else x
    thr = threshold if not l1 else mean
    signs = sign_sum if l1 else mean
    strides = (layout.inner, layout.stride_a, layout.stride_b, layout.stride_c)
    if n <= config.fused_max_n:
        block_n = _next_pow2(n)
        block_c = _fused_block_c(c, block_n, config)
        kernels.backward_fused_kernel[(triton.cdiv(c, block_c),)](
            dyk, xk, dxk, w, mean, scale, inv_std, thr, signs, consts, sum_dy_xhat, sum_dy,
            c, n, k, *strides,
            L1=l1, LOWP=lowp, HAS_W=weight is not None, DT=dt, ACC=acc_tl, INDEX_64=index_64,
            BLOCK_C=block_c, BLOCK_N=block_n, **config.launch_options,
        )
    else:
        grid = _stream_grid(c, n, layout, config)
        partials = torch.empty((2, c, grid.splits), dtype=acc, device=device)
        counts = torch.empty((4, c, grid.splits) if not l1 else (0,), dtype=torch.int32, device=device)
        launch = (grid.c_tiles, grid.splits)
        kernels.backward_reduce_kernel[launch](
            dyk, xk, mean, inv_std, thr, partials, counts if not l1 else partials,
            c, n, *strides, grid.blocks_per_split, grid.splits,
            L1=l1, LOWP=lowp, DT=dt, ACC=acc_tl, INDEX_64=index_64,
            BLOCK_C=grid.block_c, BLOCK_N=grid.block_n, **config.launch_options,
        )
        kernels.backward_dx_kernel[launch](
            dyk, xk, dxk, w, mean, scale, inv_std, thr, signs, consts, partials, counts if not l1 else partials,
            sum_dy_xhat, sum_dy,
            c, n, k, *strides, grid.blocks_per_split, grid.splits,
            L1=l1, LOWP=lowp, HAS_W=weight is not None, DT=dt, ACC=acc_tl, INDEX_64=index_64,
            BLOCK_C=grid.block_c, BLOCK_N=grid.block_n, BLOCK_Q=min(_next_pow2(grid.splits), 64),
            **config.launch_options,
        )
    if dxk is not dx:
        dx.copy_(dxk)
    return dx, sum_dy_xhat, sum_dy
