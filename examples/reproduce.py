"""Reproduce the claims of *Norm matters* (Hoffer et al., NeurIPS 2018) on real data, in one command.

    python -m examples.reproduce                  # digits (bundled with scikit-learn): ~2 minutes on 2 CPU cores
    python -m examples.reproduce --full           # 5 seeds, longer runs, width 32
    python -m examples.reproduce --data-dir ~/data/cifar-10-batches-py   # CIFAR-10 python pickles (use a GPU)

Four experiments, each over the same seeds (mean ± standard deviation over seeds). Every training run shifts
its images by up to ``--shift`` pixels at random (zero padding): without it the digits' training loss reaches
~0.003 within a few epochs, the gradients vanish and nothing about the learning rate can be seen any more.

1. ``bn``: torch's L2 BatchNorm vs L1 vs top-k L∞ BatchNorm in a small residual CNN (fp32).
2. ``half``: the same norms with every statistic in half precision (``low_precision=True``) and, for L2, a batch
   norm written here that computes its statistics in the input dtype too (:class:`InputDtypeL2BatchNorm`).
   An MLP (Linear + BatchNorm1d) in pure float16 at input scale 1 and 1000 and the CNN in pure bfloat16 at
   input scale 1000 (``--full`` adds the CNN at scale 1; fp16 convolutions are ~50x slower than fp32 ones on a
   CPU, hence bf16 there, and fp16 on CUDA).
3. ``decouple`` (longer runs, ``--decouple-epochs``: 20; ``--full``: 45): four ways of treating the
   scale-invariant weights (those feeding a batch norm), the other parameters always keeping weight decay 5e-4:

   - SGD with weight decay ``--decouple-wd`` (5e-3, large enough that the norm settles within the first phase)
     and the LR schedule (÷10 at 50% and 75% of training);
   - no weight decay, :class:`normdecouple.NormScaledLR` (reference: the norm at initialisation; the default band
     keeps each norm within 5% of it), LR schedule;
   - no weight decay, :class:`normdecouple.WeightNormProjection` (radius: the norm at initialisation), constant
     LR and the norm schedule (radius × √10 where the LR schedule divides by 10) for the scale-invariant weights
     (the other parameters, which no norm schedule can reach, keep the LR schedule);
   - the negative control: no weight decay and no correction, LR schedule.

   All four start from the same weights, the scale-invariant ones scaled by ``--decouple-init-scale`` (0.4, a
   channel norm of about 0.57) so that the run with weight decay starts near the norm it keeps anyway: then
   the fixed reference of the two corrections equals the norm weight decay maintains, and the claim predicts
   that the first three schemes turn the weights' directions alike while the fourth slows down as its norm grows.
   Records per step the mean channel norm, the effective LR ``lr·f/‖w‖²`` (``f`` the NormScaledLR factor, 1
   otherwise) and the angular update (the angle between each output channel's weight before and after the step),
   averaged over every channel of every scale-invariant weight; ``decouple_dynamics.png`` plots them.
4. ``wn``: BatchNorm vs torch's weight normalization (learned per-channel g) vs
   :func:`normdecouple.bounded_weight_norm` (per-channel norm fixed at its initial value). As in the paper's own
   code (github.com/eladhoffer/norm_matters, ``models/resnet_wn.py``), both weight norms replace each batch norm
   by a *mean-only* batch norm (:class:`MeanOnlyBatchNorm`: subtract the batch mean, add a learned bias; Salimans
   & Kingma's recommended companion) and train without weight decay; BatchNorm keeps weight decay 5e-4. Each
   method runs at every learning rate of ``--wn-lrs`` (0.03, 0.1, 0.3, 1) over the same seeds, reported at the
   one with the lowest mean final *training* loss (the test set plays no part in the choice).

Writes ``results.csv`` (one row per run), ``results.md`` (the summary table) and PNG plots into ``--out``. The table
is deterministic: the same command prints the same table on the same machine with the same ``--threads`` (each
run is seeded and runs on its own ``--threads`` CPU threads, in one of ``--jobs`` worker processes; the number of
jobs does not change the results).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import pickle
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import multiprocessing

import torch
from torch import Tensor, nn

import normdecouple as nd

# ----------------------------------------------------------------------------------------------------------- data


@dataclass
class Data:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def classes(self) -> int:
        return int(self.y_train.max()) + 1


def load_digits_data(image_size: int = 12, max_train: int | None = None) -> Data:
    """scikit-learn's 1,797 8x8 handwritten digits, zero-padded to ``image_size``, pixels in [0, 1], 80/20 split."""
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 (got {image_size})")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    before = (image_size - 8) // 2
    images = nn.functional.pad(images, (before, image_size - 8 - before, before, image_size - 8 - before))
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    if max_train is not None:
        train = train[:max_train]
    return Data("digits", images[train], labels[train], images[test], labels[test])


