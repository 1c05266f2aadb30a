r"""Triton kernels of L1 and L∞ batch normalization (training mode), forward and backward.

Notation, per channel over its n = N * spatial values: mean mu, deviations d = x - mu, scale s,
s_e = sqrt(s^2 + eps), x_hat = d / s_e, gamma the weight (1 without affine), g = dL/dy * gamma.

Addressing. The values of a channel form an (A, B) array (A rows of B values: the batch and spatial dims merged
into two groups, see ``plan.address``); value (a, b) of channel c of a tensor lives at
``c * sc + a * sa + b * sb`` with that tensor's own strides (sa, sb, sc), so every tensor of a call (input,
output, gradients, residual) may have its own layout: NCHW is (N, HW) with sb = 1, channels_last
(N*H*W, 1) with sc = 1, a channel slice or a batch step only changes the strides. A tile is
``[BLOCK_C, BLOCK_N]``: BLOCK_C channels by BLOCK_N values of each, one *block* of the channel. Two block
shapes (constexpr ``FLAT``):

* 2-D blocks: rows ``[qa * BLOCK_A, +BLOCK_A)`` by columns ``[qb * BLOCK_B, +BLOCK_B)`` (BLOCK_N = BLOCK_A *
  BLOCK_B, both powers of two), so the column index is contiguous in memory and the loads vectorise; block q of
  a channel is (qa, qb) = (q // NB, q % NB), one division per block.
* flat blocks: values ``[q * BLOCK_N, +BLOCK_N)`` of the channel in flat order i = a * B + b (one division per
  value); used where the order of the values matters: the low-precision pairwise mean, whose binary tree over
  the zero-padded channel is that of the PyTorch backend, bit for bit.

Grids are one-dimensional (axis 0 allows 2^31 - 1 programs; axes 1 and 2 only 65535): program p takes channel
tile ``p % c_tiles`` and split ``p // c_tiles`` (``per_split`` consecutive blocks). With ``IDX64`` (decided on
the host whenever any offset or index of the launch can reach 2^31) every index is int64 before any product.

Arithmetic. Statistics are accumulated in ``ACC`` (float32, float64 for float64 input). With ``LOWP``
(``low_precision=True`` on fp16/bf16 input) every arithmetic step of the statistics is rounded to the input
dtype ``DT`` (:func:`_rnd`): values are held in float32 registers but after each add, multiply, divide or square
root they are rounded to ``DT``, which is exactly IEEE arithmetic in ``DT`` (float32 carries more than the
2p + 2 bits that makes a single rounded operation in float32 followed by a rounding to p bits correctly
rounded). It also sidesteps the Triton interpreter, which has no bf16 arithmetic and truncates on bf16 casts.
Host constants (c(n, k), eps, ...) arrive as float64 scalars and are cast explicitly.

Determinism. Sums over a channel that spans several programs are written as per-program partial sums and
added in a fixed order by a later kernel; no float atomics, so every run gives the same bits.

References: arXiv:1803.01814 (Norm matters, §2 and §4)
"""

from __future__ import annotations

import triton
import triton.language as tl

#: The integer arguments that change with the batch size are not specialised on (item 15 of issue 18: a new
#: batch size must not compile new kernel variants): counts, splits and loop bounds. The channel count and the
#: strides stay specialised: they are fixed per layer, and their divisibility is what lets the compiler prove
#: a mask uniform over a vector (``ch < C``) and vectorise the loads.
_RUNTIME_INTS = ["n", "k", "A", "per_split", "splits", "blocks", "chunk", "channel_n"]


def _jit(fn):
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(do_not_specialize=[name for name in _RUNTIME_INTS if name in names])(fn)


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
def _scalar(v, DT: tl.constexpr):
    """A float64 host scalar (a kernel argument) as ``DT``. (``tl.cast`` of a plain Python float, which is what
    the interpreter passes, would round it through float32 first.)"""
    return tl.full([], v, tl.float64).to(DT)


@triton.jit
def _program(c_tiles, IDX64: tl.constexpr):
    """(channel tile, split) of this program on the one-dimensional grid."""
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    return pid % c_tiles, pid // c_tiles


@triton.jit
def _channels(tile, BLOCK_C: tl.constexpr, IDX64: tl.constexpr):
    """The BLOCK_C channel indices of channel tile ``tile`` (int64 with IDX64)."""
    ch = tl.arange(0, BLOCK_C)
    if IDX64:
        ch = ch.to(tl.int64)
    return tile * BLOCK_C + ch


@triton.jit
def _lanes(BLOCK_N: tl.constexpr, IDX64: tl.constexpr):
    j = tl.arange(0, BLOCK_N)
    if IDX64:
        j = j.to(tl.int64)
    return j


