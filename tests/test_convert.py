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
