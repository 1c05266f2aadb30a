r"""Triton kernels of L1 and L∞ batch normalization (training mode), forward and backward.

Notation, per channel over its n = N * spatial values: mean mu, deviations d = x - mu, scale s,
s_e = sqrt(s^2 + eps), x_hat = d / s_e, gamma the weight (1 without affine), g = dL/dy * gamma.

Addressing. Every kernel sees a tensor as a 3-D (A, C, B) array: element (i, c), with i = a * B + b the
position of the value inside its channel (batch-major, then spatial, the order of ``x.transpose(0, 1)``), lives at
``c * stride_c + (i // inner) * stride_a + (i % inner) * stride_b`` with ``inner = B``. NCHW is (N, C, H*W) and
channels_last is (N*H*W, C, 1) (``inner = 1``, so the division folds away), so neither layout is copied. A tile is
``[BLOCK_C, BLOCK_N]``: BLOCK_C channels by BLOCK_N values of each.

Arithmetic. Statistics are accumulated in ``ACC`` (float32, float64 for float64 input). With ``LOWP``
(``low_precision=True`` on fp16/bf16 input) every arithmetic step of the statistics is rounded to the input
dtype ``DT`` (:func:`_rnd`): values are held in float32 registers but after each add, multiply, divide or square
root they are rounded to ``DT``, which is exactly IEEE arithmetic in ``DT`` (float32 carries more than the
2p + 2 bits that makes a single rounded operation in float32 followed by a rounding to p bits correctly
rounded). It also sidesteps the Triton interpreter, which has no bf16 arithmetic and truncates on bf16 casts.

Determinism. Sums over a channel that spans several programs are written as per-program partial sums and
added in a fixed order by a later kernel; no float atomics, so every run gives the same bits.

References: arXiv:1803.01814 (Norm matters, §2 and §4)
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _rnd(v, DT: tl.constexpr):
    """Round float32 ``v`` to the nearest ``DT`` value (ties to even), keeping float32 storage.

    bf16 is the top half of a float32, so rounding adds half an ulp plus the ties-to-even bit and drops the low
    16 bits (NaNs are kept as they are); fp16 goes through a real conversion. Other dtypes are left alone.
    """
    if DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
        return tl.where(v != v, v, rounded)
    elif DT == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def to_output(v, DT: tl.constexpr):
    """Convert accumulator values to the output dtype ``DT`` with round-to-nearest-even on every backend."""
    return _rnd(v, DT).to(DT)


@triton.jit
def _tile(ch, idx, C, n, inner, stride_a, stride_b, stride_c, INDEX_64: tl.constexpr):
    """Offsets and mask of the ``[len(ch), len(idx)]`` tile of values ``idx`` of channels ``ch``."""
    if INDEX_64:
        idx = idx.to(tl.int64)
        ch = ch.to(tl.int64)
    a = idx // inner
    b = idx - a * inner
    offsets = ch[:, None] * stride_c + (a * stride_a + b * stride_b)[None, :]
    mask = (ch < C)[:, None] & (idx < n)[None, :]
    return offsets, mask


@triton.jit
def _tree_mean(v, ROWS: tl.constexpr, WIDTH: tl.constexpr, DT: tl.constexpr):
    """Row means of ``v`` ([ROWS, WIDTH], WIDTH a power of two) as a pairwise mean of means in ``DT``.

    Each level replaces neighbours (2j, 2j + 1) by ``a * 0.5 + b * 0.5``, each step rounded to ``DT``: no
    intermediate exceeds the largest |value| (a plain fp16 sum of a few hundred activations of 1e3 overflows)
    and rounding errors grow with log2(WIDTH). This is the pairing of the PyTorch backend's ``_tree_mean``,
    so for the same zero padding both give the same bits.
    """
    for level in tl.static_range(31):
        if (WIDTH >> level) > 1:
            pairs = tl.reshape(v, [ROWS, WIDTH >> (level + 1), 2])
            a, b = tl.split(pairs)
            v = _rnd(_rnd(a * 0.5, DT) + _rnd(b * 0.5, DT), DT)
    return tl.reshape(v, [ROWS])


@triton.jit
def _merge_topk(best, new, ROWS: tl.constexpr, KPAD: tl.constexpr):
    """The KPAD largest of two [ROWS, KPAD] candidate sets, per row, sorted largest first."""
    both = tl.reshape(tl.join(best, new), [ROWS, 2 * KPAD])
    return tl.topk(both, KPAD, dim=1)


@triton.jit
def _topk_mean_and_threshold(top, k, kpad_over_k, ROWS: tl.constexpr, KPAD: tl.constexpr, LOWP: tl.constexpr,
                             DT: tl.constexpr):
    """From the KPAD largest |d| (sorted), the mean of the first k and t, the k-th largest.

    In low precision the mean is the pairwise mean over the zero-padded KPAD values times KPAD / k (a host
    constant), as the PyTorch backend's ``_tree_mean`` of the top-k values.
    """
    j = tl.arange(0, KPAD)[None, :]
    chosen = tl.where(j < k, top, 0.0)
    threshold = tl.sum(tl.where(j == k - 1, top, 0.0), axis=1)
    if LOWP:
        mean_top = _rnd(_tree_mean(chosen, ROWS, KPAD, DT) * kpad_over_k, DT)
    else:
        mean_top = tl.sum(chosen, axis=1) / k
    return mean_top, threshold


@triton.jit
def _finish_scale(stat, const_ptr, gamma, LOWP: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr):
    r"""From the channel statistic to s, 1/s_e and the output multiplier gamma / s_e.

    ``stat`` is mean|d| (L1) or the mean of the k largest |d| (L∞); ``const_ptr[0]`` the factor that makes it
    estimate sigma: sqrt(pi/2) for L1, 1/c(n, k) for L∞ (float64, from the host), ``const_ptr[1]`` eps and
    ``const_ptr[2]`` sqrt(eps) already rounded to ``DT`` on the host.

    Full precision: s_e = sqrt(s^2 + eps). Low precision: s^2 overflows fp16 as soon as s > 256, so
    s_e = hypot(s, sqrt(eps)) = hi * sqrt(1 + (lo / hi)^2) with hi, lo the larger and smaller of the two, every
    step rounded to ``DT``; only a ratio <= 1 is squared.
    """
    factor = tl.load(const_ptr)
    if LOWP:
        scale = _rnd(stat * factor.to(tl.float32), DT)
        root_eps = tl.load(const_ptr + 2).to(tl.float32)
        hi = tl.maximum(scale, root_eps)
        lo = tl.minimum(scale, root_eps)
        # Correctly rounded division and root (the GPU's default fp32 ones are approximate), so each rounding to
        # DT is that of an IEEE operation in DT.
        ratio = _rnd(tl.div_rn(lo, hi), DT)
        root = _rnd(tl.sqrt_rn(_rnd(1.0 + _rnd(ratio * ratio, DT), DT)), DT)
        scale_e = _rnd(hi * root, DT)
        inv_std = 1.0 / scale_e
        mult = _rnd(tl.div_rn(_rnd(gamma, DT), scale_e), DT)
    else:
        scale = stat * factor.to(ACC)
        variance = scale * scale + tl.load(const_ptr + 1).to(ACC)
        if ACC == tl.float64:
            inv_std = 1.0 / tl.sqrt(variance)  # float64 sqrt is IEEE; sqrt_rn takes float32 only
        else:
            inv_std = 1.0 / tl.sqrt_rn(variance)
        mult = gamma * inv_std
    return scale, inv_std, mult


@triton.jit
def _deviation(x, mean, LOWP: tl.constexpr, DT: tl.constexpr):
    """d = x - mu, rounded to ``DT`` in low precision (the backward recomputes exactly the forward's d)."""
    d = x - mean[:, None]
    if LOWP:
        d = _rnd(d, DT)
    return d


@triton.jit
def _sign(d):
    """sign(d) as int32, with sign(0) = 0."""
    return (d > 0).to(tl.int32) - (d < 0).to(tl.int32)


# ---------------------------------------------------------------------------------------------------------
# Forward
#
#   mu = mean(x)
#   L1:  s = sqrt(pi/2) * mean|d|                       (and sum sign(d), kept for the backward)
#   L∞:  s = mean of the k largest |d| / c(n, k)        (and t, the k-th largest |d|, for the tie rule)
#   y  = d / s_e * gamma + beta
#
# The k largest |d| are always among the k largest and the k smallest x (|d| grows with x above mu and falls
# with it below), so the L∞ statistics need a single pass over x: it keeps the k largest and k smallest
# values of x next to the running sum, and the scale is finished from those 2k candidates once mu is known.
# L1 needs mu before the sum of |d|, hence a second pass. Small channels take a single persistent program
# per channel tile that holds the whole channel in registers (one read of x, one write of y).
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def forward_fused_kernel(
    x_ptr,  # input, (A, C, B) addressing as in the module docstring
    y_ptr,  # output, same strides as x
    w_ptr,  # (C,) weight, or any pointer when not HAS_W
    b_ptr,  # (C,) bias, or any pointer when not HAS_B
    const_ptr,  # float64 [scale factor, eps, sqrt(eps) in DT, width / n, KPAD / k]
    mean_ptr,  # (C,) ACC out: mu
    scale_ptr,  # (C,) ACC out: s
    inv_std_ptr,  # (C,) ACC out: 1 / s_e
    thr_ptr,  # (C,) ACC out (L∞): t, the k-th largest |d|
    sign_ptr,  # (C,) int32 out (L1): sum of sign(d)
    C, n, k, inner, stride_a, stride_b, stride_c,
    L1: tl.constexpr,  # L1 scale, else L∞ top-k
    LOWP: tl.constexpr,  # statistics in DT
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    DT: tl.constexpr,  # dtype of x and y
    ACC: tl.constexpr,  # accumulator dtype
    KPAD: tl.constexpr,  # k rounded up to a power of two (L∞)
    INDEX_64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next power of two >= n: the whole channel
):
    """One program per tile of BLOCK_C channels holding all n values of each: statistics, then y."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    offsets, mask = _tile(ch, tl.arange(0, BLOCK_N), C, n, inner, stride_a, stride_b, stride_c, INDEX_64)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    if LOWP:
        width_over_n = tl.load(const_ptr + 3).to(tl.float32)
        mean = _rnd(_tree_mean(x, BLOCK_C, BLOCK_N, DT) * width_over_n, DT)
    else:
        mean = tl.sum(x, axis=1) / n
    d = _deviation(x, mean, LOWP, DT)
    abs_d = tl.where(mask, tl.abs(d), 0.0)
    if L1:
        if LOWP:
            stat = _rnd(_tree_mean(abs_d, BLOCK_C, BLOCK_N, DT) * width_over_n, DT)
        else:
            stat = tl.sum(abs_d, axis=1) / n
        tl.store(sign_ptr + ch, tl.sum(tl.where(mask, _sign(d), 0), axis=1), mask=cmask)
    else:
        top = tl.topk(tl.where(mask, abs_d, -1.0), KPAD, dim=1)
        kpad_over_k = tl.load(const_ptr + 4).to(tl.float32)
        stat, threshold = _topk_mean_and_threshold(top, k, kpad_over_k, BLOCK_C, KPAD, LOWP, DT)
        tl.store(thr_ptr + ch, threshold, mask=cmask)
    if HAS_W:
        gamma = tl.load(w_ptr + ch, mask=cmask, other=1.0).to(ACC)
    else:
        gamma = tl.full([BLOCK_C], 1.0, ACC)
    scale, inv_std, mult = _finish_scale(stat, const_ptr, gamma, LOWP, DT, ACC)
    y = d * mult[:, None]
    if LOWP:
        y = _rnd(y, DT)
    if HAS_B:
        beta = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(ACC)
        if LOWP:
            beta = _rnd(beta, DT)
        y = y + beta[:, None]
    tl.store(y_ptr + offsets, to_output(y, DT), mask=mask)
    tl.store(mean_ptr + ch, mean, mask=cmask)
    tl.store(scale_ptr + ch, scale, mask=cmask)
    tl.store(inv_std_ptr + ch, inv_std, mask=cmask)


@triton.jit
def channel_reduce_kernel(
    src_ptr,  # values, (A, C, B) addressing; a (C, splits) partial array is (splits, C, 1) with inner = 1
    center_ptr,  # (C,) ACC: mu, subtracted before |.| when CENTERED
    const_ptr,  # float64 constants as in forward_fused_kernel (width / n at index 3)
    out_ptr,  # (C, splits) ACC out: partial sums (SUM) or block means (TREE), finished values when FINAL
    sign_ptr,  # (C, splits) int32 out: partial sums of sign(x - mu) when CENTERED
    cand_ptr,  # (C, splits, 2 * KPAD) ACC out (KPAD > 0): the KPAD largest and the KPAD smallest x
    C, n, inner, stride_a, stride_b, stride_c,
    blocks_per_split,  # blocks of BLOCK_N values each program reduces (1 in TREE mode)
    splits,
    channel_n,  # values per channel of the original input: the divisor of the finished SUM
    CENTERED: tl.constexpr,  # reduce |x - mu| (and count signs) instead of x
    TREE: tl.constexpr,  # low precision: pairwise mean of means in DT, else a sum in ACC
    FINAL: tl.constexpr,  # one split: finish (sum / n, or tree mean * width / n)
    DT: tl.constexpr,
    ACC: tl.constexpr,
    KPAD: tl.constexpr,  # > 0: also keep the L∞ candidates of the split
    INDEX_64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Partial per-channel reductions over a 2-D grid (channel tiles x splits of the channel's values).

    SUM mode: program (p, q) sums values [q * blocks_per_split * BLOCK_N, ...) of its channels in ACC, in a
    fixed order; a second launch over the (C, splits) partials adds them up (also in a fixed order).
    TREE mode: every program takes one block and writes its pairwise mean; the next launch takes the pairwise
    mean of those means, and so on. Blocks are powers of two and the last level's block is the next power of
    two >= the number of means left, so the levels form the one binary tree over the zero-padded channel
    that the PyTorch backend's ``_tree_mean`` computes; the result is multiplied by width / n at the end.
    """
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    if CENTERED:
        mean = tl.load(center_ptr + ch, mask=cmask, other=0.0)
        signs = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.int32)
    if KPAD > 0:
        top_hi = tl.full([BLOCK_C, KPAD], float("-inf"), ACC)
        top_lo = tl.full([BLOCK_C, KPAD], float("-inf"), ACC)
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    for block in range(blocks_per_split):
        idx = (pid_s * blocks_per_split + block) * BLOCK_N + tl.arange(0, BLOCK_N)
        offsets, mask = _tile(ch, idx, C, n, inner, stride_a, stride_b, stride_c, INDEX_64)
        x = tl.load(src_ptr + offsets, mask=mask, other=0.0).to(ACC)
        if KPAD > 0:
            top_hi = _merge_topk(top_hi, tl.topk(tl.where(mask, x, float("-inf")), KPAD, dim=1), BLOCK_C, KPAD)
            top_lo = _merge_topk(top_lo, tl.topk(tl.where(mask, -x, float("-inf")), KPAD, dim=1), BLOCK_C, KPAD)
        if CENTERED:
            d = _deviation(x, mean, TREE, DT)
            signs += tl.where(mask, _sign(d), 0)
            x = tl.where(mask, tl.abs(d), 0.0)
        acc += x
    if TREE:
        result = _tree_mean(acc, BLOCK_C, BLOCK_N, DT)
        if FINAL:
            result = _rnd(result * tl.load(const_ptr + 3).to(tl.float32), DT)
    else:
        result = tl.sum(acc, axis=1)
        if FINAL:
            result = result / channel_n
    tl.store(out_ptr + ch * splits + pid_s, result, mask=cmask)
    if CENTERED:
        tl.store(sign_ptr + ch * splits + pid_s, tl.sum(signs, axis=1), mask=cmask)
    if KPAD > 0:
        j = tl.arange(0, KPAD)[None, :]
        base = cand_ptr + (ch[:, None] * splits + pid_s) * (2 * KPAD) + j
        tl.store(base, top_hi, mask=cmask[:, None])
        tl.store(base + KPAD, -top_lo, mask=cmask[:, None])


