"""The paths around the ordinary forward/backward that torch's BatchNorm supports, side by side with it.

Higher-order derivatives (gradgradcheck, a gradient penalty, Hessian-vector products), torch.func transforms and
forward-mode AD, empty batches, meta and fake tensors, torch.fx tracing, torch's errors for bad dtypes and channel
counts, and float32 running statistics after ``load_state_dict(..., assign=True)``. The oracles are the float64
reference (``normdecouple._reference``, written from the formulas and differentiated by plain autograd), torch's
own layers and ``torch.autograd`` checks.
"""

import os

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normdecouple as nd
from normdecouple._reference import reference_batch_norm
from normdecouple.functional import l1_batch_norm, linf_batch_norm

# (norm, k): L1, the plain maximum, and a top-k with k > 1.
NORMS = [("l1", 1), ("linf", 1), ("linf", 3)]


def _fn(norm, k):
    if norm == "l1":
        return lambda *a, **kw: l1_batch_norm(*a, **kw)
    return lambda *a, **kw: linf_batch_norm(*a, k=k, **kw)


def _layer(norm, k, channels, dim=2, **kw):
    if norm == "l1":
        return getattr(nd, f"L1BatchNorm{dim}d")(channels, **kw)
    return getattr(nd, f"LinfBatchNorm{dim}d")(channels, k=k, **kw)


def _input(shape, channels_last=False, seed=0):
    # Continuous float64 values: no ties, so the top-k (and its derivatives) is locally constant.
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_()


# ----------------------------------------------------------------------------------------------------------
# Higher-order derivatives


@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_gradgradcheck(norm, k, affine, training):
    # (N=3, C=2, 2, 2): 12 values per channel, enough for k = 3; float64 as gradgradcheck needs.
    x = _input((3, 2, 2, 2))
    weight = torch.tensor([1.3, -0.7], dtype=torch.float64, requires_grad=True) if affine else None
    bias = torch.tensor([0.2, 0.5], dtype=torch.float64, requires_grad=True) if affine else None
    rm, rv = torch.tensor([0.1, -0.2], dtype=torch.float64), torch.tensor([0.9, 1.7], dtype=torch.float64)
    fn = _fn(norm, k)
    inputs = (x, weight, bias) if affine else (x,)

    def f(x, weight=None, bias=None):
        # Running statistics are updated in training; copies keep every evaluation identical.
        return fn(x, rm.clone(), rv.clone(), weight, bias, training=training, backend="torch")

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradient_penalty_matches_float64_autograd(norm, k, channels_last):
    # WGAN-GP / R1: the norm of the input gradient, backpropagated to the parameters and the input.
    def penalty_grads(forward):
        x = _input((4, 3, 3, 3), channels_last)
        weight = torch.tensor([1.1, 0.6, -1.4], dtype=torch.float64, requires_grad=True)
        bias = torch.tensor([0.3, 0.0, -0.2], dtype=torch.float64, requires_grad=True)
        out = forward(x, weight, bias)
        loss = (out.tanh() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)).sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        penalty = (gx.square().sum() - 1.0).square()
        return torch.autograd.grad(penalty, (x, weight, bias))

    ours = penalty_grads(lambda x, w, b: _fn(norm, k)(x, None, None, w, b, training=True, backend="torch"))
    reference = penalty_grads(lambda x, w, b: reference_batch_norm(x, None, None, w, b, True, norm=norm, k=k))
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("norm,k", NORMS)
def test_hessian_vector_product(norm, k):
    x = _input((5, 2, 3))
    v = torch.randn(x.shape, dtype=torch.float64)

    def hvp(forward):
        xx = x.detach().requires_grad_()
        y = forward(xx)
        (g,) = torch.autograd.grad(y, xx, grad_outputs=torch.cos(y.detach()), create_graph=True)
        return torch.autograd.grad(g, xx, grad_outputs=v)[0]

    ours = hvp(lambda t: _fn(norm, k)(t, None, None, training=True, backend="torch").sin())
    reference = hvp(lambda t: reference_batch_norm(t, None, None, training=True, norm=norm, k=k).sin())
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-11)