def load_cifar10(data_dir: str | os.PathLike, max_train: int | None = None) -> Data:
    """The CIFAR-10 python-pickle folder (``data_batch_1`` … ``data_batch_5``, ``test_batch``), no torchvision.

    Pixels are scaled to [0, 1] (the same range as the digits, so ``--input-scale`` means the same); missing
    training batches are skipped (at least one is needed).
    """
    root = Path(data_dir)

    def read(name: str) -> tuple[Tensor, Tensor]:
        with open(root / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = batch[b"data"] if b"data" in batch else batch["data"]
        labels = batch[b"labels"] if b"labels" in batch else batch["labels"]
        x = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32).float() / 255.0
        return x, torch.as_tensor(labels, dtype=torch.long)

    names = [f"data_batch_{i}" for i in range(1, 6) if (root / f"data_batch_{i}").exists()]
    if not names or not (root / "test_batch").exists():
        raise FileNotFoundError(f"{root} must hold data_batch_1..5 and test_batch (the CIFAR-10 python version)")
    parts = [read(n) for n in names]
    x_train, y_train = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    x_test, y_test = read("test_batch")
    if max_train is not None:
        x_train, y_train = x_train[:max_train], y_train[:max_train]
    return Data("cifar10", x_train, y_train, x_test, y_test)


def load_data(data_dir: str | None, image_size: int = 12, max_train: int | None = None) -> Data:
    """CIFAR-10 from ``data_dir`` when given, else the digits."""
    return load_cifar10(data_dir, max_train) if data_dir else load_digits_data(image_size, max_train)


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int) -> Tensor:
    """Each image moved by its own random offset in [-max_shift, max_shift]² pixels, zero padding (augmentation)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    shifted = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    # Plain NCHW strides, also for one channel: `.contiguous()` would keep the channel's stride of 1, which makes
    # the batch channels_last as well, and torch 2.13's oneDNN convolution backward corrupts the heap on such a
    # one-channel input with one thread (reproduced with this file's ResNet alone, no normdecouple layer).
    return shifted.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------------------- models


class MeanOnlyBatchNorm(nn.Module):
    """Mean-only batch normalization (Salimans & Kingma 2016, §3.2): subtracts the batch mean per channel (the
    running mean in eval mode, torch's momentum rule) and adds a learned bias; no division, no learned scale.
    The companion of weight normalization in the paper's code (its ``MeanBN``), where the weight norm provides the
    scale."""

    def __init__(self, channels: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            mean = x.mean(dim=dims)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().float(), self.momentum)
        else:
            mean = self.running_mean.to(x.dtype)
        return x - mean.reshape(shape) + self.bias.reshape(shape)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small residual CNN: a stem, one block at full width, one downsampling block at twice the width."""

    def __init__(self, channels: int, classes: int, width: int = 16, norm: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn = norm(width)
        self.layer1 = Block(width, width, 1, norm)
        self.layer2 = Block(width, 2 * width, 2, norm)
        self.fc = nn.Linear(2 * width, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))



def make_mlp(features: int, classes: int, width: int = 128) -> nn.Module:
    """Linear + BatchNorm1d + ReLU twice: the fp16 model (fp16 matmuls are fast on a CPU, fp16 convolutions not)."""
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, classes),
    )
    for m in model:
        if isinstance(m, nn.Linear) and m.bias is None:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


