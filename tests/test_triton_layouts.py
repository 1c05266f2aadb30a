"""The Triton path on every memory layout, and its launch geometry for shapes far too large to allocate.

Layouts (issue 18, item 1): channel slices and steps, batch steps, channels_last slices, expanded batches and
spatial steps are read in place with their own strides, and the outputs (``torch.empty_like(x)``, dense) are
written with theirs. Oracle: the PyTorch backend on the same values, in float64, forward and backward. Every
input is a view into a larger buffer and every output and scratch buffer the launcher allocates sits inside a
larger one, all filled with a sentinel that must be intact afterwards: a kernel that writes through the wrong
strides fails here (under the interpreter such writes otherwise corrupt the heap, on a GPU other tensors).

Geometry (items 3 and 4): the plans of ResNet-50 and 2^31-element shapes keep every grid on axis 0 below 2^31
programs and set ``IDX64`` on every launch that can address 2^31 elements; the same layouts run with 64-bit
indices forced, so the int64 code paths are exercised under the interpreter too.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="Triton is not installed (pip install 'normdecouple[triton]')")

import normdecouple as nd  # noqa: E402
from normdecouple import functional  # noqa: E402
from normdecouple._torch_backend import LpBatchNormFunction  # noqa: E402
from normdecouple._triton import TritonLpBatchNormFunction, launch, plan  # noqa: E402
from normdecouple.stats import Norm  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETER else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRETER and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1")

SENTINEL = 1234.5
PAD = 5
NORMS = [("l1", 1), ("linf", 1), ("linf", 3)]


class Canary:
    """Views into sentinel-filled buffers; :meth:`check` asserts nothing outside the views changed."""

    def __init__(self):
        self.regions = []

    def strided(self, shape, stride, dtype, fill=SENTINEL):
        span = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
        big = torch.full((span + 2 * PAD,), fill, dtype=dtype, device=DEVICE)
        view = big.as_strided(shape, stride, PAD)
        self.regions.append((big, view))
        return view

    def check(self):
        for base, view in self.regions:
            if view is None:
                continue
            # Compare raw storage: a channels_last base's logical order is not its memory order.
            size = base.untyped_storage().nbytes() // base.element_size()
            flat = base.as_strided((size,), (1,), 0)
            covered = torch.zeros(size, dtype=torch.bool, device=base.device)
            covered.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
            outside = flat[~covered]
            sentinel = torch.full_like(outside, SENTINEL if base.is_floating_point() else 77)
            assert torch.equal(outside, sentinel), "a kernel wrote outside its tensor"


@pytest.fixture
def canary(monkeypatch):
    """Every output and scratch buffer of the launchers is allocated inside a sentinel-filled buffer."""
    guard = Canary()

    def allocate_like(t):
        ref = torch.empty_like(t)
        return guard.strided(ref.shape, ref.stride(), ref.dtype, SENTINEL if ref.is_floating_point() else 77)

    def allocate(shape, dtype, device, fill):
        stride = torch.empty(shape, device="meta").stride()
        view = guard.strided(shape, stride, dtype, SENTINEL if dtype.is_floating_point else 77)
        if fill is not None:
            view.fill_(fill)
        return view

    monkeypatch.setattr(launch, "_allocate_like", allocate_like)
    monkeypatch.setattr(launch, "_allocate", allocate)
    return guard


def _chunk(g, n, c, h, w, channels_last=False):
    base = torch.full((n, 2 * c, h, w), SENTINEL, dtype=torch.float64, device=DEVICE)
    if channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
    region = base[:, :c]
    g.regions.append((base, region))
    return region


def _view(g, full_shape, index, channels_last=False):
    base = torch.full(full_shape, SENTINEL, dtype=torch.float64, device=DEVICE)
    if channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
    region = base[index]
    g.regions.append((base, region))
    return region


def _expanded(g, n, c, h, w):
    base = torch.full((2, c, h, w), SENTINEL, dtype=torch.float64, device=DEVICE)
    region = base[:1]
    region.copy_(torch.randn(1, c, h, w, dtype=torch.float64, device=DEVICE))
    g.regions.append((base, region))
    return region.expand(n, c, h, w)


# (name, shape, factory). Shapes: n = 60 values per channel takes the streaming kernels (interpreter tiles hold
# 16 values), n = 12 the persistent ones; odd C on purpose.
LAYOUTS = {
    "dense": lambda g, s: _view(g, s, (slice(None),)),
    "channels_last": lambda g, s: _view(g, s, (slice(None),), channels_last=True),
    "channel_chunk": lambda g, s: _chunk(g, *s),
    "channel_step": lambda g, s: _view(g, (s[0], 2 * s[1], s[2], s[3]), (slice(None), slice(None, None, 2))),
    "batch_step": lambda g, s: _view(g, (2 * s[0], *s[1:]), (slice(None, None, 2),)),
    "channels_last_chunk": lambda g, s: _chunk(g, *s, channels_last=True),
    "channels_last_batch_step": lambda g, s: _view(g, (2 * s[0], *s[1:]), (slice(None, None, 2),),
                                                   channels_last=True),
    "expanded_batch": lambda g, s: _expanded(g, *s),
    "spatial_step": lambda g, s: _view(g, (*s[:3], 2 * s[3]), (Ellipsis, slice(None, None, 2))),
    "spatial_steps_2d": lambda g, s: _view(g, (*s[:2], 2 * s[2], 3 * s[3]),
                                           (Ellipsis, slice(None, None, 2), slice(1, None, 3))),
    "cropped_width": lambda g, s: _view(g, (*s[:3], s[3] + 2), (Ellipsis, slice(1, -1))),
}
SHAPES = [(4, 3, 3, 5), (2, 3, 2, 3)]


def _run(function, x, norm, k, grad, low_precision=False):
    xi = x.detach().clone() if function is LpBatchNormFunction else x.detach()
    xi.requires_grad_()
    c = x.shape[1]
    w = torch.linspace(0.5, 1.5, c, dtype=x.dtype, device=x.device).requires_grad_()
    b = torch.linspace(-1.0, 1.0, c, dtype=x.dtype, device=x.device).requires_grad_()
    y, mean, scale = function.apply(xi, w, b, 1e-5, norm, k, low_precision)
    grads = torch.autograd.grad(y, (xi, w, b), grad)
    return (y, mean, scale, *grads)


def _assert_matches_torch_backend(x, norm, k, grad=None):
    grad = torch.randn(x.shape, dtype=x.dtype, device=x.device) if grad is None else grad
    ours = _run(TritonLpBatchNormFunction, x, norm, k, grad)
    theirs = _run(LpBatchNormFunction, x.contiguous(), norm, k, grad)
    for name, got, want in zip(("y", "mean", "scale", "dx", "dw", "db"), ours, theirs):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")
    # The output and the input gradient are torch.empty_like(x): x's layout when x is dense, else dense.
    assert ours[0].stride() == torch.empty_like(x).stride()
    assert ours[3].stride() == torch.empty_like(x).stride()
    return ours


@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=["streaming", "persistent"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_torch_backend(layout, shape, norm, k, canary):
    x = LAYOUTS[layout](canary, shape)
    if layout != "expanded_batch":
        x.copy_(torch.randn(shape, dtype=torch.float64, device=DEVICE))
    _assert_matches_torch_backend(x, norm, k)
    canary.check()


@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize(
    "shape, index",
    [
        ((30, 6), (slice(None), slice(None, None, 2))),  # (N, C) with a channel step: C stride 2
        ((60, 3), (slice(None, None, 2),)),  # (N, C) with a batch step
        ((3, 4, 5, 2, 4), (slice(None), slice(0, 2))),  # 3-D channel chunk
        ((2, 3, 2, 3, 8), (Ellipsis, slice(None, None, 2))),  # 3-D spatial step
    ],
    ids=["1d_channel_step", "1d_batch_step", "3d_channel_chunk", "3d_spatial_step"],
)
def test_other_ranks(shape, index, norm, k, canary):
    g = canary
    x = _view(g, shape, index)
    x.copy_(torch.randn(x.shape, dtype=torch.float64, device=DEVICE))
    _assert_matches_torch_backend(x, norm, k)
    canary.check()


@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize("x_layout", ["dense", "channels_last"])
@pytest.mark.parametrize("grad_layout", ["expanded", "channels_last", "contiguous", "slice"])
def test_gradient_layouts(x_layout, grad_layout, norm, k, canary):
    # The incoming gradient need not share x's layout: y.sum() gives an expanded one (every stride 0, read in
    # place), a later .contiguous() or .to(channels_last) another memory order (copied once into x's, since
    # reading it in place would scatter the loads), a slice any strides.
    shape = (4, 3, 3, 5)
    x = LAYOUTS[x_layout](canary, shape)
    x.copy_(torch.randn(shape, dtype=torch.float64, device=DEVICE))
    if grad_layout == "expanded":
        grad = torch.ones((), dtype=torch.float64, device=DEVICE).expand(shape)
    elif grad_layout == "slice":
        grad = _view(canary, (4, 3, 3, 10), (Ellipsis, slice(None, None, 2)))
        grad.copy_(torch.randn(shape, dtype=torch.float64, device=DEVICE))
    else:
        fmt = torch.channels_last if grad_layout == "channels_last" else torch.contiguous_format
        grad = torch.randn(shape, dtype=torch.float64, device=DEVICE).contiguous(memory_format=fmt)
    _assert_matches_torch_backend(x, norm, k, grad)
    canary.check()


def test_low_precision_and_half_layouts(canary):
    # fp16 statistics on a channel chunk: the flat blocks of the pairwise mean read the chunk's own strides and
    # give the bits of the PyTorch backend on a contiguous copy (k = 1: the order inside a top-k mean is free).
    for layout in ("channel_chunk", "channels_last_chunk", "batch_step"):
        x = LAYOUTS[layout](canary, (4, 3, 3, 5))
        x.copy_(3.0 + 5.0 * torch.randn(x.shape, dtype=torch.float64, device=DEVICE))
        half = x.to(torch.float16)
        for norm in ("l1", "linf"):
            ours = TritonLpBatchNormFunction.apply(half, None, None, 1e-5, norm, 1, True)
            theirs = LpBatchNormFunction.apply(half.contiguous(), None, None, 1e-5, norm, 1, True)
            for got, want in zip(ours, theirs):
                assert torch.equal(got, want)
    canary.check()


@pytest.mark.parametrize("layout", ["channel_chunk", "batch_step", "channels_last_chunk", "expanded_batch",
                                    "spatial_step"])
def test_int64_indices_on_every_layout(layout, monkeypatch, canary):
    # Force the 64-bit index paths (taken on a GPU from 2^31 addressable elements) on small shapes.
    monkeypatch.setattr(plan, "INT32_LIMIT", 32)
    plan.plan_forward.cache_clear()
    plan.plan_backward.cache_clear()
    try:
        x = LAYOUTS[layout](canary, (4, 3, 3, 5))
        if layout != "expanded_batch":
            x.copy_(torch.randn(x.shape, dtype=torch.float64, device=DEVICE))
        steps = plan.plan_forward(plan.Spec.of(x), None, None, Norm.LINF, 3, False, 1e-5,
                                  launch.tile_config(x.device)).steps
        reading_x = [s for s in steps if isinstance(s, plan.Launch) and plan.Ref("x") in dict(s.args).values()]
        assert reading_x and all(dict(s.constexprs)["IDX64"] for s in reading_x)
        for norm, k in NORMS:
            _assert_matches_torch_backend(x, norm, k)
    finally:
        plan.plan_forward.cache_clear()
        plan.plan_backward.cache_clear()
    canary.check()


# --- fused BatchNorm + activation -------------------------------------------------------------------------

FUSED = [(nd.L1BatchNormAct2d, nd.L1BatchNorm2d, {}), (nd.LinfBatchNormAct2d, nd.LinfBatchNorm2d, {"k": 1}),
         (nd.LinfBatchNormAct2d, nd.LinfBatchNorm2d, {"k": 3})]


@pytest.mark.parametrize("fused_cls, plain_cls, kw", FUSED, ids=["l1", "linf1", "linf3"])
@pytest.mark.parametrize("layout", ["channels_last", "channel_chunk", "batch_step", "channels_last_chunk",
                                    "expanded_batch", "spatial_step"])
def test_fused_layers_on_layouts(layout, fused_cls, plain_cls, kw, canary):
    # The fused layer (Triton backend) against the unfused layer on the PyTorch backend plus torch's ops.
    c = 3
    x = LAYOUTS[layout](canary, (4, c, 3, 5))
    if layout != "expanded_batch":
        x.copy_(torch.randn(x.shape, dtype=torch.float64, device=DEVICE))
    residual = torch.randn(x.shape, dtype=torch.float64, device=DEVICE)
    fused = fused_cls(c, dtype=torch.float64, activation="leaky_relu", negative_slope=0.2, backend="triton",
                      **kw).to(DEVICE)
    plain = plain_cls(c, dtype=torch.float64, backend="torch", **kw).to(DEVICE)
    with torch.no_grad():
        fused.weight.copy_(torch.tensor([1.3, -0.7, 2.0]))
        fused.bias.copy_(torch.tensor([0.1, -0.3, 0.5]))
    plain.load_state_dict(fused.state_dict())
    grad = torch.randn(x.shape, dtype=torch.float64, device=DEVICE)
    results = []
    for layer in (fused, plain):
        xi = x.detach().clone().requires_grad_() if layer is plain else x.detach().requires_grad_()
        ri = residual.clone().requires_grad_()
        y = layer(xi, ri) if layer is fused else F.leaky_relu(layer(xi) + ri, 0.2)
        results.append((y, *torch.autograd.grad(y, (xi, ri, layer.weight, layer.bias), grad)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fused.running_var, plain.running_var)
    canary.check()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["leaky_relu", "relu", "identity"])
def test_fused_half_residual_rounds_like_torch(dtype, activation):
    # torch computes F.leaky_relu(bn(x) + r): bn(x) + r is a tensor of the input dtype (rounded once), then the
    # activation in float32 rounds again. The epilogue must round twice too, bit for bit (item 6).
    layer = nd.L1BatchNormAct2d(8, activation=activation, negative_slope=0.3, backend="triton").to(DEVICE, dtype)
    plain = nd.L1BatchNorm2d(8, backend="triton").to(DEVICE, dtype)
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(-2, 2, 8))
        layer.weight.copy_(torch.linspace(0.5, 3, 8))
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(8, 8, 3, 3, device=DEVICE).to(dtype)
    r = (torch.randn(8, 8, 3, 3, device=DEVICE) * 3).to(dtype)
    act = {"leaky_relu": lambda t: F.leaky_relu(t, 0.3), "relu": F.relu, "identity": lambda t: t}[activation]
    want = act(plain(x) + r)
    got = layer(x, r)
    assert torch.equal(got, want)


def test_float64_leaky_relu_slope_is_float64():
    # The slope travels as a float64 kernel argument (on a GPU a .param .f64): a float64 layer's negative outputs
    # equal torch's leaky_relu with the slope in double precision, not rounded to float32 (item 5).
    slope = 0.1  # not a float32 value
    layer = nd.L1BatchNormAct2d(3, activation="leaky_relu", negative_slope=slope, backend="triton",
                                dtype=torch.float64).to(DEVICE)
    plain = nd.L1BatchNorm2d(3, backend="triton", dtype=torch.float64).to(DEVICE)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=DEVICE)
    assert torch.equal(layer(x), F.leaky_relu(plain(x), slope))
    act = [s for s in plan.plan_act_forward(plan.Spec.contiguous((4, 3, 9), torch.float64), torch.float64, False,
                                            1, True, slope).steps][0]
    assert act.arg("slope") == slope and isinstance(act.arg("slope"), float)


# --- no host synchronisation --------------------------------------------------------------------------------


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("norm,k", NORMS + [("linf", 70)])
@pytest.mark.parametrize("shape", SHAPES + [(4, 3, 12, 10)], ids=["streaming", "persistent", "host_topk"])
def test_launchers_never_read_the_device(shape, norm, k):
    # Item 8: no value comes back to the host on the forward or backward (each read of a CUDA value waits for
    # the whole stream and breaks CUDA-graph capture), and no per-call constant tensors are built from Python
    # values (a blocking host-to-device copy). Recorded at the dispatcher, so it holds for CUDA tensors too.
    if k > math.prod(shape) // shape[1]:
        pytest.skip("k exceeds the values per channel")
    x = torch.randn(shape, device=DEVICE)
    w = torch.rand(shape[1], device=DEVICE)
    b = torch.randn(shape[1], device=DEVICE)
    dy = torch.randn(shape, device=DEVICE)
    # The launchers themselves (inside the custom ops, which a dispatch mode sees as one call each).
    with _RecordOps() as record:
        y, mean, scale, inv_std, threshold, sign_sum = launch.forward(x, w, b, 1e-5, Norm(norm), k, False)
        launch.backward(dy, x, w, mean, scale, inv_std, threshold, sign_sum, Norm(norm), k, False)
    assert "empty_like" in record.ops  # the mode saw the launchers' own tensor operations
    forbidden = {"_local_scalar_dense", "item", "lift_fresh", "nonzero", "is_nonzero", "equal"}
    assert not forbidden & set(record.ops), sorted(forbidden & set(record.ops))


def test_deferred_nonfinite_count_warns_later_without_reading_the_device(fresh_warning_state):
    # The CUDA path of the non-finite check, run with a stand-in event: the count is read on the host only from
    # the snapshot of an event the device has completed, so the warning comes at a later call.
    class Event:
        done = False

        def record(self):
            pass

        def query(self):
            return Event.done

    monitor = functional.DeferredNonfiniteCount(torch.device("cpu"), make_event=Event, pin=False)
    finite = torch.tensor([True, False, False])
    assert monitor.add(finite) == 0  # first snapshot taken, nothing completed yet
    assert monitor.add(torch.tensor([True, True, True])) == 0  # still in flight: no wait, no read
    Event.done = True
    assert monitor.add(torch.tensor([True, True, True])) == 2  # the completed snapshot holds the 2 channels
    assert int(monitor.count) == 2


def test_every_launch_runs_under_the_input_device(monkeypatch):
    # Item 7: Triton launches on the current CUDA device; the launcher makes the input's device current.
    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(launch, "device_guard", Guard)
    x = torch.randn(4, 3, 3, 5, device=DEVICE, requires_grad=True)
    y = TritonLpBatchNormFunction.apply(x, None, None, 1e-5, "l1", 1, False)[0]
    torch.autograd.grad(y.sum(), x)
    assert len(entered) == 2 and all(d == x.device for d in entered)  # forward and backward
    monkeypatch.undo()
    cuda1 = launch.device_guard(torch.device("cuda", 1))
    assert isinstance(cuda1, torch.cuda.device) and cuda1.idx == 1


# --- geometry of huge shapes (no allocation) ----------------------------------------------------------------

GEOMETRY_CASES = [
    # (shape, channels_last, dtype, norm, k, low_precision)
    ((512, 64, 112, 112), True, torch.float16, Norm.L1, 1, True),  # item 3: one block per tree program before
    ((512, 64, 112, 112), True, torch.bfloat16, Norm.LINF, 8, True),
    ((256, 64, 56, 56), False, torch.float16, Norm.LINF, 64, False),
    ((1, 1, 2**31 + 8), False, torch.float32, Norm.L1, 1, False),  # one channel of 2^31 values
    ((1, 1, 2**31 + 8), False, torch.float32, Norm.LINF, 1, False),
    ((2**16, 2**15 + 1), False, torch.float16, Norm.LINF, 8, False),  # (N, C) of 2^31 values, channels_last-like
    ((128, 3, 2048, 2048), True, torch.float16, Norm.LINF, 64, True),  # 1.6e9 values, L∞ candidate keys
    ((4, 256, 1500, 1500), False, torch.float32, Norm.LINF, 8, False),  # 2.3e9 values, NCHW
    ((8, 2**17, 2048), False, torch.bfloat16, Norm.L1, 1, True),  # many channels, 2^31 values
]


def _spec(shape, channels_last, dtype):
    return plan.Spec.contiguous(shape, dtype, channels_last=channels_last)


def _check_launches(p, tensors):
    """Every launch: a 1-D grid below 2^31 programs; 64-bit indices wherever a tensor or index reaches 2^31."""
    sizes = {buf.name: math.prod(buf.shape) for buf in p.buffers}
    for name, spec in tensors.items():
        sizes[name] = 1 + sum((s - 1) * abs(st) for s, st in zip(spec.shape, spec.stride))
    for step in p.steps:
        if not isinstance(step, plan.Launch):
            continue
        assert len(step.grid) == 1 and 0 < step.grid[0] < 2**31, (step.kernel, step.grid)
        refs = [v.name for _, v in step.args if isinstance(v, plan.Ref)]
        largest = max(sizes[name] for name in refs)
        constexprs = dict(step.constexprs)
        if largest >= 2**31 or step.grid[0] * constexprs.get("BLOCK_N", 1) * constexprs.get("BLOCK_C", 1) >= 2**31:
            assert constexprs["IDX64"], (step.kernel, largest)


@pytest.mark.parametrize("case", GEOMETRY_CASES, ids=lambda c: f"{c[0]}-{'cl' if c[1] else 'nchw'}-{c[3].value}{c[4]}")
def test_geometry_of_huge_shapes(case):
    shape, channels_last, dtype, norm, k, low_precision = case
    x = _spec(shape, channels_last, dtype)
    config = plan.GPU_CONFIG
    fwd = plan.plan_forward(x, torch.float32, torch.float32, norm, k, low_precision, 1e-5, config)
    vector = _spec((shape[1],), False, torch.float32)
    _check_launches(fwd, {"x": x, "y": x.empty_like(), "w": vector, "b": vector})
    c = shape[1]
    bwd = plan.plan_backward(x, x, torch.float32, norm, k, low_precision, config)
    _check_launches(bwd, {"x": x, "dy": x, "dx": x.empty_like(), "w": _spec((c,), False, torch.float32),
                          "mean": _spec((c,), False, torch.float32), "scale": _spec((c,), False, torch.float32),
                          "inv_std": _spec((c,), False, torch.float32),
                          "threshold": _spec((c,), False, torch.float32),
                          "sign_sum": _spec((c,), False, torch.int32)})


def test_geometry_of_the_activation_epilogue():
    view = plan.Spec.contiguous((2**16, 64, 2**15 + 3), torch.float16)
    for p in (plan.plan_act_forward(view, torch.float32, True, 1, True, 0.01), plan.plan_l1_grad(view, torch.float32)):
        (step,) = p.steps
        assert dict(step.constexprs)["IDX64"] and step.grid[0] < 2**31


def test_grid_of_the_low_precision_tree_fits_axis_0():
    # Item 3: (512, 64, 112, 112) channels_last in fp16 with low_precision=True ran one program per block on grid
    # axis 1: (2, 100352), above CUDA's 65535. Every grid is now one-dimensional.
    x = _spec((512, 64, 112, 112), True, torch.float16)
    p = plan.plan_forward(x, None, None, Norm.L1, 1, True, 1e-5, plan.GPU_CONFIG)
    grids = [s.grid for s in p.steps if isinstance(s, plan.Launch)]
    assert all(len(g) == 1 for g in grids) and max(g[0] for g in grids) < 2**31
