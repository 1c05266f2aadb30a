"""fuse_activations / unfuse_activations: which pairs fuse, and fusion never changes a model's outputs.

Oracle: a deep copy of the model before fusion, run on the same inputs (training and eval, float64): outputs,
input and parameter gradients and running statistics must agree; after unfusion the model must be the original
one again (classes, activation objects, Parameter objects, state_dict).
"""

import copy
import doctest

import pytest
import torch
from torch import nn

import normdecouple as nd
import normdecouple.fuse
from normdecouple.fuse import FusedActivation, fusable_pairs, fuse_activations, unfuse_activations


def _conv(c_in, c_out):
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=False, dtype=torch.float64)


class Bottleneck(nn.Module):
    """A ResNet block: bn1 -> act1 fuses; bn2's output goes into the residual addition, so it does not."""

    def __init__(self, shared_act=False):
        super().__init__()
        self.conv1, self.bn1, self.act1 = _conv(4, 4), nd.L1BatchNorm2d(4, dtype=torch.float64), nn.ReLU()
        self.conv2, self.bn2 = _conv(4, 4), nd.LinfBatchNorm2d(4, k=2, dtype=torch.float64)
        self.act2 = self.act1 if shared_act else nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + x)


def _sequential():
    return nn.Sequential(
        _conv(3, 4), nd.L1BatchNorm2d(4, dtype=torch.float64), nn.ReLU(inplace=True),
        nn.Sequential(_conv(4, 4), nd.LinfBatchNorm2d(4, k=3, dtype=torch.float64), nn.LeakyReLU(0.2)),
    )


def _run(model, x):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    grads = torch.autograd.grad(y, [x, *model.parameters()], torch.ones_like(y))
    return y, grads


def _assert_same_model_behaviour(fused, original, x):
    for training in (True, False):
        fused.train(training), original.train(training)
        y1, g1 = _run(fused, x)
        y2, g2 = _run(original, x)
        torch.testing.assert_close(y1, y2)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(fused.state_dict(), original.state_dict())


def test_sequential_adjacency_without_inputs():
    model = _sequential()
    original = copy.deepcopy(model)
    params = list(model.parameters())
    keys = list(model.state_dict())
    relu, leaky = model[2], model[3][2]
    assert fusable_pairs(model) == [("1", "2"), ("3.1", "3.2")]
    assert fuse_activations(model) is model
    assert type(model[1]) is nd.L1BatchNormAct2d and type(model[3][1]) is nd.LinfBatchNormAct2d
    assert model[3][1].k == 3 and model[3][1].negative_slope == 0.2
    assert isinstance(model[2], FusedActivation) and isinstance(model[2], nn.Identity)
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert list(model.state_dict()) == keys
    _assert_same_model_behaviour(model, original, torch.randn(4, 3, 5, 5, dtype=torch.float64))

    unfuse_activations(model)
    assert type(model[1]) is nd.L1BatchNorm2d and type(model[3][1]) is nd.LinfBatchNorm2d
    assert model[2] is relu and model[3][2] is leaky
    assert not hasattr(model[1], "activation") and model[3][1].k == 3
    assert all(a is b for a, b in zip(model.parameters(), params))
    torch.testing.assert_close(model.state_dict(), original.state_dict())
    assert repr(model) == repr(original)


def test_traced_forward_fuses_a_module_calling_norm_then_act():
    model = Bottleneck()
    original = copy.deepcopy(model)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    # Without inputs nothing is found (no Sequential); with them, bn1 -> act1 only: bn2 feeds the addition.
    assert fusable_pairs(model) == []
    assert fusable_pairs(model, x) == [("bn1", "act1")]
    fuse_activations(model, x)
    assert type(model.bn1) is nd.L1BatchNormAct2d and isinstance(model.act1, FusedActivation)
    assert type(model.bn2) is nd.LinfBatchNorm2d and type(model.act2) is nn.ReLU
    _assert_same_model_behaviour(model, original, x)
    unfuse_activations(model)
    assert repr(model) == repr(original)


