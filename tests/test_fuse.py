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
