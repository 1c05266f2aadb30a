"""GPU validation of the Triton path within 10 minutes on one H100/H200: one markdown table for RESULTS.md.

Checks, most important first (issue 18, deliverable 4):

1. ``layouts``: every non-dense layout that reaches a layer in practice (channel chunk, ``x[:, ::2]``,
   ``x[::2]``, channels_last chunk, expanded batch, spatial steps; a dense tensor first as the baseline),
   forward+backward of L1, L∞ k=1, L∞ k=8 and the fused layers against float64 math written from the
   formulas (API.md §1), with guard buffers around the input, the output gradient and the residual, and on
   CUDA around the output and the input gradient (a freed slot between two guard blocks that the caching
   allocator hands to the layer's output: a write past it lands in a guard).
2. ``gpu-tests``: ``pytest -m gpu tests/``.
3. ``fused``: the fused layers against the unfused layer + residual + activation on the same backend, bit for
   bit in the forward and the running statistics (fp32, fp16, bf16, fp64; relu, leaky_relu, identity; with and
   without residual; NCHW and channels_last), gradients within tolerance.
4. ``sync``: ``torch.cuda.set_sync_debug_mode("error")`` over a training step (forward, backward, SGD step) of a
   converted conv net (no host synchronisation), and a CUDA-graph capture of forward+backward, replayed and
   compared with eager.
5. ``timing``: forward+backward against cuDNN's BatchNorm (torch's own layer) in GB/s and as a ratio, fp16
   (256, 64, 56, 56) NCHW and channels_last: L1, L∞ k=1 and k=8, the fused layer; fp32; bf16 ``low_precision``.
   CUDA events around each call, warm-up, medians of interleaved repeats.
6. ``large``: a launch grid above 65535 programs (bf16 ``low_precision``, channels_last (512, 64, 112, 112))
   and a tensor of more than 2^31 elements (33, 64, 1024, 1024) in fp16, forward+backward spot-checked against
   float64 on a few channels.

Every check runs in its own process with a timeout per case: a crash, an illegal memory access or a hang in
one case is reported on its row, and after any failed case the next one starts in a fresh process. The whole
run stops at its budget (570 s; what is left is reported as not run). Exit status: 0 when every check passed
(timings are measurements, not checks), 1 when any failed or did not run, 2 for bad arguments. Not yet timed
on a GPU (none was lent to the session that wrote it): how much of the full run fits the budget is unknown.

    python benchmarks/gpu_check.py                  # everything
    python benchmarks/gpu_check.py --quick          # one shape per check, fewer variants
    python benchmarks/gpu_check.py --only layouts 'large/*'   # checks or case ids (shell patterns); --list
    python benchmarks/gpu_check.py --cpu-interpret --quick     # no GPU: the correctness checks on tiny
                                                               # shapes, CPU tensors, TRITON_INTERPRET=1

Run it from the repository root (the repository's ``normdecouple`` is put first on the path).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fnmatch
import json
import math
import os
import queue
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import normdecouple as nd  # noqa: E402  (the repository's copy, put first on the path above)

#: Default wall-clock budget: the whole run stays under 10 minutes on one GPU (the interpreter gets more).
DEFAULT_BUDGET_S = 570.0
DEFAULT_INTERPRET_BUDGET_S = 1800.0
#: Lines of a child process that carry results start with this; everything else is kept as log.
PREFIX = "@@gpu_check "
CHECKS = ("layouts", "gpu-tests", "fused", "sync", "timing", "large")
SKIPPED_NO_CUDA = "skipped: needs CUDA"


# --------------------------------------------------------------------------------------------------------------
# Cases: what runs, in which order, with which limits. Parent and child build the same list from the arguments.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """What the run checks: on CUDA, or on CPU tensors under Triton's interpreter (tiny shapes); quick or full."""

    interpret: bool
    quick: bool


@dataclass(frozen=True)
class Case:
    id: str  # "check/name": what --only matches and the child is told to run
    label: str  # the table's "case" column
    run: Callable[[Reporter, Mode], None]
    timeout: float  # seconds for this case in its process, compilation included
    cuda_only: bool = False

    @property
    def check(self) -> str:
        return self.id.split("/", 1)[0]


@dataclass
class Row:
    check: str
    case: str
    result: str
    detail: str


class Reporter:
    """What a case function writes: rows of the table, and the step it is in (named if the process dies)."""

    def __init__(self, case: Case, emit: Callable[..., None]) -> None:
        self.case = case
        self._emit = emit
        self.failed = False

    def step(self, label: str) -> None:
        self._emit("step", label=label)

    def row(self, result: str, detail: str, case: str | None = None) -> None:
        self.failed = self.failed or result == "FAIL"
        self._emit("row", case=case or self.case.label, result=result, detail=detail)


def build_cases(mode: Mode) -> list[Case]:
    """Every case of the run, most important first."""
    cases: list[Case] = []
    for shape in layout_shapes(mode):
        for layout in LAYOUTS:
            cases.append(Case(
                f"layouts/{layout.name.replace(' ', '-')}-{'x'.join(map(str, shape))}",
                f"{layout.name} `{layout.code}`, layer input {shape_text(shape)} fp32",
                _bind(run_layout_case, layout=layout, shape=shape), timeout=150))
    cases.append(Case("gpu-tests/pytest", "`" + shlex.join(["pytest", *gpu_test_command(mode)[3:]]) + "`",
                      run_gpu_tests, timeout=180 if mode.quick else 270, cuda_only=True))
    for norm, k in fused_norms(mode):
        for dtype_name in fused_dtypes(mode):
            slug = "l1" if norm == "l1" else f"linf{k}"
            cases.append(Case(f"fused/{slug}-{dtype_name}", f"fused {norm_text(norm, k)} {dtype_name} vs unfused + act",
                              _bind(run_fused_case, norm=norm, k=k, dtype_name=dtype_name), timeout=150))
    sync_cases = [
        ("no-host-sync-l1", "no host sync: L1 net fp32 NCHW", run_no_sync_case, dict(norm="l1", k=1, fuse=False,
                                                                                  half=False)),
        ("no-host-sync-linf8-fused", "no host sync: L∞ k=8 fused net bf16 channels_last", run_no_sync_case,
         dict(norm="linf", k=8, fuse=True, half=True)),
        ("cuda-graph-l1-fused", "CUDA graph: L1 fused net fp32 NCHW", run_graph_case,
         dict(norm="l1", k=1, fuse=True, half=False)),
        ("cuda-graph-linf1", "CUDA graph: L∞ k=1 net bf16 channels_last", run_graph_case,
         dict(norm="linf", k=1, fuse=False, half=True)),
    ]
    for name, label, fn, kw in (sync_cases[::2] if mode.quick else sync_cases):
        cases.append(Case(f"sync/{name}", label, _bind(fn, **kw), timeout=120, cuda_only=True))
    for name, dtype_name, channels_last, variants in timing_configs(mode):
        layout = "channels_last" if channels_last else "NCHW"
        cases.append(Case(f"timing/{name}", f"{dtype_name} {shape_text(TIMING_SHAPE)} {layout}",
                          _bind(run_timing_case, dtype_name=dtype_name, channels_last=channels_last,
                                variants=variants), timeout=120, cuda_only=True))
    for name, label, kw in large_configs(mode):
        cases.append(Case(f"large/{name}", label, _bind(run_large_case, **kw), timeout=150, cuda_only=True))
    return cases