@triton.jit
def _positions(qa, qb, j, A, B, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, FLAT: tl.constexpr):
    """(a, b, valid) of tile columns ``j`` of the block (qa, qb) of a channel: flat block ``qa`` when FLAT."""
    if FLAT:
        i = qa * BLOCK_N + j
        a = i // B
        b = i - a * B
    else:
        a = qa * (BLOCK_N // BLOCK_B) + j // BLOCK_B
        b = qb * BLOCK_B + j % BLOCK_B
    return a, b, (a < A) & (b < B)


@triton.jit
def _block(q, NB, FLAT: tl.constexpr):
    """Block q of a channel as (qa, qb): (q // NB, q % NB), or (q, 0) for flat blocks."""
    if FLAT:
        return q, q * 0
    else:
        qa = q // NB
        return qa, q - qa * NB


@triton.jit
def _next_block(qa, qb, NB, FLAT: tl.constexpr):
    """The block after (qa, qb), without a division (a loop's blocks are consecutive)."""
    if FLAT:
        return qa + 1, qb
    else:
        qb = qb + 1
        wrap = qb == NB
        return tl.where(wrap, qa + 1, qa), tl.where(wrap, 0, qb)


@triton.jit
def _tile(ch, a, b, valid, C, sa, sb, sc):
    """Offsets and mask of the [len(ch), len(a)] tile of a tensor with strides (sa, sb, sc)."""
    offsets = ch[:, None] * sc + (a * sa + b * sb)[None, :]
    mask = (ch < C)[:, None] & valid[None, :]
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
def _topk(v, KPAD: tl.constexpr):
    """The KPAD largest values of each row of ``v``, largest first (a maximum for KPAD = 1: ``tl.topk`` of one
    value does not compile before Triton 3.9 on a one-row tile)."""
    if KPAD == 1:
        return tl.max(v, axis=1, keep_dims=True)
    else:
        return tl.topk(v, KPAD, dim=1)


@triton.jit
def _merge_topk(best, new, KPAD: tl.constexpr):
    """The KPAD largest of two [ROWS, KPAD] candidate sets, per row, sorted largest first."""
    if KPAD == 1:
        return tl.maximum(best, new)
    else:
        both = tl.reshape(tl.join(best, new), [best.shape[0], 2 * KPAD])
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
        mean_top = _rnd(_tree_mean(chosen, ROWS, KPAD, DT) * _scalar(kpad_over_k, tl.float32), DT)
    else:
        mean_top = tl.sum(chosen, axis=1) / k
    return mean_top, threshold


@triton.jit
def _finish_scale(stat, factor, eps, root_eps, gamma, LOWP: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr):
    r"""From the channel statistic to s, 1/s_e and the output multiplier gamma / s_e.

    ``stat`` is mean|d| (L1) or the mean of the k largest |d| (L∞); ``factor`` the float64 host constant that
    makes it estimate sigma: sqrt(pi/2) for L1, 1/c(n, k) for L∞; ``root_eps`` is sqrt(eps) already rounded to
    ``DT`` on the host.

    Full precision: s_e = sqrt(s^2 + eps). Low precision: s^2 overflows fp16 as soon as s > 256, so
    s_e = hypot(s, sqrt(eps)) = hi * sqrt(1 + (lo / hi)^2) with hi, lo the larger and smaller of the two, every
    step rounded to ``DT``; only a ratio <= 1 is squared.
    """
    if LOWP:
        scale = _rnd(stat * _scalar(factor, tl.float32), DT)
        root = _scalar(root_eps, tl.float32)
        hi = tl.maximum(scale, root)
        lo = tl.minimum(scale, root)
        # Correctly rounded division and root (the GPU's default fp32 ones are approximate), so each rounding to
        # DT is that of an IEEE operation in DT.
        ratio = _rnd(tl.div_rn(lo, hi), DT)
        root = _rnd(tl.sqrt_rn(_rnd(1.0 + _rnd(ratio * ratio, DT), DT)), DT)
        scale_e = _rnd(hi * root, DT)
        inv_std = 1.0 / scale_e
        mult = _rnd(tl.div_rn(_rnd(gamma, DT), scale_e), DT)
    else:
        scale = stat * _scalar(factor, ACC)
        variance = scale * scale + _scalar(eps, ACC)
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


@triton.jit
def _gamma(w_ptr, ch, cmask, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    if HAS_W:
        return tl.load(w_ptr + ch, mask=cmask, other=1.0).to(ACC)
    else:
        return tl.full([BLOCK_C], 1.0, ACC)


# ---------------------------------------------------------------------------------------------------------
# L∞ candidates of the streaming pass
#
# The k largest |d| are always among the k largest and the k smallest x (|d| grows with x above mu and falls
# with it below), so the L∞ statistics need a single pass over x next to the sum. k = 1 keeps the largest and
# the smallest x of each split. For k > 1 the pass keeps, per split, the *groups* of values whose maxima are
# the k largest (and whose minima are the k smallest): a group is S consecutive columns of a tile over the R
# consecutive blocks of a chunk, and its maximum costs one comparison per value, where a top-k of the values
# themselves costs a sorting network per value. The statistics stay exact: if a value v is among the channel's
# k largest and its group G is not among the k groups with the largest maxima, those k groups each hold a
# value >= max(G) >= v; so the k largest values of the chosen groups are the channel's k largest (ties broken
# by group id, which the argument allows). The finalising kernel reloads the chosen groups (2k per channel)
# and takes the top-k of their |d|.
#
# A group is ranked by one int64 key: the float32 maximum in order-preserving integer form, then the group id,
# so ``tl.topk`` on keys ranks groups by value and carries their ids (float32 accumulators only: a float64
# value does not fit next to an id; float64 channels take the host top-k instead).
# ---------------------------------------------------------------------------------------------------------

#: Group id of an empty key slot (never a real group: ids are < n < 2^31).
NO_GROUP = tl.constexpr(0x7FFFFFFF)
#: The key of an empty slot: below every real key (whose value part is at least that of -inf or a NaN).
EMPTY_KEY = tl.constexpr(-(2**63) + 0x7FFFFFFF)


@triton.jit
def _group_key(v, gid):
    """int64 keys ordered like the float32 values ``v``, ties by the (non-negative int32) group ids ``gid``."""
    bits = v.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | gid.to(tl.int64)


@triton.jit
def _key_group(key):
    return (key & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _key_slots(cand_ptr, ch, splits, split, KPAD: tl.constexpr):
    """Pointers to the KPAD key slots of the largest x of channels ``ch`` and this split (the smallest follow)."""
    return cand_ptr + (ch[:, None] * splits + split) * (2 * KPAD) + tl.arange(0, KPAD)[None, :]


@triton.jit
def _spread(v, N: tl.constexpr, R: tl.constexpr):
    """[N] -> [N * R]: each value repeated R times in a row."""
    return tl.reshape(tl.broadcast_to(v[:, None], [N, R]), [N * R])


@triton.jit
def _merge_keys(state, new, KPAD: tl.constexpr, G: tl.constexpr, EMPTY: tl.constexpr = EMPTY_KEY):
    """The KPAD largest of ``state`` ([ROWS, KPAD]) and ``new`` ([ROWS, G], G >= KPAD), per row.

    One top-k over both at once, the state spread to G columns first (copies past its first KPAD replaced by
    ``EMPTY``, below every real value): one sorting network instead of two, and a key tensor of at least one
    value per thread, where a [1, 2 KPAD] one would be replicated in every thread and sorted by each.
    """
    rows: tl.constexpr = state.shape[0]
    if G > KPAD:
        spread = tl.reshape(tl.broadcast_to(state[:, None, :], [rows, G // KPAD, KPAD]), [rows, G])
        state = tl.where(tl.arange(0, G)[None, :] < KPAD, spread, EMPTY)
    return tl.topk(tl.reshape(tl.join(state, new), [rows, 2 * G]), KPAD, dim=1)


# ---------------------------------------------------------------------------------------------------------
# Forward
#
#   mu = mean(x)
#   L1:  s = sqrt(pi/2) * mean|d|                       (and sum sign(d), kept for the backward)
#   L∞:  s = mean of the k largest |d| / c(n, k)        (and t, the k-th largest |d|, for the tie rule)
#   y  = d / s_e * gamma + beta
#
# Small channels take a single persistent program per channel tile that holds the whole channel in registers
# (one read of x, one write of y). Larger ones: a streaming statistics pass (L1: two, mu then mean|d|), a
# per-channel finalising kernel, and the normalising pass.
# ---------------------------------------------------------------------------------------------------------


@_jit
def forward_fused_kernel(
    x_ptr,  # input
    y_ptr,  # output
    w_ptr,  # (C,) weight, or any pointer when not HAS_W
    b_ptr,  # (C,) bias, or any pointer when not HAS_B
    mean_ptr,  # (C,) ACC out: mu
    scale_ptr,  # (C,) ACC out: s
    inv_std_ptr,  # (C,) ACC out: 1 / s_e
    thr_ptr,  # (C,) ACC out (L∞): t, the k-th largest |d|
    sign_ptr,  # (C,) int32 out (L1): sum of sign(d)
    C, n, k, A, B,  # channels, values per channel (A rows of B), top-k count
    x_sa, x_sb, x_sc, y_sa, y_sb, y_sc,  # strides of x and y
    factor: tl.float64,  # sqrt(pi/2) (L1) or 1 / c(n, k) (L∞)
    eps: tl.float64,
    root_eps: tl.float64,  # sqrt(eps) rounded to DT (low precision)
    width_over_n: tl.float64,  # BLOCK_N / n: the zero padding of the pairwise mean (low precision)
    kpad_over_k: tl.float64,  # KPAD / k (low precision)
    L1: tl.constexpr,  # L1 scale, else L∞ top-k
    LOWP: tl.constexpr,  # statistics in DT
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    DT: tl.constexpr,  # dtype of x and y
    ACC: tl.constexpr,  # accumulator dtype
    KPAD: tl.constexpr,  # k rounded up to a power of two (L∞)
    IDX64: tl.constexpr,
    FLAT: tl.constexpr,  # flat block (required by LOWP)
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,  # >= B (2-D block)
    BLOCK_N: tl.constexpr,  # the whole channel: >= n (flat), BLOCK_B * (>= A) (2-D)
):
    """One program per tile of BLOCK_C channels holding all n values of each: statistics, then y."""
    ch = _channels(tl.program_id(0), BLOCK_C, IDX64)
    cmask = ch < C
    a, b, valid = _positions(0, 0, _lanes(BLOCK_N, IDX64), A, B, BLOCK_B, BLOCK_N, FLAT)
    x_off, mask = _tile(ch, a, b, valid, C, x_sa, x_sb, x_sc)
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
    if LOWP:
        mean = _rnd(_tree_mean(x, BLOCK_C, BLOCK_N, DT) * _scalar(width_over_n, tl.float32), DT)
    else:
        mean = tl.sum(x, axis=1) / n
    d = _deviation(x, mean, LOWP, DT)
    abs_d = tl.where(mask, tl.abs(d), 0.0)
    if L1:
        if LOWP:
            stat = _rnd(_tree_mean(abs_d, BLOCK_C, BLOCK_N, DT) * _scalar(width_over_n, tl.float32), DT)
        else:
            stat = tl.sum(abs_d, axis=1) / n
        tl.store(sign_ptr + ch, tl.sum(tl.where(mask, _sign(d), 0), axis=1), mask=cmask)
    else:
        top = _topk(tl.where(mask, abs_d, -1.0), KPAD)
        stat, threshold = _topk_mean_and_threshold(top, k, kpad_over_k, BLOCK_C, KPAD, LOWP, DT)
        tl.store(thr_ptr + ch, threshold, mask=cmask)
    gamma = _gamma(w_ptr, ch, cmask, HAS_W, BLOCK_C, ACC)
    scale, inv_std, mult = _finish_scale(stat, factor, eps, root_eps, gamma, LOWP, DT, ACC)
    y = d * mult[:, None]
    if LOWP:
        y = _rnd(y, DT)
    if HAS_B:
        beta = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(ACC)
        if LOWP:
            beta = _rnd(beta, DT)
        y = y + beta[:, None]
    y_off, _ = _tile(ch, a, b, valid, C, y_sa, y_sb, y_sc)
    tl.store(y_ptr + y_off, to_output(y, DT), mask=mask)
    tl.store(mean_ptr + ch, mean, mask=cmask)
    tl.store(scale_ptr + ch, scale, mask=cmask)
    tl.store(inv_std_ptr + ch, inv_std, mask=cmask)


@_jit
def channel_reduce_kernel(
    src_ptr,  # values: the input, or a (C, P) array of partials of the previous level (A = P, B = 1)
    center_ptr,  # (C,) ACC: mu, subtracted before |.| when CENTERED
    out_ptr,  # (C, splits) ACC out: partial sums; TREE: (C, blocks) block means; FINAL: (C, 1) finished values
    sign_ptr,  # (C, splits) int32 out: partial sums of sign(x - mu) when CENTERED
    cand_ptr,  # (C, splits, 2) ACC out: max and min x (KPAD = 1), or (C, splits, 2, KPAD) int64 group keys
    C, A, B, NB,  # channels; each an (A, B) array of values in blocks, NB blocks per row (2-D)
    s_sa, s_sb, s_sc,  # strides of src
    c_tiles, per_split, splits, blocks,  # grid: channel tiles x splits of per_split blocks; blocks per channel
    chunk,  # blocks per group chunk (KPAD > 1)
    channel_n,  # values per channel of the original input: the divisor of the finished SUM
    width_over_n: tl.float64,  # padded width / n, the finished TREE's factor
    CENTERED: tl.constexpr,  # reduce |x - mu| (and count signs) instead of x
    TREE: tl.constexpr,  # low precision: pairwise mean of means in DT, else a sum in ACC
    FINAL: tl.constexpr,  # the last level: finish (sum / n, or tree mean * width / n)
    DT: tl.constexpr,
    ACC: tl.constexpr,
    KPAD: tl.constexpr,  # > 0: also keep the L∞ candidates of the split
    IDX64: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,  # columns per group (KPAD > 1): a block row has G = BLOCK_N // GROUP >= KPAD groups
):
    """Per-channel partial reductions: program (tile, split) reduces blocks [split * per_split, +per_split).

    SUM mode: each program sums its values in ACC in a fixed order and writes one partial; a further level
    (this kernel on the (C, splits) partials) adds them up, also in a fixed order. TREE mode: each program
    writes the pairwise mean of each of its blocks; the next level takes the pairwise mean of those means,
    and so on. Blocks are powers of two and each level's block is at most the next power of two of the number
    of values left, so the levels form the one binary tree over the zero-padded channel that the PyTorch
    backend's ``_tree_mean`` computes; the result is multiplied by width / n at the end.
    """
    tile, split = _program(c_tiles, IDX64)
    ch = _channels(tile, BLOCK_C, IDX64)
    cmask = ch < C
    j = _lanes(BLOCK_N, IDX64)
    if CENTERED:
        mean = tl.load(center_ptr + ch, mask=cmask, other=0.0)
        signs = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.int32)
    if KPAD == 1:
        top_hi = tl.full([BLOCK_C, BLOCK_N], float("-inf"), ACC)
        top_lo = tl.full([BLOCK_C, BLOCK_N], float("inf"), ACC)
    if KPAD > 1:
        G: tl.constexpr = BLOCK_N // GROUP
        tl.static_assert(G >= KPAD)
        # The running top-k keys live in this split's slots of cand_ptr between merges: in registers, the
        # top-k's output layout holds copies in several threads, for the whole inner loop.
        keys = _key_slots(cand_ptr, ch, splits, split, KPAD)
        empty = tl.full([BLOCK_C, KPAD], EMPTY_KEY, tl.int64)
        tl.store(keys, empty, mask=cmask[:, None])
        tl.store(keys + KPAD, empty, mask=cmask[:, None])
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    first = split * per_split
    qa, qb = _block(first, NB, FLAT)
    for start in range(0, per_split, chunk):
        if KPAD > 1:
            run_hi = tl.full([BLOCK_C, BLOCK_N], float("-inf"), ACC)
            run_lo = tl.full([BLOCK_C, BLOCK_N], float("inf"), ACC)
        for step in range(chunk):
            a, b, valid = _positions(qa, qb, j, A, B, BLOCK_B, BLOCK_N, FLAT)
            offsets, mask = _tile(ch, a, b, valid, C, s_sa, s_sb, s_sc)
            x = tl.load(src_ptr + offsets, mask=mask, other=0.0).to(ACC)  # gate: element loop
            if KPAD == 1:
                top_hi = tl.maximum(top_hi, tl.where(mask, x, float("-inf")))
                top_lo = tl.minimum(top_lo, tl.where(mask, x, float("inf")))
            if KPAD > 1:
                run_hi = tl.maximum(run_hi, tl.where(mask, x, float("-inf")))
                run_lo = tl.minimum(run_lo, tl.where(mask, x, float("inf")))
            if CENTERED:
                # Padding lanes sit at the mean: d = 0 adds nothing to either sum.
                d = _deviation(tl.where(mask, x, mean[:, None]), mean, TREE, DT)
                signs += (d > 0).to(tl.int32) - (d < 0).to(tl.int32)
                x = tl.abs(d)
            if TREE:
                block_mean = _tree_mean(x, BLOCK_C, BLOCK_N, DT)
                if FINAL:
                    block_mean = _rnd(block_mean * _scalar(width_over_n, tl.float32), DT)
                q = first + start + step
                tl.store(out_ptr + ch * blocks + q, block_mean, mask=cmask & ((ch * 0 + q) < blocks))
            else:
                acc += x
            qa, qb = _next_block(qa, qb, NB, FLAT)
        if KPAD > 1:
            # One key per group of the chunk (gid = the chunk's number in the channel * G + the group's column).
            gid = tl.arange(0, G)[None, :] + tl.zeros([BLOCK_C, G], dtype=tl.int32) + ((first + start) // chunk) * G
            group_hi = tl.max(tl.reshape(run_hi, [BLOCK_C, G, GROUP]), axis=2)
            group_lo = tl.min(tl.reshape(run_lo, [BLOCK_C, G, GROUP]), axis=2)
            tl.debug_barrier()  # every thread's last store of the keys is visible to every thread
            keys = _key_slots(cand_ptr, ch, splits, split, KPAD)  # recomputed: not kept alive through the loop
            merged = _merge_keys(tl.load(keys, mask=cmask[:, None]), _group_key(group_hi, gid), KPAD, G)
            tl.store(keys, merged, mask=cmask[:, None])
            merged = _merge_keys(tl.load(keys + KPAD, mask=cmask[:, None]), _group_key(-group_lo, gid), KPAD, G)
            tl.store(keys + KPAD, merged, mask=cmask[:, None])
    if not TREE:
        result = tl.sum(acc, axis=1)
        if FINAL:
            result = result / channel_n
        tl.store(out_ptr + ch * splits + split, result, mask=cmask)
    if CENTERED:
        tl.store(sign_ptr + ch * splits + split, tl.sum(signs, axis=1), mask=cmask)
    if KPAD == 1:
        base = cand_ptr + (ch * splits + split) * 2
        tl.store(base, tl.max(top_hi, axis=1), mask=cmask)
        tl.store(base + 1, tl.min(top_lo, axis=1), mask=cmask)


@_jit
def forward_finalize_kernel(
    mean_ptr,  # (C,) ACC: mu
    stat_ptr,  # (C,) ACC (L1): mean|d|
    sign_part_ptr,  # (C, splits) int32 (L1): partial sums of sign(d)
    cand_ptr,  # (C, splits, 2) ACC (KPAD = 1) or (C, splits, 2, KPAD) int64 group keys (KPAD > 1)
    x_ptr,  # the input, whose chosen groups are reloaded (KPAD > 1)
    top_ptr,  # (C, KPAD) ACC scratch (KPAD > 1): the running top-k |d| between reload steps
    w_ptr,
    scale_ptr,  # (C,) ACC out: s
    inv_std_ptr,  # (C,) ACC out: 1 / s_e
    mult_ptr,  # (C,) ACC out: gamma / s_e (rounded to DT in low precision)
    thr_ptr,  # (C,) ACC out (L∞): t
    sign_ptr,  # (C,) int32 out (L1): sum of sign(d)
    C, n, k, splits,
    A, B, NB, x_sa, x_sb, x_sc,  # the input's blocks and strides, as in channel_reduce_kernel
    per_split, blocks, chunk,  # the streaming pass's splits and group chunks
    factor: tl.float64,
    eps: tl.float64,
    root_eps: tl.float64,
    kpad_over_k: tl.float64,
    L1: tl.constexpr,
    LOWP: tl.constexpr,
    HAS_W: tl.constexpr,
    DT: tl.constexpr,
    ACC: tl.constexpr,
    KPAD: tl.constexpr,
    IDX64: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # partials (L1), candidates (L∞, k = 1) or splits' keys (k > 1) read per step
    BLOCK_B: tl.constexpr,  # the streaming pass's block (KPAD > 1)
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    CHUNK: tl.constexpr,  # blocks of a group reloaded per step: the planned chunk (a power of two >= it)
    PHASE: tl.constexpr,  # L∞ with k > 1: 1 = reload the chosen groups into top_ptr, 2 = statistics from it
):
    """Per channel tile: the scale from the reduced statistics; for L∞ the top-k of |d| over the candidates.

    k > 1 runs twice. Phase 1, one channel per program (BLOCK_C = 1): the KPAD best keys of each side over all
    splits, then the values of the chosen groups (the groups chosen by both sides once), their |d| and top-k,
    stored sorted in top_ptr. Phase 2, on a tile of channels: the scale from those top-k values. (One kernel
    doing both keeps a replicated [1, KPAD] top-k alive through its last steps, which ptxas spills.)
    """
    ch = _channels(tl.program_id(0), BLOCK_C, IDX64)
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
    elif KPAD == 1:
        hi = tl.full([BLOCK_C, BLOCK_Q], float("-inf"), ACC)
        lo = tl.full([BLOCK_C, BLOCK_Q], float("inf"), ACC)
        for start in range(0, splits, BLOCK_Q):
            q = start + tl.arange(0, BLOCK_Q)
            m = cmask[:, None] & (q < splits)[None, :]
            base = cand_ptr + (ch[:, None] * splits + q[None, :]) * 2
            hi = tl.maximum(hi, tl.load(base, mask=m, other=float("-inf")))
            lo = tl.minimum(lo, tl.load(base + 1, mask=m, other=float("inf")))
        # |d| is monotone in x on each side of mu (also after rounding to DT), so the largest |d| is at the
        # channel's largest or smallest value.
        top_hi = tl.abs(_deviation(tl.max(hi, axis=1)[:, None], mean, LOWP, DT))
        top_lo = tl.abs(_deviation(tl.min(lo, axis=1)[:, None], mean, LOWP, DT))
        top = tl.where(cmask[:, None], tl.maximum(top_hi, top_lo), 0.0)
        stat, threshold = _topk_mean_and_threshold(top, k, kpad_over_k, BLOCK_C, 1, LOWP, DT)
        tl.store(thr_ptr + ch, threshold, mask=cmask)
    elif PHASE == 2:
        top = tl.load(top_ptr + ch[:, None] * KPAD + tl.arange(0, KPAD)[None, :], mask=cmask[:, None], other=0.0)
        stat, threshold = _topk_mean_and_threshold(top, k, kpad_over_k, BLOCK_C, KPAD, LOWP, DT)
        tl.store(thr_ptr + ch, threshold, mask=cmask)
    else:
        tl.static_assert(BLOCK_C == 1)
        # Row 0: the keys of the largest x (group maxima), row 1: of the smallest (negated minima).
        best = tl.full([2, KPAD], EMPTY_KEY, tl.int64)
        slots = tl.arange(0, BLOCK_Q * KPAD)
        side = tl.arange(0, 2)[:, None]
        for start in range(0, splits, BLOCK_Q):
            q = start + slots // KPAD
            m = (q < splits)[None, :] & (side < 2) & cmask[:, None]
            base = cand_ptr + ((ch[:, None] * splits + q[None, :]) * 2 + side) * KPAD + (slots % KPAD)[None, :]
            new = tl.load(base, mask=m, other=EMPTY_KEY)
            # Most splits hold no key above the current k-th: skip their sort.
            if tl.max((tl.max(new, axis=1) > tl.min(best, axis=1)).to(tl.int32)) > 0:
                best = _merge_keys(best, new, KPAD, BLOCK_Q * KPAD)
        gid_hi = _key_group(tl.sum(tl.where(side == 0, best, 0), axis=0))
        gid_lo = _key_group(tl.sum(tl.where(side == 1, best, 0), axis=0))
        # A group chosen by both sides is reloaded once: its values are candidates once.
        twice = tl.max((gid_lo[:, None] == gid_hi[None, :]).to(tl.int32), axis=1) > 0
        gid_lo = tl.where(twice, NO_GROUP, gid_lo)
        gid = tl.reshape(tl.join(gid_hi, gid_lo), [2 * KPAD])
        G: tl.constexpr = BLOCK_N // GROUP
        chunk_no = gid // G
        column = (gid - chunk_no * G) * GROUP
        if IDX64:
            chunk_no = chunk_no.to(tl.int64)
            column = column.to(tl.int64)
        # Each step reloads CHUNK blocks of every chosen group: [2 KPAD groups, CHUNK blocks, GROUP columns].
        WIDTH: tl.constexpr = 2 * KPAD * CHUNK * GROUP
        # The running top-k lives in top_ptr between steps: in registers, the top-k's output layout is a copy of
        # it in every thread, kept alive through the loop (ptxas then spills).
        top_slots = top_ptr + ch[:, None] * KPAD + tl.arange(0, KPAD)[None, :]
        tl.store(top_slots, tl.full([1, KPAD], -1.0, ACC), mask=cmask[:, None])
        for start in range(0, chunk, CHUNK):
            # Recomputed each step: [WIDTH] index tensors kept alive through the loop make ptxas spill.
            slot = tl.arange(0, WIDTH)
            member = slot % GROUP
            gid_of = _spread(gid, 2 * KPAD, CHUNK * GROUP)
            chunk_of = _spread(chunk_no, 2 * KPAD, CHUNK * GROUP)
            column_of = _spread(column, 2 * KPAD, CHUNK * GROUP)
            step = start + (slot // GROUP) % CHUNK
            q = chunk_of * chunk + step  # the chunk's blocks, in order
            qa, qb = _block(q, NB, FLAT)
            a, b, valid = _positions(qa, qb, column_of + member, A, B, BLOCK_B, BLOCK_N, FLAT)
            valid = valid & (gid_of < NO_GROUP) & (step < chunk) & (q < blocks)
            offsets = ch[:, None] * x_sc + (a * x_sa + b * x_sb)[None, :]
            m = cmask[:, None] & valid[None, :]
            values = tl.load(x_ptr + offsets, mask=m, other=0.0).to(ACC)
            abs_d = tl.where(m, tl.abs(_deviation(values, mean, LOWP, DT)), -1.0)
            tl.debug_barrier()
            top_slots = top_ptr + ch[:, None] * KPAD + tl.arange(0, KPAD)[None, :]
            top = _merge_keys(tl.load(top_slots, mask=cmask[:, None], other=-1.0), abs_d, KPAD, WIDTH, -1.0)
            tl.store(top_slots, top, mask=cmask[:, None])
    if KPAD == 1 or PHASE == 2:
        gamma = _gamma(w_ptr, ch, cmask, HAS_W, BLOCK_C, ACC)
        scale, inv_std, mult = _finish_scale(stat, factor, eps, root_eps, gamma, LOWP, DT, ACC)
        tl.store(scale_ptr + ch, scale, mask=cmask)
        tl.store(inv_std_ptr + ch, inv_std, mask=cmask)
        tl.store(mult_ptr + ch, mult, mask=cmask)


@_jit
def normalize_kernel(
    x_ptr,
    y_ptr,
    mean_ptr,  # (C,) ACC: mu
    mult_ptr,  # (C,) ACC: gamma / s_e
    b_ptr,  # (C,) bias, or any pointer when not HAS_B
    C, A, B, NB,
    x_sa, x_sb, x_sc, y_sa, y_sb, y_sc,
    c_tiles, per_split,
    LOWP: tl.constexpr,
    HAS_B: tl.constexpr,
    DT: tl.constexpr,
    ACC: tl.constexpr,
    IDX64: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y = (x - mu) * (gamma / s_e) + beta, program (tile, split) over blocks [split * per_split, +per_split);
    in DT when LOWP."""
    tile, split = _program(c_tiles, IDX64)
    ch = _channels(tile, BLOCK_C, IDX64)
    cmask = ch < C
    j = _lanes(BLOCK_N, IDX64)
    mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0)
    mult = tl.load(mult_ptr + ch, mask=cmask, other=0.0)
    if HAS_B:
        beta = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(ACC)
        if LOWP:
            beta = _rnd(beta, DT)
    qa, qb = _block(split * per_split, NB, FLAT)
    for step in range(per_split):
        a, b, valid = _positions(qa, qb, j, A, B, BLOCK_B, BLOCK_N, FLAT)
        qa, qb = _next_block(qa, qb, NB, FLAT)
        x_off, mask = _tile(ch, a, b, valid, C, x_sa, x_sb, x_sc)
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)  # gate: element loop
        y = _deviation(x, mean, LOWP, DT) * mult[:, None]
        if LOWP:
            y = _rnd(y, DT)
        if HAS_B:
            y = y + beta[:, None]
        y_off, _ = _tile(ch, a, b, valid, C, y_sa, y_sb, y_sc)
        tl.store(y_ptr + y_off, to_output(y, DT), mask=mask)


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
def _tie_counts(d, threshold, mask):
    """Per value: [|d| > t] + [|d| > t and d > 0] << 16, and the same for |d| = t (the L∞ tie rule's inputs).

    Two int32 counters carry four counts (a lane counts at most one value per block and a program runs at most
    65535 blocks, which the host guarantees); above t, d != 0, so the sign sum is 2 * positives - count; at t
    it is the same unless t = 0, where every tied d is 0.
    """
    abs_d = tl.abs(d)
    above = mask & (abs_d > threshold[:, None])
    tied = mask & (abs_d == threshold[:, None])
    positive = d > 0
    return (above.to(tl.int32) + ((above & positive).to(tl.int32) << 16),
            tied.to(tl.int32) + ((tied & positive).to(tl.int32) << 16))


@triton.jit
def _unpack_counts(above, tied, threshold):
    """(#{|d| > t}, sum sign over it, #{|d| = t}, sum sign over it) per row from the packed counters."""
    n_above = tl.sum(above & 0xFFFF, axis=1)
    n_tied = tl.sum(tied & 0xFFFF, axis=1)
    sign_above = 2 * tl.sum(above >> 16, axis=1) - n_above
    sign_tied = tl.where(threshold > 0, 2 * tl.sum(tied >> 16, axis=1) - n_tied, 0)
    return n_above, sign_above, n_tied, sign_tied


@triton.jit
def _dx_coefficients(sum_dy, sum_dy_xhat, gamma, scale, inv_std, sign_sum, n_above, sign_above, n_tied, sign_tied,
                     factor, n, k, L1: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (gamma / s_e, offset, coef, share) of the backward formula above."""
    mean_g = gamma * sum_dy / n
    mean_g_xhat = gamma * sum_dy_xhat / n
    coef = -(scale * inv_std) * inv_std * mean_g_xhat * _scalar(factor, ACC)
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


@_jit
def backward_fused_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    w_ptr,
    mean_ptr, scale_ptr, inv_std_ptr,  # (C,) ACC from the forward
    thr_ptr,  # (C,) ACC (L∞): t
    sign_ptr,  # (C,) int32 (L1): sum of sign(d)
    dw_ptr,  # (C,) ACC out: sum(dy * x_hat)
    db_ptr,  # (C,) ACC out: sum(dy)
    C, n, k, A, B,
    x_sa, x_sb, x_sc, dy_sa, dy_sb, dy_sc, dx_sa, dx_sb, dx_sc,
    factor: tl.float64,  # F: sqrt(pi/2) for L1, n / (k c(n, k)) for L∞
    L1: tl.constexpr,
    LOWP: tl.constexpr,
    HAS_W: tl.constexpr,
    DT: tl.constexpr,
    ACC: tl.constexpr,
    IDX64: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per channel tile holding the whole channel: the reduction, then dx."""
    ch = _channels(tl.program_id(0), BLOCK_C, IDX64)
    cmask = ch < C
    a, b, valid = _positions(0, 0, _lanes(BLOCK_N, IDX64), A, B, BLOCK_B, BLOCK_N, FLAT)
    x_off, mask = _tile(ch, a, b, valid, C, x_sa, x_sb, x_sc)
    dy_off, _ = _tile(ch, a, b, valid, C, dy_sa, dy_sb, dy_sc)
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + dy_off, mask=mask, other=0.0).to(ACC)
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
        above, tied = _tie_counts(d, threshold, mask)
        n_above, sign_above, n_tied, sign_tied = _unpack_counts(above, tied, threshold)
    gamma = _gamma(w_ptr, ch, cmask, HAS_W, BLOCK_C, ACC)
    g_inv, offset, coef, share = _dx_coefficients(sum_dy, sum_dy_xhat, gamma, scale, inv_std, sign_sum, n_above,
                                                  sign_above, n_tied, sign_tied, factor, n, k, L1, ACC)
    u = _u_term(d, threshold, share, L1, ACC)
    dx = dy * g_inv[:, None] + offset[:, None] + coef[:, None] * u
    dx_off, _ = _tile(ch, a, b, valid, C, dx_sa, dx_sb, dx_sc)
    tl.store(dx_ptr + dx_off, to_output(dx, DT), mask=mask)
    tl.store(dw_ptr + ch, sum_dy_xhat, mask=cmask)
    tl.store(db_ptr + ch, sum_dy, mask=cmask)


@_jit
def backward_reduce_kernel(
    dy_ptr,
    x_ptr,
    mean_ptr, inv_std_ptr,  # (C,) ACC from the forward
    thr_ptr,  # (C,) ACC (L∞): t
    part_ptr,  # (2, C, splits) ACC out: partial sum(dy), sum(dy * x_hat)
    count_ptr,  # (4, C, splits) int32 out (L∞): partial #{|d| > t}, sum sign over it, #{|d| = t}, sum sign over it
    C, A, B, NB,
    x_sa, x_sb, x_sc, dy_sa, dy_sb, dy_sc,
    c_tiles, per_split, splits,
    L1: tl.constexpr,
    LOWP: tl.constexpr,
    DT: tl.constexpr,
    ACC: tl.constexpr,
    IDX64: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The backward's reduction pass: per-program partial sums, added up by the dx kernel."""
    tile, split = _program(c_tiles, IDX64)
    ch = _channels(tile, BLOCK_C, IDX64)
    cmask = ch < C
    j = _lanes(BLOCK_N, IDX64)
    mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0)
    inv_std = tl.load(inv_std_ptr + ch, mask=cmask, other=0.0)
    acc_dy = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    acc_dy_xhat = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    if not L1:
        threshold = tl.load(thr_ptr + ch, mask=cmask, other=0.0)
        acc_above = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.int32)
        acc_tied = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.int32)
    qa, qb = _block(split * per_split, NB, FLAT)
    for step in range(per_split):
        a, b, valid = _positions(qa, qb, j, A, B, BLOCK_B, BLOCK_N, FLAT)
        qa, qb = _next_block(qa, qb, NB, FLAT)
        x_off, mask = _tile(ch, a, b, valid, C, x_sa, x_sb, x_sc)
        dy_off, _ = _tile(ch, a, b, valid, C, dy_sa, dy_sb, dy_sc)
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)  # gate: element loop
        dy = tl.load(dy_ptr + dy_off, mask=mask, other=0.0).to(ACC)
        acc_dy += dy
        acc_dy_xhat += dy * ((x - mean[:, None]) * inv_std[:, None])
        if not L1:
            above, tied = _tie_counts(_deviation(x, mean, LOWP, DT), threshold, mask)
            acc_above += above
            acc_tied += tied
    plane = C * splits
    out = ch * splits + split
    tl.store(part_ptr + out, tl.sum(acc_dy, axis=1), mask=cmask)
    tl.store(part_ptr + plane + out, tl.sum(acc_dy_xhat, axis=1), mask=cmask)
    if not L1:
        n_above, sign_above, n_tied, sign_tied = _unpack_counts(acc_above, acc_tied, threshold)
        tl.store(count_ptr + out, n_above, mask=cmask)
        tl.store(count_ptr + plane + out, sign_above, mask=cmask)
        tl.store(count_ptr + 2 * plane + out, n_tied, mask=cmask)
        tl.store(count_ptr + 3 * plane + out, sign_tied, mask=cmask)


@triton.jit
def _sum_partials(ptr, ch, cmask, splits, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, DTYPE: tl.constexpr):
    """Sum of the (C, splits) partials of channels ``ch``, always in the same order."""
    total = tl.zeros([BLOCK_C, BLOCK_Q], dtype=DTYPE)
    for start in range(0, splits, BLOCK_Q):
        q = start + tl.arange(0, BLOCK_Q)
        m = cmask[:, None] & (q < splits)[None, :]
        total += tl.load(ptr + ch[:, None] * splits + q[None, :], mask=m, other=0)
    return tl.sum(total, axis=1)


@_jit
def backward_dx_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    w_ptr,
    mean_ptr, scale_ptr, inv_std_ptr, thr_ptr, sign_ptr,  # as in backward_fused_kernel
    part_ptr, count_ptr,  # partials from backward_reduce_kernel
    dw_ptr, db_ptr,  # (C,) ACC out, written by the programs of split 0
    C, n, k, A, B, NB,
    x_sa, x_sb, x_sc, dy_sa, dy_sb, dy_sc, dx_sa, dx_sb, dx_sc,
    c_tiles, per_split, splits,
    factor: tl.float64,
    L1: tl.constexpr,
    LOWP: tl.constexpr,
    HAS_W: tl.constexpr,
    DT: tl.constexpr,
    ACC: tl.constexpr,
    IDX64: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """The backward's elementwise pass: every program adds up its channels' partials (same order everywhere,
    so all programs of a channel agree bit for bit), forms the coefficients and writes dx for its split."""
    tile, split = _program(c_tiles, IDX64)
    ch = _channels(tile, BLOCK_C, IDX64)
    cmask = ch < C
    j = _lanes(BLOCK_N, IDX64)
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
    gamma = _gamma(w_ptr, ch, cmask, HAS_W, BLOCK_C, ACC)
    g_inv, offset, coef, share = _dx_coefficients(sum_dy, sum_dy_xhat, gamma, scale, inv_std, sign_sum, n_above,
                                                  sign_above, n_tied, sign_tied, factor, n, k, L1, ACC)
    # Before the loop: values kept alive through it only for a final store make ptxas spill.
    if split == 0:
        tl.store(dw_ptr + ch, sum_dy_xhat, mask=cmask)
        tl.store(db_ptr + ch, sum_dy, mask=cmask)
    qa, qb = _block(split * per_split, NB, FLAT)
    for step in range(per_split):
        a, b, valid = _positions(qa, qb, j, A, B, BLOCK_B, BLOCK_N, FLAT)
        qa, qb = _next_block(qa, qb, NB, FLAT)
        x_off, mask = _tile(ch, a, b, valid, C, x_sa, x_sb, x_sc)
        dy_off, _ = _tile(ch, a, b, valid, C, dy_sa, dy_sb, dy_sc)
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)  # gate: element loop
        dy = tl.load(dy_ptr + dy_off, mask=mask, other=0.0).to(ACC)
        u = _u_term(_deviation(x, mean, LOWP, DT), threshold, share, L1, ACC)
        dx = dy * g_inv[:, None] + offset[:, None] + coef[:, None] * u
        dx_off, _ = _tile(ch, a, b, valid, C, dx_sa, dx_sb, dx_sc)
        tl.store(dx_ptr + dx_off, to_output(dx, DT), mask=mask)
