"""convert_batchnorm / revert_batchnorm: every torch BatchNorm in, everything a user trained kept."""

import copy

import pytest
import torch
from torch import nn

import normdecouple as nd
from normdecouple.batchnorm import L1BatchNormNd, LinfBatchNormNd


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.volume = nn.BatchNorm3d(2, momentum=None, eps=1e-3)
        self.head = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False), nn.Linear(5, 2))
        self.untracked = nn.BatchNorm1d(5, track_running_stats=False)
        self.nobias = nn.BatchNorm2d(4, bias=False)

    def forward(self, x):
        h = self.nobias(self.features(x)).mean(dim=(2, 3))
        return self.head(h)


def _trained_net():
    net = Net()
    for _ in range(3):
        net(torch.randn(6, 3, 7, 7)).sum().backward()
        net.volume(torch.randn(3, 2, 2, 3, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net.features[0].weight.requires_grad_(False)
    net.features[1].bias.requires_grad_(False)
    return net


@pytest.mark.parametrize("norm,kw", [("l1", {}), ("linf", {"k": 2})])
def test_convert_keeps_everything(norm, kw):
    net = _trained_net()
    before = copy.deepcopy(net)
    params = {name: p for name, p in net.named_parameters()}
    converted = nd.convert_batchnorm(net, norm, low_precision=True, **kw)
    assert converted is net
    expected = {
        "features.1": nd.L1BatchNorm2d if norm == "l1" else nd.LinfBatchNorm2d,
        "volume": nd.L1BatchNorm3d if norm == "l1" else nd.LinfBatchNorm3d,
        "head.1": nd.L1BatchNorm1d if norm == "l1" else nd.LinfBatchNorm1d,
    }
    for name, cls in expected.items():
        layer = converted.get_submodule(name)
        assert type(layer) is cls and layer.low_precision and getattr(layer, "k", 1) == kw.get("k", 1)
    # The very same Parameter objects (optimizers keep working), requires_grad untouched.
    for name, p in converted.named_parameters():
        assert p is params[name]
    assert not converted.features[0].weight.requires_grad and not converted.features[1].bias.requires_grad
    # Buffers, hyperparameters and mode.
    assert converted.state_dict().keys() == before.state_dict().keys()
    for (name, a), b in zip(converted.state_dict().items(), before.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert converted.volume.momentum is None and converted.volume.eps == 1e-3
    assert not converted.head[1].affine and not converted.untracked.track_running_stats
    assert converted.nobias.bias is None and converted.nobias.weight is not None
    net.eval(), before.eval()
    x = torch.randn(4, 3, 7, 7)
    torch.testing.assert_close(net(x), before(x), rtol=0, atol=0)  # eval is torch's formula


def test_training_flag_dtype_and_device_kept():
    net = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm1d(3)).to(torch.float64)
    net[0].eval()
    converted = nd.convert_batchnorm(net)
    assert not converted[0].training and converted[1].training
    assert converted[0].weight.dtype == torch.float64 and converted[0].running_var.dtype == torch.float64
    half = nd.convert_batchnorm(nn.BatchNorm2d(3).half())
    assert half.weight.dtype == torch.float16 and half.running_var.dtype == torch.float32
    meta = nd.convert_batchnorm(nn.BatchNorm2d(3, device="meta"))
    assert meta.weight.device.type == "meta" and meta.running_mean.device.type == "meta"


def test_root_may_be_a_batchnorm():
    bn = nn.BatchNorm1d(3)
    bn(torch.randn(5, 3))
    new = nd.convert_batchnorm(bn, "linf", k=1)
    assert type(new) is nd.LinfBatchNorm1d and new.weight is bn.weight
    assert new.num_batches_tracked is bn.num_batches_tracked
    back = nd.revert_batchnorm(new)
    assert type(back) is nn.BatchNorm1d


def test_sync_batchnorm_in_and_back():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.SyncBatchNorm(3), nn.SyncBatchNorm(3))
    converted = nd.convert_batchnorm(net)
    assert type(converted[1]) is L1BatchNormNd
    converted.train()
    y = converted(torch.randn(4, 2, 3, 3))  # any rank >= 2, as SyncBatchNorm accepts
    assert y.shape == (4, 3, 3, 3)
    assert type(nd.convert_batchnorm(nn.SyncBatchNorm(3), "linf")) is LinfBatchNormNd
    reverted = nd.revert_batchnorm(converted).eval()
    assert type(reverted[1]) is nn.SyncBatchNorm


@pytest.mark.parametrize("norm,kw", [("l1", {}), ("linf", {"k": 3})])
def test_revert_gives_identical_eval_outputs(norm, kw):
    net = nd.convert_batchnorm(Net(), norm, **kw)
    for _ in range(3):
        net(torch.randn(6, 3, 7, 7) * 2 + 1)
    net.eval()
    x = torch.randn(4, 3, 7, 7)
    expected = net(x)
    params = {name: p for name, p in net.named_parameters()}
    reverted = nd.revert_batchnorm(net)
    assert all(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) for m in reverted.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert all(p is params[name] for name, p in reverted.named_parameters())
    torch.testing.assert_close(reverted(x), expected, rtol=0, atol=0)
    # Exportable as torch's layers are: TorchScript.
    scripted = torch.jit.script(reverted)
    torch.testing.assert_close(scripted(x), expected, rtol=0, atol=0)


def test_revert_half_model():
    layer = nd.L1BatchNorm2d(3).half()
    layer(torch.randn(4, 3, 2, 2).half())
    layer.eval()
    x = torch.randn(4, 3, 2, 2).half()
    expected = layer(x)
    reverted = nd.revert_batchnorm(layer)
    assert reverted.running_var.dtype == torch.float16
    torch.testing.assert_close(reverted(x), expected, rtol=2e-3, atol=2e-3)
    with torch.no_grad():
        layer.running_var.fill_(1e6)
    with pytest.raises(ValueError, match=r"model.float\(\)"):
        nd.revert_batchnorm(layer)


def test_already_converted_layers_are_left_alone():
    layer = nd.LinfBatchNorm2d(3, k=2)
    assert nd.convert_batchnorm(layer, "l1") is layer


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (("l3",), {}, ValueError, r"norm must be one of \('l1', 'linf'\)"),
        (("l1",), {"k": 2}, TypeError, "norm='l1' takes none"),
        (("linf",), {"k": 0}, ValueError, "k must be at least 1"),
        (("linf",), {"momentum": 0.3}, TypeError, "unexpected keyword arguments"),
        (("l1",), {"backend": "gpu"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        nd.convert_batchnorm(nn.BatchNorm2d(3), *args, **kwargs)


# --- Converters never change a model silently (issue 12) ---------------------------------------------------

import torch.nn.functional as F  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402


def _sync_round_trip(model):
    return nd.revert_sync_batchnorm(nd.convert_sync_batchnorm(model))


# Each converter with a model it acts on: torch layers for convert_batchnorm, ours for the other three.
CONVERTERS = {
    "convert_batchnorm": (lambda: nn.BatchNorm2d(3), lambda m: nd.convert_batchnorm(m, "linf", k=2)),
    "revert_batchnorm": (lambda: nd.L1BatchNorm2d(3), nd.revert_batchnorm),
    "convert_sync_batchnorm": (lambda: nd.LinfBatchNorm2d(3, k=2), nd.convert_sync_batchnorm),
    "revert_sync_batchnorm": (lambda: nd.SyncL1BatchNorm(3), nd.revert_sync_batchnorm),
}


@pytest.mark.parametrize("converter", CONVERTERS)
def test_shared_instance_stays_shared(converter):
    make, convert = CONVERTERS[converter]
    shared = make()
    model = nn.Module()
    model.a = nn.Sequential(nn.Conv2d(3, 3, 1), shared)
    model.b = nn.Sequential(shared, nn.ReLU())
    model.c = shared
    before = copy.deepcopy(model)  # deepcopy keeps the sharing
    out = convert(model)
    assert out is model
    assert out.a[1] is out.b[0] is out.c and out.c is not shared
    assert out.c.weight is shared.weight and out.c.running_var is shared.running_var
    # One layer, so one set of parameters (as an optimizer sees them) and the same state_dict keys.
    assert len(list(out.parameters())) == len(list(before.parameters())) == 4
    assert list(out.state_dict()) == list(before.state_dict())


@pytest.mark.parametrize("converter", CONVERTERS)
def test_hooks_are_carried_over_and_fire(converter):
    make, convert = CONVERTERS[converter]
    layer = make()
    fired = []
    handles = [
        layer.register_forward_pre_hook(lambda m, args: fired.append("pre")),
        layer.register_forward_pre_hook(lambda m, args, kwargs: fired.append("pre_kwargs"), with_kwargs=True),
        layer.register_forward_hook(lambda m, args, out: fired.append("post")),
        layer.register_forward_hook(lambda m, args, out: fired.append("always"), always_call=True),
        layer.register_forward_hook(lambda m, args, kwargs, out: fired.append("post_kwargs"), with_kwargs=True),
        layer.register_full_backward_pre_hook(lambda m, grad_out: fired.append("backward_pre")),
        layer.register_full_backward_hook(lambda m, grad_in, grad_out: fired.append("backward")),
        layer.register_state_dict_post_hook(lambda m, sd, prefix, local: fired.append("state_dict")),
        layer.register_load_state_dict_post_hook(lambda m, keys: fired.append("load")),
    ]
    new = convert(nn.Sequential(layer))[0]
    assert new is not layer
    new.eval()  # a synchronised layer needs a process group in training only
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    new(x).sum().backward()
    new.load_state_dict(new.state_dict())
    assert fired == ["pre", "pre_kwargs", "post", "always", "post_kwargs", "backward_pre", "backward",
                     "state_dict", "load"]
    # The user's handles still work on the new layer.
    for handle in handles:
        handle.remove()
    fired.clear()
    new(x).sum().backward()
    assert fired == []


class _Positive(nn.Module):
    """A parametrization with a gradient that is not the identity's, so a lost one shows in the outputs."""

    def forward(self, w):
        return F.softplus(w)


def test_parametrizations_are_kept():
    torch_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    parametrize.register_parametrization(torch_model[1], "weight", _Positive())
    parametrize.register_parametrization(torch_model[1], "bias", _Positive())
    torch_model(torch.randn(8, 3, 6, 6) * 3)  # non-trivial running statistics
    original = torch_model[1].parametrizations.weight.original
    parametrization = torch_model[1].parametrizations.weight[0]
    before = copy.deepcopy(torch_model)
    model = nd.convert_batchnorm(torch_model, "l1")
    layer = model[1]
    assert isinstance(layer, nd.L1BatchNorm2d) and parametrize.is_parametrized(layer, "weight")
    assert layer.parametrizations.weight.original is original and layer.parametrizations.weight[0] is parametrization
    assert model.state_dict().keys() == before.state_dict().keys()
    x = torch.randn(8, 3, 6, 6)
    model.eval(), before.eval()
    torch.testing.assert_close(model(x), before(x), rtol=0, atol=0)
    # Training: our L1 layer with softplus(original) as its weight, built by hand.
    reference = nd.L1BatchNorm2d(4)
    with torch.no_grad():
        reference.weight.copy_(F.softplus(original))
        reference.bias.copy_(F.softplus(before[1].parametrizations.bias.original))
    model.train()
    h = model[0](x)
    torch.testing.assert_close(model[1](h), reference(h))
    model[1](h).square().sum().backward()
    assert original.grad is not None  # the gradient reaches the user's original parameter
    # And back: torch's layer with the same parametrization and parameter, the same eval outputs.
    expected = model.eval()(x)
    reverted = nd.revert_batchnorm(model)
    assert type(reverted[1]).__bases__ == (nn.BatchNorm2d,)
    assert reverted[1].parametrizations.weight.original is original
    torch.testing.assert_close(reverted(x), expected, rtol=0, atol=0)


def test_extra_attributes_qconfig_and_requires_grad_are_kept():
    layer = nn.BatchNorm2d(3)
    layer.qconfig = "qconfig"
    layer.tag = {"frozen": True}
    layer.weight.requires_grad_(False)
    new = nd.convert_batchnorm(layer, "linf", k=2, backend="torch")
    assert new.qconfig == "qconfig" and new.tag is layer.tag and not new.weight.requires_grad
    assert (new.k, new.backend) == (2, "torch")
    synced = nd.convert_sync_batchnorm(new, process_group="g")
    assert synced.tag is layer.tag and synced.k == 2 and synced.process_group == "g"
    back = nd.revert_batchnorm(nd.revert_sync_batchnorm(synced))
    assert type(back) is nn.BatchNorm2d and back.tag is layer.tag and back.qconfig == "qconfig"
    # Our constructor arguments do not travel onto torch's layer.
    assert not any(hasattr(back, name) for name in ("k", "backend", "low_precision", "process_group"))


def _snapshot(model):
    """Everything a failed conversion must leave as it was: the objects, the state, the hooks."""
    return (
        [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)],
        [(name, id(t)) for name, t in model.state_dict(keep_vars=True).items()],
        {name: t if isinstance(t, nn.parameter.UninitializedTensorMixin) else t.clone()
         for name, t in model.state_dict().items()},
        [(id(m._forward_hooks), list(m._forward_hooks)) for m in model.modules()],
    )


def _assert_unchanged(model, snapshot):
    after = _snapshot(model)
    assert after[0] == snapshot[0] and after[1] == snapshot[1] and after[3] == snapshot[3]
    assert after[2].keys() == snapshot[2].keys()
    for name in snapshot[2]:
        if isinstance(snapshot[2][name], nn.parameter.UninitializedTensorMixin):
            assert after[2][name] is snapshot[2][name]
            continue
        torch.testing.assert_close(after[2][name], snapshot[2][name], rtol=0, atol=0, msg=name)


class _FusedLike(nd.LpBatchNorm):
    """Stands for a fused BatchNorm + activation layer: one of ours, but not an L1BatchNorm2d."""

    norm = nd.L1BatchNorm2d.norm
    _dim = 2

    def forward(self, input, residual=None):
        y = super().forward(input)
        return F.relu(y if residual is None else y + residual)


def _model_with(middle, outer=nn.BatchNorm2d):
    """Convertible layers before and after ``middle`` (the walk meets it between them)."""
    model = nn.Sequential(outer(3), nn.Sequential(nn.Conv2d(3, 3, 1), middle), outer(3))
    model[0].register_forward_hook(lambda m, i, o: None)
    return model


@pytest.mark.parametrize("case", ["lazy", "scripted", "revert_fp16", "revert_fused", "sync_fused", "revert_sync"])
def test_a_failing_converter_leaves_the_model_as_it_was(case):
    if case == "lazy":
        model, convert, match = _model_with(nn.LazyBatchNorm2d()), nd.convert_batchnorm, r"`1\.1`.*forward"
    elif case == "scripted":
        model = _model_with(torch.jit.script(nn.BatchNorm2d(3)))
        convert, match = nd.convert_batchnorm, r"`1\.1` is a TorchScript-compiled BatchNorm2d"
    elif case == "revert_fp16":
        middle = nd.L1BatchNorm2d(3).half()
        middle.running_var.fill_(1e6)  # beyond fp16's range, which torch's layer would need
        model, convert, match = nd.convert_batchnorm(_model_with(middle)), nd.revert_batchnorm, r"`1\.1`.*float16"
    elif case == "revert_fused":
        model = nd.convert_batchnorm(_model_with(_FusedLike(3)))
        convert, match = nd.revert_batchnorm, r"`1\.1` is a _FusedLike, a normdecouple layer with no torch"
    elif case == "sync_fused":
        model = nd.convert_batchnorm(_model_with(_FusedLike(3)))
        convert, match = nd.convert_sync_batchnorm, r"`1\.1` is a _FusedLike.*no synchronised counterpart"
    else:
        class MySync(nd.SyncL1BatchNorm):
            pass

        model = _model_with(MySync(3), outer=nd.SyncLinfBatchNorm)
        convert, match = nd.revert_sync_batchnorm, r"`1\.1` is a .*MySync.*no rule"
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        convert(model)
    _assert_unchanged(model, snapshot)


def test_lazy_layer_converts_once_materialised():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"`1` is an uninitialised LazyBatchNorm2d.*Run one forward pass first"):
        nd.convert_batchnorm(model)
    model(torch.randn(2, 3, 4, 4))
    assert type(nd.convert_batchnorm(model)[1]) is nd.L1BatchNorm2d


def test_fused_like_layers_are_left_alone_by_convert_and_named_by_revert():
    fused = _FusedLike(3)
    assert nd.convert_batchnorm(fused) is fused
    with pytest.raises(ValueError, match="the root module is a _FusedLike"):
        nd.revert_batchnorm(fused)


# --------------------------------------------------------------------------------------------------------------
# convert_batchnorm(..., fuse_activation=True) and its revert


class _NormThenAct(torch.nn.Module):
    """A block that calls its norm and its activation by name (not an nn.Sequential); ``act`` is used once."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(6)
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Sequential(torch.nn.Conv2d(6, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.LeakyReLU(0.2))
        self.shared = torch.nn.ReLU()  # used twice: after a norm and after a residual sum, so never fused
        self.bn2 = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.head(self.act(self.bn(self.conv(x))))
        return self.shared(self.shared(self.bn2(h)) + h)


def _train_outputs(model, x):
    model.train()
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("norm,kwargs", [("l1", {}), ("linf", {"k": 3})])
def test_fuse_activation_keeps_outputs_and_reverts_exactly(norm, kwargs):
    torch.manual_seed(0)
    original = _NormThenAct().double()  # float64: the fused backward recovers x_hat from y, rounding differs
    reference = nd.convert_batchnorm(copy.deepcopy(original), norm, **kwargs)
    model = copy.deepcopy(original)
    act, leaky, shared = model.act, model.head[2], model.shared
    keys = list(model.state_dict())
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    model = nd.convert_batchnorm(model, norm, fuse_activation=True, example_inputs=(x,), **kwargs)
    assert type(model.bn).__name__.endswith("BatchNormAct2d") and type(model.head[1]).__name__.endswith("Act2d")
    assert model.shared is shared and type(model.bn2).__name__ in ("L1BatchNorm2d", "LinfBatchNorm2d")
    assert list(model.state_dict()) == keys
    # The example forward left the buffers alone: the fused model trains exactly like the unfused one.
    torch.testing.assert_close(model.state_dict(), reference.state_dict())
    for got, expected in zip(_train_outputs(model, x), _train_outputs(reference, x)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    reverted = nd.revert_batchnorm(model.eval())
    assert type(reverted.bn) is torch.nn.BatchNorm2d and type(reverted.head[1]) is torch.nn.BatchNorm2d
    assert reverted.act is act and reverted.head[2] is leaky and reverted.shared is shared
    assert list(reverted.state_dict()) == keys
    reference.eval()
    torch.testing.assert_close(reverted(x), reference(x), rtol=0, atol=0)


def test_fuse_activation_without_example_inputs_uses_sequential_adjacency():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    model = nd.convert_batchnorm(model, "l1", fuse_activation=True)
    assert type(model[1]) is nd.L1BatchNormAct2d


def test_fuse_activation_failure_leaves_the_model_as_it_was():
    model = _NormThenAct()
    children = {name: module for name, module in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        # A wrong input size: the followed forward fails after the conversion was planned and committed.
        nd.convert_batchnorm(model, "l1", fuse_activation=True, example_inputs=(torch.randn(2, 5, 4, 4),))
    assert {name: module for name, module in model.named_modules()} == children
    assert type(model.bn) is torch.nn.BatchNorm2d
    torch.testing.assert_close(model.state_dict(), state)


def test_example_inputs_need_fuse_activation():
    with pytest.raises(ValueError, match="fuse_activation=True"):
        nd.convert_batchnorm(_NormThenAct(), "l1", example_inputs=(torch.randn(2, 3, 4, 4),))