class InputDtypeL2BatchNorm(nn.Module):
    """EXAMPLE ONLY, not part of normdecouple: an L2 batch norm whose statistics stay in the input dtype.

    This is what ``low_precision=True`` would mean for torch's L2 batch norm: mean, deviations, their squares and
    the variance are all computed in the input's dtype (fp16/bf16), with no upcast. (torch's CPU reductions may
    accumulate a sum in float32 internally; that only helps L2 here. The squares themselves are fp16/bf16
    values, so in fp16 any deviation above 256 gives inf.) Running statistics are kept in float32, as in
    normdecouple's layers; eval mode is torch's formula.
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def _apply(self, fn: Callable, recurse: bool = True) -> nn.Module:  # keep running statistics in float32
        super()._apply(fn, recurse)
        self.running_mean.data = self.running_mean.data.float()
        self.running_var.data = self.running_var.data.float()
        return self

    def forward(self, x: Tensor) -> Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            mean = x.mean(dim=dims, keepdim=True)
            d = x - mean
            var = (d * d).mean(dim=dims, keepdim=True)  # the square in the input dtype: fp16 overflows above 256
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().reshape(-1).float(), self.momentum)
                self.running_var.lerp_(var.detach().reshape(-1).float() * n / max(n - 1, 1), self.momentum)
        else:
            mean = self.running_mean.to(x.dtype).reshape(shape)
            var = self.running_var.to(x.dtype).reshape(shape)
            d = x - mean
        return d / torch.sqrt(var + self.eps) * self.weight.reshape(shape) + self.bias.reshape(shape)


def to_input_dtype_l2(model: nn.Module) -> nn.Module:
    """Replace every torch BatchNorm of ``model`` by :class:`InputDtypeL2BatchNorm` (weights kept)."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = InputDtypeL2BatchNorm(child.num_features, child.eps, child.momentum)
            new.load_state_dict({k: v for k, v in child.state_dict().items() if k != "num_batches_tracked"})
            setattr(model, name, new)
        else:
            to_input_dtype_l2(child)
    return model



# ------------------------------------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Config:
    """One way of training. Runs of equal ``key`` are the same computation (shared between experiments)."""

    label: str
    model: str = "resnet"  # "resnet" | "mlp"
    norm: str = "l2"  # "l2" (torch) | "l1" | "linf" | "l2-input-dtype" | "torch-wn" | "bounded-wn"
    dtype: str = "float32"
    low_precision: bool = False
    input_scale: float = 1.0
    # Scale-invariant weights: "wd" (weight decay like the rest), "nowd" (weight decay 0, no correction),
    # "nslr" (weight decay 0 + NormScaledLR), "projection" (weight decay 0 + WeightNormProjection, norm schedule).
    scheme: str = "wd"
    lr: float = 0.1
    weight_decay: float = 5e-4  # of every parameter ("wd") or of the others (the other schemes)
    init_scale: float = 1.0  # the scale-invariant weights are multiplied by this at initialisation
    long: bool = False  # trains for --decouple-epochs instead of --epochs
    track: bool = False  # records norm, effective LR and angular update per step

    @property
    def key(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__ if f != "label")


WEIGHT_NORMS = {"torch-wn": "torch weight_norm (learned g) + mean-only BN",
                "bounded-wn": "bounded_weight_norm + mean-only BN"}


def experiments(half_dtype: str, *, full: bool = False, wn_lrs: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0),
                decouple_wd: float = 5e-3, decouple_init_scale: float = 0.4) -> dict[str, list[Config]]:
    cnn_scales = (1.0, 1000.0) if full else (1000.0,)
    dec = {"weight_decay": decouple_wd, "init_scale": decouple_init_scale, "long": True, "track": True}
    return {
        "bn": [
            Config("L2 (torch BatchNorm2d)"),
            Config("L1", norm="l1"),
            Config("top-k L∞ (k=8)", norm="linf"),
        ],
        "half": [
            *(Config(f"MLP float16 ×{s:g}: {lab}", model="mlp", norm=n, dtype="float16", low_precision=True,
                     input_scale=s)
              for s in (1.0, 1000.0)
              for lab, n in (("L2 (input dtype)", "l2-input-dtype"), ("L1", "l1"), ("L∞ k=8", "linf"))),
            *(Config(f"CNN {half_dtype} ×{s:g}: {lab}", norm=n, dtype=half_dtype, low_precision=True, input_scale=s)
              for s in cnn_scales
              for lab, n in (("L2 (input dtype)", "l2-input-dtype"), ("L1", "l1"), ("L∞ k=8", "linf"))),
        ],
        "decouple": [
            Config(f"SGD + weight decay {decouple_wd:g}, LR steps", **dec),
            Config("no WD + NormScaledLR, LR steps", scheme="nslr", **dec),
            Config("no WD + WeightNormProjection, norm steps", scheme="projection", **dec),
            Config("no WD, no correction (control), LR steps", scheme="nowd", **dec),
        ],
        "wn": [
            *(Config(f"BatchNorm (L2), WD 5e-4, lr {lr:g}", lr=lr) for lr in wn_lrs),
            *(Config(f"{lab}, lr {lr:g}", norm=n, lr=lr, weight_decay=0.0)
              for n, lab in WEIGHT_NORMS.items() for lr in wn_lrs),
        ],
    }


