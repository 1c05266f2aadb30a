"""The GPU compile gate: every kernel variant the launch plans choose, compiled for a real GPU without one.

The Triton interpreter runs the kernels' arithmetic on the CPU but cannot see what a GPU build does: whether a
variant compiles at all, whether it spills registers, how many instructions its inner loop costs, which PTX
types its scalar arguments get. This module takes the launch plans (:mod:`.plan`, the very code the launchers
execute) for a table of realistic shapes, turns every launch into the specialisation Triton's JIT would
compile for it (same parameter types, same integer specialisations, same constexprs), compiles each distinct
variant with ``triton.compile`` for ``GPUTarget("cuda", 80 | 90, 32)`` using the ``ptxas`` in Triton's wheel,
and reads the result with the wheel's ``cuobjdump``: registers, stack (spills), the SASS of the inner loop.

Run it in a process without ``TRITON_INTERPRET`` (the kernels must be JIT functions)::

    python -m normdecouple._triton.gate --subset fast --json results.json
    python benchmarks/compile_gate.py            # the full table, printed (what benchmarks/RESULTS.md holds)

``tests/test_compile_gate.py`` runs it in a subprocess and asserts on the results.

References: arXiv:1803.01814
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from ..stats import Norm
from . import plan as P

__all__ = ["Case", "Variant", "cases", "variants", "batch_size_variants", "compile_variant", "run"]

TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
              torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}
#: PTX parameter types of Triton signature types (item 5 of issue 18: a float64 scalar must be ``.f64``).
PTX_TYPES = {"fp64": {".f64"}, "fp32": {".f32"}, "i32": {".u32", ".s32", ".b32"}, "i64": {".u64", ".s64", ".b64"},
             "i1": {".u8", ".pred"}}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
#: The element tensors of the kernels (per-value traffic); everything else is per channel or scratch.
ELEMENT_TENSORS = {"x", "y", "dy", "dx", "r", "dz"}

# ResNet-50's batch-norm inputs (channels, spatial side) at batch 256.
RESNET50 = [(64, 112), (64, 56), (128, 56), (256, 56), (128, 28), (256, 28), (512, 28), (256, 14), (512, 14),
            (1024, 14), (512, 7), (2048, 7)]
NORMS = [(Norm.L1, 1), (Norm.LINF, 1), (Norm.LINF, 8), (Norm.LINF, 64)]


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer call of the table: input shape and layout, dtype, norm, options, and which passes."""

    shape: tuple[int, ...]
    channels_last: bool
    dtype: str
    norm: Norm
    k: int
    low_precision: bool

    @property
    def label(self) -> str:
        layout = "NHWC" if self.channels_last else "NCHW"
        norm = "L1" if self.norm is Norm.L1 else f"Linf k={self.k}"
        lowp = " lowp" if self.low_precision else ""
        return f"{'x'.join(map(str, self.shape))} {layout} {self.dtype} {norm}{lowp}"


def cases(subset: str) -> list[Case]:
    """The table: ``"fast"`` (one ResNet layer, the dtypes and norms that matter most) or ``"full"``.

    The full table covers every factor of the issue without their full product (which would compile for
    hours): every ResNet-50 shape in both layouts (fp16, L1 and L∞ k = 8: the tilings that depend on the
    shape), every dtype x norm x low_precision on the (256, 64, 56, 56) layer in both layouts, the 1-d
    (4096, 2048) and the 3-d (2, 32, 128, 128, 128) inputs, and (in :func:`variants`) the activation
    epilogues of every dtype, activation and residual.
    """
    out = []
    if subset == "fast":
        for channels_last in (False, True):
            for norm, k in ((Norm.L1, 1), (Norm.LINF, 8)):
                for lowp in (False, True):
                    out.append(Case((256, 64, 56, 56), channels_last, "fp16", norm, k, lowp))
        return out
    for c, side in RESNET50:
        for channels_last in (False, True):
            for norm, k in ((Norm.L1, 1), (Norm.LINF, 8)):
                out.append(Case((256, c, side, side), channels_last, "fp16", norm, k, False))
    for channels_last in (False, True):
        for dtype in DTYPES:
            for norm, k in NORMS:
                for lowp in ((False, True) if dtype in ("fp16", "bf16") else (False,)):
                    out.append(Case((256, 64, 56, 56), channels_last, dtype, norm, k, lowp))
    for shape, channels_last in (((4096, 2048), False), ((2, 32, 128, 128, 128), False),
                                 ((2, 32, 128, 128, 128), True)):
        for dtype in ("fp16", "fp32"):
            for norm, k in ((Norm.L1, 1), (Norm.LINF, 8)):
                for lowp in ((False, True) if dtype == "fp16" else (False,)):
                    out.append(Case(shape, channels_last, dtype, norm, k, lowp))
    return list(dict.fromkeys(out))


