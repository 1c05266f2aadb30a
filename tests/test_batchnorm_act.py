"""The fused BatchNorm + activation layers against the unfused layer followed by torch's activation.

Oracle: our unfused layer (``L1BatchNorm2d``/``LinfBatchNorm2d``, itself tested against float64 formulas and
torch) then ``+ residual`` and ``torch.nn.functional.relu``/``leaky_relu``, in float64; plus gradcheck and
gradgradcheck. The saved-tensor bytes are asserted exactly from the sizes of what the Function saves.
"""

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import normdecouple as nd
import normdecouple.batchnorm_act
from normdecouple._act_backend import (
    HALF_MAX_GAIN,
    _pack_bits_torch,
    _unpack_bits_torch,
    pack_bits,
    unpack_bits,
)

# (fused class, plain class, kwargs): the L1 scale, the plain maximum, and a top-k mean with k > 1.
NORMS = [
    pytest.param(nd.L1BatchNormAct2d, nd.L1BatchNorm2d, {}, id="l1"),
    pytest.param(nd.LinfBatchNormAct2d, nd.LinfBatchNorm2d, {"k": 1}, id="linf1"),
    pytest.param(nd.LinfBatchNormAct2d, nd.LinfBatchNorm2d, {"k": 3}, id="linf3"),
]
ACTS = {
    "relu": F.relu,
    "leaky_relu": lambda t: F.leaky_relu(t, 0.2),
    "identity": lambda t: t,
}
C = 5  # odd; channel 1 gets gamma = 0, channel 3 a tiny gamma: both must keep their inputs


def _pair(fused_cls, plain_cls, kw, activation="relu", affine=True, dtype=torch.float64, **extra):
    fused = fused_cls(C, affine=affine, dtype=dtype, activation=activation, negative_slope=0.2, **kw, **extra)
    plain = plain_cls(C, affine=affine, dtype=dtype, **kw)
    if affine:
        with torch.no_grad():
            fused.weight.copy_(torch.tensor([1.3, 0.0, -0.7, 1e-9, 2.0]))
            fused.bias.copy_(torch.tensor([0.1, 0.5, -0.3, 0.2, -1.0]))
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _both(fused, plain, x, residual, activation, grad=None):
    """Outputs and gradients (input, weight, bias, residual) of the fused layer and of the oracle."""
    results = []
    for layer in (fused, plain):
        xi = x.detach().clone().requires_grad_()
        ri = None if residual is None else residual.detach().clone().requires_grad_()
        if layer is fused:
            y = layer(xi, ri)
        else:
            z = layer(xi)
            y = ACTS[activation](z if ri is None else z + ri)
        g = torch.randn_like(y) if grad is None else grad
        grad = g
        inputs = [xi] + [p for p in (layer.weight, layer.bias) if p is not None] + ([ri] if ri is not None else [])
        results.append((y, torch.autograd.grad(y, inputs, g)))
    return results


def _assert_same(fused, plain, x, residual=None, activation="relu"):
    (y1, g1), (y2, g2) = _both(fused, plain, x, residual, activation)
    # The forward is the unfused layer's own, then the same residual addition and activation: bit for bit.
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert y1.stride() == y2.stride()
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(fused.running_mean, plain.running_mean)
    torch.testing.assert_close(fused.running_var, plain.running_var)


@pytest.mark.parametrize("fused_cls, plain_cls, kw", NORMS)
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("residual", [False, True])
def test_equals_unfused(fused_cls, plain_cls, kw, activation, residual):
    # N=4, HW=3x3: 36 values per channel, gamma = 0 and gamma = 1e-9 channels among them.
    fused, plain = _pair(fused_cls, plain_cls, kw, activation)
    x = torch.randn(4, C, 3, 3, dtype=torch.float64) * 2 + 0.5
    _assert_same(fused, plain, x, torch.randn_like(x) if residual else None, activation)


@pytest.mark.parametrize("fused_cls, plain_cls, kw", NORMS)
@pytest.mark.parametrize(
    "layout",
    ["channels_last", "slice", "channels_last_residual_contiguous"],
)
def test_layouts(fused_cls, plain_cls, kw, layout):
    fused, plain = _pair(fused_cls, plain_cls, kw)
    x = torch.randn(3, C, 4, 5, dtype=torch.float64)
    residual = torch.randn_like(x)
    if layout.startswith("channels_last"):
        x = x.to(memory_format=torch.channels_last)
        if layout == "channels_last":
            residual = residual.to(memory_format=torch.channels_last)
    else:
        # A non-contiguous slice of a wider tensor.
        x = torch.randn(3, C, 4, 10, dtype=torch.float64)[..., ::2]
        residual = None
    _assert_same(fused, plain, x, residual)


