"""The Triton kernels (normdecouple._triton) against the float64 reference.

Without a GPU they run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, which must be set before
Triton is imported, hence at the top of this module), with the interpreter's tiny tiles (``INTERPRETER_CONFIG``:
16 values per block, channels of more than 16 values leave the persistent kernel), so small shapes already run
the 2-D grid, the loops over blocks and several levels of the low-precision pairwise mean. With a CUDA device
the same checks run on the GPU (``pytest -m gpu``), plus larger shapes.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="Triton is not installed (pip install 'normdecouple[triton]')")

import normdecouple.functional as functional  # noqa: E402
from normdecouple import LinfBatchNorm2d  # noqa: E402
from normdecouple._reference import reference_batch_norm  # noqa: E402
from normdecouple._torch_backend import LpBatchNormFunction  # noqa: E402
from normdecouple._triton import TritonLpBatchNormFunction, plan  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETER, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETER, reason="no GPU")],
    ),
]
# (norm, k): the L1 scale, the plain maximum, and a top-k mean (k = 3 is padded to 4 candidates per row).
NORMS = [("l1", 1), ("linf", 1), ("linf", 3)]
# low_precision=True: the statistics themselves are rounded at every step in the input dtype (log2(n) levels of
# the pairwise mean), so the tolerance is a few ulps of the input dtype rather than one.
LOW_PRECISION_TOLERANCES = {torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)}


def _norm_fn(norm, k):
    if norm == "l1":
        return functional.l1_batch_norm
    return lambda *a, **kw: functional.linf_batch_norm(*a, k=k, **kw)


# Shapes with the reason for each (interpreter tiles: 16 values per block, persistent kernel up to n = 16).
SHAPES = [
    (2, 3),  # 1d (N, C), the minimum batch in training: persistent kernel, n = 2
    (3, 5, 1, 1),  # HW = 1, odd C
    (4, 3, 2, 2),  # n = 16: the largest channel of the persistent kernel
    (5, 3, 3, 4),  # n = 60: 2-D grid, four blocks, two pairwise-mean levels in low precision
    (6, 2, 6, 5),  # n = 180: several blocks per program
    (2, 3, 2, 3, 5),  # 3d input, n = 60
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_reference(device, norm, k, shape, check_against_reference):
    if norm == "linf" and k > math.prod(shape) // shape[1]:
        pytest.skip("k exceeds the values per channel")
    check_against_reference(torch.randn(shape, device=device), norm, k, backend="triton", param_dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (5, 6, 3, 4)])  # persistent kernel; 2-D grid with 4-channel tiles
def test_channels_last(device, norm, k, shape, check_against_reference):
    x = torch.randn(shape, device=device).to(memory_format=torch.channels_last)
    y = check_against_reference(x, norm, k, backend="triton", param_dtype=torch.float32)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_3d_and_sliced_input(device, check_against_reference):
    # channels_last_3d is read in place like channels_last; a cropped width has no (A, C, B) view and is copied once.
    check_against_reference(torch.randn(2, 4, 3, 2, 3, device=device).to(memory_format=torch.channels_last_3d),
                            "linf", 3, backend="triton", param_dtype=torch.float32)
    sliced = torch.randn(4, 6, 5, 9, device=device)[:, ::2, :, 1:8]
    assert plan.address({"y": plan.Spec.of(torch.empty_like(sliced))}, {"x": plan.Spec.of(sliced)})[2] == ("x",)
    check_against_reference(sliced, "l1", 1, backend="triton", param_dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (5, 3, 3, 4)])
def test_half_inputs_float32_statistics(device, norm, k, dtype, shape, check_against_reference):
    check_against_reference(torch.randn(shape, device=device).to(dtype), norm, k, backend="triton", param_dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (6, 2, 6, 5)])
def test_low_precision_matches_reference(device, norm, k, dtype, shape, check_against_reference):
    x = torch.randn(shape, device=device).to(dtype)
    check_against_reference(x, norm, k, tol=LOW_PRECISION_TOLERANCES[dtype], low_precision=True, backend="triton", param_dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,k", [("l1", 1), ("linf", 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (9, 2, 7, 5)])  # persistent; n = 315: three pairwise-mean levels
def test_low_precision_statistics_are_the_torch_backends_bits(device, norm, k, dtype, shape):
    # The kernels round every step of the statistics to the input dtype with the PyTorch backend's pairing of the
    # pairwise mean, so mu, s and y are the same bits: the statistics really are computed in fp16/bf16. (For
    # k > 1 the order of the top-k values inside their mean is unspecified, so only k = 1 is bitwise.)
    x = (3.0 + 5.0 * torch.randn(shape, device=device)).to(dtype)
    weight, bias = torch.rand(shape[1], device=device) + 0.5, torch.randn(shape[1], device=device)
    ours = TritonLpBatchNormFunction.apply(x, weight, bias, 1e-5, norm, k, True)
    theirs = LpBatchNormFunction.apply(x, weight, bias, 1e-5, norm, k, True)
    for got, want in zip(ours, theirs):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,k", NORMS)
def test_low_precision_large_fp16_activations(device, norm, k):
    # Activations around 1e3: squares (1e6) and the plain fp16 sum of a channel's 100 values (1e5) overflow
    # 65504; the pairwise mean and the hypot do not.
    x = (1000.0 + 900.0 * torch.randn(4, 2, 5, 5, device=device)).to(torch.float16)
    assert not torch.isfinite(x.transpose(0, 1).reshape(2, -1).sum(dim=1, dtype=torch.float16)).all()
    y, mean, scale = TritonLpBatchNormFunction.apply(x, None, None, 1e-5, norm, k, True)
    assert torch.isfinite(y).all() and torch.isfinite(mean).all() and torch.isfinite(scale).all()
    y64 = reference_batch_norm(x.double(), None, None, training=True, norm=norm, k=k)
    torch.testing.assert_close(y.double(), y64, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_match_the_torch_function(device):
    # Same apply signature and outputs: statistics in float32 for half inputs, float64 for float64, no grad.
    for dtype in (torch.float16, torch.float64):
        x = torch.randn(4, 3, 5, device=device, dtype=dtype, requires_grad=True)
        ours = TritonLpBatchNormFunction.apply(x, None, None, 1e-5, "linf", 2, False)
        theirs = LpBatchNormFunction.apply(x, None, None, 1e-5, "linf", 2, False)
        assert [t.dtype for t in ours] == [t.dtype for t in theirs]
        assert [t.shape for t in ours] == [t.shape for t in theirs]
        assert ours[0].requires_grad and not ours[1].requires_grad and not ours[2].requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,k", NORMS)
def test_float64_gradcheck(device, norm, k):
    # float64 runs the same kernels with float64 accumulators: gradcheck validates the closed-form backward.
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    weight = (torch.rand(2, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    bias = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)

    def f(x, w, b):
        return TritonLpBatchNormFunction.apply(x, w, b, 1e-5, norm, k, False)[0]

    assert torch.autograd.gradcheck(f, (x, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "values,k,tied",
    [
        ([-3.0, 3.0, 1.0, -1.0, 0.5, -0.5], 1, (0, 1)),  # the maximum |d| tied between two values
        ([5.0, -3.0, 3.0, -4.0, -1.0], 3, (1, 2)),  # 5 and -4 above, the third place shared by -3 and 3
    ],
)
def test_ties_share_the_gradient_evenly(device, values, k, tied):
    # Breaking the tie either way and averaging the reference's tie-free gradients gives the even split.
    base = torch.tensor(values, dtype=torch.float64, device=device).view(-1, 1)
    grad = torch.randn(base.shape, dtype=torch.float64, device=device)
    x = base.clone().requires_grad_()
    y = TritonLpBatchNormFunction.apply(x, None, None, 1e-5, "linf", k, False)[0]
    ours = torch.autograd.grad(y, x, grad)[0]
    broken = []
    for index in tied:
        xb = base.clone()
        xb[index] *= 1 + 1e-9
        xb.requires_grad_()
        y = reference_batch_norm(xb, None, None, training=True, norm="linf", k=k)
        broken.append(torch.autograd.grad(y, xb, grad)[0])
    torch.testing.assert_close(ours, sum(broken) / len(broken), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("shape", [(4, 2, 2, 2), (6, 2, 5, 4)])  # persistent kernel and 2-D grid
def test_many_ties_match_the_torch_backend(device, k, shape):
    # Integer-valued data: many values tie at the k-th largest |d| (on both sides of the mean), and the counts
    # of the tie rule are summed over several programs on the 2-D grid.
    x = torch.randint(-3, 4, shape, device=device).double()
    grad = torch.randn(shape, dtype=torch.float64, device=device)
    results = []
    for function in (TritonLpBatchNormFunction, LpBatchNormFunction):
        xi = x.clone().requires_grad_()
        y, mean, scale = function.apply(xi, None, None, 1e-5, "linf", k, False)
        results.append((y, mean, scale, torch.autograd.grad(y, xi, grad)[0]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_constant_channel_has_finite_output_and_gradient(device):
    for shape in [(4, 2, 2, 2), (4, 2, 3, 3)]:  # persistent kernel and 2-D grid
        x = torch.full(shape, 5.0, device=device, requires_grad=True)
        for norm, k in NORMS:
            y = TritonLpBatchNormFunction.apply(x, None, None, 1e-5, norm, k, False)[0]
            (g,) = torch.autograd.grad(y.sum(), x)
            assert torch.all(y == 0) and torch.isfinite(g).all()


@pytest.mark.parametrize("device", DEVICES)
def test_large_k_takes_the_host_topk(device, monkeypatch, check_against_reference):
    # k beyond the kernels' register top-k takes its statistics from torch.topk; everything else stays in Triton.
    monkeypatch.setattr(plan, "MAX_KERNEL_K", 2)
    plan.plan_forward.cache_clear()  # plans are cached: none made with the real limit may serve this test
    try:
        x = torch.randn(5, 3, 3, 4, device=device)
        assert any(isinstance(step, plan.HostTopk) for step in _forward_plan(x, "linf", 3).steps)
        check_against_reference(x, "linf", 3, backend="triton", param_dtype=torch.float32)
        x = torch.randn(5, 3, 3, 4, device=device).to(torch.float16)
        check_against_reference(x, "linf", 3, tol=LOW_PRECISION_TOLERANCES[torch.float16], low_precision=True,
                                backend="triton", param_dtype=torch.float32)
    finally:
        plan.plan_forward.cache_clear()


def _forward_plan(x, norm, k, low_precision=False):
    from normdecouple._triton.launch import tile_config
    from normdecouple.stats import Norm

    return plan.plan_forward(plan.Spec.of(x), None, None, Norm(norm), k, low_precision, 1e-5, tile_config(x.device))


@pytest.mark.parametrize("device", DEVICES)
def test_float64_top_k_takes_the_host_topk(device, check_against_reference):
    # A float64 value does not fit next to a group id in the int64 keys of the kernels' top-k: the host top-k.
    x = torch.randn(5, 3, 3, 4, device=device, dtype=torch.float64)
    assert any(isinstance(step, plan.HostTopk) for step in _forward_plan(x, "linf", 3).steps)
    check_against_reference(x, "linf", 3, backend="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    # Partial sums are added in a fixed order (no atomics): two runs give the same bits.
    x = torch.randn(6, 2, 6, 5, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    runs = []
    for _ in range(2):
        y = TritonLpBatchNormFunction.apply(x, None, None, 1e-5, "l1", 1, False)[0]
        runs.append((y, torch.autograd.grad(y, x, grad)[0]))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch(device):
    x = torch.randn(4, 3, device=device)
    assert functional.select_function(x, "triton") is TritonLpBatchNormFunction
    assert functional.select_function(x, "torch") is LpBatchNormFunction
    auto = TritonLpBatchNormFunction if device == "cuda" else LpBatchNormFunction
    assert functional.select_function(x, "auto") is auto


@pytest.mark.parametrize("device", DEVICES)
def test_layer_with_triton_backend_matches_torch_backend(device):
    layers = [LinfBatchNorm2d(3, k=2, backend=b).to(device) for b in ("triton", "torch")]
    x = torch.randn(4, 3, 3, 3, device=device)
    outputs = [layer(x) for layer in layers]
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(layers[0].running_var, layers[1].running_var)
    torch.testing.assert_close(layers[0].running_mean, layers[1].running_mean)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    # The kernels are custom ops with fake implementations: inductor keeps them as calls in one graph.
    torch._dynamo.reset()

    def step(x, w, b):
        y = functional.linf_batch_norm(x, None, None, w, b, training=True, k=2, backend="triton")
        return (y * y).sum()

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(4, 3, 2, 3, device=device)
    w = torch.rand(3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    for fn in (step, compiled):
        w.grad = b.grad = None
        fn(x, w, b).backward()
        if fn is step:
            expected = (w.grad.clone(), b.grad.clone())
    torch.testing.assert_close((w.grad, b.grad), expected)


# GPU only: ResNet-like shapes, large enough for many programs per channel, several reduction levels and the
# fused kernel's largest tiles.
GPU_SHAPES = [(32, 64, 28, 28), (8, 256, 7, 7), (64, 3, 64, 64), (2, 2048, 1, 1)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETER, reason="no GPU")
@pytest.mark.parametrize("norm,k", NORMS + [("linf", 8)])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_large_shapes(norm, k, shape, channels_last, check_against_reference):
    x = torch.randn(shape, device="cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    check_against_reference(x, norm, k, backend="triton", param_dtype=torch.float32)
    check_against_reference(x.to(torch.bfloat16), norm, k, backend="triton", param_dtype=torch.float32)
    check_against_reference(x.to(torch.float16), norm, k, tol=LOW_PRECISION_TOLERANCES[torch.float16],
                            low_precision=True, backend="triton", param_dtype=torch.float32)


def _adversarial(kind, shape, device):
    """Inputs that stress the L∞ group candidates (kernels.py, "L∞ candidates"): with the interpreter's tiles,
    (4, 2, 4, 32) has 512 values per channel in 32 blocks, three splits, several chunks and one-column groups."""
    x = torch.randn(shape, device=device) * 0.1  # float32: float64 takes the host top-k
    if kind == "one_group":
        # The k largest |d| all in one group (one column of one chunk) of one split.
        x[0, :, 0, 0] = 10.0
        x[1, :, 0, 0] = 9.0
        x[2, :, 0, 0] = -8.0
        x[3, :, 0, 0] = 7.5
    elif kind == "ties_across_splits":
        # Two values above, then ten tied at the k-th place on both sides of the mean, in every split.
        x.view(-1)[::97] = 5.0
        x.view(-1)[50::101] = -5.0
        x[0, :, 0, 1] = 9.0
        x[3, :, 3, 30] = -9.0
    elif kind == "group_max_ties":
        # Many groups share the same maximum: the group ranking breaks ties by group id.
        x[:, :, 1, ::3] = 3.0
        x[:, :, 2, ::5] = -3.0
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["one_group", "ties_across_splits", "group_max_ties"])
@pytest.mark.parametrize("k", [3, 8])
@pytest.mark.parametrize("channels_last", [False, True])
def test_linf_group_candidates_give_the_exact_statistics(device, kind, k, channels_last):
    # Item 9: the streaming pass keeps the groups whose maxima (minima) are the k largest (smallest), not the
    # values; the statistics, the tie rule's threshold and the gradients must be exactly those of the PyTorch
    # backend's top-k over every value.
    x = _adversarial(kind, (4, 2, 4, 32), device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    p = _forward_plan(x, "linf", k)
    assert any(dict(s.constexprs).get("KPAD", 0) > 1 and s.kernel == "channel_reduce_kernel" for s in p.steps
               if isinstance(s, plan.Launch)), "the group candidates did not run"
    grad = torch.randn(x.shape, device=device)
    results = []
    for function in (TritonLpBatchNormFunction, LpBatchNormFunction):
        xi = x.detach().clone().requires_grad_()
        y, mean, scale = function.apply(xi, None, None, 1e-5, "linf", k, False)
        results.append((y, mean, scale, torch.autograd.grad(y, xi, grad)[0]))
    # float32 sums in another order: a few ulps. A wrong candidate set or tie count moves the scale or the
    # gradient of the tied values by far more.
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETER, reason="runs the GPU's tiles on CPU tensors under TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", [
    # (shape, channels_last, dtype, low precision, k): the GPU's group geometry (8-warp group passes, 8192-value
    # reloads, splits no shorter than a chunk, the 4-warp low-precision tree), with 2048-value tiles.
    ((4, 2, 96, 96), False, torch.float32, False, 8),
    ((4, 2, 96, 96), False, torch.float32, False, 64),
    ((4, 2, 96, 96), True, torch.float32, False, 8),
    ((64, 3, 7, 7), False, torch.float32, False, 8),  # a short channel: one split, one merge
    ((4, 2, 96, 96), False, torch.float16, True, 8),
])
def test_gpu_tiles_give_the_torch_backends_statistics(case, monkeypatch):
    # The interpreter's tiny tiles exercise the looping code; the GPU's own tiles (the geometry the compile gate
    # builds) must compute the same statistics, which only running them can show.
    from normdecouple._triton import launch

    shape, channels_last, dtype, low_precision, k = case
    monkeypatch.setattr(launch, "tile_config", lambda device: plan.GPU_CONFIG)
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    x.view(-1)[::97] = 4.0  # ties at the top
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    p = plan.plan_forward(plan.Spec.of(x), None, None, plan.Norm.LINF, k, low_precision, 1e-5, plan.GPU_CONFIG)
    group_pass = [s for s in p.steps if isinstance(s, plan.Launch) and dict(s.constexprs).get("KPAD", 0) > 1]
    assert group_pass, "the group candidates did not run"
    grad = torch.randn(x.shape).to(dtype)
    # float32: against the float64 math (the PyTorch backend's float32 sums over 36,864 values are themselves
    # 2e-5 off in the top-k values' gradient); low precision: against the PyTorch backend's rounding, in fp16.
    reference = torch.float64 if not low_precision else dtype
    results = []
    for function, work in ((TritonLpBatchNormFunction, dtype), (LpBatchNormFunction, reference)):
        xi = x.detach().to(work).requires_grad_()
        y, mean, scale = function.apply(xi, None, None, 1e-5, "linf", k, low_precision)
        results.append((y, mean, scale, torch.autograd.grad(y, xi, grad.to(work))[0]))
    tol = {} if not low_precision else dict(atol=2e-3, rtol=2e-3)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want.to(got.dtype), **tol)