def test_traced_forward_in_eval_mode():
    # In eval mode the layer runs torch's eval batch norm: a different autograd node, the same data flow.
    model = Bottleneck().eval()
    assert fusable_pairs(model, torch.randn(2, 4, 5, 5, dtype=torch.float64)) == [("bn1", "act1")]
    assert not model.training and not model.bn1.training


def test_shared_activation_with_another_use_is_not_fused():
    # torchvision's pattern: one ReLU instance after bn1 and after the residual addition.
    model = Bottleneck(shared_act=True)
    assert fusable_pairs(model, torch.randn(2, 4, 5, 5, dtype=torch.float64)) == []


def test_shared_activation_used_only_after_fusable_layers_is_fused():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_a = nd.L1BatchNorm2d(3, dtype=torch.float64)
            self.bn_b = nd.L1BatchNorm2d(3, dtype=torch.float64)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.bn_a(x)) * self.act(self.bn_b(x * 2))

    model = TwoBranches()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    fuse_activations(model, x)
    assert type(model.bn_a) is type(model.bn_b) is nd.L1BatchNormAct2d
    assert isinstance(model.act, FusedActivation)
    _assert_same_model_behaviour(model, original, x)


class _Uses(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.bn = nd.L1BatchNorm2d(3, dtype=torch.float64)
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.bn(x)
        if self.mode == "twice":
            return self.act(out) + out
        if self.mode == "returned":
            return self.act(out), out
        if self.mode == "modified":
            return self.act(out.mul_(2))
        return self.act(out)


@pytest.mark.parametrize("mode", ["twice", "returned", "modified"])
def test_layer_output_with_another_use_is_not_fused(mode):
    assert fusable_pairs(_Uses(mode), torch.randn(2, 3, 4, 4, dtype=torch.float64)) == []


def test_trace_leaves_buffers_and_rng_untouched():
    model = _Uses("plain")
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    state = torch.random.get_rng_state()
    fuse_activations(model, x)
    assert type(model.bn) is nd.L1BatchNormAct2d
    torch.testing.assert_close(model.state_dict(), before)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_failing_trace_leaves_the_model_unchanged():
    model = _Uses("plain")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError):
        fuse_activations(model, torch.randn(2, 5, 4, 4, dtype=torch.float64))  # wrong channel count
    assert type(model.bn) is nd.L1BatchNorm2d and type(model.act) is nn.ReLU
    assert not model.bn._forward_hooks and not model.act._forward_pre_hooks
    torch.testing.assert_close(model.state_dict(), before)


def test_not_fused():
    class MyReLU(nn.ReLU):
        pass

    hooked = nd.L1BatchNorm2d(3)
    hooked.register_forward_hook(lambda *args: None)
    model = nn.Sequential(
        nd.L1BatchNorm2d(3), nn.LeakyReLU(-0.1),  # a negative slope cannot be inverted
        nd.L1BatchNorm2d(3), MyReLU(),  # a subclass may do anything
        hooked, nn.ReLU(),  # the hook would see the fused output
        nn.BatchNorm2d(3), nn.ReLU(),  # torch's layer: convert it first
        nd.SyncL1BatchNorm(3), nn.ReLU(),  # synchronised layers have no fused form
    )
    assert fusable_pairs(model) == []


def test_shared_layer_registered_twice_is_not_fused_by_adjacency():
    bn = nd.L1BatchNorm2d(3)
    model = nn.Sequential(nn.Sequential(bn, nn.ReLU()), nn.Sequential(bn, nn.ReLU()))
    assert fusable_pairs(model) == []


def test_user_built_fused_layers_are_left_alone_by_unfuse():
    model = nn.Sequential(nd.L1BatchNormAct2d(3), nn.ReLU())
    unfuse_activations(model)
    assert type(model[0]) is nd.L1BatchNormAct2d and type(model[1]) is nn.ReLU