@pytest.mark.parametrize("fused_cls, plain_cls, kw", NORMS)
def test_affine_false(fused_cls, plain_cls, kw):
    fused, plain = _pair(fused_cls, plain_cls, kw, affine=False)
    x = torch.randn(2, C, 3, 3, dtype=torch.float64)
    _assert_same(fused, plain, x, torch.randn_like(x))


@pytest.mark.parametrize(
    "fused_cls, plain_cls, shape",
    [
        (nd.L1BatchNormAct1d, nd.L1BatchNorm1d, (6, C)),  # (N, C): HW = 1
        (nd.LinfBatchNormAct1d, nd.LinfBatchNorm1d, (2, C, 7)),
        (nd.L1BatchNormAct3d, nd.L1BatchNorm3d, (2, C, 2, 3, 3)),
        (nd.LinfBatchNormAct3d, nd.LinfBatchNorm3d, (2, C, 2, 3, 3)),
    ],
)
def test_other_ranks(fused_cls, plain_cls, shape):
    fused, plain = _pair(fused_cls, plain_cls, {"k": 2} if "Linf" in fused_cls.__name__ else {})
    x = torch.randn(shape, dtype=torch.float64)
    _assert_same(fused, plain, x, torch.randn_like(x))


@pytest.mark.parametrize("fused_cls, plain_cls, kw", NORMS)
def test_ties_and_values_at_the_mean(fused_cls, plain_cls, kw):
    # Small integers: many |d| tie at the k-th place (L∞ tie rule over more than k values), channel 0 has
    # values exactly at its mean (sign 0 for L1), channel 2 is constant (s = 0, t = 0).
    x = torch.randint(-2, 3, (4, C, 3, 3)).double()
    x[:, 0] = torch.tensor([-1.0, 0.0, 1.0]).repeat(12).view(4, 3, 3)
    x[:, 2] = 3.0
    fused, plain = _pair(fused_cls, plain_cls, kw)
    with torch.no_grad():
        fused.weight.fill_(1.5)
        plain.weight.fill_(1.5)
    _assert_same(fused, plain, x, torch.randn_like(x))


def test_fallback_channels_are_the_poorly_recoverable_ones():
    # gamma = 0, gamma small against beta, and a residual large against gamma keep their inputs; others do not.
    layer = nd.L1BatchNormAct2d(4, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 0.0, 0.01, 1.0]))
        layer.bias.copy_(torch.tensor([0.5, 0.0, 0.5, 0.0]))
    x = torch.randn(4, 4, 3, 3).bfloat16()
    residual = torch.zeros_like(x)
    residual[:, 3] = 5.0  # max|r| > 4 |gamma|: poor in bf16
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x.requires_grad_(), residual)
    fallback = [t for t in saved if t.dtype == torch.int64 and t.dim() == 1]
    assert fallback[0].tolist() == [1, 2, 3]
    assert HALF_MAX_GAIN == 4.0


def _saved(layer, x, residual=None):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x, residual)
    return y, saved


