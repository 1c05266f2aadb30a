"""Launch plans of the Triton batch-norm kernels: which kernels run, on which grids, with which arguments.

A plan is a pure function of shapes, strides, dtypes and options: it allocates nothing and reads no data. The
launchers (:mod:`.launch`, :mod:`.act_launch`) execute plans, and the compile gate (:mod:`.gate`) compiles the
kernel variants of the same plans for a GPU, so what the gate checks is what users run; the geometry tests
check grids and offset widths of shapes far too large to allocate.

What a plan guarantees (tested in ``tests/test_triton_layouts.py``):

* every tensor is addressed with its own strides in one shared (A, C, B) index space (:func:`address`), or
  copied once into the output's layout when no such space exists; nothing is written through another
  tensor's strides;
* grids are one-dimensional with fewer than 2^31 programs (CUDA's axes 1 and 2 stop at 65535);
* ``IDX64`` is set on every launch where an offset or index, masked lanes included, can reach 2^31;
* no integer that changes with the batch size is a specialisation key (``kernels._RUNTIME_INTS``), and block
  sizes that depend on it are powers of two, so the variants compiled over all batch sizes stay few.

References: arXiv:1803.01814
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import torch
import triton.language as tl

from .._constants import L1_SCALE, topk_constant
from ..stats import Norm, accumulate_dtype, computes_in_input_dtype

__all__ = [
    "Spec", "Ref", "Buffer", "Launch", "HostTopk", "Plan", "TileConfig", "GPU_CONFIG", "INTERPRETER_CONFIG",
    "MAX_KERNEL_K", "TL_DTYPES", "address", "plan_forward", "plan_backward", "plan_act_forward", "plan_l1_grad",
]

#: Largest k whose top-k the kernels keep in registers (next power of two of k candidates per row). Larger k,
#: a rare choice (the paper uses small k), take the top-k statistics from ``torch.topk``; the normalising pass
#: and the backward still run in Triton.
MAX_KERNEL_K = 64
INT32_LIMIT = 2**31
#: Most blocks one program of a streaming pass runs: the backward packs two per-lane counts in an int32.
MAX_BLOCKS_PER_PROGRAM = 32767

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class TileConfig:
    """Fixed tile sizes of one device kind (no autotuning: the interpreter cannot run it, and it would re-run
    kernels with side effects while timing them).

    Attributes:
        stream_elems: values per tile of the streaming kernels.
        channel_tile: channels per tile when channels are contiguous in memory (channels_last, (N, C)): wide
            enough for whole 32-byte sectors; the persistent kernel takes such inputs only if this many
            channels fit in its tile.
        fused_max_n: largest per-channel count handled by the persistent single-pass kernels.
        fused_elems: largest tile (channels x padded count) of the persistent kernels.
        target_programs: programs the streaming grids aim for (enough to fill the device).
        finalize_block_c: channels per program of the per-channel finalising kernel.
        finalize_block_q: partials it reads per step.
        reload_values: L∞ with k > 1: values per channel the finalising kernel reloads (the 2k chosen groups);
            it sets the groups' size, and so how many blocks pass between two merges of the group keys.
        num_warps: warps per program.
        wide_warps: warps of the L∞ statistics pass with k > 1, whose group merges need the registers of twice
            the threads (at 4 warps a channels_last tile's top-k spills, and a one-channel tile of short rows
            (7x7, 14x14) needs up to 196 registers on sm_90).
        whole_chunks: L∞ with k > 1: never split a channel into pieces shorter than one chunk of group merges
            (the GPU amortises each merge over a whole chunk; the interpreter keeps several splits per channel
            so that the tests merge candidates across splits).
    """

    stream_elems: int
    channel_tile: int
    fused_max_n: int
    fused_elems: int
    target_programs: int
    finalize_block_c: int
    finalize_block_q: int
    reload_values: int
    num_warps: int
    wide_warps: int
    whole_chunks: bool

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    @property
    def launch_options(self) -> dict:
        """Triton launch options. FMA contraction is allowed: it only touches the ACC arithmetic, since in low
        precision every product is rounded to the input dtype (a conversion) before it is added."""
        return {"num_warps": self.num_warps, "enable_fp_fusion": True}

    def for_device(self, sm_count: int) -> TileConfig:
        return replace(self, target_programs=4 * sm_count)


# GPU: 2048 values per tile is 16 per thread at 4 warps, enough for 128-bit loads; 4096-value persistent
# tiles stay in registers; ~4 programs per SM hide memory latency (528 on an H100/H200's 132 SMs). The L∞
# finalising kernel reloads 8192 values per channel (1% of a (256, 64, 56, 56) channel): chunks of group
# merges twice as long as with 4096, which brings k = 64 in float32 from 5.0x to 2.8x the L1 pass's
# instructions per value (benchmarks/RESULTS.md, section 7).
GPU_CONFIG = TileConfig(
    stream_elems=2048, channel_tile=32, fused_max_n=4096, fused_elems=4096, target_programs=528,
    finalize_block_c=16, finalize_block_q=64, reload_values=8192, num_warps=4, wide_warps=8, whole_chunks=True,
)
# The interpreter runs every program as numpy calls: tiny tiles keep the tests fast and make small shapes
# span several blocks, splits, chunks and tree levels, so the looping code runs.
INTERPRETER_CONFIG = TileConfig(
    stream_elems=16, channel_tile=4, fused_max_n=16, fused_elems=64, target_programs=6,
    finalize_block_c=4, finalize_block_q=2, reload_values=16, num_warps=1, wide_warps=1, whole_chunks=False,
)


# ---------------------------------------------------------------------------------------------------------
# Tensors and addressing
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """Shape, strides and dtype of a tensor: all a plan knows of it."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> Spec:
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype)

    @classmethod
    def contiguous(cls, shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool = False) -> Spec:
        fmt = torch.channels_last if channels_last and len(shape) == 4 else (
            torch.channels_last_3d if channels_last and len(shape) == 5 else torch.contiguous_format)
        meta = torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)
        return cls.of(meta)

    def empty_like(self, dtype: torch.dtype | None = None) -> Spec:
        """The spec of ``torch.empty_like`` of this tensor (what the outputs and the fake kernels allocate)."""
        meta = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")
        return Spec.of(torch.empty_like(meta, dtype=dtype))

    def with_dtype(self, dtype: torch.dtype) -> Spec:
        return replace(self, dtype=dtype)