def build_model(cfg: Config, data: Data, width: int) -> nn.Module:
    if cfg.model == "mlp":
        model = make_mlp(data.x_train[0].numel(), data.classes)
    elif cfg.norm in WEIGHT_NORMS:
        model = ResNet(data.channels, data.classes, width, norm=MeanOnlyBatchNorm)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                if cfg.norm == "torch-wn":
                    nn.utils.parametrizations.weight_norm(m, "weight", dim=0)
                else:
                    nd.bounded_weight_norm(m, "weight", p=2)
    else:
        model = ResNet(data.channels, data.classes, width)
    if cfg.norm == "l1":
        model = nd.convert_batchnorm(model, "l1", low_precision=cfg.low_precision)
    elif cfg.norm == "linf":
        model = nd.convert_batchnorm(model, "linf", k=8, low_precision=cfg.low_precision)
    elif cfg.norm == "l2-input-dtype":
        model = to_input_dtype_l2(model)
    return model.to(device=data.x_train.device, dtype=getattr(torch, cfg.dtype))


def lr_drops(epochs: int) -> list[int]:
    """Epochs at whose start the LR is divided by 10 (or the radius multiplied by √10): 50% and 75% of training."""
    return sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)} - {epochs})


def _channel_angles(before: list[Tensor], after: list[Tensor]) -> Tensor:
    """The angle between each output channel's weight before and after a step, for every weight (radians)."""
    angles = []
    for w0, w1 in zip(before, after):
        u0 = nn.functional.normalize(w0.flatten(1).float(), dim=1)
        u1 = nn.functional.normalize(w1.flatten(1).float(), dim=1)
        angles.append(2 * torch.atan2((u0 - u1).norm(dim=1), (u0 + u1).norm(dim=1)))  # accurate for small angles
    return torch.cat(angles)


def train_run(cfg: Config, data: Data, seed: int, epochs: int, width: int, batch_size: int = 64,
              shift: int = 2) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build_model(cfg, data, width)
    dtype = getattr(torch, cfg.dtype)
    x_train = (data.x_train * cfg.input_scale).to(dtype)
    x_test = (data.x_test * cfg.input_scale).to(dtype)
    invariant: list[str] = []
    if cfg.model == "resnet" and cfg.norm not in WEIGHT_NORMS and (cfg.track or cfg.scheme != "wd"):
        invariant = nd.scale_invariant_parameters(model, x_train[:batch_size])
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n in invariant:
            named[n].mul_(cfg.init_scale)
    decoupled = set(invariant) if cfg.scheme != "wd" else set()
    groups = [
        {"params": [p for n, p in named.items() if n not in decoupled], "weight_decay": cfg.weight_decay},
        {"params": [named[n] for n in sorted(decoupled)], "weight_decay": 0.0},
    ]
    opt = torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=0.9)
    hook: Any = None
    if cfg.scheme == "nslr":
        hook = nd.NormScaledLR(opt, sorted(decoupled), reference="init", model=model)
    elif cfg.scheme == "projection":
        hook = nd.WeightNormProjection(opt, sorted(decoupled), radius="init", model=model)
    drops = lr_drops(epochs)
    tracked = [named[n] for n in invariant] if cfg.track else []
    references = [hook.references[n].to(data.x_train.device) for n in invariant] if cfg.scheme == "nslr" else None
    gen = torch.Generator().manual_seed(seed)
    curve_loss, curve_acc = [], []
    trace: dict[str, list[float]] = {"norm": [], "eff_lr": [], "angle": []}
    start = time.perf_counter()
    for epoch in range(epochs):
        if epoch in drops:
            for g in opt.param_groups:
                if cfg.scheme == "projection" and g is opt.param_groups[-1]:
                    hook.scale_radius(10 ** 0.5)  # the norm schedule replaces the LR schedule of these weights
                else:  # (the others, not scale-invariant, keep the LR schedule in every scheme)
                    g["lr"] /= 10
        model.train()
        losses = []
        for batch in torch.randperm(len(data.y_train), generator=gen).split(batch_size):
            if len(batch) < 2:
                continue
            x = random_shift(x_train[batch.to(x_train.device)], gen, shift)
            loss = nn.functional.cross_entropy(model(x).float(), data.y_train[batch.to(x_train.device)])
            opt.zero_grad()
            loss.backward()
            before = [p.detach().clone() for p in tracked]
            if tracked:  # this step's effective LR: lr · f / ‖w_i‖², f the NormScaledLR factor (‖w_i‖/ρ_i)²
                sq = torch.cat([p.detach().float().flatten(1).square().sum(1) for p in tracked])
                lr = opt.param_groups[-1]["lr"]
                eff = lr / torch.cat(references).square() if references is not None else lr / sq
                trace["eff_lr"].append(eff.mean().item())
            opt.step()
            losses.append(loss.item())
            if tracked:
                with torch.no_grad():
                    trace["angle"].append(_channel_angles(before, [p.detach() for p in tracked]).mean().item())
                    trace["norm"].append(torch.cat([p.detach().float().flatten(1).norm(dim=1)
                                                    for p in tracked]).mean().item())
        curve_loss.append(sum(losses) / max(len(losses), 1))
        curve_acc.append(evaluate(model, x_test, data.y_test, batch_size * 4))
    finite = all(torch.isfinite(p).all().item() for p in model.parameters()) and math.isfinite(curve_loss[-1])
    return {"test_acc": curve_acc[-1], "train_loss": curve_loss[-1], "finite": finite,
            "seconds": time.perf_counter() - start, "curve_loss": curve_loss, "curve_acc": curve_acc,
            "steps_per_epoch": len(losses), **trace}


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    model.eval()
    with torch.no_grad():
        pairs = zip(x.split(batch_size), y.split(batch_size))
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in pairs)
    return correct / len(y)