def _bind(fn: Callable[..., None], **kwargs) -> Callable[[Reporter, Mode], None]:
    return lambda reporter, mode: fn(reporter, mode, **kwargs)


def shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def norm_text(norm: str, k: int) -> str:
    return "L1" if norm == "l1" else f"L∞ k={k}"


def select(cases: list[Case], patterns: Sequence[str] | None) -> list[Case]:
    """The cases whose check name or id matches one of the shell ``patterns`` (all without patterns)."""
    if not patterns:
        return cases
    return [c for c in cases if any(c.check == p or fnmatch.fnmatchcase(c.id, p) for p in patterns)]


# --------------------------------------------------------------------------------------------------------------
# Shared helpers of the checks (run in the child processes).
# --------------------------------------------------------------------------------------------------------------

#: (atol, rtol) of a result against the float64 math: float32 loses ~1e-6 relative per op over a few
#: reductions; half precision outputs are one rounding to 11 (fp16) or 8 (bf16) significant bits away;
#: low_precision statistics are rounded at every level of the pairwise mean (a few ulps of the dtype).
TOLERANCES = {"fp64": (1e-10, 1e-8), "fp32": (2e-5, 2e-4), "fp16": (4e-3, 4e-3), "bf16": (3e-2, 3e-2)}
LOW_PRECISION_TOLERANCES = {"fp16": (1e-2, 1e-2), "bf16": (6e-2, 6e-2)}
MOMENTUM, EPS = 0.1, 1e-5
LEAKY_SLOPE = 0.1  # not a float32 number: a float64 layer shows whether the slope reaches the kernel in float64