def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("norm, k", [("l1", 1), ("linf", 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_exact(norm, k, dtype):
    # 8 x 6 x 5 x 7: 280 values per channel, 1680 in all (not a multiple of 8 per channel on purpose: the bits
    # are packed over the whole tensor).
    n_ch = 6
    cls = nd.L1BatchNormAct2d if norm == "l1" else nd.LinfBatchNormAct2d
    layer = cls(n_ch, **({} if norm == "l1" else {"k": k})).to(dtype)
    x = torch.randn(8, n_ch, 5, 7) * 0.5
    # Five distinct largest values per channel: no tie at the k-th place, which would keep the channel's input
    # (bf16 has few distinct values near 1).
    x[0, :, 0, :5] = torch.tensor([3.0, 3.25, 3.5, 3.75, 4.0])
    x = x.to(dtype).requires_grad_()
    # |residual| <= 1: in bf16 a channel with max|r| > 4 |gamma| would keep its input (HALF_MAX_GAIN).
    residual = torch.rand(8, n_ch, 5, 7, dtype=dtype) * 2 - 1
    y, saved = _saved(layer, x, residual)
    params = {_storage(p) for p in layer.parameters()}
    shared = {_storage(y), _storage(residual)} | params
    own = {}
    for t in saved:
        if _storage(t) not in shared:
            own[_storage(t)] = t.untyped_storage().nbytes()
    assert not any(_storage(t) == _storage(x) for t in saved), "the input must not be saved"
    acc = 4  # float32 statistics for float32 and bf16 inputs
    vectors = 3 * n_ch * acc  # batch mean, scale, 1/s_e
    if norm == "l1":
        expected = vectors + math.ceil(x.numel() / 8)  # one bit per value
    else:
        expected = vectors + n_ch * acc + n_ch * k * 4  # threshold, (position + 1) * sign as int32
    # The fallback channel index and the kept inputs are empty here (no gamma = 0, no ties).
    assert sum(own.values()) == expected
    # y and the residual are saved as themselves (the next convolution and the block's first one keep them).
    assert {_storage(y), _storage(residual)} <= {_storage(t) for t in saved}


def test_pack_bits_roundtrip():
    bits = torch.rand(3, 5, 7) > 0.5  # 105 values: the last byte is partial
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 14
    assert torch.equal(unpack_bits(packed, bits.shape), bits.to(torch.uint8))
    # The torch bit operations (the path of GPU tensors) give the same bytes as numpy's packbits on the CPU.
    assert torch.equal(_pack_bits_torch(bits.reshape(-1)), packed)
    assert torch.equal(_unpack_bits_torch(packed, bits.shape), bits.to(torch.uint8))


@pytest.mark.parametrize("fused_cls, kw", [(nd.L1BatchNormAct2d, {}), (nd.LinfBatchNormAct2d, {"k": 2})])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_gradcheck(fused_cls, kw, activation):
    layer = fused_cls(3, dtype=torch.float64, activation=activation, **kw)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.2, 0.0, -0.8]))
        layer.bias.copy_(torch.tensor([0.3, 0.1, -0.2]))
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, r, w, b: layer(a, r), (x, residual, layer.weight, layer.bias))


@pytest.mark.parametrize("fused_cls, kw", [(nd.L1BatchNormAct2d, {}), (nd.LinfBatchNormAct2d, {"k": 2})])
def test_gradgradcheck_with_double_backward(fused_cls, kw):
    layer = fused_cls(2, dtype=torch.float64, activation="leaky_relu", double_backward=True, **kw)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, r, w: layer(a, r), (x, residual, layer.weight))