# Worker processes: each loads the data once and runs whole training runs on its own CPU threads.
_WORKER: dict[str, Any] = {}


def _worker_init(data_args: tuple, device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    data = load_data(*data_args)
    _WORKER["data"] = Data(data.name, *(t.to(device) for t in (data.x_train, data.y_train, data.x_test,
                                                               data.y_test)))


def _worker_run(cfg: Config, seed: int, epochs: int, width: int, shift: int) -> dict[str, Any]:
    return train_run(cfg, _WORKER["data"], seed, epochs, width, shift=shift)


# -------------------------------------------------------------------------------------------------------- reports


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def select_wn_lrs(rows: list[dict[str, Any]]) -> dict[str, str]:
    """For each method of the ``wn`` experiment, the variant (learning rate) with the lowest mean final training
    loss over seeds (non-finite losses count as infinite; ties go to the smaller LR). ``{method: variant}``."""
    by_variant: dict[str, list[float]] = {}
    for r in rows:
        if r["experiment"] == "wn":
            loss = r["train_loss"] if math.isfinite(r["train_loss"]) else math.inf
            by_variant.setdefault(r["variant"], []).append(loss)
    best: dict[str, tuple[float, float, str]] = {}
    for variant, losses in by_variant.items():
        method, lr = variant.rsplit(", lr ", 1)
        candidate = (statistics.mean(losses), float(lr), variant)
        if method not in best or candidate < best[method]:
            best[method] = candidate
    return {method: b[2] for method, b in best.items()}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per (experiment, variant): test accuracy and final training loss (mean ± std), finite runs. No
    timings, so that the same command prints the same table."""
    table: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        table.setdefault((r["experiment"], r["variant"]), []).append(r)
    selected = set(select_wn_lrs(rows).values())
    out = []
    for (exp, variant), runs in table.items():
        out.append({
            "experiment": exp, "variant": variant + (" ← tuned" if variant in selected else ""),
            "test accuracy": mean_std([r["test_acc"] for r in runs]),
            "final train loss": mean_std([r["train_loss"] for r in runs]) if all(
                math.isfinite(r["train_loss"]) for r in runs) else "nan/inf",
            "finite runs": f"{sum(bool(r['finite']) for r in runs)}/{len(runs)}",
        })
    return out


def dynamics_summary(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, str]]:
    """The decouple experiment's dynamics per scheme: mean channel norm at the start and end, and the angular
    update per step averaged over the first and the last 25% of the steps of the first LR phase (mean ± std
    over seeds)."""
    out = []
    for variant, runs in results.items():
        if not runs[0]["angle"]:
            continue
        phase = len(runs[0]["angle"]) * lr_drops(len(runs[0]["curve_loss"]))[0] // len(runs[0]["curve_loss"]) \
            if lr_drops(len(runs[0]["curve_loss"])) else len(runs[0]["angle"])
        q = max(1, phase // 4)

        def fmt(values: list[float], digits: int = 4) -> str:
            if len(values) == 1:
                return f"{values[0]:.{digits}f}"
            return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

        out.append({
            "scheme": variant,
            "‖w‖ first step → last": (f"{fmt([r['norm'][0] for r in runs], 2)} → "
                                      f"{fmt([r['norm'][-1] for r in runs], 2)}"),
            "angle/step, phase 1 start": fmt([statistics.mean(r["angle"][:q]) for r in runs]),
            "angle/step, phase 1 end": fmt([statistics.mean(r["angle"][phase - q:phase]) for r in runs]),
            "eff. LR, phase 1 end": fmt([statistics.mean(r["eff_lr"][phase - q:phase]) for r in runs], 3),
        })
    return out


def markdown(summary: list[dict[str, str]]) -> str:
    cols = list(summary[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row[c] for c in cols) + " |" for row in summary]
    return "\n".join(lines) + "\n"


def _band(ax: Any, x: Any, traces: list[list[float]], color: str, label: str, ls: str = "-") -> None:
    """The mean over seeds as a line, the seeds' min–max as a band."""
    t = torch.tensor(traces, dtype=torch.float64)
    ax.plot(x, t.mean(0).tolist(), color=color, label=label, lw=1.5, ls=ls)
    if len(traces) > 1:
        ax.fill_between(x, t.min(0).values.tolist(), t.max(0).values.tolist(), color=color, alpha=0.2, lw=0)


def _epoch_means(trace: list[float], steps_per_epoch: int) -> list[float]:
    return [statistics.mean(trace[i:i + steps_per_epoch]) for i in range(0, len(trace), steps_per_epoch)]


def plot(results: dict[str, dict[str, list[dict[str, Any]]]], out: Path, tuned: set[str] = frozenset()) -> list[Path]:
    """``{exp}_curves.png`` (in ``wn`` the tuned learning rates only), ``decouple_dynamics.png``,
    ``wn_lr_sweep.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for exp, variants in results.items():
        if exp == "wn" and tuned:
            variants = {v + " (tuned)": runs for v, runs in variants.items() if v in tuned}
        colors = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.5))
        for i, (variant, runs) in enumerate(variants.items()):
            epochs = list(range(1, len(runs[0]["curve_loss"]) + 1))
            _band(ax_loss, epochs, [r["curve_loss"] for r in runs], colors(i), variant)
            _band(ax_acc, epochs, [r["curve_acc"] for r in runs], colors(i), variant)
        ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log",
                    title=f"{exp}: training loss (mean, band: min–max over seeds)")
        ax_acc.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1.02),
                   title=f"{exp}: test accuracy (mean, band: min–max over seeds)")
        ax_acc.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out / f"{exp}_curves.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    if "decouple" in results:
        variants = {v: runs for v, runs in results["decouple"].items() if runs[0]["angle"]}
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
        for i, (variant, runs) in enumerate(variants.items()):
            spe, ls = runs[0]["steps_per_epoch"], ["-", "--", ":", "-."][i % 4]
            x = [(k + 1) / spe for k in range(len(runs[0]["norm"]))]
            _band(axes[0], x, [r["norm"] for r in runs], f"C{i}", variant, ls)
            _band(axes[1], x, [r["eff_lr"] for r in runs], f"C{i}", variant, ls)
            ep = list(range(1, len(runs[0]["curve_loss"]) + 1))
            _band(axes[2], ep, [_epoch_means(r["angle"], spe) for r in runs], f"C{i}", variant, ls)
        axes[0].set(xlabel="epoch", ylabel="mean channel norm ‖w_i‖", yscale="log",
                    title="weight norm (scale-invariant weights)")
        axes[1].set(xlabel="epoch", ylabel="lr · f / ‖w_i‖²  (channel mean)", yscale="log",
                    title="effective learning rate")
        axes[2].set(xlabel="epoch", ylabel="angle(w_t, w_t+1) per step, rad (epoch mean)", yscale="log",
                    title="angular update per step")
        axes[0].legend(fontsize=8)
        fig.suptitle("decouple: mean over seeds, band = min–max over seeds; "
                     "LR ÷10 (or radius ×√10) at 50% and 75%")
        fig.tight_layout()
        path = out / "decouple_dynamics.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    if "wn" in results:
        methods: dict[str, dict[float, list[float]]] = {}
        for variant, runs in results["wn"].items():
            method, lr = variant.rsplit(", lr ", 1)
            methods.setdefault(method, {})[float(lr)] = [r["test_acc"] for r in runs]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (method, accs) in enumerate(methods.items()):
            lrs = sorted(accs)
            means = [statistics.mean(accs[lr]) for lr in lrs]
            ax.plot(lrs, means, "o-", color=f"C{i}", label=method)
            for lr in lrs:
                ax.scatter([lr] * len(accs[lr]), accs[lr], color=f"C{i}", s=10, alpha=0.5)
        all_lrs = sorted({lr for accs in methods.values() for lr in accs})
        ax.set(xscale="log", xlabel="learning rate", ylabel="final test accuracy", ylim=(0, 1.02),
               title="wn: learning-rate sweep (line: mean; dots: seeds)")
        ax.set_xticks(all_lrs, [f"{lr:g}" for lr in all_lrs])
        ax.minorticks_off()
        ax.legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        path = out / "wn_lr_sweep.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="longer settings: 5 seeds, 15 epochs (decouple 45), width 32, "
                        "the bf16 CNN at input scale 1 too")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3; --full: 5)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 8; --full: 15)")
    parser.add_argument("--decouple-epochs", type=int, default=None,
                        help="epochs of the decouple runs (default 20; --full: 45)")
    parser.add_argument("--width", type=int, default=None, help="CNN base width (default 16; --full: 32)")
    parser.add_argument("--out", default="outputs/reproduce", help="output folder (default ./outputs/reproduce)")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 python-pickle folder; default: sklearn digits")
    parser.add_argument("--image-size", type=int, default=12, help="digits are zero-padded to this size")
    parser.add_argument("--max-train", type=int, default=None, help="use only this many training images")
    parser.add_argument("--shift", type=int, default=2, help="random-shift augmentation, pixels (0: none)")
    parser.add_argument("--experiments", default="bn,half,decouple,wn", help="comma-separated subset")
    parser.add_argument("--wn-lrs", default=None,
                        help="learning rates of the wn sweep (default 0.03,0.1,0.3,1)")
    parser.add_argument("--decouple-wd", type=float, default=5e-3, help="weight decay of the decouple WD scheme")
    parser.add_argument("--decouple-init-scale", type=float, default=0.4,
                        help="the decouple runs' scale-invariant weights start at this × their default init")
    parser.add_argument("--half-dtype", default=None, choices=["bfloat16", "float16"],
                        help="dtype of the pure-half CNN (default: float16 on CUDA, bfloat16 on CPU, whose fp16 "
                        "convolutions are ~50x slower)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per run (default 1; the results depend on it, not on --jobs)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs trained in parallel worker processes (default: min(2, CPU count); 1 on CUDA)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seeds = args.seeds or (5 if args.full else 3)
    epochs = args.epochs or (15 if args.full else 8)
    decouple_epochs = args.decouple_epochs or (45 if args.full else 20)
    width = args.width or (32 if args.full else 16)
    jobs = 1 if device.type == "cuda" else max(1, args.jobs or min(2, os.cpu_count() or 1))
    wn_lrs = tuple(float(v) for v in (args.wn_lrs or ("0.03,0.1,0.3,1"))
                   .split(","))
    half_dtype = args.half_dtype or ("float16" if device.type == "cuda" else "bfloat16")
    chosen = [e.strip() for e in args.experiments.split(",") if e.strip()]
    all_exps = experiments(half_dtype, full=args.full, wn_lrs=wn_lrs, decouple_wd=args.decouple_wd,
                           decouple_init_scale=args.decouple_init_scale)
    unknown = set(chosen) - set(all_exps)
    if unknown:
        parser.error(f"unknown experiments {sorted(unknown)}; choose from {list(all_exps)}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, device, seeds, epochs, decouple_epochs, width, jobs, chosen, all_exps, argv)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, device: torch.device, seeds: int, epochs: int, decouple_epochs: int, width: int,
         jobs: int, chosen: list[str], all_exps: dict[str, list[Config]], argv: list[str] | None) -> Path:
    data_args = (args.data_dir, args.image_size, args.max_train)
    data = load_data(*data_args)
    data = Data(data.name, *(t.to(device) for t in (data.x_train, data.y_train, data.x_test, data.y_test)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{data.name}: {len(data.y_train)} train / {len(data.y_test)} test images of {tuple(data.x_train.shape[1:])}"
          f"; {seeds} seeds × {epochs} epochs (decouple {decouple_epochs}), width {width}, shift ±{args.shift} px; "
          f"torch {torch.__version__}, {device}, {args.threads} thread(s) per run, {jobs} job(s)")

    unique: dict[tuple, Config] = {}
    for exp in chosen:
        for cfg in all_exps[exp]:
            unique.setdefault(cfg.key, cfg)
    tasks = [(cfg, seed, decouple_epochs if cfg.long else epochs) for cfg in unique.values() for seed in range(seeds)]
    tasks.sort(key=lambda t: -t[2])  # the long runs first: the workers finish together
    cache: dict[tuple, dict[str, Any]] = {}
    start = time.perf_counter()
    with _progress(sum(t[2] for t in tasks)) as tick:
        if jobs == 1:
            for cfg, seed, n in tasks:
                cache[(cfg.key, seed)] = train_run(cfg, data, seed, n, width, shift=args.shift)
                tick(n)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                     initargs=(data_args, str(device), args.threads)) as pool:
                futures = {pool.submit(_worker_run, cfg, seed, n, width, args.shift): (cfg, seed, n)
                           for cfg, seed, n in tasks}
                for future in as_completed(futures):
                    cfg, seed, n = futures[future]
                    cache[(cfg.key, seed)] = future.result()
                    tick(n)
    wall = time.perf_counter() - start

    rows, results = [], {}
    for exp in chosen:
        results[exp] = {}
        for cfg in all_exps[exp]:
            for seed in range(seeds):
                r = cache[(cfg.key, seed)]
                results[exp].setdefault(cfg.label, []).append(r)
                rows.append({"experiment": exp, "variant": cfg.label, "seed": seed,
                             "epochs": decouple_epochs if cfg.long else epochs, "dtype": cfg.dtype,
                             "input_scale": cfg.input_scale, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                             "test_acc": r["test_acc"], "train_loss": r["train_loss"], "finite": r["finite"],
                             "final_norm": r["norm"][-1] if r["norm"] else "",
                             "seconds": round(r["seconds"], 1)})
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    dynamics = dynamics_summary(results["decouple"]) if "decouple" in results else []
    command = "python -m examples.reproduce" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    header = (f"`{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
              f"{device}, {args.threads} thread(s) per run, {jobs} job(s): {data.name}, {seeds} seeds × {epochs} "
              f"epochs (decouple {decouple_epochs}), width {width}, random shifts ±{args.shift} px. Test accuracy "
              f"and final training loss (mean over the last epoch): mean ± std over seeds. Training time {wall:.0f} s "
              f"wall.\n\n")
    text = header + markdown(summary)
    if dynamics:
        text += ("\nDecouple dynamics (scale-invariant weights, every channel; phase 1 = before the first LR drop, "
                 "its first and last 25% of steps):\n\n" + markdown(dynamics))
    text += ("\n`← tuned`: in `wn`, the learning rate with the lowest mean final training loss of each method. "
             "`finite runs`: runs whose weights and final loss are finite. An fp16 L2 batch norm whose variance "
             "overflows divides by inf and outputs zeros, not NaN: such runs stay finite and learn nothing (accuracy "
             "of a constant prediction).\n")
    (out / "results.md").write_text(text)
    plots = plot(results, out, set(select_wn_lrs(rows).values()))
    _print_table(summary, "results (mean ± std over seeds)")
    if dynamics:
        _print_table(dynamics, "decouple dynamics (mean ± std over seeds)")
    print(f"training time {wall:.0f} s wall; wrote {out / 'results.csv'}, {out / 'results.md'} and "
          f"{len(plots)} plots to {out.resolve()}")
    return out


class _progress:
    """A rich progress bar when rich is installed, else a line per 10%."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def __enter__(self) -> Callable[[int], None]:
        try:
            from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress("[progress.description]{task.description}", BarColumn(),
                                "{task.completed}/{task.total} epochs", TimeElapsedColumn(), TimeRemainingColumn())
            self.bar.start()
            task = self.bar.add_task("training", total=self.total)
            return lambda n: self.bar.advance(task, n)
        except ImportError:
            self.bar = None

            def tick(n: int) -> None:
                before, self.done = self.done, self.done + n
                if self.done * 10 // self.total != before * 10 // self.total:
                    print(f"training: {self.done}/{self.total} epochs", flush=True)

            return tick

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_table(summary: list[dict[str, str]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in summary[0]:
            table.add_column(c)
        for row in summary:
            table.add_row(*row.values())
        Console(width=160).print(table)
    except ImportError:
        print(title)
        print(markdown(summary))


if __name__ == "__main__":
    main()