def test_docstring_examples():
    result = doctest.testmod(normdecouple.fuse, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------------------
# Residual blocks, BatchNormAct subclasses and the plan (issue 20).
#
# Oracle: the same model converted without fusion, in float64 (the fused backward recovers x_hat from the
# output, so float64 makes any real difference stand out above rounding: 1e-10). After revert_batchnorm, eval
# outputs must be bit-identical to the reverted unfused model (both are torch's BatchNorm with the same state).

import io  # noqa: E402
from collections import Counter  # noqa: E402
import logging  # noqa: E402
import warnings  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from _timm_support import BasicBlock, BatchNormAct2d  # noqa: E402
from normdecouple.fuse import RewrittenForward, fusion_plan  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only wait for each other


class TorchvisionBottleneck(nn.Module):
    """torchvision's layout: one ``ReLU(inplace=True)`` shared by bn1, bn2 and the residual sum, so no BatchNorm
    has an activation module of its own; ``out += identity`` in place."""

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def _torchvision_net():
    # Odd spatial size (9 -> 5 after the stride) and a block without downsampling: the residual is the input.
    return nn.Sequential(TorchvisionBottleneck(8, 4, 2), TorchvisionBottleneck(16, 4)).double()


def _timm_net():
    return nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))


def _hf_resnet():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1], layer_type="bottleneck")
    return transformers.ResNetForImageClassification(config).double()


def _hf_logits(model, x):
    return model(x).logits


def _train_and_grads(model, x, steps=2, call=None):
    """Outputs, input and parameter gradients of ``steps`` training forwards (the running statistics move)."""
    call = call or (lambda m, v: m(v))
    results = []
    model.train()
    for step in range(steps):
        v = (x * (step + 1)).detach().requires_grad_()
        y = call(model, v)
        grads = torch.autograd.grad(y, [v, *model.parameters()], torch.ones_like(y) + y.detach())
        results.append((y.detach(), grads))
    return results


def _assert_fused_like_unfused(make, x, call=None, expected=None):
    """Fuse ``convert_batchnorm(make())`` and check it against the unfused converted model; return both."""
    torch.manual_seed(0)
    original = make()
    keys = list(original.state_dict())
    reference = nd.convert_batchnorm(copy.deepcopy(original))
    fused = nd.convert_batchnorm(copy.deepcopy(original), fuse_activation=True, example_inputs=(x,))
    plan = fusion_plan(fused, x)
    if expected is not None:
        assert {row.path: (row.pattern, row.fused) for row in plan} == expected, str(plan)
    assert type(fused) is type(original) and list(fused.state_dict()) == keys
    for (y1, g1), (y2, g2) in zip(_train_and_grads(fused, x, call=call), _train_and_grads(reference, x, call=call)):
        torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused.state_dict(), reference.state_dict(), rtol=0, atol=0)
    return fused, reference, plan


def test_torchvision_bottleneck_fuses_every_batchnorm():
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    expected = {"0.bn1": ("bn → act", True), "0.bn2": ("bn → act", True), "0.bn3": ("bn → add → act", True),
                "0.downsample.1": ("residual operand", True),
                "1.bn1": ("bn → act", True), "1.bn2": ("bn → act", True), "1.bn3": ("bn → add → act", True)}
    fused, reference, plan = _assert_fused_like_unfused(_torchvision_net, x, expected=expected)
    # The downsampling BatchNorm's output is the residual that bn3's fused call keeps: fused with the identity,
    # it keeps that same tensor instead of its own input.
    assert type(fused[0].downsample[1]) is nd.L1BatchNormAct2d and fused[0].downsample[1].activation == "identity"
    assert plan.blocks == ("0", "1")
    assert isinstance(vars(fused[0])["forward"], RewrittenForward)
    # The shared ReLU and every BatchNorm are the same module objects: only the blocks' forwards changed.
    assert type(fused[0].relu) is nn.ReLU and type(fused[0].bn3) is nd.L1BatchNorm2d


def test_revert_gives_back_the_very_blocks_with_bit_identical_eval_outputs():
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    fused, reference, _ = _assert_fused_like_unfused(_torchvision_net, x)
    blocks = list(fused)
    modules = dict(fused.named_modules())
    reverted = nd.revert_batchnorm(fused.eval())
    assert list(reverted) == blocks and all(a is b for a, b in zip(reverted, blocks))
    assert all("forward" not in vars(block) for block in reverted)
    assert all(reverted.get_submodule(name) is m for name, m in modules.items() if "bn" not in name and
               name != "0.downsample.1")
    expected = nd.revert_batchnorm(reference.eval())
    assert torch.equal(reverted(x), expected(x))