@dataclass(frozen=True)
class Strides:
    """A tensor's strides in the (A, C, B) index space: value (a, b) of channel c at c*c + a*a + b*b."""

    a: int
    b: int
    c: int


@dataclass(frozen=True)
class Space:
    """The shared index space of a call: C channels of A rows by B values."""

    c: int
    a: int
    b: int

    @property
    def n(self) -> int:
        return self.a * self.b


def _merged_stride(shape: tuple[int, ...], stride: tuple[int, ...], dims: list[int]) -> int | None:
    """The stride of ``dims`` (consecutive, all of size > 1) merged into one dim, or None if they do not merge."""
    if not dims:
        return 0
    for p, q in zip(dims, dims[1:]):
        if stride[p] != stride[q] * shape[q]:
            return None
    return stride[dims[-1]]


def _splits(spec: Spec, dims: list[int]) -> dict[int, tuple[int, int]]:
    """The split points s for which ``dims[:s]`` and ``dims[s:]`` each merge, with the two merged strides."""
    found = {}
    for s in range(len(dims) + 1):
        sa = _merged_stride(spec.shape, spec.stride, dims[:s])
        sb = _merged_stride(spec.shape, spec.stride, dims[s:])
        if sa is not None and sb is not None:
            found[s] = (sa, sb)
    return found


def _fast_axis(st: Strides, space: Space) -> str | None:
    """The axis along which the tensor is contiguous (the one its loads coalesce on), if any."""
    sizes = {"c": space.c, "a": space.a, "b": space.b}
    moving = [(abs(getattr(st, axis)), axis) for axis in ("c", "b", "a") if sizes[axis] > 1 and getattr(st, axis)]
    return min(moving)[1] if moving else None


def address(outputs: dict[str, Spec], inputs: dict[str, Spec]) -> tuple[Space, dict[str, Strides], tuple[str, ...]]:
    """The (A, C, B) index space shared by ``outputs`` and ``inputs`` and each tensor's strides in it.

    The batch and spatial dims (in order, size-1 dims dropped) are split into two groups, A before B, each of
    which must merge into one dim of uniform stride in every tensor. Outputs are dense (``torch.empty_like``),
    so a split exists for them. An input for which none of their splits works (a cropped spatial dim, say), or
    whose contiguous axis is not that of the first input (a gradient in another memory format, which would be
    read with scattered loads), is listed for a copy into the first output's layout; its strides are then
    that output's. Inputs with every stride 0 (an expanded scalar gradient) are read in place.

    Returns:
        ``(space, strides by name, names of the inputs to copy)``.
    """
    first = next(iter(outputs.values()))
    shape = first.shape
    dims = [d for d in [0, *range(2, len(shape))] if shape[d] > 1]
    common = None
    for spec in outputs.values():
        valid = _splits(spec, dims)
        common = set(valid) if common is None else common & set(valid)
    candidates: dict[str, dict[int, tuple[int, int]]] = {name: _splits(spec, dims) for name, spec in inputs.items()}
    copies = []
    for name, valid in candidates.items():
        if common & set(valid):
            common &= set(valid)
        else:
            copies.append(name)
    split = max(common)

    def strides_of(spec: Spec) -> Strides:
        sa, sb = _splits(spec, dims)[split]
        return Strides(sa, sb, spec.stride[1])

    a = math.prod(shape[d] for d in dims[:split])
    b = math.prod(shape[d] for d in dims[split:])
    space = Space(shape[1], a, b)
    strides = {name: strides_of(spec) for name, spec in outputs.items()}
    lead = None
    for name, spec in inputs.items():
        if name in copies:
            continue
        st = strides_of(spec)
        axis = _fast_axis(st, space)
        if lead is None:
            lead = axis
        elif axis is not None and axis != lead:
            copies.append(name)
            continue
        strides[name] = st
    for name in copies:
        strides[name] = strides_of(first)
    return space, strides, tuple(copies)


def _span(space: Space, st: Strides, rows: int, cols: int, chans: int) -> int:
    """One past the largest |offset| a tile grid of chans x rows x cols (padding included) computes."""
    return (chans - 1) * abs(st.c) + (rows - 1) * abs(st.a) + (cols - 1) * abs(st.b) + 1


# ---------------------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """A tensor argument of a launch, by name (an input, an output or a plan buffer)."""

    name: str