def test_create_graph_without_double_backward_is_an_error():
    layer = nd.L1BatchNormAct2d(2)
    x = torch.randn(3, 2, 2, 2, requires_grad=True)
    y = layer(x)
    with pytest.raises(RuntimeError, match="double_backward=True"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("fused_cls, plain_cls, kw", NORMS)
def test_eval_is_torch_eval_plus_residual_and_act(fused_cls, plain_cls, kw):
    fused, _ = _pair(fused_cls, plain_cls, kw, activation="leaky_relu")
    with torch.no_grad():
        fused.running_mean.copy_(torch.randn(C))
        fused.running_var.copy_(torch.rand(C) + 0.5)
    torch_bn = torch.nn.BatchNorm2d(C, dtype=torch.float64)
    torch_bn.load_state_dict(fused.state_dict())
    fused.eval(), torch_bn.eval()
    x = torch.randn(2, C, 3, 3, dtype=torch.float64)
    r = torch.randn_like(x)
    torch.testing.assert_close(fused(x, r), F.leaky_relu(torch_bn(x) + r, 0.2))


def test_layer_contract():
    layer = nd.LinfBatchNormAct2d(4, k=2, activation="leaky_relu", negative_slope=0.1)
    plain = nd.LinfBatchNorm2d(4, k=2)
    assert isinstance(layer, nd.LpBatchNorm)
    assert not isinstance(layer, (nd.LinfBatchNorm2d, nd.L1BatchNorm2d))
    assert list(layer.state_dict()) == list(plain.state_dict())
    assert "activation='leaky_relu', negative_slope=0.1" in repr(layer)
    # Running statistics stay float32 after .half(), as for the plain layers.
    assert layer.half().running_var.dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError, match="activation must be one of"):
        nd.L1BatchNormAct2d(2, activation="gelu")
    with pytest.raises(ValueError, match="negative_slope must be positive"):
        nd.L1BatchNormAct2d(2, activation="leaky_relu", negative_slope=0.0)
    layer = nd.L1BatchNormAct2d(2)
    x = torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        layer(x, torch.randn(2, 2, 3, 1))
    with pytest.raises(TypeError, match="residual.to"):
        layer(x, torch.randn(2, 2, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        layer(torch.randn(2, 2, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 2, 1, 1))
    with pytest.raises(ValueError, match="k=9 exceeds"):
        nd.LinfBatchNormAct2d(2, k=9)(torch.randn(2, 2, 2, 2))


def test_empty_batch():
    layer = nd.L1BatchNormAct2d(3)
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    y = layer(x, torch.zeros(0, 3, 2, 2))
    assert y.shape == x.shape and int(layer.num_batches_tracked) == 1
    assert torch.equal(layer.running_var, torch.ones(3))


# The Triton path (CUDA, or CPU tensors under TRITON_INTERPRET=1, which conftest switches on without a GPU):
# the Triton batch-norm forward, then the activation epilogue kernel (residual, activation, L1 sign bits), and
# for L1 the input-gradient kernel. Oracle: the unfused layer on the same Triton kernels, then torch's ops.
@pytest.mark.parametrize("fused_cls, plain_cls, kw", NORMS[::2])
@pytest.mark.parametrize("activation, layout", [("relu", "contiguous"), ("leaky_relu", "channels_last")])
def test_triton_path_equals_unfused_triton_layer(fused_cls, plain_cls, kw, activation, layout, monkeypatch):
    pytest.importorskip("triton")
    from normdecouple._triton import act_launch

    original, calls = act_launch.statistics, []

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(act_launch, "statistics", spy)
    fused, plain = _pair(fused_cls, plain_cls, kw, activation, backend="triton")
    plain.backend = "triton"
    # 3 x 5 x 4 x 5: 60 values per channel, more than one 8-value byte group per channel and a partial last
    # program; gamma = 0 and tiny-gamma channels keep their inputs.
    x = torch.randn(3, C, 4, 5, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    _assert_same(fused, plain, x, torch.randn_like(x), activation)
    assert calls, "the Triton epilogue was not used"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_path_half_outputs_bit_identical(dtype):
    # The interpreter truncates bf16 casts; the epilogue rounds to nearest even itself.
    pytest.importorskip("triton")
    fused = nd.L1BatchNormAct2d(4, backend="triton").to(dtype)
    plain = nd.L1BatchNorm2d(4, backend="triton").to(dtype)
    x = torch.randn(2, 4, 3, 3, dtype=dtype)
    r = torch.randn_like(x)
    torch.testing.assert_close(fused(x, r), F.relu(plain(x) + r), rtol=0, atol=0)


def test_triton_path_gradcheck():
    # fast_mode: one random projection per input, so the interpreter runs the kernels a few dozen times only.
    pytest.importorskip("triton")
    layer = nd.L1BatchNormAct2d(2, dtype=torch.float64, activation="leaky_relu", backend="triton")
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, r, w, b: layer(a, r), (x, residual, layer.weight, layer.bias),
                                    fast_mode=True)


def test_triton_path_saved_bytes():
    pytest.importorskip("triton")
    layer = nd.L1BatchNormAct2d(3, backend="triton")
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y, saved = _saved(layer, x)
    params = {_storage(p) for p in layer.parameters()}
    own = {_storage(t): t.untyped_storage().nbytes() for t in saved if _storage(t) not in params | {_storage(y)}}
    # Per channel: mean, scale, 1/s_e (float32) and the forward's sum of sign(d) (int32, so that the backward
    # never unpacks the bits into a tensor); one bit per value.
    assert sum(own.values()) == 3 * 3 * 4 + 3 * 4 + math.ceil(x.numel() / 8)


def test_torch_func_takes_the_unfused_path():
    # track_running_stats=False: torch.func refuses in-place updates of captured buffers (ours and torch's).
    layer = nd.L1BatchNormAct2d(3, dtype=torch.float64, track_running_stats=False)
    plain = nd.L1BatchNorm2d(3, dtype=torch.float64, track_running_stats=False)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    got = torch.func.grad(lambda t: layer(t).sum())(x)
    want = torch.func.grad(lambda t: F.relu(plain(t)).sum())(x)
    torch.testing.assert_close(got, want)


def test_meta_tensors_in_training():
    layer = nd.LinfBatchNormAct2d(3, k=2, device="meta")
    x = torch.empty(4, 3, 2, 2, device="meta", requires_grad=True)
    y = layer(x, torch.empty(4, 3, 2, 2, device="meta"))
    assert y.shape == x.shape and y.device.type == "meta"


def test_torch_compile_runs_the_unfused_path():
    # backend="eager": dynamo traces the layer (the part that must work) without the slow CPU code generation.
    fused, plain = _pair(nd.L1BatchNormAct2d, nd.L1BatchNorm2d, {})
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    x = torch.randn(2, C, 3, 3, dtype=torch.float64)
    r = torch.randn_like(x)
    torch.testing.assert_close(compiled(x, r), F.relu(plain(x) + r))


def test_fx_trace_records_the_layer_whole():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nd.L1BatchNormAct2d(3)

        def forward(self, x):
            return self.bn(x, x)

    block = Block()
    twin = Block()
    traced = torch.fx.symbolic_trace(block)
    assert "_act_layer_forward" in traced.code
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(traced(x), twin(x))
    # The traced graph updates the layer's running statistics when it runs, as calling the layer does.
    torch.testing.assert_close(block.bn.running_var, twin.bn.running_var)


# Low precision: the recovery divides by gamma and subtracts beta and the residual. Measured against the float64
# layer on the same rounded inputs, the fused layer's relative gradient errors stay within 4x the unfused
# layer's (typically equal; the weight gradient, a sum of recovered x_hat, is the one that differs), plus
# a quarter of the dtype's spacing at 1; channels beyond HALF_MAX_GAIN keep their inputs.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused_cls, plain_cls, kw", NORMS[::2])
@pytest.mark.parametrize("beta_scale, residual", [(0.1, False), (3.0, False), (1.0, True)])
def test_low_precision_gradient_error(dtype, fused_cls, plain_cls, kw, beta_scale, residual):
    n_ch = 16
    ref = plain_cls(n_ch, dtype=torch.float64, **kw)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(n_ch) + 0.5)
        ref.bias.copy_(torch.randn(n_ch) * beta_scale)
    x = (torch.randn(8, n_ch, 6, 6, dtype=torch.float64) * 3 + 1).to(dtype)
    r = torch.randn_like(x) if residual else None
    grad = torch.randn_like(x)
    fused = fused_cls(n_ch, dtype=dtype, **kw)
    plain = plain_cls(n_ch, dtype=dtype, **kw)
    fused.load_state_dict(ref.state_dict()), plain.load_state_dict(ref.state_dict())
    (_, g_fused), (_, g_plain) = _both(fused, plain, x, r, "relu", grad)
    (_, g_ref), _ = _both_ref(ref, x, r, grad)
    spacing = torch.finfo(dtype).eps
    for a, b, want in zip(g_fused, g_plain, g_ref):
        err_fused = ((a.double() - want).norm() / want.norm()).item()
        err_plain = ((b.double() - want).norm() / want.norm()).item()
        assert err_fused <= 4 * err_plain + spacing / 4, (err_fused, err_plain)


def _both_ref(ref, x, r, grad):
    xi = x.double().requires_grad_()
    ri = None if r is None else r.double().requires_grad_()
    z = ref(xi)
    y = F.relu(z if ri is None else z + ri)
    inputs = [xi, ref.weight, ref.bias] + ([ri] if ri is not None else [])
    return (y, torch.autograd.grad(y, inputs, grad.double())), None


@pytest.mark.parametrize("fused_cls, plain_cls, kw", NORMS[::2])
@pytest.mark.parametrize("momentum", [0.1, None])  # None: the cumulative average counts num_batches_tracked
def test_batch_norm_act_forward_on_a_plain_layer_is_the_fused_layer(fused_cls, plain_cls, kw, momentum):
    # What normdecouple.fuse's rewritten forwards call: a plain layer's state, the fused computation.
    torch.manual_seed(0)
    plain = plain_cls(5, momentum=momentum, dtype=torch.float64, **kw)
    fused = fused_cls(5, momentum=momentum, dtype=torch.float64, activation="leaky_relu", negative_slope=0.2, **kw)
    with torch.no_grad():
        for layer in (plain, fused):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
    fused.load_state_dict(plain.state_dict())
    for step in range(2):
        x = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
        r = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
        y1 = normdecouple.batchnorm_act.batch_norm_act_forward(plain, x, r, "leaky_relu", 0.2, False)
        y2 = fused(x, residual=r)
        assert torch.equal(y1, y2)
        g = torch.randn_like(y1)
        for a, b in zip(torch.autograd.grad(y1, [x, r, plain.weight, plain.bias], g),
                        torch.autograd.grad(y2, [x, r, fused.weight, fused.bias], g)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(plain.state_dict(), fused.state_dict(), rtol=0, atol=0)
    assert int(plain.num_batches_tracked) == 2


def test_docstring_examples():
    result = doctest.testmod(normdecouple.batchnorm_act, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
