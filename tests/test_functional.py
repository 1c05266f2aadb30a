"""normdecouple.functional against the float64 reference, autograd.gradcheck and torch's own batch norm."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normdecouple._reference import reference_batch_norm
import normdecouple.functional as functional
from normdecouple.functional import l1_batch_norm, linf_batch_norm

# (norm, k) cases: the L1 scale, the plain maximum and a top-k mean.
NORMS = [("l1", 1), ("linf", 1), ("linf", 3)]
def _fn(norm, k):
    if norm == "l1":
        return lambda *a, **kw: l1_batch_norm(*a, **kw)
    return lambda *a, **kw: linf_batch_norm(*a, k=k, **kw)


def _params(c, dtype=torch.float64):
    weight = torch.empty(c, dtype=dtype).uniform_(0.5, 1.5).requires_grad_()
    bias = torch.randn(c, dtype=dtype).requires_grad_()
    return weight, bias


@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(norm, k, affine, training):
    x = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    weight, bias = _params(2) if affine else (None, None)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5
    fn = _fn(norm, k)
    inputs = (x,) + ((weight, bias) if affine else ())

    def run(x, *wb):
        w, b = wb if wb else (None, None)
        return fn(x, rm.clone(), rv.clone(), w, b, training=training)

    assert torch.autograd.gradcheck(run, inputs)


@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize(
    "shape",
    [
        (2, 3),  # 1d (N, C), the minimum batch in training
        (2, 1, 3, 1),  # C = 1, a 3-value channel
        (3, 5, 1, 1),  # HW = 1: only the batch dimension varies
        (5, 7, 3),  # 1d (N, C, L), odd sizes
        (4, 6, 5, 7),  # non-power-of-two spatial
        (2, 3, 2, 3, 5),  # 3d input
        (9, 2, 33, 17),  # more values per channel than a small block
    ],
)
def test_matches_reference_float32(norm, k, shape, check_against_reference):
    if norm == "linf" and k > math.prod(shape) // shape[1]:
        pytest.skip("k exceeds the values per channel of this shape (tested in test_k_larger_than_n)")
    check_against_reference(torch.randn(shape), norm, k)


@pytest.mark.parametrize("norm,k", NORMS)
def test_matches_reference_float64_no_affine_momentum_one(norm, k, check_against_reference):
    check_against_reference(torch.randn(4, 3, 5, 5, dtype=torch.float64), norm, k, affine=False, momentum=1.0)


@pytest.mark.parametrize("norm,k", NORMS)
def test_channels_last_and_noncontiguous(norm, k, check_against_reference):
    base = torch.randn(4, 6, 5, 7)
    y_cl = check_against_reference(base.to(memory_format=torch.channels_last), norm, k)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    # A strided slice: every other channel and a cropped width, as a view.
    sliced = torch.randn(4, 12, 5, 9)[:, ::2, :, 1:8]
    assert not sliced.is_contiguous()
    check_against_reference(sliced, norm, k)
    check_against_reference(torch.randn(2, 4, 3, 5, 6).to(memory_format=torch.channels_last_3d), norm, k)


@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_float32_statistics(norm, k, dtype, check_against_reference):
    check_against_reference(torch.randn(4, 3, 6, 5).to(dtype), norm, k)


@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_reference(norm, k, dtype, check_against_reference):
    check_against_reference(torch.randn(4, 3, 6, 5).to(dtype), norm, k, low_precision=True)


def _fp16_l2_batch_norm(x):
    """Plain L2 batch norm with every step in fp16 (what 'no upcast' means for L2): mean(d^2) overflows."""
    xc = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = xc.sum(dim=1, dtype=torch.float16) / xc.shape[1]
    d = xc - mean[:, None]
    var = (d * d).sum(dim=1, dtype=torch.float16) / xc.shape[1]
    return var


@pytest.mark.parametrize("norm,k", NORMS)
def test_low_precision_large_fp16_activations(norm, k):
    # Activations around 1e3 with a spread of ~1e3: squares reach 1e6 > 65504, the fp16 maximum.
    x = (1000.0 + 900.0 * torch.randn(16, 4, 16, 16)).to(torch.float16)
    assert not torch.isfinite(_fp16_l2_batch_norm(x)).all(), "the L2 control should overflow in fp16"
    # And a plain fp16 sum of the 4096 values of a channel overflows too (4e6), which the blocked mean avoids.
    assert not torch.isfinite(x.transpose(0, 1).reshape(4, -1).cumsum(dim=1)[:, -1]).all()
    rm, rv = torch.zeros(4), torch.ones(4)
    y = _fn(norm, k)(x, rm, rv, training=True, momentum=1.0, low_precision=True)
    assert torch.isfinite(y).all() and torch.isfinite(rm).all() and torch.isfinite(rv).all()
    y64 = reference_batch_norm(x.double(), None, None, training=True, norm=norm, k=k)
    torch.testing.assert_close(y.double(), y64, atol=2e-2, rtol=2e-2)
    rm64, rv64 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    reference_batch_norm(x.double(), rm64, rv64, training=True, momentum=1.0, norm=norm, k=k)
    torch.testing.assert_close(rm.double(), rm64, rtol=2e-3, atol=1.0)
    torch.testing.assert_close(rv.double(), rv64, rtol=1e-2, atol=0.0)


def test_low_precision_is_computed_in_input_dtype():
    # An fp16 channel whose mean is not representable: a float32 accumulator would give the exact mean of
    # the rounded values; the fp16 pairwise mean rounds at every level. Both must be close, and the fp16
    # result must be an fp16 number computed without a wider accumulator (it differs from the wide one).
    x = (torch.arange(1, 1 + 3 * 1024, dtype=torch.float32) / 7.0 + 2000.0).to(torch.float16).view(3, 1, 32, 32)
    rm, rv = torch.zeros(1), torch.ones(1)
    l1_batch_norm(x, rm, rv, training=True, momentum=1.0, low_precision=True)
    wide = x.double().mean().item()
    assert rm.item() == pytest.approx(wide, rel=1e-3)
    assert rm.item() == float(torch.tensor(rm.item()).to(torch.float16))


@pytest.mark.parametrize(
    "values,k,tied",
    [
        ([-3.0, 3.0, 1.0, -1.0, 0.5, -0.5], 1, (0, 1)),  # the maximum |d| tied between two values
        ([-3.0, 3.0, 1.0, -1.0, 0.5, -0.5], 2, ()),  # both tied values inside the top 2: no tie to break
        ([5.0, -3.0, 3.0, -4.0, -1.0], 3, (1, 2)),  # 5 and -4 above, the third place shared by -3 and 3
    ],
)
def test_ties_share_the_gradient_evenly(values, k, tied):
    # Breaking the tie either way (a relative nudge of 1e-9) and averaging the reference's tie-free
    # gradients must give ours: the even split is the mean of the subgradients.
    base = torch.tensor(values, dtype=torch.float64).view(-1, 1)
    grad = torch.randn(base.shape, dtype=torch.float64)
    x = base.clone().requires_grad_()
    ours = torch.autograd.grad(linf_batch_norm(x, None, None, training=True, k=k), x, grad)[0]
    broken = []
    for index in tied or (0,):
        xb = base.clone()
        xb[index] *= 1 + 1e-9
        xb.requires_grad_()
        y = reference_batch_norm(xb, None, None, training=True, norm="linf", k=k)
        broken.append(torch.autograd.grad(y, xb, grad)[0])
    torch.testing.assert_close(ours, sum(broken) / len(broken), atol=1e-6, rtol=1e-6)


def test_constant_channel_has_finite_output_and_gradient():
    x = torch.full((4, 2, 3, 3), 5.0, requires_grad=True)
    for fn in (_fn("l1", 1), _fn("linf", 1), _fn("linf", 4)):
        y = fn(x, None, None, training=True)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.all(y == 0) and torch.isfinite(g).all()


@pytest.mark.parametrize("norm,k", NORMS)
def test_nonfinite_batch_skips_running_update_and_warns_once(norm, k, fresh_warning_state):
    x = torch.randn(4, 3, 5, 5)
    x[0, 1, 0, 0] = float("inf")
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.warns(RuntimeWarning, match="1 channel"):
        y = _fn(norm, k)(x, rm, rv, training=True)
    assert rm[1] == 0 and rv[1] == 1  # channel 1 untouched
    assert rm[0] != 0 and rv[0] != 1 and rm[2] != 0  # the others updated
    assert y.shape == x.shape  # the output is still computed and returned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fn(norm, k)(x, rm, rv, training=True)


def test_eval_is_torch_batch_norm_eval():
    x = torch.randn(4, 3, 5, 5)
    rm, rv = torch.randn(3), torch.rand(3) + 0.1
    w, b = torch.randn(3), torch.randn(3)
    expected = torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3)
    for fn in (_fn("l1", 1), _fn("linf", 3)):
        torch.testing.assert_close(fn(x, rm, rv, w, b, training=False, eps=1e-3), expected, rtol=0, atol=0)


def test_running_mean_equals_torch_and_running_var_estimates_variance():
    # The running mean has the same definition as torch's; the variance-equivalent running_var estimates
    # sigma^2 for Gaussian data (unbiased like torch's), here with 65536 values per channel.
    # The top-k scale of one batch is noisier than the L1 one, hence the average over 16 channels.
    x = 2.0 + 3.0 * torch.randn(64, 16, 32, 32, dtype=torch.float64)
    torch_rm, torch_rv = torch.zeros(16, dtype=torch.float64), torch.ones(16, dtype=torch.float64)
    torch.nn.functional.batch_norm(x, torch_rm, torch_rv, training=True, momentum=1.0)
    for fn, rtol in ((_fn("l1", 1), 0.01), (_fn("linf", 8), 0.03)):
        rm, rv = torch.zeros(16, dtype=torch.float64), torch.ones(16, dtype=torch.float64)
        fn(x, rm, rv, training=True, momentum=1.0)
        torch.testing.assert_close(rm, torch_rm)
        assert rv.mean().item() == pytest.approx(9.0, rel=rtol)


def test_errors_match_torch():
    x1 = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError) as theirs:
        torch.nn.functional.batch_norm(x1, None, None, training=True)
    for fn in (_fn("l1", 1), _fn("linf", 1)):
        with pytest.raises(ValueError) as ours:
            fn(x1, None, None, training=True)
        assert str(ours.value) == str(theirs.value)
        with pytest.raises(ValueError, match="eps must be positive"):
            fn(torch.randn(4, 3), None, None, training=True, eps=0.0)
        with pytest.raises(ValueError, match="required when training=False"):
            fn(torch.randn(4, 3), None, None, training=False)
        with pytest.raises(ValueError, match="at least 2D"):
            fn(torch.randn(4), None, None, training=True)


def test_k_larger_than_n():
    with pytest.raises(ValueError, match=r"k=7 exceeds the n=6 values per channel.*use k <= 6"):
        linf_batch_norm(torch.randn(2, 3, 3), None, None, training=True, k=7)
    linf_batch_norm(torch.randn(2, 3, 3), None, None, training=True, k=6)  # k = n is the L1-like mean


@pytest.mark.parametrize("k,error,match", [(0, ValueError, "at least 1"), (2.0, TypeError, "must be an int")])
def test_bad_k(k, error, match):
    with pytest.raises(error, match=match):
        linf_batch_norm(torch.randn(4, 3), None, None, training=True, k=k)


@pytest.mark.parametrize(
    "backend,triton_importable,match",
    [
        ("triton", False, "backend='auto'"),  # no Triton: the error names the fallbacks
        ("triton", True, "runs on CUDA tensors"),  # a CPU tensor without Triton's interpreter
        ("cuda", True, "must be one of"),
    ],
)
def test_bad_backend(backend, triton_importable, match, monkeypatch):
    monkeypatch.setattr(functional, "_triton_available", lambda: triton_importable)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=match):
        l1_batch_norm(torch.randn(4, 3), None, None, training=True, backend=backend)


@pytest.mark.parametrize("triton_importable", [True, False])
def test_auto_dispatch_picks_the_backend_by_device(monkeypatch, triton_importable):
    # "auto": the Triton kernels for CUDA tensors when Triton imports, the PyTorch path otherwise. A fake CUDA
    # tensor (FakeTensorMode needs no GPU) exercises the CUDA branch of the dispatch without running anything.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from normdecouple._torch_backend import LpBatchNormFunction

    monkeypatch.setattr(functional, "_triton_available", lambda: triton_importable)
    assert functional.select_function(torch.randn(4, 3), "auto") is LpBatchNormFunction
    assert functional.select_function(torch.randn(4, 3), "torch") is LpBatchNormFunction
    with FakeTensorMode():
        cuda_input = torch.empty(4, 3, device="cuda")
    chosen = functional.select_function(cuda_input, "auto")
    assert functional.select_function(cuda_input, "torch") is LpBatchNormFunction
    if triton_importable:
        from normdecouple._triton import TritonLpBatchNormFunction

        assert chosen is TritonLpBatchNormFunction
    else:
        assert chosen is LpBatchNormFunction


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 5),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    k=st.integers(1, 4),
    norm=st.sampled_from(["l1", "linf"]),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_matches_reference(n, c, spatial, k, norm, channels_last, seed, check_against_reference):
    shape = (n, c, *spatial)
    count = math.prod(shape) // c
    if norm == "linf" and k > count:
        k = count
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if channels_last and len(shape) == 4:
        x = x.to(memory_format=torch.channels_last)
    check_against_reference(x, norm, k if norm == "linf" else 1)


@pytest.mark.parametrize("k", [1, 3])
def test_linf_dense_and_sparse_backward_terms_agree(k):
    # Eager mode selects the few values at or above the k-th largest |d|; compiled graphs use the dense form.
    # Quantised data makes ties common, and channel 2 is constant (t = 0).
    from normdecouple._torch_backend import _sum_u_sparse
    from normdecouple.stats import linf_tie_weights

    view = torch.randint(-3, 4, (6, 3, 5)).double()
    view[:, 2] = 1.5
    mean = view.mean(dim=(0, 2))
    dev = view - mean[:, None]
    threshold = dev.abs().transpose(0, 1).reshape(3, -1).topk(k, dim=1).values.amin(dim=1)
    dense = dev.sign() * linf_tie_weights(dev.abs(), threshold, k, (0, 2))
    index, selected, sum_u = _sum_u_sparse(view, mean, threshold, k, torch.float64)
    scattered = torch.zeros_like(dense).index_put_(index, selected, accumulate=True)
    torch.testing.assert_close(scattered, dense, rtol=0, atol=1e-15)
    torch.testing.assert_close(sum_u, dense.sum(dim=(0, 2)))
    # |u| is the weight w; a channel's weights add up to k (the k-th place shared); the constant channel has 0.
    torch.testing.assert_close(dense.abs().sum(dim=(0, 2)), torch.tensor([k, k, 0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradient_in_another_layout_than_the_input(dtype):
    # A channels_last input with a contiguous gradient (and the reverse): the parameter gradients must be the
    # float32 sums of the gradient, as with matching layouts.
    x = torch.randn(8, 16, 9, 9).to(dtype)
    grad = torch.randn(x.shape).to(dtype)
    for x_layout, g_layout in ((torch.channels_last, torch.contiguous_format),
                               (torch.contiguous_format, torch.channels_last)):
        xt = x.to(memory_format=x_layout).requires_grad_()
        bias = torch.zeros(16, requires_grad=True)
        weight = torch.ones(16, requires_grad=True)
        y = l1_batch_norm(xt, None, None, weight, bias, training=True)
        y.backward(grad.to(memory_format=g_layout))
        torch.testing.assert_close(bias.grad.double(), grad.double().sum(dim=(0, 2, 3)), rtol=1e-6, atol=1e-5)
        assert xt.grad.is_contiguous(memory_format=x_layout)
