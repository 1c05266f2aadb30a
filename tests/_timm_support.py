"""Test support: timm's BatchNorm + activation layer and its sync converter, rebuilt from their structure.

timm does not install usably next to the CPU-only torch here (its torchvision dependency fails), so the tests
use classes written to behave as ``timm/layers/norm_act.py`` does (timm 1.0): same constructor arguments,
attributes and forward. Shared by tests/test_convert_subclasses.py, tests/test_distributed.py (its spawned
ranks import this module by name), tests/test_lightning_ddp.py and tests/test_fuse.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _make_act(act_layer, act_kwargs, inplace, apply_act):
    # timm also accepts activation names (its get_act_layer); the tests pass classes. ``inplace`` goes to the
    # activations that take it, unless act_kwargs says otherwise.
    if act_layer is None or not apply_act:
        return nn.Identity()
    kwargs = dict(act_kwargs or {})
    if act_layer in (nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.ReLU6):
        kwargs.setdefault("inplace", inplace)
    return act_layer(**kwargs)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: torch's BatchNorm2d forward copied, calling ``F.batch_norm`` directly (timm
    does this to stay scriptable and traceable), then ``self.drop``, then ``self.act``. As in timm the activation
    is in place by default (``inplace=True``), which modifies the batch norm's output."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None, device=None,
                 dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _make_act(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
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
        x = self.drop(x)
        x = self.act(x)
        return x


class BatchNormReLU2d(nn.BatchNorm2d):
    """The other common pattern: the activation on top of ``super().forward``."""

    def forward(self, x):
        return F.relu(super().forward(x))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's ``SyncBatchNormAct``: torch's L2 SyncBatchNorm, then the ``drop`` and ``act`` it was given."""

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def timm_convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """What ``timm.layers.convert_sync_batchnorm`` (``--sync-bn`` in timm's train.py) does: every ``_BatchNorm``
    becomes torch's ``SyncBatchNorm``, a ``BatchNormAct2d`` (by ``isinstance``) a ``SyncBatchNormAct`` holding
    its ``act`` and ``drop``; parameters, buffers and ``qconfig`` carried over by reference."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        cls = SyncBatchNormAct if isinstance(module, BatchNormAct2d) else nn.SyncBatchNorm
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  process_group=process_group)
        if isinstance(module, BatchNormAct2d):
            out.act, out.drop = module.act, module.drop
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, timm_convert_sync_batchnorm(child, process_group))
    return out


class FixedChannelDrop(nn.Module):
    """A deterministic stand-in for timm's ``drop_layer`` (DropBlock): zeroes channel 1, so that a test sees
    whether the layer's forward applied it (random masks would differ between processes)."""

    def forward(self, x):
        mask = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        mask[1:2] = 0
        return x * mask.view(1, -1, *([1] * (x.dim() - 2)))


class BasicBlock(nn.Module):
    """timm's ResNet ``BasicBlock`` layout: ``bn1`` applies its ReLU itself, ``bn2`` is a BatchNormAct2d without
    activation, and the block adds the shortcut and applies ``act2`` (``x += shortcut; x = self.act2(x)``)."""

    def __init__(self, cin, cout, stride=1, dtype=torch.float64):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False, dtype=dtype)
        self.bn1 = BatchNormAct2d(cout, dtype=dtype)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False, dtype=dtype)
        self.bn2 = BatchNormAct2d(cout, apply_act=False, dtype=dtype)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False, dtype=dtype),
                                            BatchNormAct2d(cout, apply_act=False, dtype=dtype))

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act2(x)
        return x