@dataclass(frozen=True)
class Buffer:
    """A scratch or per-channel tensor the launcher allocates for the plan (uninitialised unless ``fill``)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: int | None = None


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``module.kernel[grid](**args, **constexprs, **options)``."""

    module: str  # "kernels" or "act_kernels"
    kernel: str
    grid: tuple[int]
    args: tuple[tuple[str, object], ...]  # (parameter, Ref | int | float) in the kernel's order
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int

    def arg(self, name: str) -> object:
        return dict(self.args)[name]


@dataclass(frozen=True)
class HostTopk:
    """L∞ statistics with ``torch.topk`` (k > MAX_KERNEL_K, float64 with k > 1, or a channel of 2^31 values)."""

    k: int
    factor: float
    eps: float
    root_eps: float
    lowp: bool


@dataclass(frozen=True)
class Plan:
    space: Space
    strides: dict[str, Strides] = field(hash=False)
    copies: tuple[str, ...]  # inputs copied into the layout of ``like`` first
    like: str
    buffers: tuple[Buffer, ...]
    steps: tuple[Launch | HostTopk, ...]


@dataclass(frozen=True)
class Tiles:
    """The blocks of a streaming pass (or the one block of a persistent kernel) and its grid."""

    block_c: int
    block_b: int
    block_n: int
    flat: bool
    nb: int  # blocks per row (2-D)
    blocks: int  # blocks per channel
    c_tiles: int
    splits: int
    per_split: int  # blocks per program
    chunk: int = 1  # blocks per L∞ group chunk
    group: int = 1  # columns per L∞ group

    @property
    def block_a(self) -> int:
        return self.block_n // self.block_b

    @property
    def programs(self) -> int:
        return self.c_tiles * self.splits

    def padded(self, space: Space) -> tuple[int, int, int]:
        """(channels, rows, columns) the grid covers, padding included."""
        if self.flat:
            values = self.splits * self.per_split * self.block_n
            return self.c_tiles * self.block_c, cdiv(values, max(space.b, 1)) + 1, space.b
        rows = (cdiv(self.splits * self.per_split, self.nb)) * self.block_a
        return self.c_tiles * self.block_c, rows, self.nb * self.block_b

    def constexprs(self) -> dict:
        return {"FLAT": self.flat, "BLOCK_C": self.block_c, "BLOCK_B": self.block_b, "BLOCK_N": self.block_n}


def _channels_contiguous(st: Strides, space: Space) -> bool:
    return space.c > 1 and abs(st.c) == 1


#: Narrowest block row (values contiguous in memory) worth choosing for less padding: 32 bytes of fp16.
MIN_BLOCK_COLUMNS = 16


def _columns(b: int, per_row: int) -> int:
    """Columns of a 2-D block: the power of two that pads a row of b values least (a 56 x 56 map in rows of 64
    values, 49 per row exactly, rather than 2048 + 1088), the wider one on ties. It depends on the spatial size
    only, never on the batch: a new batch size compiles no new variant (issue 18, item 15)."""
    widest = min(next_pow2(b), per_row)
    best, best_cost = widest, None
    width = widest
    while width >= min(MIN_BLOCK_COLUMNS, widest):
        cost = cdiv(b, width) * width
        if best_cost is None or cost < best_cost:
            best, best_cost = width, cost
        width //= 2
    return best


