"""Stand-ins for timm's normalisation layers (timm needs a torchvision that does not install next to the CPU torch
used here), copied from the structure of ``timm/layers/norm_act.py``.

``BatchNormAct2d`` keeps timm's constructor arguments (``apply_act``, ``act_layer``, ``drop_layer``, ``inplace``),
its attributes (``drop``, ``act``) and its forward: torch's ``BatchNorm2d.forward`` copied, calling
``F.batch_norm`` directly (timm does this to stay scriptable and traceable, with ``torch._assert`` for the rank
check), then ``drop`` and ``act``.
"""

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None, device=None,
                 dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        if apply_act and act_layer is not None:
            kwargs = dict(act_kwargs or {})
            if act_layer in (nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.ReLU6):
                kwargs.setdefault("inplace", inplace)
            self.act = act_layer(**kwargs)
        else:
            self.act = nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


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
