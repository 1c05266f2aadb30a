"""convert_batchnorm on BatchNorm subclasses: a timm-style residual network keeps its activations (issue 12)."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normdecouple as nd


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``layers/norm_act.py`` pattern: torch's forward copied, calling ``F.batch_norm`` directly, then
    ``drop`` and ``act`` (timm does this to stay scriptable and traceable)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()
        self.apply_act = apply_act

    def forward(self, x):
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps,
        )
        return self.act(self.drop(x))


class BatchNormReLU2d(nn.BatchNorm2d):
    """The other common pattern: the activation on top of ``super().forward``."""

    def forward(self, x):
        return F.relu(super().forward(x))


class Block(nn.Module):
    def __init__(self, channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn1 = BatchNormAct2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = BatchNormAct2d(channels, apply_act=False)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + x)


class ResNetLike(nn.Module):
    """A small residual network built only from the subclasses, as timm's models are."""

    def __init__(self, channels=6, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = BatchNormReLU2d(channels)
        self.blocks = nn.Sequential(Block(channels), Block(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        h = self.blocks(self.bn(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))


class OursThenAct(nn.Module):
    """The hand-built reference of a converted subclass layer: our layer, then the subclass's activation."""

    def __init__(self, layer, ours):
        super().__init__()
        self.norm = ours
        self.act = nn.ReLU() if isinstance(layer, BatchNormReLU2d) or layer.apply_act else nn.Identity()
        self.norm.load_state_dict(layer.state_dict(), strict=False)

    def forward(self, x):
        return self.act(self.norm(x))


def _reference(model, make_ours):
    reference = copy.deepcopy(model)
    for name, layer in list(reference.named_modules()):
        if isinstance(layer, (BatchNormAct2d, BatchNormReLU2d)):
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, OursThenAct(layer, make_ours(layer.num_features)))
    return reference


NORMS = {"l1": ({}, lambda c: nd.L1BatchNorm2d(c)), "linf": ({"k": 3}, lambda c: nd.LinfBatchNorm2d(c, k=3))}


@pytest.mark.parametrize("norm", NORMS)
def test_residual_network_of_subclasses_keeps_its_activations(norm):
    kwargs, make_ours = NORMS[norm]
    torch_model = ResNetLike()
    x = torch.randn(8, 3, 7, 7) * 2 + 1
    torch_model(x)  # running statistics of torch's layers, which the conversion keeps
    reference = _reference(torch_model, make_ours)
    model = nd.convert_batchnorm(copy.deepcopy(torch_model), norm, **kwargs)

    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(layers) == 5
    for layer in layers:
        assert isinstance(layer, nd.LpBatchNorm) and isinstance(layer, (BatchNormAct2d, BatchNormReLU2d))
        assert getattr(layer, "k", 3) == 3
    assert isinstance(model.blocks[0].bn1.act, nn.ReLU) and isinstance(model.blocks[0].bn2.act, nn.Identity)
    assert type(model.blocks[0].bn1) is type(model.blocks[1].bn2)  # one generated class per pair

    # Training: exactly our layer followed by the activation, and different from torch's L2 network.
    y = model(x)
    torch.testing.assert_close(y, reference(x))
    assert not torch.allclose(y, torch_model(x), atol=1e-3)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # running statistics updated the same way
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    torch.testing.assert_close(model.blocks[1].bn1.weight.grad, reference.blocks[1].bn1.norm.weight.grad)

    # Eval is torch's formula; revert gives the user's classes back with identical eval outputs.
    model.eval(), reference.eval()
    expected = model(x)
    torch.testing.assert_close(expected, reference(x))
    act = model.blocks[0].bn1.act
    reverted = nd.revert_batchnorm(model)
    assert type(reverted.bn) is BatchNormReLU2d and type(reverted.blocks[0].bn1) is BatchNormAct2d
    assert reverted.blocks[0].bn1.act is act and reverted.blocks[0].bn2.apply_act is False
    assert not any(isinstance(m, nd.LpBatchNorm) for m in reverted.modules())
    torch.testing.assert_close(reverted(x), expected, rtol=0, atol=0)


def test_converted_subclass_pickles_and_copies():
    layer = nd.convert_batchnorm(BatchNormAct2d(4), "linf", k=2)
    x = torch.randn(6, 4, 3, 3)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(layer) and loaded.k == 2
    torch.testing.assert_close(loaded(x), copy.deepcopy(layer)(x))


def test_subclass_without_forward_and_direct_batchnorm_subclasses():
    class Tagged(nn.BatchNorm1d):  # only adds an attribute
        tag = "mine"

    class AnyRank(nn.modules.batchnorm._BatchNorm):  # derives from the private base, with its own rank check
        def _check_input_dim(self, input):
            if input.dim() != 3:
                raise ValueError("AnyRank wants 3D")

    model = nd.convert_batchnorm(nn.Sequential(Tagged(4), AnyRank(4)), "l1")
    assert isinstance(model[0], nd.L1BatchNorm1d) and model[0].tag == "mine"
    assert isinstance(model[1], nd.L1BatchNormNd) and isinstance(model[1], AnyRank)
    x = torch.randn(5, 4, 3)
    torch.testing.assert_close(model(x), nd.L1BatchNormNd(4)(nd.L1BatchNorm1d(4)(x)))
    with pytest.raises(ValueError, match="AnyRank wants 3D"):
        model[1](torch.randn(5, 4))
    reverted = nd.revert_batchnorm(model)
    assert type(reverted[0]) is Tagged and type(reverted[1]) is AnyRank


def test_syncbatchnorm_subclasses():
    class Plain(nn.SyncBatchNorm):
        pass

    class WithForward(nn.SyncBatchNorm):
        def forward(self, x):
            return F.relu(super().forward(x))

    # Without its own forward: ours, whatever torch's SyncBatchNorm.forward would do in a process group.
    layer = nd.convert_batchnorm(Plain(3))
    assert type(layer).forward is nd.L1BatchNormNd.forward
    x = torch.randn(4, 3, 2)
    torch.testing.assert_close(layer(x), nd.L1BatchNormNd(3)(x))
    with pytest.raises(ValueError, match=r"`0` is a .*WithForward.*synchronised L2 path.*subclasses='warn'"):
        nd.convert_batchnorm(nn.Sequential(WithForward(3)))


def test_subclasses_option():
    model = nn.Sequential(nn.BatchNorm2d(3), BatchNormAct2d(3))
    with pytest.warns(UserWarning, match=r"`1` \(.*BatchNormAct2d, a subclass of torch's BatchNorm2d\) is left"):
        out = nd.convert_batchnorm(model, subclasses="warn")
    assert type(out[0]) is nd.L1BatchNorm2d and type(out[1]) is BatchNormAct2d
    model = nn.Sequential(nn.BatchNorm2d(3), BatchNormAct2d(3))
    with pytest.raises(ValueError, match=r"`1` is a .*BatchNormAct2d.*subclasses='error'"):
        nd.convert_batchnorm(model, subclasses="error")
    assert type(model[0]) is nn.BatchNorm2d  # all or nothing
    with pytest.raises(ValueError, match="subclasses must be one of"):
        nd.convert_batchnorm(model, subclasses="skip")


def test_converted_subclass_is_refused_by_the_sync_converter():
    model = nd.convert_batchnorm(nn.Sequential(nn.BatchNorm2d(3), BatchNormAct2d(3)))
    with pytest.raises(ValueError, match=r"`1` is a .*BatchNormAct2d.*no synchronised counterpart"):
        nd.convert_sync_batchnorm(model)
    assert type(model[0]) is nd.L1BatchNorm2d


def test_subclass_names_that_would_decide_our_norm_are_refused():
    class WithBackend(nn.BatchNorm2d):
        backend = "cudnn"  # would shadow our layer's backend setting

    model = nn.Sequential(nn.BatchNorm2d(3), WithBackend(3))
    with pytest.raises(ValueError, match=r"`1` is a .*WithBackend that defines \['backend'\]"):
        nd.convert_batchnorm(model)
    assert type(model[0]) is nn.BatchNorm2d


def test_syncbatchnorm_process_group_survives_the_round_trip():
    group = object()
    model = nd.convert_batchnorm(nn.Sequential(nn.SyncBatchNorm(3, process_group=group)))
    assert type(model[0]) is nd.L1BatchNormNd
    reverted = nd.revert_batchnorm(model)
    assert type(reverted[0]) is nn.SyncBatchNorm and reverted[0].process_group is group