def test_linf_double_backward_keeps_the_tie_rule():
    # Channel 0 has three values tied at the maximum |d|: the first derivative splits the scale's gradient
    # evenly between them (the documented rule), with or without create_graph.
    x = torch.tensor([[3.0], [-3.0], [3.0], [0.5], [-1.0], [0.0], [-2.5]], dtype=torch.float64)
    x = (x - x.mean()).requires_grad_()
    grad = torch.linspace(-1, 1, 7, dtype=torch.float64).view(7, 1)
    plain = torch.autograd.grad(linf_batch_norm(x, None, None, training=True), x, grad)[0]
    graphed = torch.autograd.grad(linf_batch_norm(x, None, None, training=True), x, grad, create_graph=True)[0]
    torch.testing.assert_close(graphed.detach(), plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm,k", [("l1", 1), ("linf", 2)])
def test_triton_backend_double_backward(norm, k):
    # The kernels' backward is first order only; create_graph=True routes to the differentiable PyTorch form.
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    x = _input((3, 2, 4)).float().detach().requires_grad_()
    weight = torch.tensor([0.8, 1.2], requires_grad=True)

    def first_grads(backend):
        y = _fn(norm, k)(x, None, None, weight, None, training=True, backend=backend)
        gx, gw = torch.autograd.grad((y.sin()).sum(), (x, weight), create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.sum(), (x, weight))

    for got, expected in zip(first_grads("triton"), first_grads("torch")):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_sync_function_refuses_double_backward(tmp_path):
    import torch.distributed as dist

    from normdecouple.distributed import SyncLpBatchNormFunction
    from normdecouple.stats import Norm

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.randn(4, 3, requires_grad=True)
        y = SyncLpBatchNormFunction.apply(x, None, None, 1e-5, Norm.L1, 1, False, dist.group.WORLD, 1)[0]
        with pytest.raises(RuntimeError, match="higher-order gradients"):
            torch.autograd.grad(y.square().sum(), x, create_graph=True)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# torch.func and forward-mode AD


@pytest.mark.parametrize("norm,k", NORMS)
def test_func_jacrev_matches_autograd_jacobian(norm, k):
    x = _input((4, 3)).detach()
    weight = torch.tensor([0.5, 1.5, -1.0], dtype=torch.float64)

    def f(t):
        return _fn(norm, k)(t, None, None, weight, None, training=True)

    jac_func = torch.func.jacrev(f)(x)
    jac_autograd = torch.autograd.functional.jacobian(f, x)
    reference = torch.autograd.functional.jacobian(
        lambda t: reference_batch_norm(t, None, None, weight, None, True, norm=norm, k=k), x
    )
    torch.testing.assert_close(jac_func, jac_autograd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jac_func, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm,k", NORMS)
def test_func_grad_hessian_jvp_vmap_and_forward_ad(norm, k):
    x = _input((5, 2, 2)).detach()
    tangent = torch.randn(x.shape, dtype=torch.float64)

    def ours(t):
        return _fn(norm, k)(t, None, None, training=True)

    def ref(t):
        return reference_batch_norm(t, None, None, training=True, norm=norm, k=k)

    def scalar(forward):
        return lambda t: (forward(t).sin() * torch.arange(t.numel(), dtype=t.dtype).view(t.shape)).sum()

    torch.testing.assert_close(torch.func.grad(scalar(ours))(x), torch.func.grad(scalar(ref))(x))
    torch.testing.assert_close(torch.func.hessian(scalar(ours))(x), torch.func.hessian(scalar(ref))(x))
    out, jvp_out = torch.func.jvp(ours, (x,), (tangent,))
    ref_out, ref_jvp = torch.func.jvp(ref, (x,), (tangent,))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(jvp_out, ref_jvp)
    stacked = torch.stack([x, 2 * x + 1, x.flip(0)])
    torch.testing.assert_close(torch.func.vmap(ours)(stacked), torch.stack([ref(s) for s in stacked]))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual_out = ours(fwAD.make_dual(x, tangent))
        torch.testing.assert_close(fwAD.unpack_dual(dual_out).tangent, ref_jvp)


@pytest.mark.parametrize("norm,k", [("l1", 1), ("linf", 2)])
def test_func_grad_through_a_module_with_functional_call(norm, k):
    # As torch's BatchNorm needs: under torch.func the buffers are passed in (an input of the transformed
    # function, through functional_call), and they are updated as in eager mode.
    layer = _layer(norm, k, 3, dim=1).double()
    reference_layer = _layer(norm, k, 3, dim=1).double()
    params = {name: p.detach() for name, p in layer.named_parameters()}
    buffers = {name: b.clone() for name, b in layer.named_buffers()}
    x = _input((6, 3)).detach()

    def loss(params, buffers, x):
        return torch.func.functional_call(layer, (params, buffers), (x,)).pow(3).sum()

    grads = torch.func.grad(loss)(params, buffers, x)
    out = reference_layer(x.detach().requires_grad_())
    out.pow(3).sum().backward()
    torch.testing.assert_close(grads["weight"], reference_layer.weight.grad)
    torch.testing.assert_close(grads["bias"], reference_layer.bias.grad)
    torch.testing.assert_close(buffers["running_mean"], reference_layer.running_mean)
    torch.testing.assert_close(buffers["running_var"], reference_layer.running_var)


# ----------------------------------------------------------------------------------------------------------
# vmap over the backward: batched gradients (per-sample VJPs, Opacus-style DP, gradcheck(check_batched_grad=True))

# The sample inputs of torch's own module suite for BatchNorm{1,2,3}d (torch.testing._internal.common_modules,
# module_inputs_torch_nn_BatchNorm*d, torch 2.13): (rank, constructor args, constructor kwargs, input shape).
TORCH_MODULE_SUITE_INPUTS = [
    (1, (10,), {}, (4, 10)),
    (1, (5,), {}, (4, 5, 3)),
    (1, (10, 1e-3, None), {}, (4, 10)),
    (1, (10, 1e-3, 0.3, False), {}, (4, 10)),
    (1, (10, 1e-3, 0.3, True, False), {}, (4, 10)),
    (1, (5, 1e-3, 0.3, False), {}, (4, 5, 3)),
    (1, (5, 1e-3, 0.3, False), {}, (0, 5, 9)),
    (1, (10,), {"bias": False}, (4, 10)),
    (2, (3,), {}, (2, 3, 6, 6)),
    (2, (3, 1e-3, None), {}, (2, 3, 6, 6)),
    (2, (3, 1e-3, 0.8), {}, (2, 3, 6, 6)),
    (2, (3, 1e-3, 0.8, False), {}, (2, 3, 6, 6)),
    (2, (3, 1e-3, 0.8, True, False), {}, (2, 3, 6, 6)),
    (2, (5, 1e-3, 0.3, False), {}, (0, 5, 2, 2)),
    (2, (3,), {"bias": False}, (2, 3, 6, 6)),
    (3, (3,), {}, (2, 3, 4, 4, 4)),
    (3, (3, 1e-3, None), {}, (2, 3, 4, 4, 4)),
    (3, (3, 1e-3, 0.7), {}, (2, 3, 4, 4, 4)),
    (3, (3, 1e-3, 0.7, False), {}, (2, 3, 4, 4, 4)),
    (3, (3, 1e-3, 0.7, True, False), {}, (2, 3, 4, 4, 4)),
    (3, (5, 1e-3, 0.3, False), {}, (0, 5, 2, 2, 2)),
    (3, (3,), {"bias": False}, (2, 3, 4, 4, 4)),
]


@pytest.mark.parametrize("family", ["torch", "L1", "Linf"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_torch_module_suite_gradients_with_batched_grad(one_thread, dim, family):
    # torch's test_modules.py test_grad / test_gradgrad: gradcheck and gradgradcheck of the module's output with
    # respect to its input and parameters, in train and eval mode, through torch's testing wrapper's defaults
    # (check_batched_grad=True, fast_mode=True). torch's own layer is the reference that passes.
    cls = getattr(torch.nn, f"BatchNorm{dim}d") if family == "torch" else getattr(nd, f"{family}BatchNorm{dim}d")
    for rank, args, kwargs, shape in TORCH_MODULE_SUITE_INPUTS:
        if rank != dim:
            continue
        for training in (True, False):
            torch.manual_seed(0)
            layer = cls(*args, **kwargs).double().train(training)
            x = torch.testing.make_tensor(shape, dtype=torch.float64, device="cpu", requires_grad=True)
            inputs = (x, *layer.parameters())

            def f(*inputs):
                return layer(inputs[0])

            where = f"{cls.__name__}{args}{kwargs} {shape} training={training}"
            assert gradcheck(f, inputs, check_batched_grad=True, fast_mode=True), where
            assert gradgradcheck(f, inputs, check_batched_grad=True, fast_mode=True), where


def _vjp_layers():
    return {
        "L1": lambda dtype, lowp: nd.L1BatchNorm2d(3, low_precision=lowp).to(dtype),
        "Linf": lambda dtype, lowp: nd.LinfBatchNorm2d(3, k=2, low_precision=lowp).to(dtype),
        "L1Act": lambda dtype, lowp: nd.L1BatchNormAct2d(3, low_precision=lowp).to(dtype),
        "LinfAct": lambda dtype, lowp: nd.LinfBatchNormAct2d(3, k=2, low_precision=lowp).to(dtype),
    }


@pytest.mark.parametrize("layer", list(_vjp_layers()))
@pytest.mark.parametrize("dtype,low_precision", [(torch.float64, False), (torch.float32, False),
                                                 (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_vmap_over_the_backward_equals_one_vjp_at_a_time(one_thread, layer, dtype, low_precision, channels_last):
    # Per-sample vector-Jacobian products: torch.func.vmap over autograd.grad, and autograd.grad with
    # is_grads_batched=True (torch's legacy vmap), against a loop of ordinary backward passes. Both batch the
    # backward of our autograd.Functions, which must avoid out= ops and kernels without batching rules (as
    # torch's BatchNorm backward does).
    torch.manual_seed(0)
    module = _vjp_layers()[layer](dtype, low_precision)
    x = torch.randn(4, 3, 5, 3).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    inputs = (x, module.weight, module.bias)
    y = module(x)
    vectors = torch.randn((3,) + y.shape).to(dtype)
    expected = [torch.stack(g) for g in zip(*[torch.autograd.grad(y, inputs, v, retain_graph=True)
                                                for v in vectors])]
    batched = torch.func.vmap(lambda v: torch.autograd.grad(y, inputs, v, retain_graph=True))(vectors)
    legacy = torch.autograd.grad(y, inputs, vectors, retain_graph=True, is_grads_batched=True)
    # The batched backward sums in other kernels (plain reductions): float roundings apart, bf16 one rounding.
    tol = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1.6e-2)}[dtype]
    for got_func, got_legacy, want in zip(batched, legacy, expected):
        torch.testing.assert_close(got_func, want, atol=tol[0], rtol=tol[1])
        torch.testing.assert_close(got_legacy, want, atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("cls", [nd.L1BatchNorm2d, nd.LinfBatchNorm2d, nd.L1BatchNormAct2d, nd.LinfBatchNormAct2d])
def test_vmap_over_the_backward_of_the_triton_kernels(one_thread, cls):
    # The Triton Functions' backward batched too (a kernel cannot read a batched tensor: the batched backward
    # must not launch one on it).
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    torch.manual_seed(0)
    module = cls(3, backend="triton")
    x = torch.randn(4, 3, 5, 3, requires_grad=True)
    y = module(x)
    vectors = torch.randn((2,) + y.shape)
    expected = torch.stack([torch.autograd.grad(y, x, v, retain_graph=True)[0] for v in vectors])
    batched = torch.func.vmap(lambda v: torch.autograd.grad(y, x, v, retain_graph=True)[0])(vectors)
    legacy = torch.autograd.grad(y, x, vectors, retain_graph=True, is_grads_batched=True)[0]
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(legacy, expected, atol=1e-5, rtol=1e-5)


def test_sync_function_refuses_batched_gradients_clearly(tmp_path):
    import torch.distributed as dist

    from normdecouple.distributed import SyncLpBatchNormFunction
    from normdecouple.stats import Norm

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.randn(4, 3, requires_grad=True)
        y = SyncLpBatchNormFunction.apply(x, None, None, 1e-5, Norm.L1, 1, False, dist.group.WORLD, 1)[0]
        vectors = torch.randn(2, 4, 3)
        with pytest.raises(RuntimeError, match="batched gradients.*revert_sync_batchnorm"):
            torch.autograd.grad(y, x, vectors, retain_graph=True, is_grads_batched=True)
        with pytest.raises(RuntimeError, match="batched gradients.*revert_sync_batchnorm"):
            torch.func.vmap(lambda v: torch.autograd.grad(y, x, v, retain_graph=True))(vectors)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# Empty batches


@pytest.mark.parametrize("norm,k", [("l1", 1), ("linf", 4)])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
def test_empty_batch_like_torch(norm, k, shape):
    ours, torchs = _layer(norm, k, 3), torch.nn.BatchNorm2d(3)
    for layer in (ours, torchs):
        with torch.no_grad():
            layer.running_mean.fill_(0.25)
            layer.running_var.fill_(2.0)
    outputs = []
    for layer in (ours, torchs):
        x = torch.randn(shape, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        outputs.append((y, x.grad, layer))
    (y, gx, layer), (ty, tgx, tlayer) = outputs
    assert y.shape == ty.shape and y.requires_grad == ty.requires_grad
    torch.testing.assert_close(gx, tgx)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(tlayer, name))
    torch.testing.assert_close(layer.weight.grad, tlayer.weight.grad)
    torch.testing.assert_close(layer.bias.grad, tlayer.bias.grad)


@pytest.mark.parametrize("fn", [l1_batch_norm, linf_batch_norm])
def test_empty_batch_functional(fn):
    rm, rv = torch.zeros(3), torch.ones(3)
    y = fn(torch.empty(0, 3), rm, rv, training=True)
    assert y.shape == (0, 3)
    torch.testing.assert_close(rm, torch.zeros(3))
    torch.testing.assert_close(rv, torch.ones(3))


# ----------------------------------------------------------------------------------------------------------
# Meta and fake tensors


@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_forward_and_backward_on_meta(norm, k, channels_last):
    layer = _layer(norm, k, 4, device="meta")
    x = torch.empty(8, 4, 5, 5, device="meta", requires_grad=True)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = layer(x)
    assert y.device.type == "meta" and y.shape == x.shape
    y.sum().backward()
    assert layer.weight.grad.shape == (4,)


@pytest.mark.parametrize("norm,k", NORMS)
def test_training_forward_under_fake_tensor_mode(norm, k):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        layer = _layer(norm, k, 4)
        x = mode.from_tensor(torch.randn(8, 4, 5, 5)).requires_grad_()
        y = layer(x)
        y.square().sum().backward()
    assert y.shape == (8, 4, 5, 5)


def test_export_of_a_training_model():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), nd.LinfBatchNorm2d(4, k=2), torch.nn.ReLU())
    exported = torch.export.export(model, (torch.randn(4, 3, 6, 6),))
    x = torch.randn(4, 3, 6, 6)
    twin = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), nd.LinfBatchNorm2d(4, k=2), torch.nn.ReLU())
    twin.load_state_dict(model.state_dict())
    torch.testing.assert_close(exported.module()(x), twin(x))


# ----------------------------------------------------------------------------------------------------------
# torch.fx


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.l1 = nd.L1BatchNorm2d(6)
        self.linf = nd.LinfBatchNorm2d(6, k=3, momentum=None)

    def forward(self, x):
        return self.linf(torch.relu(self.l1(self.conv(x))) + 1.0)


def test_fx_symbolic_trace_computes_the_same_in_train_and_eval():
    model = _Block()
    twin = _Block()
    twin.load_state_dict(model.state_dict())
    traced = torch.fx.symbolic_trace(model)
    for step in range(3):
        x = torch.randn(4, 3, 5, 5)
        torch.testing.assert_close(traced(x), twin(x))
    torch.testing.assert_close(traced.state_dict(), twin.state_dict())
    traced.eval()
    twin.eval()
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(traced(x), twin(x))


# ----------------------------------------------------------------------------------------------------------
# Errors and dtypes


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
@pytest.mark.parametrize("training", [True, False])
def test_bad_dtype_gives_torchs_error(dtype, training):
    x = torch.zeros(4, 3, 2, 2, dtype=dtype)
    errors = []
    for layer in (nd.L1BatchNorm2d(3), nd.LinfBatchNorm2d(3), torch.nn.BatchNorm2d(3)):
        layer.train(training)
        with pytest.raises(Exception) as info:
            layer(x)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[2] and errors[1] == errors[2]


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_count_gives_torchs_error(affine, track, training):
    x = torch.randn(4, 3, 2, 2)
    errors = []
    for layer in (nd.L1BatchNorm2d(4, affine=affine, track_running_stats=track),
                  torch.nn.BatchNorm2d(4, affine=affine, track_running_stats=track)):
        layer.train(training)
        with pytest.raises(RuntimeError) as info:
            layer(x)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("cls", [nd.L1BatchNorm2d, nd.LinfBatchNorm2d])
def test_load_state_dict_assign_keeps_float32_statistics(cls):
    source = torch.nn.BatchNorm2d(3).half()
    with torch.no_grad():
        source.running_mean.fill_(500.0)
        source.running_var.fill_(4.0e4)
    layer = cls(3).half()
    layer.load_state_dict(source.state_dict(), assign=True)
    assert layer.running_mean.dtype == torch.float32 and layer.running_var.dtype == torch.float32
    assert layer.weight.dtype == torch.float16
    torch.testing.assert_close(layer.running_var, torch.full((3,), 4.0e4))
    # Activations around 1e3: a float32 running_var keeps updating (an fp16 one would be inf after one step).
    layer(torch.randn(16, 3, 4, 4, dtype=torch.float16) * 1000)
    assert torch.isfinite(layer.running_var).all() and (layer.running_var > 4.0e4).all()


@pytest.mark.parametrize("norm,k", [("l1", 1), ("linf", 2)])
def test_func_jacobian_with_respect_to_the_parameters_only(norm, k):
    # Only weight or bias is transformed (the input is a plain tensor): still the differentiable path.
    x = _input((5, 3)).detach()
    weight = torch.tensor([0.5, 1.5, -1.0], dtype=torch.float64)
    bias = torch.tensor([0.1, 0.0, -0.3], dtype=torch.float64)

    def ours(w, b):
        return _fn(norm, k)(x, None, None, w, b, training=True)

    def ref(w, b):
        return reference_batch_norm(x, None, None, w, b, True, norm=norm, k=k)

    for argnums in (0, 1):
        torch.testing.assert_close(torch.func.jacrev(ours, argnums=argnums)(weight, bias),
                                   torch.autograd.functional.jacobian(ref, (weight, bias))[argnums])
