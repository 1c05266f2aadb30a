r"""Triton kernels of the fused BatchNorm + activation layers: the activation epilogue and the L1 input gradient.

The normalisation itself is the Triton batch-norm forward (:mod:`normdecouple._triton.kernels`); these kernels
add what the fused layers need around it (notation of :mod:`normdecouple._act_backend`):

* :func:`act_forward_kernel`: ``y = act(y + r)`` in place and, for L1, sign(x - mu) packed 8 values per byte
  plus a per-channel flag for values exactly at the mean (their sign, 0, has no bit);
* :func:`l1_grad_kernel`: ``dx = dz * a_c + o_c + k_c * b`` with the bit b of each value unpacked in the
  kernel (a = gamma / s_e, o = offset - coef, k = 2 coef), so the backward never materialises u.

Addressing: both kernels walk the values in memory order of the (A, C, B) view (contiguous NCHW or
channels_last), element e in channel ``(e // B) % C``; a program handles ``BLOCK`` bytes of bits, i.e.
``8 * BLOCK`` values, as a ``[BLOCK, 8]`` tile, so one byte is written by one program (no atomics on the bits).
With ``IDX64`` (more than 2^31 values) every index is int64.

References: arXiv:1803.01814
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _rnd, _scalar, to_output

#: Activation codes of the ``ACT`` constexpr.
RELU, LEAKY_RELU, IDENTITY = 0, 1, 2


@triton.jit
def _values(BLOCK: tl.constexpr, IDX64: tl.constexpr):
    """(byte indices, value indices) of this program's ``[BLOCK, 8]`` tile."""
    rows = tl.arange(0, BLOCK)
    pid = tl.program_id(0)
    if IDX64:
        rows = rows.to(tl.int64)
        pid = pid.to(tl.int64)
    rows = pid * BLOCK + rows
    return rows, rows[:, None] * 8 + tl.arange(0, 8)[None, :]


@triton.jit(do_not_specialize=["numel", "C"])
def act_forward_kernel(
    y_ptr,  # the batch-norm output, (A, C, B) contiguous; overwritten by act(y + r)
    r_ptr,  # the residual in the same layout (ignored without HAS_R)
    x_ptr,  # the input in the same layout (ignored without SIGNS)
    mean_ptr,  # (C,) batch mean in ACC
    bits_ptr,  # (ceil(numel / 8),) uint8: bit j of byte i is [x - mean > 0] of value 8 i + j
    zero_ptr,  # (C,) int32, zero on entry: set to 1 where a value equals its channel's mean
    numel,  # number of values
    C,  # channels
    inner,  # B of the (A, C, B) view
    slope: tl.float64,  # negative slope of the leaky ReLU, as the user gave it
    HAS_R: tl.constexpr,
    ACT: tl.constexpr,
    SIGNS: tl.constexpr,
    DT: tl.constexpr,  # dtype of y (rounded to it to nearest even on every backend, the interpreter included)
    COMPUTE: tl.constexpr,  # torch's opmath of DT: float32 for half inputs, else DT itself
    ACC: tl.constexpr,  # dtype of the mean (the subtraction promotes to it, as torch's does)
    IDX64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """z = act(y + r), rounded as torch rounds ``F.leaky_relu(y + r)``: y + r is a tensor of the input dtype
    (one rounding), then the activation computes in COMPUTE with the slope converted to COMPUTE (a second one);
    the signs are sign(x - mu) of the forward's own d, so they agree with its sum of signs."""
    rows, offs = _values(BLOCK, IDX64)
    mask = offs < numel
    z = tl.load(y_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_R:
        z = _rnd(z + tl.load(r_ptr + offs, mask=mask, other=0.0).to(COMPUTE), DT)
    if ACT == 0:
        z = tl.where(z > 0, z, 0.0)
    elif ACT == 1:
        z = tl.where(z > 0, z, z * _scalar(slope, COMPUTE))
    tl.store(y_ptr + offs, to_output(z, DT), mask=mask)
    if SIGNS:
        ch = (offs // inner) % C
        mean = tl.load(mean_ptr + ch, mask=mask, other=0.0)
        d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - mean
        packed = tl.sum((d > 0).to(tl.int32) << tl.arange(0, 8)[None, :], axis=1)
        tl.store(bits_ptr + rows, packed.to(tl.uint8), mask=rows * 8 < numel)
        # Values at the mean are rare: only they reach the atomic.
        at_mean = mask & (d == 0)
        tl.atomic_max(zero_ptr + ch, tl.full(ch.shape, 1, tl.int32), mask=at_mean)


@triton.jit(do_not_specialize=["numel", "C"])
def l1_grad_kernel(
    dz_ptr,  # dL/dz, (A, C, B) contiguous
    bits_ptr,  # the packed signs of act_forward_kernel
    dx_ptr,  # output dL/dx in ACC, same layout
    a_ptr,  # (C,) gamma / s_e
    o_ptr,  # (C,) offset - coef
    k_ptr,  # (C,) 2 coef
    numel,
    C,
    inner,
    ACC: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows, offs = _values(BLOCK, IDX64)
    mask = offs < numel
    ch = (offs // inner) % C
    packed = tl.load(bits_ptr + rows, mask=rows * 8 < numel, other=0).to(tl.int32)
    bit = ((packed[:, None] >> tl.arange(0, 8)[None, :]) & 1).to(ACC)
    dz = tl.load(dz_ptr + offs, mask=mask, other=0.0).to(ACC)
    a = tl.load(a_ptr + ch, mask=mask, other=0.0)
    o = tl.load(o_ptr + ch, mask=mask, other=0.0)
    k = tl.load(k_ptr + ch, mask=mask, other=0.0)
    tl.store(dx_ptr + offs, dz * a + o + k * bit, mask=mask)