@pytest.mark.slow
def test_hf_resnet_bottleneck_blocks_fuse():
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    fused, reference, plan = _assert_fused_like_unfused(_hf_resnet, x, call=_hf_logits)
    rows = {row.path: row for row in plan}
    bn3 = "resnet.encoder.stages.0.layers.0.layer.2.normalization"
    shortcut = "resnet.encoder.stages.0.layers.0.shortcut.normalization"
    assert rows[bn3].fused and rows[bn3].pattern == "bn → add → act"
    assert "resnet.encoder.stages.0.layers.0" in rows[bn3].detail
    assert rows[shortcut].fused and rows[shortcut].pattern == "residual operand"
    # bn1/bn2 of every block and the stem have their own ReLU module: replaced by fused layers.
    assert plan.summary() == ("fused 12 of 12 BatchNorm layers (7 bn → act, 3 bn → add → act, 2 residual operand) "
                              "with 3 rewritten forwards")
    block = fused.resnet.encoder.stages[0].layers[0]
    assert type(block).__name__ == "ResNetBottleNeckLayer" and "forward" in vars(block)
    reverted = nd.revert_batchnorm(fused.eval())
    assert reverted.resnet.encoder.stages[0].layers[0] is block and "forward" not in vars(block)
    assert torch.equal(reverted(x).logits, nd.revert_batchnorm(reference.eval())(x).logits)


@pytest.mark.slow
def test_hf_mobilenet_v2_relu6_does_not_fuse_and_says_why():
    transformers = pytest.importorskip("transformers")
    config = transformers.MobileNetV2Config(depth_multiplier=0.35, image_size=32)
    model = nd.convert_batchnorm(transformers.MobileNetV2ForImageClassification(config))
    plan = fusion_plan(model, torch.randn(2, 3, 32, 32))
    rows = {row.path.rsplit(".", 2)[-2]: row for row in plan if ".layer.3." in row.path}
    # ReLU6 keeps its input, the BatchNorm's output: fused with the identity, the BatchNorm keeps only that.
    for name in ("expand_1x1", "conv_3x3"):
        assert rows[name].fused and rows[name].pattern == "bn, output kept", str(plan)
        assert "Hardtanh keeps its output" in rows[name].detail
    # The linear bottleneck's projection feeds a residual sum with no activation after it: nothing to gain.
    assert not rows["reduce_1x1"].fused and "no activation after the residual addition" in rows["reduce_1x1"].detail


def test_timm_batchnormact_layers_fuse_and_revert_to_their_class():
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    expected = {"0.bn1": ("BatchNormAct", True), "0.bn2": ("bn → add → act", True),
                "0.downsample.1": ("residual operand", True), "1.bn1": ("BatchNormAct", True),
                "1.bn2": ("bn → add → act", True)}
    fused, reference, _ = _assert_fused_like_unfused(_timm_net, x, expected=expected)
    act = fused[0].bn1.act
    reverted = nd.revert_batchnorm(fused.eval())
    assert type(reverted[0].bn1) is BatchNormAct2d and reverted[0].bn1.act is act
    assert "forward" not in vars(reverted[0].bn1) and "forward" not in vars(reverted[0])
    assert torch.equal(reverted(x), nd.revert_batchnorm(reference.eval())(x))