@triton.jit
def forward_finalize_kernel(
    mean_ptr,  # (C,) ACC: mu
    stat_ptr,  # (C,) ACC (L1): mean|d|
    sign_part_ptr,  # (C, splits) int32 (L1): partial sums of sign(d)
    cand_ptr,  # (C, splits, 2 * KPAD) ACC (L∞): candidates from channel_reduce_kernel
    w_ptr,
    const_ptr,
    scale_ptr,  # (C,) ACC out: s
    inv_std_ptr,  # (C,) ACC out: 1 / s_e
    mult_ptr,  # (C,) ACC out: gamma / s_e (rounded to DT in low precision)
    thr_ptr,  # (C,) ACC out (L∞): t
    sign_ptr,  # (C,) int32 out (L1): sum of sign(d)
    C, n, k, splits,
    chunk,  # values per split in the candidate pass
    L1: tl.constexpr,
    LOWP: tl.constexpr,
    HAS_W: tl.constexpr,
    DT: tl.constexpr,
    ACC: tl.constexpr,
    KPAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # candidates (L1: sign partials) read per step
):
    """Per channel tile: the scale from the reduced statistics; for L∞ the top-k of |candidate - mu|.

    Split q held ``len_q = min(chunk, n - q * chunk)`` values and kept its min(KPAD, len_q) largest; of its
    smallest only those that are not already among the largest count (max(0, min(KPAD, len_q - KPAD))), so every
    value of the channel is a candidate at most once and ties are counted with their multiplicity.
    """
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0)
    if L1:
        stat = tl.load(stat_ptr + ch, mask=cmask, other=0.0)
        total = tl.zeros([BLOCK_C, BLOCK_Q], dtype=tl.int32)
        for start in range(0, splits, BLOCK_Q):
            q = start + tl.arange(0, BLOCK_Q)
            m = cmask[:, None] & (q < splits)[None, :]
            total += tl.load(sign_part_ptr + ch[:, None] * splits + q[None, :], mask=m, other=0)
        tl.store(sign_ptr + ch, tl.sum(total, axis=1), mask=cmask)
    else:
        best = tl.full([BLOCK_C, KPAD], -1.0, ACC)
        count = splits * 2 * KPAD
        for start in range(0, count, BLOCK_Q):
            q = start + tl.arange(0, BLOCK_Q)
            split = q // (2 * KPAD)
            slot = q % KPAD
            length = tl.minimum(chunk, n - split * chunk)
            kept_hi = tl.minimum(KPAD, length)
            kept_lo = tl.maximum(0, tl.minimum(KPAD, length - KPAD))
            valid = (q < count) & (slot < tl.where((q // KPAD) % 2 == 1, kept_lo, kept_hi))
            m = cmask[:, None] & valid[None, :]
            cand = tl.load(cand_ptr + ch[:, None] * count + q[None, :], mask=m, other=0.0)
            abs_d = tl.where(m, tl.abs(_deviation(cand, mean, LOWP, DT)), -1.0)
            best = _merge_topk(best, tl.topk(abs_d, KPAD, dim=1), BLOCK_C, KPAD)
        kpad_over_k = tl.load(const_ptr + 4).to(tl.float32)
        stat, threshold = _topk_mean_and_threshold(best, k, kpad_over_k, BLOCK_C, KPAD, LOWP, DT)
        tl.store(thr_ptr + ch, threshold, mask=cmask)
    if HAS_W:
        gamma = tl.load(w_ptr + ch, mask=cmask, other=1.0).to(ACC)
    else:
        gamma = tl.full([BLOCK_C], 1.0, ACC)
    scale, inv_std, mult = _finish_scale(stat, const_ptr, gamma, LOWP, DT, ACC)
    tl.store(scale_ptr + ch, scale, mask=cmask)
    tl.store(inv_std_ptr + ch, inv_std, mask=cmask)
    tl.store(mult_ptr + ch, mult, mask=cmask)


@triton.jit
def normalize_kernel(
    x_ptr,
    y_ptr,  # same strides as x
    mean_ptr,  # (C,) ACC: mu
    mult_ptr,  # (C,) ACC: gamma / s_e
    b_ptr,  # (C,) bias, or any pointer when not HAS_B
    C, n, inner, stride_a, stride_b, stride_c,
    blocks_per_split,
    LOWP: tl.constexpr,
    HAS_B: tl.constexpr,
    DT: tl.constexpr,
    ACC: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y = (x - mu) * (gamma / s_e) + beta over a 2-D grid (channel tiles x splits); in DT when LOWP."""
    pid_s = tl.program_id(1)
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0)
    mult = tl.load(mult_ptr + ch, mask=cmask, other=0.0)
    if HAS_B:
        beta = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(ACC)
        if LOWP:
            beta = _rnd(beta, DT)
    for block in range(blocks_per_split):
        idx = (pid_s * blocks_per_split + block) * BLOCK_N + tl.arange(0, BLOCK_N)
        offsets, mask = _tile(ch, idx, C, n, inner, stride_a, stride_b, stride_c, INDEX_64)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        y = _deviation(x, mean, LOWP, DT) * mult[:, None]
        if LOWP:
            y = _rnd(y, DT)
        if HAS_B:
            y = y + beta[:, None]
        tl.store(y_ptr + offsets, to_output(y, DT), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Backward
#
# If ds/dd_i = a_i, then (PAPER.md §2)
#
#     dx_i = (g_i - mean(g) - (s / s_e) * (sum_j g_j x_hat_j) * (a_i - mean(a))) / s_e
#
#   L1:  a_i = sqrt(pi/2) * u_i / n,       u_i = sign(d_i)                     (sign(0) = 0)
#   L∞:  a_i = u_i / (k * c(n, k)),        u_i = sign(d_i) * w_i, with the tie rule
#        w_i = 1 if |d_i| > t,  (k - #{|d| > t}) / #{|d| = t} if |d_i| = t,  0 otherwise:
#        the values tied at the k-th place share it evenly, which is the mean of the subgradients over every
#        way of breaking the tie (and the plain top-k gradient when there is no tie).
#
# Written with per-channel coefficients, as the kernels compute it (F = sqrt(pi/2) for L1, n / (k c) for L∞):
#
#     coef   = -(s / s_e) / s_e * mean(g x_hat) * F
#     offset = -mean(g) / s_e - coef * mean(u)
#     dx_i   = dy_i * gamma / s_e + offset + coef * u_i
#     dgamma = sum(dy * x_hat),   dbeta = sum(dy)
#
# One reduction pass (sum dy, sum dy x_hat in ACC; for L∞ the exact int32 counts #{|d| > t}, #{|d| = t} and the
# sums of sign(d) over both sets; for L1 sum sign(d) comes from the forward) and one elementwise pass.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _tie_masks(d, threshold, mask):
    """The L∞ tie rule's inputs: the values above t, those tied at t (both within ``mask``), and sign(d)."""
    abs_d = tl.abs(d)
    above = mask & (abs_d > threshold[:, None])
    tied = mask & (abs_d == threshold[:, None])
    return above, tied, _sign(d)


@triton.jit
def _dx_coefficients(sum_dy, sum_dy_xhat, gamma, scale, inv_std, sign_sum, n_above, sign_above, n_tied, sign_tied,
                     factor, n, k, L1: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (gamma / s_e, offset, coef, share) of the backward formula above."""
    mean_g = gamma * sum_dy / n
    mean_g_xhat = gamma * sum_dy_xhat / n
    coef = -(scale * inv_std) * inv_std * mean_g_xhat * factor
    if L1:
        share = tl.zeros_like(sum_dy)
        mean_u = sign_sum.to(ACC) / n
    else:
        tied = n_tied.to(ACC)
        share = tl.where(n_tied > 0, (k - n_above).to(ACC) / tl.maximum(tied, 1.0), 0.0)
        mean_u = (sign_above.to(ACC) + share * sign_tied.to(ACC)) / n
    offset = -mean_g * inv_std - coef * mean_u
    return gamma * inv_std, offset, coef, share


@triton.jit
def _u_term(d, threshold, share, L1: tl.constexpr, ACC: tl.constexpr):
    """u_i = dd_i-part of the scale's gradient: sign(d) for L1, sign(d) * w_i (tie rule) for L∞."""
    sign = _sign(d).to(ACC)
    if L1:
        return sign
    abs_d = tl.abs(d)
    weight = tl.where(abs_d > threshold[:, None], 1.0, tl.where(abs_d == threshold[:, None], share[:, None], 0.0))
    return sign * weight


@triton.jit
def backward_fused_kernel(
    dy_ptr,  # grad of y, same strides as x
    x_ptr,
    dx_ptr,  # out, same strides as x
    w_ptr,
    mean_ptr, scale_ptr, inv_std_ptr,  # (C,) ACC from the forward
    thr_ptr,  # (C,) ACC (L∞): t
    sign_ptr,  # (C,) int32 (L1): sum of sign(d)
    const_ptr,  # float64 [F]: sqrt(pi/2) for L1, n / (k c(n, k)) for L∞
    dw_ptr,  # (C,) ACC out: sum(dy * x_hat)
    db_ptr,  # (C,) ACC out: sum(dy)
    C, n, k, inner, stride_a, stride_b, stride_c,
    L1: tl.constexpr,
    LOWP: tl.constexpr,
    HAS_W: tl.constexpr,
    DT: tl.constexpr,
    ACC: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per channel tile holding the whole channel: the reduction, then dx."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    offsets, mask = _tile(ch, tl.arange(0, BLOCK_N), C, n, inner, stride_a, stride_b, stride_c, INDEX_64)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0)
    scale = tl.load(scale_ptr + ch, mask=cmask, other=0.0)
    inv_std = tl.load(inv_std_ptr + ch, mask=cmask, other=0.0)
    x_hat = (x - mean[:, None]) * inv_std[:, None]
    sum_dy = tl.sum(dy, axis=1)
    sum_dy_xhat = tl.sum(dy * x_hat, axis=1)
    d = _deviation(x, mean, LOWP, DT)
    if L1:
        sign_sum = tl.load(sign_ptr + ch, mask=cmask, other=0)
        threshold = mean
        n_above = sign_sum
        sign_above = sign_sum
        n_tied = sign_sum
        sign_tied = sign_sum
    else:
        sign_sum = tl.zeros([BLOCK_C], dtype=tl.int32)
        threshold = tl.load(thr_ptr + ch, mask=cmask, other=0.0)
        above, tied, sign = _tie_masks(d, threshold, mask)
        n_above = tl.sum(above.to(tl.int32), axis=1)
        sign_above = tl.sum(tl.where(above, sign, 0), axis=1)
        n_tied = tl.sum(tied.to(tl.int32), axis=1)
        sign_tied = tl.sum(tl.where(tied, sign, 0), axis=1)
    if HAS_W:
        gamma = tl.load(w_ptr + ch, mask=cmask, other=1.0).to(ACC)
    else:
        gamma = tl.full([BLOCK_C], 1.0, ACC)
    factor = tl.load(const_ptr).to(ACC)
    g_inv, offset, coef, share = _dx_coefficients(sum_dy, sum_dy_xhat, gamma, scale, inv_std, sign_sum, n_above,
                                                  sign_above, n_tied, sign_tied, factor, n, k, L1, ACC)
    u = _u_term(d, threshold, share, L1, ACC)
    dx = dy * g_inv[:, None] + offset[:, None] + coef[:, None] * u
    tl.store(dx_ptr + offsets, to_output(dx, DT), mask=mask)
    tl.store(dw_ptr + ch, sum_dy_xhat, mask=cmask)
    tl.store(db_ptr + ch, sum_dy, mask=cmask)


@triton.jit
def backward_reduce_kernel(
    dy_ptr,
    x_ptr,
    mean_ptr, inv_std_ptr,  # (C,) ACC from the forward
    thr_ptr,  # (C,) ACC (L∞): t
    part_ptr,  # (2, C, splits) ACC out: partial sum(dy), sum(dy * x_hat)
    count_ptr,  # (4, C, splits) int32 out (L∞): partial #{|d| > t}, sum sign over it, #{|d| = t}, sum sign over it
    C, n, inner, stride_a, stride_b, stride_c,
    blocks_per_split, splits,
    L1: tl.constexpr,
    LOWP: tl.constexpr,
    DT: tl.constexpr,
    ACC: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The backward's reduction pass over a 2-D grid: per-program partial sums, added up by the dx kernel."""
    pid_s = tl.program_id(1)
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0)
    inv_std = tl.load(inv_std_ptr + ch, mask=cmask, other=0.0)
    acc_dy = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    acc_dy_xhat = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    if not L1:
        threshold = tl.load(thr_ptr + ch, mask=cmask, other=0.0)
        n_above = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.int32)
        sign_above = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.int32)
        n_tied = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.int32)
        sign_tied = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.int32)
    for block in range(blocks_per_split):
        idx = (pid_s * blocks_per_split + block) * BLOCK_N + tl.arange(0, BLOCK_N)
        offsets, mask = _tile(ch, idx, C, n, inner, stride_a, stride_b, stride_c, INDEX_64)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
        acc_dy += dy
        acc_dy_xhat += dy * ((x - mean[:, None]) * inv_std[:, None])
        if not L1:
            above, tied, sign = _tie_masks(_deviation(x, mean, LOWP, DT), threshold, mask)
            n_above += above.to(tl.int32)
            sign_above += tl.where(above, sign, 0)
            n_tied += tied.to(tl.int32)
            sign_tied += tl.where(tied, sign, 0)
    plane = C * splits
    out = ch * splits + pid_s
    tl.store(part_ptr + out, tl.sum(acc_dy, axis=1), mask=cmask)
    tl.store(part_ptr + plane + out, tl.sum(acc_dy_xhat, axis=1), mask=cmask)
    if not L1:
        tl.store(count_ptr + out, tl.sum(n_above, axis=1), mask=cmask)
        tl.store(count_ptr + plane + out, tl.sum(sign_above, axis=1), mask=cmask)
        tl.store(count_ptr + 2 * plane + out, tl.sum(n_tied, axis=1), mask=cmask)
        tl.store(count_ptr + 3 * plane + out, tl.sum(sign_tied, axis=1), mask=cmask)


@triton.jit
def _sum_partials(ptr, ch, cmask, splits, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, DTYPE: tl.constexpr):
    """Sum of the (C, splits) partials of channels ``ch``, always in the same order."""
    total = tl.zeros([BLOCK_C, BLOCK_Q], dtype=DTYPE)
    for start in range(0, splits, BLOCK_Q):
        q = start + tl.arange(0, BLOCK_Q)
        m = cmask[:, None] & (q < splits)[None, :]
        total += tl.load(ptr + ch[:, None] * splits + q[None, :], mask=m, other=0)
    return tl.sum(total, axis=1)


@triton.jit
def backward_dx_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    w_ptr,
    mean_ptr, scale_ptr, inv_std_ptr, thr_ptr, sign_ptr, const_ptr,  # as in backward_fused_kernel
    part_ptr, count_ptr,  # partials from backward_reduce_kernel
    dw_ptr, db_ptr,  # (C,) ACC out, written by the programs of split 0
    C, n, k, inner, stride_a, stride_b, stride_c,
    blocks_per_split, splits,
    L1: tl.constexpr,
    LOWP: tl.constexpr,
    HAS_W: tl.constexpr,
    DT: tl.constexpr,
    ACC: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """The backward's elementwise pass: every program adds up its channels' partials (same order everywhere,
    so all programs of a channel agree bit for bit), forms the coefficients and writes dx for its split."""
    pid_s = tl.program_id(1)
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    plane = C * splits
    sum_dy = _sum_partials(part_ptr, ch, cmask, splits, BLOCK_C, BLOCK_Q, ACC)
    sum_dy_xhat = _sum_partials(part_ptr + plane, ch, cmask, splits, BLOCK_C, BLOCK_Q, ACC)
    mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0)
    scale = tl.load(scale_ptr + ch, mask=cmask, other=0.0)
    inv_std = tl.load(inv_std_ptr + ch, mask=cmask, other=0.0)
    if L1:
        sign_sum = tl.load(sign_ptr + ch, mask=cmask, other=0)
        threshold = mean
        n_above = sign_sum
        sign_above = sign_sum
        n_tied = sign_sum
        sign_tied = sign_sum
    else:
        sign_sum = tl.zeros([BLOCK_C], dtype=tl.int32)
        threshold = tl.load(thr_ptr + ch, mask=cmask, other=0.0)
        n_above = _sum_partials(count_ptr, ch, cmask, splits, BLOCK_C, BLOCK_Q, tl.int32)
        sign_above = _sum_partials(count_ptr + plane, ch, cmask, splits, BLOCK_C, BLOCK_Q, tl.int32)
        n_tied = _sum_partials(count_ptr + 2 * plane, ch, cmask, splits, BLOCK_C, BLOCK_Q, tl.int32)
        sign_tied = _sum_partials(count_ptr + 3 * plane, ch, cmask, splits, BLOCK_C, BLOCK_Q, tl.int32)
    if HAS_W:
        gamma = tl.load(w_ptr + ch, mask=cmask, other=1.0).to(ACC)
    else:
        gamma = tl.full([BLOCK_C], 1.0, ACC)
    factor = tl.load(const_ptr).to(ACC)
    g_inv, offset, coef, share = _dx_coefficients(sum_dy, sum_dy_xhat, gamma, scale, inv_std, sign_sum, n_above,
                                                  sign_above, n_tied, sign_tied, factor, n, k, L1, ACC)
    for block in range(blocks_per_split):
        idx = (pid_s * blocks_per_split + block) * BLOCK_N + tl.arange(0, BLOCK_N)
        offsets, mask = _tile(ch, idx, C, n, inner, stride_a, stride_b, stride_c, INDEX_64)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
        u = _u_term(_deviation(x, mean, LOWP, DT), threshold, share, L1, ACC)
        dx = dy * g_inv[:, None] + offset[:, None] + coef[:, None] * u
        tl.store(dx_ptr + offsets, to_output(dx, DT), mask=mask)
    if pid_s == 0:
        tl.store(dw_ptr + ch, sum_dy_xhat, mask=cmask)
        tl.store(db_ptr + ch, sum_dy, mask=cmask)