@dataclasses.dataclass(frozen=True)
class Variant:
    """A kernel specialisation as Triton's JIT keys it, with what the report needs to read its SASS."""

    module: str
    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    attrs: tuple[tuple[int, str], ...]
    num_warps: int

    @property
    def key(self) -> str:
        consts = ",".join(f"{k}={_show(v)}" for k, v in self.constexprs)
        sig = ",".join(f"{k}:{t}" for k, t in self.signature)
        attrs = ",".join(f"{i}{d}" for i, d in self.attrs)
        return f"{self.module}.{self.kernel}[{self.num_warps}]({sig}|{consts}|{attrs})"

    @property
    def values_per_thread(self) -> int:
        c = dict(self.constexprs)
        tile = c.get("BLOCK_C", 1) * c.get("BLOCK_N", c.get("BLOCK", 1) * 8)
        return max(1, tile // (32 * self.num_warps))


def _show(v) -> str:
    return str(v).replace("triton.language.", "")


def _kernel(module: str, name: str):
    from . import act_kernels, kernels

    return getattr({"kernels": kernels, "act_kernels": act_kernels}[module], name)


def _specialise(launch: P.Launch, dtypes: dict[str, torch.dtype]) -> Variant:
    """The variant Triton's JIT compiles for ``launch`` (pointers assumed 16-byte aligned, as allocations are)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    fn = _kernel(launch.module, launch.kernel)
    args = dict(launch.args)
    consts = dict(launch.constexprs)
    signature, constexprs, attrs = [], [], []
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature.append((name, "constexpr"))
            constexprs.append((name, consts[name]))
            continue
        value = args[name]
        if isinstance(value, P.Ref):
            signature.append((name, "*" + TYPE_NAMES[dtypes[value.name]]))
            attrs.append((index, "D"))
            continue
        if isinstance(value, float):
            signature.append((name, param.annotation_type or "fp32"))
            continue
        kind, attr = native_specialize_impl(CUDABackend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        if kind == "constexpr":
            signature.append((name, "constexpr"))
            constexprs.append((name, attr))
        else:
            signature.append((name, kind))
            if attr:
                attrs.append((index, attr))
    return Variant(launch.module, launch.kernel, tuple(signature), tuple(constexprs), tuple(attrs),
                   launch.num_warps)


def jit_parity(launch: P.Launch, dtypes: dict[str, torch.dtype], variant: Variant) -> str | None:
    """None if Triton's own JIT binder specialises ``launch`` as :func:`_specialise` did, else the difference.

    The binder runs on CPU tensors of the right dtypes (16-byte aligned, like CUDA allocations); it needs no
    GPU. This keeps the gate honest if a Triton release changes how it specialises arguments.
    """
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(launch.module, launch.kernel)
    binder = create_function_from_signature(fn.signature, fn.params, CUDABackend(GPUTarget("cuda", 90, 32)))
    args = {name: torch.empty(64, dtype=dtypes[v.name]) if isinstance(v, P.Ref) else v for name, v in launch.args}
    _, specialisation, _ = binder(**args, **dict(launch.constexprs))
    ours = dict(variant.signature)
    consts = dict(variant.constexprs)
    attrs = dict(variant.attrs)
    for index, (param, (kind, attr)) in enumerate(zip(fn.params, specialisation)):
        mine = ours[param.name]
        if kind == "constexpr":
            if mine != "constexpr" or consts[param.name] != attr:
                return f"{param.name}: Triton constexpr {attr!r}, gate {mine} {consts.get(param.name)!r}"
        elif mine != kind or (attr == "D") != (attrs.get(index) == "D"):
            return f"{param.name}: Triton {kind} {attr!r}, gate {mine} {attrs.get(index)!r}"
    return None


def _case_plans(case: Case, config: P.TileConfig) -> list[tuple[P.Plan, dict[str, torch.dtype]]]:
    dtype = DTYPES[case.dtype]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = P.Spec.contiguous(case.shape, dtype, channels_last=case.channels_last)
    fwd = P.plan_forward(x, torch.float32, torch.float32, case.norm, case.k, case.low_precision, 1e-5, config)
    bwd = P.plan_backward(x, x, torch.float32, case.norm, case.k, case.low_precision, config)
    base = {"x": dtype, "y": dtype, "dy": dtype, "dx": dtype, "w": torch.float32, "b": torch.float32,
            "mean": acc, "scale": acc, "inv_std": acc, "threshold": acc, "sign_sum": torch.int32}
    plans = []
    for p in (fwd, bwd):
        plans.append((p, {**base, **{buf.name: buf.dtype for buf in p.buffers}}))
    return plans


def _act_plans(dtype: torch.dtype, activations=(0, 1, 2)) -> list[tuple[P.Plan, dict[str, torch.dtype]]]:
    """The fused BatchNorm + activation epilogues of a (256, 64, 56, 56) layer: every activation, with and
    without residual, L1 (with the sign bits) and L∞, and the L1 input-gradient kernel."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    view = P.Spec.contiguous((256, 64, 3136), dtype)
    out = []
    for act in activations:
        for residual in (False, True):
            for signs in (True, False):
                p = P.plan_act_forward(view, acc, residual, act, signs, 0.01)
                out.append((p, {"y": dtype, "r": dtype, "x": dtype, "mean": acc, "bits": torch.uint8,
                                "zero": torch.int32}))
    p = P.plan_l1_grad(P.Spec.contiguous((256, 64, 3136), acc), acc)
    out.append((p, {"dz": acc, "bits": torch.uint8, "dx": acc, "a": acc, "o": acc, "kc": acc}))
    return out


@dataclasses.dataclass
class Use:
    """Where a variant is used: the first case that launches it, and the loop facts of that launch."""

    case: str
    chunk: int
    bytes_per_value: int
    parity: str | None  # jit_parity of that launch
    role: str  # "mean", "dev" (L1 |d|), "stats" (L∞ with candidates), "partials", "normalize", ...
    short: bool = False  # L∞ groups: the channel is shorter than one planned chunk, so merges are not amortised


def variants(subset: str, config: P.TileConfig = P.GPU_CONFIG) -> dict[str, tuple[Variant, Use]]:
    """Every distinct variant the plans of ``cases(subset)`` (and the activation epilogues) launch."""
    found: dict[str, tuple[Variant, Use]] = {}
    work = [(case.label, plans) for case in cases(subset) for plans in _case_plans(case, config)]
    if subset == "fast":
        work += [("act fp16", plans) for plans in _act_plans(torch.float16, activations=(0, 1))]
    else:
        work += [(f"act {d}", plans) for d in DTYPES for plans in _act_plans(DTYPES[d])]
    for label, (p, dtypes) in work:
        for step in p.steps:
            if not isinstance(step, P.Launch):
                continue
            variant = _specialise(step, dtypes)
            if variant.key in found:
                continue
            args = dict(step.args)
            element_bytes = sum(dtypes[v.name].itemsize for v in set(args.values())
                                if isinstance(v, P.Ref) and v.name in ELEMENT_TENSORS)
            consts = dict(step.constexprs)
            chunk = int(args.get("chunk", 1)) if consts.get("KPAD", 0) > 1 else 1
            role = _role(step, consts)
            short = False
            if role == "L∞ stats pass" and consts["KPAD"] > 1:
                short = chunk < P._groups(consts["BLOCK_C"], consts["BLOCK_N"], consts["KPAD"], config,
                                              bool(consts["FLAT"]))[1]
            found[variant.key] = (variant, Use(label, chunk, element_bytes, jit_parity(step, dtypes, variant),
                                               role, short))
    return found


def _role(step: P.Launch, consts: dict) -> str:
    if step.kernel != "channel_reduce_kernel":
        return step.kernel.replace("_kernel", "")
    src = dict(step.args)["src_ptr"]
    if src != P.Ref("x"):
        return "partials"
    if consts["CENTERED"]:
        return "L1 |d| pass"
    return "L∞ stats pass" if consts["KPAD"] > 0 else "mean pass"


def batch_size_variants(shape: tuple[int, ...], channels_last: bool, dtype: str, norm: Norm, k: int,
                        low_precision: bool, sizes=range(1, 257), config: P.TileConfig = P.GPU_CONFIG) -> set[str]:
    """The variant keys one layer compiles over batch sizes ``sizes`` (item 15: bounded, not one per size)."""
    keys = set()
    for n in sizes:
        case = Case((n, *shape[1:]), channels_last, dtype, norm, k, low_precision)
        if n * (case.shape[2] if len(case.shape) > 2 else 1) < 2:
            continue
        for p, dtypes in _case_plans(case, config):
            keys |= {_specialise(s, dtypes).key for s in p.steps if isinstance(s, P.Launch)}
    return keys


#: Layers whose variants over batch sizes 1..256 the gate counts (item 15 of issue 18).
BATCH_LAYERS = [
    ((256, 64, 56, 56), False, "fp16", Norm.L1, 1, False),
    ((256, 64, 56, 56), True, "fp16", Norm.LINF, 8, False),
    ((256, 256, 14, 14), False, "bf16", Norm.LINF, 64, True),
    ((256, 2048), False, "fp32", Norm.L1, 1, False),
    ((256, 32, 16, 16, 16), True, "fp16", Norm.LINF, 1, False),
]


# ---------------------------------------------------------------------------------------------------------
# Compiling and reading the binary
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _cache_dir(path: str):
    from triton import knobs

    previous = knobs.cache.dir
    knobs.cache.dir = path
    try:
        yield
    finally:
        knobs.cache.dir = previous


def _cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _tools() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LINE_INFO = re.compile(r'line (\d+)')
#: The comment that marks the element loads of a streaming kernel's main loop in kernels.py.
LOOP_MARKER = "# gate: element loop"


def _annotated_sass(tools: str, cubin: str) -> list[tuple[int, str, set[int]]]:
    """(address, instruction, source lines, the inlined-at ones included) from ``nvdisasm -gi``; branch
    targets are rewritten from labels to addresses."""
    text = subprocess.run([os.path.join(tools, "nvdisasm"), "-gi", "-c", cubin], capture_output=True, text=True,
                          check=True).stdout
    out, lines, pending, labels = [], set(), [], {}
    for row in text.splitlines():
        stripped = row.strip()
        if stripped.startswith("//##"):
            lines |= {int(v) for v in _LINE_INFO.findall(row)}
            continue
        label = re.match(r"^(\.L_x_\d+):", stripped)
        if label:
            pending.append(label.group(1))
            continue
        match = _SASS_LINE.search(row)
        if match:
            address = int(match.group(1), 16)
            labels.update({name: address for name in pending})
            pending = []
            out.append((address, match.group(2).strip(), lines))
            lines = set()
    resolved = []
    for address, instruction, where in out:
        target = re.search(r"`\((\.L_x_\d+)\)", instruction)
        if target and target.group(1) in labels:
            instruction = instruction.replace(target.group(0), hex(labels[target.group(1)]))
        resolved.append((address, instruction, where))
    return resolved


def _loops(sass: list[tuple[int, str, set[int]]]) -> list[tuple[int, int]]:
    """(first, last) instruction addresses of every loop: a branch back to an earlier address."""
    loops = []
    for address, text, _ in sass:
        jump = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if jump:
            target = int(jump.group(1), 16)
            if target <= address:
                loops.append((target, address))
    return loops


def _marker_lines(fn) -> set[int]:
    import inspect

    source, first = inspect.getsourcelines(fn.fn)
    return {first + i for i, line in enumerate(source) if LOOP_MARKER in line}


def _loop_report(sass, fn) -> dict:
    """Instructions of the element loop (the innermost loop holding the marked loads) and, when it runs inside
    another loop (the L∞ group chunks), the enclosing loop's own instructions (the merge, once per chunk)."""
    loops = _loops(sass)
    marked = _marker_lines(fn)
    hits = [a for a, _, lines in sass if lines & marked]
    candidates = [r for r in loops if any(r[0] <= a <= r[1] for a in hits)]
    if not candidates:
        return {"loop_instructions": None, "loop_loads": None, "outer_instructions": None}
    main = min(candidates, key=lambda r: r[1] - r[0])

    def body(r):
        return [text for a, text, _ in sass if r[0] <= a <= r[1]]

    around = [r for r in loops if r != main and r[0] <= main[0] and main[1] <= r[1]]
    outer = min(around, key=lambda r: r[1] - r[0]) if around else None
    return {
        "loop_instructions": len(body(main)),
        "loop_loads": sum(1 for i in body(main) if "LDG" in i),
        "outer_instructions": len(body(outer)) - len(body(main)) if outer else None,
    }


def _ptx_params(ptx: str) -> list[str]:
    entry = ptx[ptx.index(".entry"):]
    head = entry[: entry.index(")")]
    return re.findall(r"\.param\s+(\.\w+)", head)


def compile_variant(variant: Variant, arch: int) -> dict:
    """Compile ``variant`` for sm_``arch``; registers, stack, compile time, PTX parameter types, inner loops."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    fn = _kernel(variant.module, variant.kernel)
    attrs = {(i,): CUDABackend.parse_attr(d) for i, d in variant.attrs}
    src = ASTSource(fn=fn, signature=dict(variant.signature), constexprs=dict(variant.constexprs), attrs=attrs)
    # CPU seconds of this process and of ptxas (its child), so that a loaded machine does not inflate them.
    start = _cpu_seconds()
    wall = time.perf_counter()
    # Triton prints ptxas's own report (-v: registers, stack frame, spill stores and loads) when asked.
    # A fresh cache directory per build, so that every build runs ptxas (and its compile time is real).
    log = io.StringIO()
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with tempfile.TemporaryDirectory() as cache, _cache_dir(cache), contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": variant.num_warps, "enable_fp_fusion": True})
    except Exception as error:  # the gate reports a failing variant instead of stopping at it
        return {"error": f"{type(error).__name__}: {str(error)[-2000:]}", "seconds": _cpu_seconds() - start}
    finally:
        os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
    seconds = _cpu_seconds() - start
    wall = time.perf_counter() - wall
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue())]
    if not spills:
        raise RuntimeError(f"no ptxas report in Triton's output (a cached build?): {log.getvalue()[-500:]}")
    tools = _tools()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        # Only kernels with an element loop have SASS worth reading (the disassembly costs time).
        sass = _annotated_sass(tools, cubin) if _marker_lines(fn) else []
    resources = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    loops = _loop_report(sass, fn)
    ptx_params = _ptx_params(compiled.asm["ptx"])
    runtime = [t for _, t in variant.signature if t != "constexpr"]
    mismatched = []
    for position, kind in enumerate(runtime):
        got = ptx_params[position] if position < len(ptx_params) else None
        want = {".u64"} if kind.startswith("*") else PTX_TYPES.get(kind, set())
        if got not in want:
            mismatched.append(f"param {position} ({kind}) is {got}")
    return {
        "seconds": seconds,
        "wall_seconds": wall,
        "registers": int(resources.get("REG", 0)),
        "stack": int(resources.get("STACK", 0)),
        "spill_bytes": sum(spills),
        "local": int(resources.get("LOCAL", 0)),
        **loops,
        "ptx_mismatches": mismatched,
    }


def _source_digest() -> str:
    """A digest of the kernels' source: a cached result is reused only for the very kernels it compiled."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("kernels.py", "act_kernels.py"):
        with open(os.path.join(os.path.dirname(__file__), name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _compile_job(job):
    variant, arch = job
    return variant.key, arch, compile_variant(variant, arch)


def run(subset: str, archs=(90, 80), jobs: int = 2, cache: str | None = None) -> dict:
    """Compile every variant of ``subset`` for ``archs`` (reusing ``cache``, a JSON file of earlier results of
    this Triton version); returns ``{"triton": version, "variants": {key: {...}}}``."""
    import triton

    found = variants(subset)
    known = {}
    version = f"{triton.__version__} {_source_digest()}"
    if cache and os.path.exists(cache):
        with open(cache) as f:
            stored = json.load(f)
        if stored.get("triton") == version:
            known = stored["variants"]
    todo = [(v, arch) for key, (v, _) in found.items() for arch in archs
            if str(arch) not in known.get(key, {}).get("archs", {})]
    results: dict[str, dict] = {key: {"archs": dict(known.get(key, {}).get("archs", {}))} for key in found}
    if todo:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for key, arch, result in pool.map(_compile_job, todo, chunksize=1):
                results[key]["archs"][str(arch)] = result
    for key, (variant, use) in found.items():
        results[key].update(module=variant.module, kernel=variant.kernel, case=use.case, chunk=use.chunk,
                            bytes_per_value=use.bytes_per_value, values_per_thread=variant.values_per_thread,
                            constexprs={k: _show(v) for k, v in variant.constexprs},
                            signature=dict(variant.signature), jit_parity=use.parity, role=use.role,
                            short_channel=use.short)
    layers = BATCH_LAYERS if subset == "full" else BATCH_LAYERS[:2]
    batches = {f"{shape} {'NHWC' if cl else 'NCHW'} {dtype} {norm.value}{k}{' lowp' if lowp else ''}":
               len(batch_size_variants(shape, cl, dtype, norm, k, lowp))
               for shape, cl, dtype, norm, k, lowp in layers}
    out = {"triton": triton.__version__, "variants": results, "batch_size_variants": batches}
    if cache:
        merged = {"triton": version, "variants": {**known, **results}}
        with open(cache, "w") as f:
            json.dump(merged, f)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", choices=("fast", "full"), default="full")
    parser.add_argument("--archs", default="90,80")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--cache", help="reuse and extend this results file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("the gate compiles JIT kernels: unset TRITON_INTERPRET")  # exits with status 2
    out = run(args.subset, tuple(int(a) for a in args.archs.split(",")), args.jobs, args.cache)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