@pytest.mark.parametrize("act_layer, drop_layer, fused, reason", [
    (nn.ReLU, None, True, ""),
    (nn.LeakyReLU, lambda: nn.Dropout(0.0), True, ""),  # identity dropout
    (nn.SiLU, None, False, "SiLU"),  # cannot be recovered from its output
    (nn.ReLU, lambda: nn.Dropout(0.1), False, "Dropout"),  # not the identity in training
])
def test_batchnormact_proof(act_layer, drop_layer, fused, reason):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dtype=torch.float64),
                          BatchNormAct2d(4, act_layer=act_layer, drop_layer=drop_layer, dtype=torch.float64))
    model = nd.convert_batchnorm(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    row = fusion_plan(model, x)["1"]
    assert row.pattern == "BatchNormAct" and row.fused is fused and reason in row.detail, row


def test_batchnormact_proof_in_eval_and_with_cumulative_momentum():
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)

    def make():
        net = _timm_net()
        for m in net.modules():
            if isinstance(m, BatchNormAct2d):
                m.momentum = None
        net[1].bn1.eval()  # a BatchNorm left in eval inside a training model
        return net

    fused, _, plan = _assert_fused_like_unfused(make, x)
    assert plan["1.bn1"].fused and plan["0.bn1"].fused


class _Residual(nn.Module):
    """``act(bn(conv(x)) + r)`` in the forms a user may write, with r the block input."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False, dtype=torch.float64)
        self.bn = nn.BatchNorm2d(4, dtype=torch.float64)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x):
        out = self.bn(self.conv(x))
        if self.form == "iadd":
            out += x
            return F.relu(out, inplace=True)
        if self.form == "radd":
            return torch.relu(x + out)
        if self.form == "torch.add":
            return self.act(torch.add(out, x))
        if self.form == "method":
            return out.add_(x).relu_()
        if self.form == "leaky":
            return F.leaky_relu(out + x, 0.2)
        if self.form == "into_residual":
            x = x * 1
            x += out
            return F.relu(x)
        if self.form == "sum_twice":
            s = out + x
            return F.relu(s) + s
        if self.form == "no_act":
            return out + x
        if self.form == "broadcast":
            return F.relu(out + x.mean(dim=(0, 2, 3), keepdim=True))
        if self.form == "data_dependent":
            if x.sum() > 0:  # torch.fx cannot trace this branch
                x = x * 2
            return F.relu(out + x)
        if self.form == "no_grad":
            with torch.no_grad():
                r = x * 2
            return F.relu(out + r)
        if self.form == "mode":
            return F.relu(out + (x if self.training else 2 * x))
        raise AssertionError(self.form)


@pytest.mark.parametrize("form", ["iadd", "radd", "torch.add", "method", "leaky", "broadcast"])
def test_residual_forms_fuse(form):
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    _, _, plan = _assert_fused_like_unfused(lambda: _Residual(form), x)
    assert plan["bn"].fused and plan["bn"].pattern == "bn → add → act", str(plan)


@pytest.mark.parametrize("form, reason, block_fails", [
    ("into_residual", "in place into the residual", False),  # the residual's other users would see the sum
    ("sum_twice", "the sum has 2 uses", False),
    ("no_act", "no activation after the residual addition", False),
    ("no_grad", "switches grad", True),  # torch.fx would drop the no_grad region
    ("mode", "differs between training and eval", True),
])
def test_residual_forms_that_must_not_fuse(form, reason, block_fails):
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    model = nd.convert_batchnorm(_Residual(form))
    row = fusion_plan(model, x)["bn"]
    assert not row.fused and reason in row.detail, row
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nd.fuse.fuse_activations(model, x)
    assert "forward" not in vars(model)
    # Only a block that holds a fusable pattern but cannot be rewritten is worth a warning.
    assert [reason in str(w.message) for w in caught] == ([True] if block_fails else [])


def test_block_that_cannot_be_rewritten_is_named_in_a_warning():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).abs()
    model = nd.convert_batchnorm(_Residual("data_dependent"))
    with pytest.warns(UserWarning, match=r"`bn` \(its block `\(root\)`: torch.fx cannot trace its forward"):
        nd.fuse.fuse_activations(model, x)
    assert "forward" not in vars(model) and type(model.bn) is nd.L1BatchNorm2d


def test_shared_batchnorm_and_hooked_activation_stay_unfused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nd.L1BatchNorm2d(4, dtype=torch.float64)
            self.relu = nn.ReLU()

        def forward(self, x):
            y = self.relu(self.bn(x * 2) + x)
            return torch.relu(self.bn(y) + y)

    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert "calls it 2 times" in fusion_plan(Shared(), x)["bn"].detail
    model = _Residual("torch.add")
    model.act.register_forward_hook(lambda *args: None)
    assert "`act` has hooks" in fusion_plan(nd.convert_batchnorm(model), x)["bn"].detail


def test_hooks_on_rewritten_blocks_fire_and_later_hooks_on_skipped_modules_are_honoured():
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    fused, reference, _ = _assert_fused_like_unfused(_torchvision_net, x)
    seen = []
    fused[0].register_forward_pre_hook(lambda m, args: seen.append("block pre"))
    fused[0].register_forward_hook(lambda m, args, out: seen.append("block"))
    y = fused(x)
    assert seen == ["block pre", "block"]
    # A hook on a BatchNorm whose call the rewrite skips: the block runs its own forward while it is there.
    handle = fused[0].bn3.register_forward_hook(lambda m, args, out: seen.append(("bn3", out.shape)))
    assert not vars(fused[0])["forward"].intact()
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-10, atol=1e-10)
    assert ("bn3", torch.Size([4, 16, 5, 5])) in seen
    handle.remove()
    assert vars(fused[0])["forward"].intact()
    assert y.shape == (4, 16, 5, 5)


def test_rewritten_blocks_under_other_paths():
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    fused, reference, _ = _assert_fused_like_unfused(_torchvision_net, x)
    # create_graph=True: the fused backward does not keep the input; the error says how to fix it.
    v = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="unfuse_activations"):
        torch.autograd.grad(fused(v).square().sum(), v, create_graph=True)
    # torch.fx of the whole model records the fused calls; jit.trace of the eval model replays exactly.
    traced = torch.fx.symbolic_trace(copy.deepcopy(fused))
    assert "_fused_call" in traced.code
    torch.testing.assert_close(traced(x), copy.deepcopy(fused)(x), rtol=0, atol=0)
    fused.eval(), reference.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        jitted = torch.jit.trace(fused, x)
    assert torch.equal(jitted(x), fused(x))
    # Meta tensors and torch.func run the unfused path of the fused calls.
    fused.train()
    assert copy.deepcopy(fused).to("meta")(x.to("meta")).shape == (4, 16, 5, 5)
    out = torch.func.functional_call(fused, dict(fused.named_parameters()), (x,))
    torch.testing.assert_close(out, copy.deepcopy(reference).train()(x), rtol=1e-10, atol=1e-10)


def test_state_survives_pickling_deepcopy_and_state_dict_round_trips():
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    fused, reference, _ = _assert_fused_like_unfused(_torchvision_net, x)
    for copied in (copy.deepcopy(fused), _pickled(fused)):
        assert vars(copied[0])["forward"].module is copied[0]
        assert copied[0].bn3 is not fused[0].bn3
        torch.testing.assert_close(copied(x), copy.deepcopy(reference)(x), rtol=1e-10, atol=1e-10)
    fresh = nd.convert_batchnorm(_torchvision_net())
    fresh.load_state_dict(fused.state_dict())
    torch.testing.assert_close(fresh.eval()(x), fused.eval()(x), rtol=0, atol=0)


def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_fusion_plan_changes_nothing():
    model = nd.convert_batchnorm(_torchvision_net())
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    state = copy.deepcopy(model.state_dict())
    modules = dict(model.named_modules())
    rng = torch.random.get_rng_state()
    plan = fusion_plan(model, x)
    assert len(plan.fused) == 7
    assert dict(model.named_modules()) == modules and not any("forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)
    assert torch.equal(torch.random.get_rng_state(), rng)
    text = str(plan)
    assert text.splitlines()[0].split() == ["path", "layer", "pattern", "fused", "detail"]
    assert "0.downsample.1" in text and text.endswith(plan.summary())


def test_convert_logs_the_summary_and_refits_an_already_fused_model(caplog):
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="normdecouple.fuse"):
        model = nd.convert_batchnorm(_torchvision_net(), fuse_activation=True, example_inputs=(x,))
    (record,) = [r for r in caplog.records if r.name == "normdecouple.fuse"]
    assert record.levelno == logging.INFO and "fused 7 of 7 BatchNorm layers" in record.getMessage()
    # Planning again sees what is fused already; fusing again changes nothing.
    plan = fusion_plan(model, x)
    assert all(row.fused for row in plan)
    forward = vars(model[0])["forward"]
    nd.fuse.fuse_activations(model, x)
    assert vars(model[0])["forward"] is forward
    nd.fuse.unfuse_activations(model)
    assert not any("forward" in vars(m) for m in model.modules())


def test_residual_of_another_shape_runs_the_original_operations():
    # Broadcasting residuals keep the original code's semantics (the fused layer adds without broadcasting).
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    model = nd.convert_batchnorm(_Residual("broadcast"), fuse_activation=True, example_inputs=(x,))
    assert "forward" in vars(model)
    reference = nd.convert_batchnorm(_Residual("broadcast"))
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)


def test_fuse_does_not_import_convert():
    # The dependency runs one way: convert -> fuse -> _transplant.
    import ast
    import pathlib

    import normdecouple._transplant
    import normdecouple.fuse as fuse_module

    for module in (fuse_module, normdecouple._transplant):
        tree = ast.parse(pathlib.Path(module.__file__).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "convert" not in imported and not any(name and name.endswith(".convert") for name in imported)


class _ConvAfterNorm(nn.Module):
    """bn1's output goes into a convolution (which keeps it); bn2's output is changed in place afterwards."""

    def __init__(self):
        super().__init__()
        self.bn1 = nd.L1BatchNorm2d(3, dtype=torch.float64)
        self.conv = nn.Conv2d(3, 3, 3, padding=1, dtype=torch.float64)
        self.bn2 = nd.L1BatchNorm2d(3, dtype=torch.float64)

    def forward(self, x):
        y = self.bn2(self.conv(self.bn1(x)))
        return y.mul_(2)


def test_a_layer_whose_output_is_kept_anyway_fuses_with_the_identity():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    model = _ConvAfterNorm()
    plan = fusion_plan(model, x)
    assert plan["bn1"].fused and plan["bn1"].pattern == "bn, output kept" and "Convolution" in plan["bn1"].detail
    # bn2's output is modified in place: the fused layer would have saved a tensor that changes afterwards.
    assert not plan["bn2"].fused
    reference = copy.deepcopy(model)
    nd.fuse.fuse_activations(model, x)
    assert type(model.bn1) is nd.L1BatchNormAct2d and model.bn1.activation == "identity"
    for (y1, g1), (y2, g2) in zip(_train_and_grads(model, x), _train_and_grads(reference, x)):
        torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # What autograd keeps: bn1 no longer keeps its input, only its output, which the convolution keeps anyway.
    assert _saved_storages(model, x) < _saved_storages(reference, x)


def _saved_storages(model, x):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.clone().requires_grad_())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_scale_invariant_parameters_see_through_rewritten_blocks():
    # The analysis hooks every BatchNorm: rewritten blocks then run their own forward, so it sees the same model.
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    net = lambda: nn.Sequential(_torchvision_net(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # noqa: E731
                                nn.Linear(16, 3, dtype=torch.float64))
    fused, reference, _ = _assert_fused_like_unfused(net, x)
    expected = nd.scale_invariant_parameters(reference, x)
    assert "0.0.conv3.weight" in expected and "0.0.downsample.0.weight" in expected
    assert nd.scale_invariant_parameters(fused, x) == expected
    assert all(vars(block)["forward"].intact() for block in fused[0])


def test_docs_memory_example_runs(capsys):
    # The example of "Fusing an existing model" on the Memory page (docs/memory.md), which was the README's.
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "memory.md").read_text()
    section = text[text.index("## Fusing an existing model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/memory.md", "exec"), namespace)
    table = capsys.readouterr().out
    assert "fused 5 of 5 BatchNorm layers" in table, table
    assert type(namespace["model"][3].bn2) is nn.BatchNorm2d and "forward" not in vars(namespace["model"][3])