def stream_tiles(space: Space, st: Strides, config: TileConfig, *, flat: bool, min_block_n: int = 1,
                 group_k: int = 0, elems: int | None = None, channel_tile: int | None = None) -> Tiles:
    """Tiles and splits of a streaming pass over the channels of ``space`` read with strides ``st``.

    A tile holds about ``config.stream_elems`` values: ``channel_tile`` channels by few values when channels
    are contiguous in memory (coalesced loads along C), else one channel (more when channels are short) by a
    2-D block of rows x columns whose columns are contiguous in memory. Flat blocks (the low-precision tree)
    never exceed the next power of two of n, so each tree level's block is a power of two <= the padded width.
    The splits fill the device; with ``group_k`` (L∞, k > 1) each split is a whole number of group chunks.
    """
    c, a, b, n = space.c, space.a, space.b, space.n
    elems = elems or config.stream_elems
    if _channels_contiguous(st, space):
        # L∞ with a large k keeps 2 x k int64 keys per channel in registers: fewer channels per tile.
        block_c = min(next_pow2(c), channel_tile or config.channel_tile, max(1, 1024 // max(group_k, 1)))
        per_row = max(elems // block_c, min_block_n)
    else:
        block_c = 1
        per_row = elems
    if flat:
        block_b = 1
        block_n = max(min(per_row, next_pow2(n)), min_block_n)
        nb = 1
        blocks = cdiv(n, block_n)
    else:
        # The block's shape follows the layer (spatial size, channels, layout), not the batch: a small batch
        # leaves rows of the block masked rather than compiling a narrower variant.
        block_b = _columns(b, per_row)
        block_a = max(per_row // block_b, 1)
        block_n = block_a * block_b
        if block_n < min_block_n:
            block_a = cdiv(min_block_n, block_b)
            block_n = next_pow2(block_a * block_b)
        nb = cdiv(b, block_b)
        blocks = cdiv(a, block_n // block_b) * nb
    if block_c == 1:
        block_c = max(1, min(next_pow2(c), elems // block_n))
    c_tiles = cdiv(c, block_c)
    splits = min(blocks, max(1, cdiv(config.target_programs, c_tiles)))
    splits = max(splits, cdiv(blocks, MAX_BLOCKS_PER_PROGRAM))
    per_split = cdiv(blocks, splits)
    chunk = group = 1
    if group_k > 1:
        group, chunk = _groups(block_c, block_n, group_k, config, flat)
        if config.whole_chunks and per_split < chunk:
            # Fewer, longer splits: a merge costs the same whatever the chunk's length.
            splits = max(1, blocks // chunk)
            per_split = cdiv(blocks, splits)
        chunk = min(per_split, chunk)
        per_split = cdiv(per_split, chunk) * chunk
    splits = cdiv(blocks, per_split)
    return Tiles(block_c, block_b, block_n, flat, nb, blocks, c_tiles, splits, per_split, chunk, group)


#: Values per tile of the low-precision tree's later levels (over the block means of the level before).
TREE_LEVEL_ELEMS = 128
def _group_warps(block_c: int, flat: bool, config: TileConfig) -> int:
    """Warps of the L∞ statistics pass with groups: ``wide_warps`` (the key merges of a [block_c, 2 G] tensor
    need the registers of twice the threads: at 4 warps a one-channel tile of 7x7 rows takes 196 registers on
    sm_90 and a (2, 32, 128, 128, 128) float32 one spills), except for the flat one-channel blocks of the
    low-precision tree, whose pairwise means across 8 warps cost 1.5x the instructions and spill in bf16 at
    k = 64, while 4 warps stay within 101 registers."""
    return config.num_warps if (flat and block_c == 1) else config.wide_warps


#: Values the finalising kernel reloads per step of the L∞ groups (its top-k runs on twice as many).
RELOAD_STEP = 1024


def _groups(block_c: int, block_n: int, kpad: int, config: TileConfig, flat: bool = False) -> tuple[int, int]:
    """(columns per group, blocks per chunk) of the L∞ candidate groups (kernels.py, "L∞ candidates").

    A block row has G >= kpad groups, just enough that the [block_c, 2 G] keys of a merge give every thread one
    (a smaller key tensor is replicated in each thread and sorted by each; a larger one costs registers) and
    that one block of the 2 kpad chosen groups fits the finalising kernel's reload step. A
    chunk of blocks passes between two merges, as many as keep the 2 kpad reloaded groups within the reload
    budget; the merges then cost about 4 kpad log2(kpad)^2 / reload instructions per value, whatever G.
    """
    threads = 32 * _group_warps(block_c, flat, config)
    g = min(block_n, max(kpad, next_pow2(cdiv(threads, 2 * block_c)), next_pow2(cdiv(2 * kpad * block_n, RELOAD_STEP))))
    group = block_n // g
    # A large k merges 2 k keys: a longer chunk (and reload) keeps the merges a small part of the pass.
    reload = max(config.reload_values, 64 * kpad)
    return group, max(1, reload // (2 * kpad * group))


def partial_tiles(space: Space, config: TileConfig) -> Tiles:
    """One program per channel tile adding up a (C, P) array of partial sums: the last SUM level, whatever P
    (a fixed tile, so that the number of splits of the level before makes no variant of its own)."""
    block_c = config.finalize_block_c
    block_n = config.finalize_block_q
    blocks = cdiv(space.a, block_n)
    return Tiles(block_c, 1, block_n, False, 1, blocks, cdiv(space.c, block_c), 1, blocks, 1)


def fused_tiles(space: Space, st: Strides, config: TileConfig, lowp: bool) -> Tiles | None:
    """The tile of the persistent kernels (whole channels in registers), or None when the channel is too long.

    Low precision needs the flat order (the pairwise tree); 2-D blocks otherwise, unless their padding would
    more than double the tile. Channels contiguous in memory need ``channel_tile`` channels per tile (or all of
    them) for coalesced loads: a one-channel tile of such a tensor would read scattered values.
    """
    c, a, b, n = space.c, space.a, space.b, space.n
    if n > config.fused_max_n:
        return None
    width = next_pow2(n)
    if lowp or b == 1 or next_pow2(a) * next_pow2(b) > 2 * width:
        flat, block_b, block_n = True, 1, width
    else:
        flat, block_b, block_n = False, next_pow2(b), next_pow2(a) * next_pow2(b)
    if _channels_contiguous(st, space):
        block_c = min(next_pow2(c), config.channel_tile)
        if block_c * block_n > config.fused_elems:
            return None
    else:
        if block_n > config.fused_elems:
            return None
        block_c = max(1, min(next_pow2(c), config.fused_elems // block_n))
    c_tiles = cdiv(c, block_c)
    return Tiles(block_c, block_b, block_n, flat, 1, 1, c_tiles, 1, 1)


def _needs_idx64(*extents: int) -> bool:
    return max(extents) >= INT32_LIMIT


def _tensor_idx64(space: Space, tiles: Tiles, *strides: Strides) -> bool:
    chans, rows, cols = tiles.padded(space)
    index = tiles.splits * tiles.per_split * tiles.block_n + tiles.block_n
    return _needs_idx64(index, tiles.programs, *(_span(space, st, rows, cols, chans) for st in strides))


def _launch(module: str, kernel: str, grid: int, args: dict, constexprs: dict, config: TileConfig,
            num_warps: int | None = None) -> Launch:
    if not 0 < grid < INT32_LIMIT:
        raise ValueError(f"a grid of {grid} programs cannot be launched (CUDA allows 1 to 2^31 - 1 on axis 0)")
    return Launch(module, kernel, (grid,), tuple(args.items()), tuple(constexprs.items()),
                  num_warps or config.num_warps)


def _strides_args(prefix: str, st: Strides) -> dict:
    return {f"{prefix}_sa": st.a, f"{prefix}_sb": st.b, f"{prefix}_sc": st.c}


def _rounded(value: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


@dataclass
class _Builder:
    config: TileConfig
    buffers: list[Buffer] = field(default_factory=list)
    steps: list = field(default_factory=list)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, fill: int | None = None) -> Ref:
        self.buffers.append(Buffer(name, shape, dtype, fill))
        return Ref(name)

    def launch(self, module: str, kernel: str, grid: int, args: dict, constexprs: dict,
               num_warps: int | None = None) -> None:
        self.steps.append(_launch(module, kernel, grid, args, constexprs, self.config, num_warps))


def _reduce_levels(bld: _Builder, tag: str, space: Space, st: Strides, src: Ref, center: Ref | None, out: Ref,
                   *, tree: bool, dt, acc_tl, acc: torch.dtype, kpad: int, width_over_n: float,
                   sign_out: bool) -> tuple[Tiles, Ref | None, Ref | None]:
    """The levels of channel_reduce_kernel that bring x (or |x - mu|) down to one value per channel in ``out``.

    Level 1 reads x (and, with ``center``, counts the signs; with ``kpad``, keeps the L∞ candidates); every
    further level reduces the previous level's (C, P) partials, read as C channels of P rows of one value.

    Returns:
        ``(level-1 tiles, level-1 sign partials, level-1 candidates)``.
    """
    c = space.c
    first = stream_tiles(space, st, bld.config, flat=tree, min_block_n=kpad if kpad > 1 else 1, group_k=kpad,
                         elems=_elems(bld.config, acc))
    level, tiles, level_space, level_st, level_src = 1, first, space, st, src
    signs = cand = None
    while True:
        width = tiles.blocks if tree else tiles.splits
        final = width == 1
        target = out if final else bld.buffer(f"{tag}_level{level}", (c, width), acc)
        args = {"src_ptr": level_src, "center_ptr": center if (center is not None and level == 1) else target,
                "out_ptr": target}
        if level == 1 and center is not None and sign_out:
            signs = bld.buffer(f"{tag}_signs", (c, tiles.splits), torch.int32)
        if level == 1 and kpad == 1:
            cand = bld.buffer(f"{tag}_extremes", (c, tiles.splits, 2), acc)
        elif level == 1 and kpad > 1:
            cand = bld.buffer(f"{tag}_keys", (c, tiles.splits, 2, kpad), torch.int64)
        level_kpad = kpad if level == 1 else 0
        args["sign_ptr"] = signs if (level == 1 and signs is not None) else target
        args["cand_ptr"] = cand if (level == 1 and cand is not None) else target
        args.update(C=c, A=level_space.a, B=level_space.b, NB=tiles.nb, s_sa=level_st.a, s_sb=level_st.b,
                    s_sc=level_st.c, c_tiles=tiles.c_tiles, per_split=tiles.per_split, splits=tiles.splits,
                    blocks=tiles.blocks, chunk=tiles.chunk if level_kpad > 1 else tiles.per_split,
                    channel_n=space.n, width_over_n=width_over_n)
        buffers = [c * width, c * tiles.splits * 2 * max(level_kpad, 1), c * tiles.splits]
        idx64 = _tensor_idx64(level_space, tiles, level_st) or _needs_idx64(*buffers)
        bld.launch("kernels", "channel_reduce_kernel", tiles.programs, args, dict(
            CENTERED=center is not None and level == 1, TREE=tree, FINAL=final, DT=dt, ACC=acc_tl,
            KPAD=level_kpad, IDX64=idx64, **tiles.constexprs(), GROUP=tiles.group if level_kpad > 1 else 1),
            num_warps=_group_warps(tiles.block_c, tiles.flat, bld.config) if level_kpad > 1 else None)
        if final:
            return first, signs, cand
        level += 1
        level_space = Space(c, width, 1)
        level_st = Strides(1, 0, width)
        level_src = target
        if tree:
            # Narrow blocks: the pairwise mean of a wide one costs registers (Triton 3.7 spills at 4 x 512
            # and needs 155 registers at 1 x 256).
            tiles = stream_tiles(level_space, level_st, bld.config, flat=True,
                                 elems=min(TREE_LEVEL_ELEMS, bld.config.stream_elems))
        else:
            tiles = partial_tiles(level_space, bld.config)


def _elems(config: TileConfig, acc: torch.dtype, halve: bool = False) -> int:
    """Values per tile of a streaming pass: half the usual for float64 (twice the registers per value) and
    where a pass keeps more accumulators per value (``halve``), so that none needs more than 128 registers."""
    return config.stream_elems // 2 if (halve or acc == torch.float64) else config.stream_elems


def _kernel_topk(norm: Norm, k: int, n: int, acc: torch.dtype) -> str:
    """How the streaming L∞ pass finds its top k: "extremes" (k = 1), "groups", or "host" (torch.topk)."""
    if norm is Norm.L1:
        return "none"
    if k == 1:
        return "extremes"
    if k > MAX_KERNEL_K or acc == torch.float64 or n >= INT32_LIMIT // 2:
        return "host"
    return "groups"


@functools.lru_cache(maxsize=512)
def plan_forward(x: Spec, weight_dtype: torch.dtype | None, bias_dtype: torch.dtype | None, norm: Norm, k: int,
                 low_precision: bool, eps: float, config: TileConfig) -> Plan:
    """The kernel launches of the training forward of ``x``.

    Tensors: inputs ``x``, ``w``, ``b`` (``x`` stands in for a missing weight or bias); outputs ``y``
    (``torch.empty_like(x)``) and the (C,) buffers ``mean``, ``scale``, ``inv_std``, ``threshold`` (L∞) and
    ``sign_sum`` (L1, int32).
    """
    y = x.empty_like()
    space, strides, copies = address({"y": y}, {"x": x})
    c, n = space.c, space.n
    lowp = computes_in_input_dtype(x.dtype, low_precision)
    acc = accumulate_dtype(x.dtype)
    dt, acc_tl = TL_DTYPES[x.dtype], TL_DTYPES[acc]
    l1 = norm is Norm.L1
    kpad = 1 if l1 else next_pow2(k)
    factor = L1_SCALE if l1 else 1.0 / topk_constant(n, k)
    root_eps = _rounded(math.sqrt(eps), x.dtype) if lowp else math.sqrt(eps)
    kpad_over_k = kpad / k
    w = Ref("w") if weight_dtype is not None else Ref("x")
    b = Ref("b") if bias_dtype is not None else Ref("x")
    bld = _Builder(config)
    mean = bld.buffer("mean", (c,), acc)
    scale = bld.buffer("scale", (c,), acc)
    inv_std = bld.buffer("inv_std", (c,), acc)
    threshold = bld.buffer("threshold", (0 if l1 else c,), acc)
    sign_sum = bld.buffer("sign_sum", (c if l1 else 0,), torch.int32)
    sx, sy = strides["x"], strides["y"]
    scalars = dict(factor=factor, eps=eps, root_eps=root_eps)
    fused = fused_tiles(space, sx, config, lowp)
    if fused is not None:
        args = dict(x_ptr=Ref("x"), y_ptr=Ref("y"), w_ptr=w, b_ptr=b, mean_ptr=mean, scale_ptr=scale,
                    inv_std_ptr=inv_std, thr_ptr=mean if l1 else threshold, sign_ptr=sign_sum if l1 else mean,
                    C=c, n=n, k=k, A=space.a, B=space.b, **_strides_args("x", sx), **_strides_args("y", sy),
                    **scalars, width_over_n=fused.block_n / n, kpad_over_k=kpad_over_k)
        bld.launch("kernels", "forward_fused_kernel", fused.c_tiles, args, dict(
            L1=l1, LOWP=lowp, HAS_W=weight_dtype is not None, HAS_B=bias_dtype is not None, DT=dt, ACC=acc_tl,
            KPAD=kpad, IDX64=_tensor_idx64(space, fused, sx, sy), **fused.constexprs()))
        return Plan(space, strides, copies, "y", tuple(bld.buffers), tuple(bld.steps))

    width_over_n = next_pow2(n) / n
    how = _kernel_topk(norm, k, n, acc)
    first, _, cand = _reduce_levels(bld, "mean", space, sx, Ref("x"), None, mean, tree=lowp, dt=dt,
                                    acc_tl=acc_tl, acc=acc, width_over_n=width_over_n, sign_out=False,
                                    kpad={"extremes": 1, "groups": kpad}.get(how, 0))
    mult = bld.buffer("mult", (c,), acc)
    # The input's blocks matter to the finalising kernel only when it reloads groups (L∞, k > 1); elsewhere
    # fixed placeholders, so that they do not make variants of their own.
    fin = dict(mean_ptr=mean, stat_ptr=mean, sign_part_ptr=mean, cand_ptr=mean, x_ptr=Ref("x"), top_ptr=mean, w_ptr=w,
               scale_ptr=scale, inv_std_ptr=inv_std, mult_ptr=mult, thr_ptr=mean if l1 else threshold,
               sign_ptr=sign_sum if l1 else mean, C=c, n=n, k=k, splits=first.splits, A=1, B=1, NB=1,
               x_sa=0, x_sb=0, x_sc=0, per_split=1, blocks=1, chunk=1, **scalars, kpad_over_k=kpad_over_k)
    fin_const = dict(L1=l1, LOWP=lowp, HAS_W=weight_dtype is not None, DT=dt, ACC=acc_tl, KPAD=kpad,
                     FLAT=False, BLOCK_B=1, BLOCK_N=1, GROUP=1, CHUNK=1, PHASE=0)
    block_c = config.finalize_block_c
    block_q = config.finalize_block_q
    if l1:
        stat = bld.buffer("stat", (c,), acc)
        dev, signs, _ = _reduce_levels(bld, "dev", space, sx, Ref("x"), mean, stat, tree=lowp, dt=dt,
                                       acc_tl=acc_tl, acc=acc, kpad=0, width_over_n=width_over_n, sign_out=True)
        fin.update(stat_ptr=stat, sign_part_ptr=signs, splits=dev.splits)
    elif how == "extremes":
        fin.update(cand_ptr=cand)
    elif how == "groups":
        fin.update(cand_ptr=cand, A=space.a, B=space.b, NB=first.nb, **_strides_args("x", sx),
                   per_split=first.per_split, blocks=first.blocks, chunk=first.chunk,
                   top_ptr=bld.buffer("top", (c, kpad), acc))
        fin_const.update(FLAT=first.flat, BLOCK_B=first.block_b, BLOCK_N=first.block_n, GROUP=first.group)
        block_c = 1
        block_q = max(1, config.finalize_block_q * 2 // kpad)
        # The reload step: blocks of the chosen groups, RELOAD_STEP values at a time (a larger top-k spills).
        planned = _groups(first.block_c, first.block_n, kpad, config, first.flat)[1]
        fin_const["CHUNK"] = min(next_pow2(planned), max(1, RELOAD_STEP // (2 * kpad * first.group)))
    if how == "host":
        bld.steps.append(HostTopk(k, factor, eps, root_eps, lowp))
    else:
        chans, rows, cols = first.padded(space)
        idx64 = _needs_idx64(_span(space, sx, rows, cols, chans), c * first.splits * 2 * kpad, first.programs,
                             first.splits * first.per_split * first.block_n)
        # The group reload (up to RELOAD_STEP values and a top-k over twice as many) gets twice the threads;
        # then the statistics from the reloaded top-k, on tiles of channels.
        bld.launch("kernels", "forward_finalize_kernel", cdiv(c, block_c), fin, dict(
            fin_const, IDX64=idx64, BLOCK_C=block_c, BLOCK_Q=block_q, PHASE=1 if how == "groups" else 0),
            num_warps=config.wide_warps if how == "groups" else None)
        if how == "groups":
            stats = dict(fin, x_ptr=mean, cand_ptr=mean, A=1, B=1, NB=1, x_sa=0, x_sb=0, x_sc=0, per_split=1,
                         blocks=1, chunk=1)
            bld.launch("kernels", "forward_finalize_kernel", cdiv(c, config.finalize_block_c), stats, dict(
                fin_const, FLAT=False, BLOCK_B=1, BLOCK_N=1, GROUP=1, CHUNK=1, PHASE=2, IDX64=_needs_idx64(c * kpad),
                BLOCK_C=config.finalize_block_c, BLOCK_Q=1))
    norm_tiles = stream_tiles(space, sx, config, flat=False, elems=_elems(config, acc))
    bld.launch("kernels", "normalize_kernel", norm_tiles.programs, dict(
        x_ptr=Ref("x"), y_ptr=Ref("y"), mean_ptr=mean, mult_ptr=mult, b_ptr=b, C=c, A=space.a, B=space.b,
        NB=norm_tiles.nb, **_strides_args("x", sx), **_strides_args("y", sy), c_tiles=norm_tiles.c_tiles,
        per_split=norm_tiles.per_split,
    ), dict(LOWP=lowp, HAS_B=bias_dtype is not None, DT=dt, ACC=acc_tl,
            IDX64=_tensor_idx64(space, norm_tiles, sx, sy), **norm_tiles.constexprs()))
    return Plan(space, strides, copies, "y", tuple(bld.buffers), tuple(bld.steps))


@functools.lru_cache(maxsize=512)
def plan_backward(x: Spec, dy: Spec, weight_dtype: torch.dtype | None, norm: Norm, k: int, low_precision: bool,
                  config: TileConfig) -> Plan:
    """The kernel launches of the backward of :func:`plan_forward`.

    Tensors: inputs ``x``, ``dy``, ``w`` and the forward's ``mean``, ``scale``, ``inv_std``, ``threshold``,
    ``sign_sum``; outputs ``dx`` (``torch.empty_like(x)``) and the (C,) buffers ``sum_dy_xhat``, ``sum_dy``.
    """
    dx = x.empty_like()
    space, strides, copies = address({"dx": dx}, {"x": x, "dy": dy})
    c, n = space.c, space.n
    lowp = computes_in_input_dtype(x.dtype, low_precision)
    acc = accumulate_dtype(x.dtype)
    dt, acc_tl = TL_DTYPES[x.dtype], TL_DTYPES[acc]
    l1 = norm is Norm.L1
    factor = L1_SCALE if l1 else n / (k * topk_constant(n, k))
    w = Ref("w") if weight_dtype is not None else Ref("x")
    thr = Ref("mean") if l1 else Ref("threshold")
    signs = Ref("sign_sum") if l1 else Ref("mean")
    bld = _Builder(config)
    sum_dy_xhat = bld.buffer("sum_dy_xhat", (c,), acc)
    sum_dy = bld.buffer("sum_dy", (c,), acc)
    sx, sdy, sdx = strides["x"], strides["dy"], strides["dx"]
    all_strides = {**_strides_args("x", sx), **_strides_args("dy", sdy)}
    common = dict(L1=l1, LOWP=lowp, DT=dt, ACC=acc_tl)
    fused = fused_tiles(space, sx, config, lowp=False)
    if fused is not None:
        bld.launch("kernels", "backward_fused_kernel", fused.c_tiles, dict(
            dy_ptr=Ref("dy"), x_ptr=Ref("x"), dx_ptr=Ref("dx"), w_ptr=w, mean_ptr=Ref("mean"),
            scale_ptr=Ref("scale"), inv_std_ptr=Ref("inv_std"), thr_ptr=thr, sign_ptr=signs,
            dw_ptr=sum_dy_xhat, db_ptr=sum_dy, C=c, n=n, k=k, A=space.a, B=space.b, **all_strides,
            **_strides_args("dx", sdx), factor=factor,
        ), dict(**common, HAS_W=weight_dtype is not None, IDX64=_tensor_idx64(space, fused, sx, sdy, sdx),
                **fused.constexprs()))
        return Plan(space, strides, copies, "dx", tuple(bld.buffers), tuple(bld.steps))
    # L∞ keeps four accumulators per value (two sums, two packed counts): half a tile keeps it within 128
    # registers (the reduction and the elementwise pass share their tiles and splits).
    # float64 L∞ on channels_last: half the channels per tile (with 32, the per-channel float64 constants of
    # backward_dx_kernel need 141 registers on sm_90).
    wide64 = acc == torch.float64 and not l1
    tiles = stream_tiles(space, sx, config, flat=False, elems=_elems(config, acc, halve=not l1),
                         channel_tile=max(1, config.channel_tile // 2) if wide64 else None)
    partials = bld.buffer("partials", (2, c, tiles.splits), acc)
    counts = bld.buffer("counts", (4, c, tiles.splits), torch.int32) if not l1 else partials
    idx64 = _tensor_idx64(space, tiles, sx, sdy, sdx) or _needs_idx64(4 * c * tiles.splits)
    grid_args = dict(c_tiles=tiles.c_tiles, per_split=tiles.per_split, splits=tiles.splits)
    bld.launch("kernels", "backward_reduce_kernel", tiles.programs, dict(
        dy_ptr=Ref("dy"), x_ptr=Ref("x"), mean_ptr=Ref("mean"), inv_std_ptr=Ref("inv_std"), thr_ptr=thr,
        part_ptr=partials, count_ptr=counts, C=c, A=space.a, B=space.b, NB=tiles.nb, **all_strides, **grid_args,
    ), dict(**common, IDX64=idx64, **tiles.constexprs()))
    bld.launch("kernels", "backward_dx_kernel", tiles.programs, dict(
        dy_ptr=Ref("dy"), x_ptr=Ref("x"), dx_ptr=Ref("dx"), w_ptr=w, mean_ptr=Ref("mean"), scale_ptr=Ref("scale"),
        inv_std_ptr=Ref("inv_std"), thr_ptr=thr, sign_ptr=signs, part_ptr=partials, count_ptr=counts,
        dw_ptr=sum_dy_xhat, db_ptr=sum_dy, C=c, n=n, k=k, A=space.a, B=space.b, NB=tiles.nb, **all_strides,
        **_strides_args("dx", sdx), **grid_args, factor=factor,
    ), dict(**common, HAS_W=weight_dtype is not None, IDX64=idx64, **tiles.constexprs(),
            BLOCK_Q=max(1, min(config.finalize_block_q, 512 // tiles.block_c))))
    return Plan(space, strides, copies, "dx", tuple(bld.buffers), tuple(bld.steps))


# ---------------------------------------------------------------------------------------------------------
# Fused BatchNorm + activation epilogue (act_kernels)
# ---------------------------------------------------------------------------------------------------------

#: Bytes of packed signs (8 values each) per program of the activation kernels.
ACT_BLOCK = 128


@functools.lru_cache(maxsize=512)
def plan_act_forward(view: Spec, mean_dtype: torch.dtype, has_residual: bool, activation: int, signs: bool,
                     negative_slope: float) -> Plan:
    """``act_forward_kernel`` over the (A, C, B) contiguous view ``view`` of the batch-norm output.

    Tensors: ``y`` (the output, overwritten), ``r`` (residual, same layout), ``x`` (the input, same layout),
    ``mean``; outputs ``bits`` (uint8) and ``zero`` (int32, zero-initialised by the launcher).
    """
    numel = math.prod(view.shape)
    c, inner = view.shape[1], view.shape[2]
    dtype = view.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    bld = _Builder(replace(GPU_CONFIG, num_warps=4))
    bits = bld.buffer("bits", ((numel + 7) // 8 if signs else 0,), torch.uint8)
    zero = bld.buffer("zero", (c if signs else 0,), torch.int32, fill=0)
    idx64 = _needs_idx64(numel + 8 * ACT_BLOCK)
    bld.launch("act_kernels", "act_forward_kernel", cdiv(numel, 8 * ACT_BLOCK), dict(
        y_ptr=Ref("y"), r_ptr=Ref("r") if has_residual else Ref("y"), x_ptr=Ref("x") if signs else Ref("y"),
        mean_ptr=Ref("mean"), bits_ptr=bits if signs else Ref("y"), zero_ptr=zero if signs else Ref("mean"),
        numel=numel, C=c, inner=inner, slope=float(negative_slope),
    ), dict(HAS_R=has_residual, ACT=activation, SIGNS=signs, DT=TL_DTYPES[dtype], COMPUTE=TL_DTYPES[compute],
            ACC=TL_DTYPES[mean_dtype], IDX64=idx64, BLOCK=ACT_BLOCK))
    space = Space(c, view.shape[0], inner)
    return Plan(space, {}, (), "y", tuple(bld.buffers), tuple(bld.steps))


@functools.lru_cache(maxsize=512)
def plan_l1_grad(view: Spec, acc: torch.dtype) -> Plan:
    """``l1_grad_kernel`` over the contiguous (A, C, B) gradient ``dz``; output ``dx`` in ``acc``.

    Tensors: ``dz``, ``bits``, ``a``, ``o``, ``kc`` (the per-channel coefficients), ``dx``.
    """
    numel = math.prod(view.shape)
    c, inner = view.shape[1], view.shape[2]
    bld = _Builder(replace(GPU_CONFIG, num_warps=4))
    bld.launch("act_kernels", "l1_grad_kernel", cdiv(numel, 8 * ACT_BLOCK), dict(
        dz_ptr=Ref("dz"), bits_ptr=Ref("bits"), dx_ptr=Ref("dx"), a_ptr=Ref("a"), o_ptr=Ref("o"), k_ptr=Ref("kc"),
        numel=numel, C=c, inner=inner,
    ), dict(ACC=TL_DTYPES[acc], IDX64=_needs_idx64(numel + 8 * ACT_BLOCK), BLOCK=ACT_BLOCK))
    return Plan(Space(c, view.shape[0], inner), {}, (), "dx", tuple(bld.buffers), tuple(bld.steps))