def dtype_of(name: str):
    return {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def device_of(mode: Mode):
    return torch.device("cpu" if mode.interpret else "cuda")


def reference(x, weight, bias, norm: str, k: int, eps: float = EPS, residual=None, activation: str = "identity",
              slope: float = LEAKY_SLOPE):
    """float64 training-mode ``act(BN(x) + residual)`` and the batch statistics, from the formulas of API.md §1.

    mean μ and deviations d = x − μ per channel over its n values; L1: s = sqrt(π/2)·mean|d|; L∞: s = (mean of
    the k largest |d|) / c(n, k); y = d / sqrt(s² + eps) · weight + bias. Returns (y, μ, s, n).
    """
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    n = x.numel() // c
    view = [1, c] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    d = x - mean
    if norm == "l1":
        s = math.sqrt(math.pi / 2) * d.abs().mean(dims, keepdim=True)
    else:
        top = d.abs().transpose(0, 1).reshape(c, -1).topk(k, dim=1).values
        s = (top.mean(1) / nd.functional.topk_constant(n, k)).view(view)
    y = d / torch.sqrt(s * s + eps)
    if weight is not None:
        y = y * weight.view(view) + bias.view(view)
    if residual is not None:
        y = y + residual
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "leaky_relu":
        y = F.leaky_relu(y, slope)
    return y, mean.flatten(), s.flatten(), n


def mismatch(got, want, atol: float, rtol: float, relative_to_max: bool = False) -> str | None:
    """None when ``got`` is within (atol, rtol) of the float64 ``want`` everywhere, else what is off."""
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got = got.detach().to(device=want.device, dtype=torch.float64)
    want = want.detach().to(torch.float64)
    if relative_to_max:  # sums over a channel: compared relative to their largest entry
        atol = atol * (want.abs().max().item() + 1.0) if want.numel() else atol
    bad = ~torch.isclose(got, want, atol=atol, rtol=rtol)
    count = int(bad.sum())
    if not count:
        return None
    finite = torch.isfinite(got)
    worst = (got - want).abs()[finite].max().item() if finite.any() else float("nan")
    scale = want.abs().max().item()
    nonfinite = int((~finite).sum())
    extra = f", {nonfinite} not finite" if nonfinite else ""
    return f"{count} of {got.numel()} off (max |diff| {worst:.3g}, max |ref| {scale:.3g}{extra})"


def guarded(numel: int, dtype, device, fill: Callable | None = None, guard: int = 4096):
    """(buffer, middle): ``numel`` values between two guard runs of a sentinel, in one allocation."""
    buf = torch.full((guard + numel + guard,), GUARD_VALUE, dtype=dtype, device=device)
    middle = buf[guard:guard + numel]
    if fill is not None:
        middle.copy_(fill(numel).to(dtype))
    return buf, middle, guard


GUARD_VALUE = -1152.0  # exact in every float dtype (9 * 2^7), far outside any normalised output
GUARD_BYTE = 0xA5


def guards_intact(buf, guard: int) -> bool:
    return bool((buf[:guard] == GUARD_VALUE).all()) and bool((buf[-guard:] == GUARD_VALUE).all())


class OutputTrap:
    """A freed slot between two guard blocks, which the CUDA caching allocator hands to the next allocation of
    the slot's size (the layer's output): a kernel writing past that output lands in a guard.

    Why the placement holds: the guards (32 MiB) and the slot (over 20 MiB) are larger than any free fragment
    the allocator keeps (segments for requests under 10 MiB are 20 MiB), so after ``empty_cache`` they are carved
    one after the other from one fresh segment, and the freed slot is then the best fit for a request of its
    size. Whether it held is checked (``holds``: the output's address is the slot's) rather than assumed.
    """

    GUARD = 32 * 2**20
    MIN_SLOT = 20 * 2**20 + 1

    def __init__(self, nbytes: int, device) -> None:
        self.ptr = None
        self.before = self.after = None
        if device.type != "cuda" or nbytes < self.MIN_SLOT:
            return
        size = -(-nbytes // 512) * 512  # the caching allocator's rounding
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        blob = torch.empty(2 * self.GUARD + size, dtype=torch.uint8, device=device)
        del blob
        self.before = torch.full((self.GUARD,), GUARD_BYTE, dtype=torch.uint8, device=device)
        slot = torch.empty(size, dtype=torch.uint8, device=device)
        self.after = torch.full((self.GUARD,), GUARD_BYTE, dtype=torch.uint8, device=device)
        if (self.before.data_ptr() + self.GUARD == slot.data_ptr()
                and slot.data_ptr() + size == self.after.data_ptr()):
            self.ptr = slot.data_ptr()
        del slot

    def holds(self, t) -> bool:
        return self.ptr is not None and t is not None and t.data_ptr() == self.ptr

    def intact(self) -> bool:
        if self.before is None:
            return True
        return bool((self.before == GUARD_BYTE).all()) and bool((self.after == GUARD_BYTE).all())


# --------------------------------------------------------------------------------------------------------------
# 1. Layouts
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A layer input of shape (N, C, H, W) as a view of a base tensor that the test owns (and guards)."""

    name: str
    code: str
    base: Callable[[tuple[int, ...]], tuple[int, ...]]  # base shape from the layer input's shape
    channels_last: bool
    view: Callable  # (base, layer input shape) -> layer input


LAYOUTS = [
    Layout("dense", "x", lambda s: s, False, lambda b, s: b),
    Layout("channel chunk", "x.chunk(2, 1)[0]", lambda s: (s[0], 2 * s[1], *s[2:]), False,
           lambda b, s: b.chunk(2, dim=1)[0]),
    Layout("channel step", "x[:, ::2]", lambda s: (s[0], 2 * s[1], *s[2:]), False, lambda b, s: b[:, ::2]),
    Layout("batch step", "x[::2]", lambda s: (2 * s[0], *s[1:]), False, lambda b, s: b[::2]),
    Layout("channels_last chunk", "x_cl.chunk(2, 1)[0]", lambda s: (s[0], 2 * s[1], *s[2:]), True,
           lambda b, s: b.chunk(2, dim=1)[0]),
    Layout("expanded batch", "x[:1].expand(N, -1, -1, -1)", lambda s: (1, *s[1:]), False,
           lambda b, s: b.expand(s[0], -1, -1, -1)),
    Layout("spatial steps", "x[:, :, ::2, ::2]", lambda s: (s[0], s[1], 2 * s[2], 2 * s[3]), False,
           lambda b, s: b[:, :, ::2, ::2]),
]


def layout_shapes(mode: Mode) -> list[tuple[int, int, int, int]]:
    """Layer input shapes. CUDA: 100352 values per channel and a 25.7 MB fp32 output (streaming kernels, and
    large enough for the output guard), then 256 values per channel (the persistent kernel). CPU: 48 values per
    channel, three of the interpreter's 16-value blocks."""
    if mode.interpret:
        return [(4, 4, 3, 4)]
    return [(32, 64, 56, 56)] if mode.quick else [(32, 64, 56, 56), (4, 32, 8, 8)]


@dataclass(frozen=True)
class LayerSpec:
    label: str
    norm: str
    k: int
    fused: bool = False
    activation: str = "identity"
    residual: bool = False
    low_precision: bool = False

    def make(self, channels: int, device, dtype=None, backend: str = "triton"):
        kw = {"low_precision": self.low_precision} | ({} if self.norm == "l1" else {"k": self.k})
        if self.fused:
            cls = nd.L1BatchNormAct2d if self.norm == "l1" else nd.LinfBatchNormAct2d
            kw.update(activation=self.activation, negative_slope=LEAKY_SLOPE)
        else:
            cls = nd.L1BatchNorm2d if self.norm == "l1" else nd.LinfBatchNorm2d
        return cls(channels, momentum=MOMENTUM, eps=EPS, backend=backend, **kw).to(device=device, dtype=dtype)


def layout_layers(mode: Mode) -> list[LayerSpec]:
    k_top = 3 if mode.interpret else 8  # the interpreter's top-k costs seconds per call
    layers = [LayerSpec("L1", "l1", 1), LayerSpec("L∞ k=1", "linf", 1)]
    if mode.interpret and mode.quick:
        return layers
    return layers + [
        LayerSpec(f"L∞ k={k_top}", "linf", k_top),
        LayerSpec("fused L1+ReLU+r", "l1", 1, fused=True, activation="relu", residual=True),
        LayerSpec("fused L∞+leaky", "linf", 1, fused=True, activation="leaky_relu"),
    ]


def run_layout_case(rep: Reporter, mode: Mode, layout: Layout, shape: tuple[int, ...]) -> None:
    device = device_of(mode)
    problems, armed = [], {"y": 0, "dx": 0}
    layers = layout_layers(mode)
    for spec in layers:
        rep.step(spec.label)
        torch.manual_seed(0)
        issues, held = check_layer_on_layout(spec, layout, shape, device)
        problems += [f"{spec.label}: {issue}" for issue in issues]
        for name in held:
            armed[name] += 1
    names = ", ".join(s.label for s in layers)
    if device.type == "cuda":
        guards = f"output guards armed for y {armed['y']}/{len(layers)}, dx {armed['dx']}/{len(layers)}"
    else:
        guards = "output guards: CUDA only (on the CPU a stray write may show as a crash)"
    if problems:
        rep.row("FAIL", "; ".join(problems))
    else:
        rep.row("pass", f"{names}: y, dx, dweight, dbias (dresidual), running stats vs float64; input, dy and "
                        f"residual guards and untouched input; {guards}")


def check_layer_on_layout(spec: LayerSpec, layout: Layout, shape: tuple[int, ...], device) -> tuple[list[str], list]:
    """Forward+backward of one layer on one layout against float64; returns (problems, outputs the trap held)."""
    c = shape[1]
    base_shape = layout.base(shape)
    numel = math.prod(base_shape)
    buf, flat, guard = guarded(numel, torch.float32, device, fill=lambda m: torch.randn(m, device=device))
    if layout.channels_last:
        n_, c_, h_, w_ = base_shape
        base = flat.view(n_, h_, w_, c_).permute(0, 3, 1, 2)
    else:
        base = flat.view(base_shape)
    snapshot = base.clone()
    leaf = base.detach().requires_grad_()
    view = layout.view(leaf, shape)

    dy_buf, dy_flat, _ = guarded(math.prod(shape), torch.float32, device,
                                 fill=lambda m: torch.randn(m, device=device))
    dy = dy_flat.view(shape)
    r_buf = residual = None
    if spec.residual:
        r_buf, r_flat, _ = guarded(math.prod(shape), torch.float32, device,
                                   fill=lambda m: torch.randn(m, device=device))
        residual = r_flat.view(shape).detach().requires_grad_()

    layer = spec.make(c, device)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 1.5)
    expected = _layout_reference(spec, layout, shape, layer, snapshot, residual, dy)

    nbytes = view.numel() * view.element_size()
    trap_y = OutputTrap(nbytes, device)
    y = layer(view, residual) if spec.fused else layer(view)
    held = ["y"] if trap_y.holds(y) else []
    dx_seen = []
    view.register_hook(lambda g: dx_seen.append(g))
    trap_dx = OutputTrap(nbytes, device)
    inputs = [leaf, layer.weight, layer.bias] + ([residual] if residual is not None else [])
    grads = torch.autograd.grad(y, inputs, dy)
    if dx_seen and trap_dx.holds(dx_seen[0]):
        held.append("dx")
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    problems = []
    if not trap_y.intact():
        problems.append("a write past the output y (guard next to it changed)")
    if not trap_dx.intact():
        problems.append("a write past the input gradient (guard next to it changed)")
    for name, b in (("input", buf), ("dy", dy_buf), ("residual", r_buf)):
        if b is not None and not guards_intact(b, guard):
            problems.append(f"guard around the {name} changed")
    if not torch.equal(base, snapshot):
        problems.append("the input was modified")
    atol, rtol = TOLERANCES["fp32"]
    got = {"y": y, "running_mean": layer.running_mean, "running_var": layer.running_var}
    got.update(zip(["dx", "dweight", "dbias", "dresidual"], grads))
    for name, want in expected.items():
        issue = mismatch(got[name], want, atol, rtol, relative_to_max=name.startswith("d"))
        if issue:
            problems.append(f"{name} {issue}")
    return problems, held


def _layout_reference(spec: LayerSpec, layout: Layout, shape: tuple[int, ...], layer, base, residual, dy) -> dict:
    """The float64 results of one training step on the same view of a float64 copy of ``base`` (gradients to
    the base), moved to the CPU: the device's memory then holds no temporaries of the reference, so that the
    output guards are carved from a fresh segment."""
    leaf64 = base.double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    r64 = residual.detach().double().requires_grad_() if residual is not None else None
    y64, mean64, s64, n = reference(layout.view(leaf64, shape), w64, b64, spec.norm, spec.k, residual=r64,
                                    activation=spec.activation)
    inputs64 = [leaf64, w64, b64] + ([r64] if r64 is not None else [])
    grads64 = torch.autograd.grad(y64, inputs64, dy.double())
    expected = {
        "y": y64,
        # torch's update rule, with the variance-equivalent s² n/(n − 1) (API.md §1).
        "running_mean": (1 - MOMENTUM) * layer.running_mean.double() + MOMENTUM * mean64,
        "running_var": (1 - MOMENTUM) * layer.running_var.double() + MOMENTUM * s64 ** 2 * n / (n - 1),
    }
    expected.update(zip(["dx", "dweight", "dbias", "dresidual"], grads64))
    return {name: t.detach().cpu() for name, t in expected.items()}


# --------------------------------------------------------------------------------------------------------------
# 2. The GPU tests
# --------------------------------------------------------------------------------------------------------------


def gpu_test_command(mode: Mode) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", "tests/"]
    if mode.quick:
        # The large shapes are this script's own layouts, timing and large checks.
        command += ["-x", "-k", "not gpu_large_shapes"]
    return command


def run_gpu_tests(rep: Reporter, mode: Mode) -> None:
    rep.step("pytest -m gpu")
    timeout = 150 if mode.quick else 240
    start = time.monotonic()
    process = subprocess.Popen(gpu_test_command(mode), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace")
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        progress = "".join(ln.strip() for ln in output.splitlines() if set(ln.strip()) <= set(".sFEx") and ln)
        rep.row("FAIL", f"pytest did not finish within {timeout} s; progress so far: {progress.count('.')} passed, "
                        f"{progress.count('F')} failed, {progress.count('E')} errors")
        return
    elapsed = time.monotonic() - start
    lines = output.strip().splitlines()
    words = ("passed", "failed", "error", "skipped", "deselected", "no tests ran")
    summary = next((ln.strip("= ") for ln in reversed(lines) if " in " in ln and any(w in ln for w in words)),
                   lines[-1] if lines else "(no output)")
    failures = [ln.split(" ", 1)[1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    if process.returncode == 5:
        rep.row("FAIL", f"no GPU test was collected ({summary})")
    elif process.returncode != 0 or failures:
        shown = "; ".join(failures[:8]) + (f"; ... {len(failures) - 8} more" if len(failures) > 8 else "")
        shown = shown or (lines[-1] if lines else "")
        rep.row("FAIL", f"{summary} (exit {process.returncode}, {elapsed:.0f} s): {shown}")
    else:
        rep.row("pass", f"{summary} ({elapsed:.0f} s)")


# --------------------------------------------------------------------------------------------------------------
# 3. Fused layers, bit for bit
# --------------------------------------------------------------------------------------------------------------


def fused_norms(mode: Mode) -> list[tuple[str, int]]:
    if mode.quick:
        return [("l1", 1)] if mode.interpret else [("l1", 1), ("linf", 1)]
    return [("l1", 1), ("linf", 1), ("linf", 3 if mode.interpret else 8)]


def fused_dtypes(mode: Mode) -> list[str]:
    if mode.interpret and mode.quick:
        return ["fp32", "fp16"]
    return ["fp32", "fp16", "bf16", "fp64"]


def fused_combinations(mode: Mode) -> list[tuple[tuple[int, ...], bool, str, bool]]:
    """(shape, channels_last, activation, residual) of one fused case."""
    acts = ("relu", "leaky_relu", "identity")
    if mode.interpret:
        # 60 values per channel (four of the interpreter's 16-value blocks); each combination costs seconds.
        shape = (3, 4, 4, 5)
        if mode.quick:
            return [(shape, False, "relu", True), (shape, False, "leaky_relu", True)]
        return [(shape, cl, act, not cl) for act in acts for cl in (False, True)]
    # 3200 values per channel (persistent kernel) and 9216 (streaming).
    shapes = [(16, 32, 24, 24)] if mode.quick else [(8, 32, 20, 20), (16, 32, 24, 24)]
    return [(shape, cl, act, res) for shape in shapes for cl in (False, True)
            for act in acts for res in (False, True)]


def run_fused_case(rep: Reporter, mode: Mode, norm: str, k: int, dtype_name: str) -> None:
    device, dtype = device_of(mode), dtype_of(dtype_name)
    acts = {"relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, LEAKY_SLOPE), "identity": lambda t: t}
    atol, rtol = TOLERANCES[dtype_name]
    combos = fused_combinations(mode)
    problems = []
    for shape, channels_last, activation, with_residual in combos:
        label = f"{activation}{'+r' if with_residual else ''} {'NHWC' if channels_last else 'NCHW'} " \
                f"{'x'.join(map(str, shape))}"
        rep.step(label)
        torch.manual_seed(0)
        fused = LayerSpec("", norm, k, fused=True, activation=activation).make(shape[1], device, dtype)
        plain = LayerSpec("", norm, k).make(shape[1], device, dtype)
        with torch.no_grad():
            fused.weight.uniform_(0.5, 1.5)
            fused.bias.normal_()
        plain.load_state_dict(fused.state_dict())
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype).contiguous(memory_format=memory_format)
        r = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format) \
            if with_residual else None
        dy = torch.randn(shape, device=device).to(dtype)
        outputs = []
        for layer in (fused, plain):
            xi = x.clone().requires_grad_()
            ri = r.clone().requires_grad_() if r is not None else None
            if layer is fused:
                y = layer(xi, ri)
            else:
                z = layer(xi)
                y = acts[activation](z if ri is None else z + ri)
            inputs = [xi, layer.weight, layer.bias] + ([ri] if ri is not None else [])
            outputs.append((y, torch.autograd.grad(y, inputs, dy)))
        (y1, g1), (y2, g2) = outputs
        if not torch.equal(y1, y2):
            differ = int((y1 != y2).sum())
            problems.append(f"{label}: y differs from the unfused layer in {differ} of {y1.numel()} values "
                            f"(max |diff| {(y1.double() - y2.double()).abs().max().item():.3g})")
        elif y1.stride() != y2.stride():
            problems.append(f"{label}: output strides {y1.stride()}, unfused {y2.stride()}")
        for name in ("running_mean", "running_var"):
            if not torch.equal(getattr(fused, name), getattr(plain, name)):
                problems.append(f"{label}: {name} differs from the unfused layer's")
        for name, a, b in zip(("dx", "dweight", "dbias", "dresidual"), g1, g2):
            issue = mismatch(a, b, atol, rtol, relative_to_max=True)
            if issue:
                problems.append(f"{label}: {name} {issue}")
    if problems:
        rep.row("FAIL", "; ".join(problems))
    else:
        rep.row("pass", f"{len(combos)} combinations (act, residual, layout, shape): forward and running stats "
                        f"bitwise, gradients within {dtype_name} tolerance")


# --------------------------------------------------------------------------------------------------------------
# 4. No host synchronisation; CUDA graphs
# --------------------------------------------------------------------------------------------------------------


def small_convnet(norm: str, k: int, fuse: bool, half: bool, device):
    """conv-BN-ReLU x2 (16384 and 4096 values per channel at batch 16, 32x32), pooled, linear: converted."""
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    kw = {} if norm == "l1" else {"k": k}
    # Fusion by nn.Sequential adjacency: no example forward (it would run the Triton backend on CPU tensors).
    net = nd.convert_batchnorm(net, norm, backend="triton", fuse_activation=fuse, **kw)
    memory_format = torch.channels_last if half else torch.contiguous_format
    dtype = torch.bfloat16 if half else torch.float32
    net = net.to(device=device, dtype=dtype, memory_format=memory_format)
    fused = sum(type(m).__name__.endswith("Act2d") for m in net.modules())
    return net, dtype, memory_format, fused


def run_no_sync_case(rep: Reporter, mode: Mode, norm: str, k: int, fuse: bool, half: bool) -> None:
    device = device_of(mode)
    torch.manual_seed(0)
    net, dtype, memory_format, fused = small_convnet(norm, k, fuse, half, device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 3, 32, 32, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    target = torch.randint(0, 10, (16,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x).float(), target).backward()
        optimizer.step()

    rep.step("warm-up steps (kernel compilation, optimizer state)")
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    rep.step("training step under set_sync_debug_mode('error')")
    error = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as exc:
        error = str(exc).strip().splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    # The mode really raises on a sync here (otherwise the step above proves nothing).
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ones(1, device=device).item()
        probe = False
    except RuntimeError:
        probe = True
    finally:
        torch.cuda.set_sync_debug_mode(0)
    what = f"forward, backward, SGD step; {fused} fused layers"
    if error:
        kind = "host sync" if "synchroniz" in error else "error"
        rep.row("FAIL", f"{kind} in the training step ({what}): {error}")
    elif not probe:
        rep.row("FAIL", "set_sync_debug_mode('error') did not flag .item(): the check proves nothing here")
    else:
        rep.row("pass", f"{what}: no synchronising call (the mode flags .item() here)")


def run_graph_case(rep: Reporter, mode: Mode, norm: str, k: int, fuse: bool, half: bool) -> None:
    device = device_of(mode)
    torch.manual_seed(0)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    net, dtype, memory_format, fused = small_convnet(norm, k, fuse, half, device)

    def batch():
        return (torch.randn(16, 3, 32, 32, device=device, dtype=dtype).contiguous(memory_format=memory_format),
                torch.randint(0, 10, (16,), device=device))

    static_x, static_t = batch()
    rep.step("warm-up on a side stream")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(static_x).float(), static_t).backward()
    torch.cuda.current_stream().wait_stream(side)
    eager = copy.deepcopy(net)
    net.zero_grad(set_to_none=True)
    rep.step("capture of forward+backward")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = net(static_x)
        static_loss = F.cross_entropy(static_out.float(), static_t)
        static_loss.backward()
    rep.step("replays against eager")
    problems, bitwise = [], True
    for replay in range(2):
        x, t = batch()
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        out = eager(x)
        loss = F.cross_entropy(out.float(), t)
        loss.backward()
        torch.cuda.synchronize()
        pairs = [("output", static_out, out), ("loss", static_loss, loss)]
        pairs += [(f"grad {name}", p.grad, q.grad) for (name, p), q in zip(net.named_parameters(),
                                                                              eager.parameters())]
        pairs += [(name, a, b) for (name, a), b in zip(net.named_buffers(), eager.buffers())]
        for name, a, b in pairs:
            if a is None or b is None:
                problems.append(f"replay {replay}: {name} missing")
                continue
            bitwise = bitwise and torch.equal(a, b)
            if a.is_floating_point():
                issue = mismatch(a, b, *TOLERANCES["bf16" if half else "fp32"], relative_to_max=True)
            else:
                issue = None if torch.equal(a, b) else "differs"
            if issue:
                problems.append(f"replay {replay}: {name} {issue}")
    what = f"{fused} fused layers; 2 replays: output, loss, gradients, running stats"
    if problems:
        rep.row("FAIL", "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else ""))
    else:
        rep.row("pass", f"{what} {'bitwise equal to' if bitwise else 'within tolerance of'} eager")


# --------------------------------------------------------------------------------------------------------------
# 5. Timing against cuDNN
# --------------------------------------------------------------------------------------------------------------

TIMING_SHAPE = (256, 64, 56, 56)  # ResNet-50's first BatchNorm at batch 256


def timing_configs(mode: Mode) -> list[tuple[str, str, bool, tuple[str, ...]]]:
    """(case name, dtype, channels_last, variants): the cuDNN layer is timed in every case as the baseline."""
    full = ("L1", "L∞ k=1", "L∞ k=8", "fused L1+ReLU")
    configs = [
        ("fp16-nchw", "fp16", False, full),
        ("fp16-channels_last", "fp16", True, full),
        ("fp32-nchw", "fp32", False, ("L1", "L∞ k=1", "L∞ k=8")),
        ("bf16-low_precision-nchw", "bf16", False, ("L1 low_precision", "L∞ k=1 low_precision")),
        ("bf16-low_precision-channels_last", "bf16", True, ("L1 low_precision", "L∞ k=1 low_precision")),
    ]
    if mode.quick:
        return [configs[0], configs[1], configs[4]]
    return configs


def _timing_module(name: str, channels: int):
    lowp = name.endswith("low_precision")
    if name == "cuDNN BatchNorm2d":
        return nn.BatchNorm2d(channels)
    if name == "cuDNN BatchNorm2d + ReLU":
        return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())
    if name == "fused L1+ReLU":
        return nd.L1BatchNormAct2d(channels, backend="triton")
    if name.startswith("L1"):
        return nd.L1BatchNorm2d(channels, backend="triton", low_precision=lowp)
    k = int(name.split("k=")[1].split()[0])
    return nd.LinfBatchNorm2d(channels, k=k, backend="triton", low_precision=lowp)


def time_calls(calls: dict[str, Callable[[int], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each variant (CUDA events around every call), the variants taking turns."""
    for call in calls.values():
        for i in range(warmup):
            call(i)
    torch.cuda.synchronize()
    events: dict[str, list] = {name: [] for name in calls}
    names = list(calls)
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls[name](i)
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) / 1e3 for s, e in pairs) for name, pairs in events.items()}


def run_timing_case(rep: Reporter, mode: Mode, dtype_name: str, channels_last: bool,
                    variants: tuple[str, ...]) -> None:
    device, dtype = device_of(mode), dtype_of(dtype_name)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    # Two inputs of 103 MB (fp16) each, alternating: more than an H200's 60 MB L2, so no call finds its input
    # cached.
    xs = [torch.randn(TIMING_SHAPE, device=device, dtype=dtype).contiguous(memory_format=memory_format)
          .requires_grad_() for _ in range(2)]
    dys = [torch.randn_like(x) for x in xs]
    baselines = ["cuDNN BatchNorm2d"] + (["cuDNN BatchNorm2d + ReLU"] if "fused L1+ReLU" in variants else [])
    # Parameters in float32 for every dtype, as under autocast (and as cuDNN's BatchNorm needs for half inputs).
    modules = {name: _timing_module(name, TIMING_SHAPE[1]).to(device) for name in baselines + list(variants)}
    forward, both = {}, {}
    for name, module in modules.items():
        params = [p for p in module.parameters()]
        forward[name] = lambda i, m=module: m(xs[i % 2])
        both[name] = lambda i, m=module, ps=params: torch.autograd.grad(m(xs[i % 2]), [xs[i % 2], *ps],
                                                                         dys[i % 2])
    repeats, warmup = (20, 3) if mode.quick else (40, 5)
    rep.step("forward")
    fwd = time_calls(forward, repeats, warmup)
    rep.step("forward+backward")
    fb = time_calls(both, repeats, warmup)
    nbytes = math.prod(TIMING_SHAPE) * xs[0].element_size()
    base = fb["cuDNN BatchNorm2d"]
    for name in modules:
        # Minimal traffic of forward+backward: read x, write y; read x and dy, write dx.
        bandwidth = 5 * nbytes / fb[name] / 1e9
        extra = ""
        if name == "fused L1+ReLU":
            extra = f", {fb[name] / fb['cuDNN BatchNorm2d + ReLU']:.2f}x cuDNN BN + ReLU"
        rep.row("measured", f"f+b {fb[name] * 1e3:.3f} ms (fwd {fwd[name] * 1e3:.3f}), {bandwidth:.0f} GB/s, "
                            f"{fb[name] / base:.2f}x cuDNN{extra}", case=f"{rep.case.label}: {name}")


# --------------------------------------------------------------------------------------------------------------
# 6. Large launch grids and more than 2^31 elements
# --------------------------------------------------------------------------------------------------------------

LARGE_SHAPE = (33, 64, 1024, 1024)  # 2,214,592,512 elements (2^31 = 2,147,483,648)


def large_configs(mode: Mode) -> list[tuple[str, str, dict]]:
    big = shape_text(LARGE_SHAPE)
    configs = [
        ("grid-bf16-low_precision-channels_last", "grid > 65535: L1 bf16 low_precision channels_last "
         "(512, 64, 112, 112)", dict(shape=(512, 64, 112, 112), spec=LayerSpec("L1", "l1", 1, low_precision=True),
                                     dtype_name="bf16", channels_last=True)),
        ("2^31-l1-nchw", f"> 2^31 elements: L1 fp16 NCHW {big}",
         dict(shape=LARGE_SHAPE, spec=LayerSpec("L1", "l1", 1), dtype_name="fp16", channels_last=False)),
        ("2^31-linf1-channels_last", f"> 2^31 elements: L∞ k=1 fp16 channels_last {big}",
         dict(shape=LARGE_SHAPE, spec=LayerSpec("L∞ k=1", "linf", 1), dtype_name="fp16", channels_last=True)),
        ("2^31-fused-l1-nchw", f"> 2^31 elements: fused L1+ReLU fp16 NCHW {big}",
         dict(shape=LARGE_SHAPE, spec=LayerSpec("fused L1+ReLU", "l1", 1, fused=True, activation="relu"),
              dtype_name="fp16", channels_last=False)),
    ]
    return configs[:2] if mode.quick else configs


def run_large_case(rep: Reporter, mode: Mode, shape: tuple[int, ...], spec: LayerSpec, dtype_name: str,
                   channels_last: bool) -> None:
    device, dtype = device_of(mode), dtype_of(dtype_name)
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    rep.step("allocate")
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    layer = spec.make(shape[1], device, dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    rep.step("forward")
    y = layer(x)
    rep.step("backward")
    (dx,) = torch.autograd.grad(y, [x], dy)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rep.step("float64 spot check")
    atol, rtol = (LOW_PRECISION_TOLERANCES if spec.low_precision else TOLERANCES)[dtype_name]
    channels = [0, shape[1] // 2, shape[1] - 1]
    problems = []
    for c in channels:
        xc = x.detach()[:, c:c + 1].double().requires_grad_()
        w = layer.weight.detach()[c:c + 1].double()
        b = layer.bias.detach()[c:c + 1].double()
        y64, mean64, s64, n = reference(xc, w, b, spec.norm, spec.k, activation=spec.activation)
        (dx64,) = torch.autograd.grad(y64, [xc], dy[:, c:c + 1].double())
        rv = (1 - MOMENTUM) * 1.0 + MOMENTUM * s64.detach() ** 2 * n / (n - 1)
        rm = MOMENTUM * mean64.detach()
        for name, got, want, rel in (("y", y[:, c:c + 1], y64, False), ("dx", dx[:, c:c + 1], dx64, True),
                                     ("running_mean", layer.running_mean[c:c + 1], rm, False),
                                     ("running_var", layer.running_var[c:c + 1], rv, False)):
            issue = mismatch(got, want, atol, rtol, relative_to_max=rel)
            if issue:
                problems.append(f"channel {c} {name}: {issue}")
        del xc, y64, dx64
    if problems:
        rep.row("FAIL", "; ".join(problems))
    else:
        rep.row("pass", f"{x.numel():,} elements: y, dx and running stats of channels {channels} vs float64 "
                        f"({dtype_name} tolerance)")


# --------------------------------------------------------------------------------------------------------------
# Child side: run the given cases, stream what happens.
# --------------------------------------------------------------------------------------------------------------


def emit(kind: str, **payload) -> None:
    print(PREFIX + json.dumps({"kind": kind, **payload}), flush=True)


def child_main(mode: Mode, ids: Sequence[str]) -> int:
    cases = {case.id: case for case in build_cases(mode)}
    for case_id in ids:
        case = cases[case_id]
        emit("start", id=case_id)
        reporter = Reporter(case, emit)
        try:
            case.run(reporter, mode)
        except Exception as exc:  # noqa: BLE001 - any failure of the code under test is a row, not a crash
            message = " ".join(str(exc).strip().splitlines()[:2])[:300]
            reporter.row("FAIL", f"{type(exc).__name__}: {message}")
        emit("end", id=case_id)
        if reporter.failed:
            # A failed case may have left a CUDA context unusable or (wrong strides on the CPU) a corrupted heap:
            # the next case gets a fresh process.
            return 3
        if not mode.interpret:
            torch.cuda.empty_cache()
    return 0


# --------------------------------------------------------------------------------------------------------------
# Parent side: processes, timeouts, the table.
# --------------------------------------------------------------------------------------------------------------


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def run_isolated(command: Callable[[list[str]], list[str]], cases: list[Case], env: dict[str, str],
                 deadline: float, progress: Callable[[str], None] = lambda s: None) -> list[Row]:
    """Run ``cases`` in child processes started with ``command(ids)``, in order.

    A case that crashes its process or runs past its timeout gets a FAIL row (with the step it was in and the
    last lines of output) and the remaining cases continue in a fresh process. Past ``deadline``
    (``time.monotonic()``) the case in progress is stopped and the rest are reported as not run.
    """
    rows: list[Row] = []
    pending = list(cases)
    by_id = {case.id: case for case in cases}
    while pending:
        if time.monotonic() >= deadline:
            rows += [Row(c.check, c.label, "not run", "the time budget was spent") for c in pending]
            break
        process = subprocess.Popen(command([c.id for c in pending]), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                                   start_new_session=True, errors="replace")
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(process.stdout, lines), daemon=True).start()
        current, step, log = None, "starting", deque(maxlen=6)
        case_rows: list[Row] = []
        started = time.monotonic()
        case_deadline = started + pending[0].timeout + 60  # the first case also pays the imports
        while True:
            limit = min(case_deadline, deadline)
            try:
                line = lines.get(timeout=max(0.0, limit - time.monotonic()))
            except queue.Empty:
                _kill(process)
                case = current or pending[0]
                timed_out = limit == case_deadline
                why = f"timed out after {case.timeout:.0f} s" if timed_out else "stopped: the time budget was spent"
                rows += _close_case(case, case_rows, "FAIL" if timed_out else "not run",
                                    f"{why} in step '{step}'" + _log_text(log))
                progress(f"{case.id}: {why}")
                pending.remove(case)
                break
            if line is None:  # the process ended
                process.wait()
                if current is not None:
                    what = _describe_exit(process.returncode)
                    rows += _close_case(current, case_rows, "FAIL", f"process {what} in step '{step}'" + _log_text(log))
                    progress(f"{current.id}: {what}")
                    pending.remove(current)
                elif pending and process.returncode == 0:
                    for case in pending:
                        rows.append(Row(case.check, case.label, "FAIL", "the process ended without running it"))
                    pending = []
                elif pending and process.returncode != 3:
                    detail = f"process {_describe_exit(process.returncode)} before its first case" + _log_text(log)
                    rows += [Row(c.check, c.label, "FAIL", detail) for c in pending]
                    pending = []
                break
            if not line.startswith(PREFIX):
                log.append(line)
                continue
            message = json.loads(line[len(PREFIX):])
            kind = message["kind"]
            if kind == "start":
                current, step, case_rows = by_id[message["id"]], "start", []
                case_start = time.monotonic()
                case_deadline = case_start + current.timeout
                log.clear()
            elif kind == "step":
                step = message["label"]
            elif kind == "row":
                case_rows.append(Row(current.check if current else "?", message["case"], message["result"],
                                     message["detail"]))
            elif kind == "end":
                rows += case_rows
                results = ", ".join(sorted({r.result for r in case_rows})) or "no row"
                progress(f"{current.id}: {results} ({time.monotonic() - case_start:.1f} s)")
                pending.remove(current)
                current, case_rows = None, []
    return rows


def _close_case(case: Case, rows: list[Row], result: str, detail: str) -> list[Row]:
    """The rows of a case its process did not finish: what it reported, then why it stopped (on its last row)."""
    if not rows:
        return [Row(case.check, case.label, result, detail)]
    last = rows[-1]
    worse = last.result if last.result == "FAIL" else result
    return rows[:-1] + [Row(last.check, last.case, worse, f"{last.detail}; then {detail}")]


def _log_text(log: deque) -> str:
    text = " / ".join(line.strip() for line in log if line.strip())
    return f"; last output: {text[-400:]}" if text else ""


def markdown_table(rows: list[Row]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| # | check | case | result | detail |", "|---|---|---|---|---|"]
    for index, row in enumerate(rows, 1):
        lines.append(f"| {index} | {row.check} | {cell(row.case)} | {cell(row.result)} | {cell(row.detail)} |")
    return "\n".join(lines)


def failed(rows: list[Row]) -> bool:
    """Whether the run failed: a FAIL row, or a check that did not run (a skip for want of CUDA is not one)."""
    return any(row.result in ("FAIL", "not run") for row in rows)


def header(mode: Mode, argv: Sequence[str], seconds: float) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if mode.interpret:
        device = "CPU tensors under TRITON_INTERPRET=1 (no GPU: correctness checks on tiny shapes)"
    else:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}), " \
                 f"CUDA {torch.version.cuda}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "benchmarks/gpu_check.py", *argv])
    return "\n".join([
        f"- Date: {date}; device: {device}",
        f"- torch {torch.__version__}, Triton {triton_version}, Python {sys.version.split()[0]}",
        f"- Command (from the repository root): `{command}` ({seconds:.0f} s)",
        "- Dtypes and shapes: in each case; correctness against float64 math from the formulas or against "
        "torch's own ops; timings are medians of interleaved calls timed with CUDA events, ratio = time / cuDNN "
        "BatchNorm2d in the same run, GB/s = 5 tensors (read x, write y; read x and dy, write dx) per f+b time",
    ])


def child_env(mode: Mode) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if mode.interpret:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--quick", action="store_true", help="one shape per check and fewer variants")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help=f"checks ({', '.join(CHECKS)}) or case ids / shell patterns (see --list)")
    parser.add_argument("--cpu-interpret", action="store_true",
                        help="CPU tensors under TRITON_INTERPRET=1, tiny shapes; CUDA-only checks are skipped")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"wall-clock seconds for the whole run (default {DEFAULT_BUDGET_S:.0f}; "
                             f"{DEFAULT_INTERPRET_BUDGET_S:.0f} with --cpu-interpret)")
    parser.add_argument("--list", action="store_true", help="print the case ids and exit")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    mode = Mode(interpret=args.cpu_interpret, quick=args.quick)
    if args.child:
        return child_main(mode, args.child)
    cases = select(build_cases(mode), args.only)
    if args.only and not cases:
        print(f"--only {' '.join(args.only)} matches no case; the checks are {', '.join(CHECKS)} "
              "(--list prints the case ids)", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(f"{c.id}{'  (CUDA only)' if c.cuda_only else ''}" for c in cases))
        return 0
    if not mode.interpret and not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA device and none is visible (torch.cuda.is_available() is False); "
              "--cpu-interpret runs the correctness checks on CPU tensors under Triton's interpreter",
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu_check.py checks the Triton kernels: pip install 'normdecouple[triton]'", file=sys.stderr)
        return 2
    start = time.monotonic()
    budget = args.budget if args.budget is not None else (
        DEFAULT_INTERPRET_BUDGET_S if mode.interpret else DEFAULT_BUDGET_S)
    deadline = start + budget
    env = child_env(mode)
    script = str(Path(__file__).resolve())
    flags = (["--quick"] if mode.quick else []) + (["--cpu-interpret"] if mode.interpret else [])

    def command(ids: list[str]) -> list[str]:
        return [sys.executable, script, *flags, "--child", *ids]

    def progress(text: str) -> None:
        print(f"[gpu_check {time.monotonic() - start:5.0f} s] {text}", file=sys.stderr, flush=True)

    rows: list[Row] = []
    for check in CHECKS:
        group = [c for c in cases if c.check == check]
        runnable = [c for c in group if not (mode.interpret and c.cuda_only)]
        if len(runnable) < len(group):
            rows.append(Row(check, "all cases" if not runnable else f"{len(group) - len(runnable)} cases",
                            SKIPPED_NO_CUDA, "--cpu-interpret runs on CPU tensors"))
        if runnable:
            progress(f"{check}: {len(runnable)} case(s)")
            rows += run_isolated(command, runnable, env, deadline, progress)
    print(header(mode, argv, time.monotonic() - start))
    print()
    print(markdown_table(rows))
    return 1 if failed(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
