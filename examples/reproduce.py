"""Reproduce the claims of *Norm matters* (Hoffer et al., NeurIPS 2018) on real data, in one command.

    python -m examples.reproduce                  # digits (bundled with scikit-learn): ~2 minutes on 2 CPU cores
    python -m examples.reproduce --full           # more seeds and epochs
    python -m examples.reproduce --data-dir ~/data/cifar-10-batches-py   # CIFAR-10 python pickles (use a GPU)

Four experiments, each with several seeds (mean ± standard deviation over seeds):

1. ``bn``: torch's L2 BatchNorm vs L1 vs top-k L∞ BatchNorm in a small residual CNN (fp32).
2. ``half``: the same norms with every statistic in half precision (``low_precision=True``) and, for L2, a batch
   norm written here that computes its statistics in the input dtype too (:class:`InputDtypeL2BatchNorm`).
   The CNN runs in pure bfloat16; because fp16 convolutions are about 50x slower than fp32 ones on a CPU, the
   fp16 part uses an MLP (Linear + BatchNorm1d) on the flattened images. Both at input scale 1 and 1000.
3. ``decouple``: SGD with weight decay and an LR schedule vs :class:`normdecouple.NormScaledLR` without weight
   decay on the scale-invariant weights vs :class:`normdecouple.WeightNormProjection` with a constant LR and a
   norm schedule (radius × √10 where the LR schedule divides by 10). Plots the effective LR of a few layers.
4. ``wn``: torch's weight normalization (learned g) vs :func:`normdecouple.bounded_weight_norm` vs BatchNorm.

Writes ``results.csv`` (one row per run), ``results.md`` (the summary table) and PNG plots into ``--out``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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


# ---------------------------------------------------------------------------------------------------------- models


class Affine(nn.Module):
    """A per-channel scale and shift: what is left of a BatchNorm layer when weight normalization replaces it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.reshape(shape) + self.bias.reshape(shape)


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


def data_dependent_init(model: nn.Module, x: Tensor) -> None:
    """Weight normalization's data-dependent initialisation (Salimans & Kingma, §3): one forward pass on a batch
    in which each :class:`Affine` layer, in order, sets its scale and shift so its output channels have mean 0 and
    standard deviation 1 on that batch. Used for both weight-norm variants; BatchNorm does this at every step."""

    def hook(module: Affine, inputs: tuple[Tensor]) -> None:
        dims = [0] + list(range(2, inputs[0].dim()))
        mean, std = inputs[0].mean(dims), inputs[0].std(dims)
        module.weight.copy_(1 / (std + 1e-5))
        module.bias.copy_(-mean / (std + 1e-5))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, Affine)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()


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
    """One way of training. ``key`` identifies runs that are the same computation (shared between experiments)."""

    label: str
    model: str = "resnet"  # "resnet" | "mlp"
    norm: str = "l2"  # "l2" (torch) | "l1" | "linf" | "l2-input-dtype" | "torch-wn" | "bounded-wn"
    dtype: str = "float32"
    low_precision: bool = False
    input_scale: float = 1.0
    hook: str = "none"  # "none" | "nslr" | "projection"
    lr: float = 0.1

    @property
    def key(self) -> tuple:
        return (self.model, self.norm, self.dtype, self.low_precision, self.input_scale, self.hook, self.lr)


def experiments(half_dtype: str) -> dict[str, list[Config]]:
    return {
        "bn": [
            Config("L2 (torch BatchNorm2d)"),
            Config("L1", norm="l1"),
            Config("top-k L∞ (k=8)", norm="linf"),
        ],
        "half": [
            *(Config(f"CNN {half_dtype} ×{s:g}: {lab}", norm=n, dtype=half_dtype, low_precision=True, input_scale=s)
              for s in (1.0, 1000.0)
              for lab, n in (("L2 (input dtype)", "l2-input-dtype"), ("L1", "l1"), ("L∞ k=8", "linf"))),
            *(Config(f"MLP float16 ×{s:g}: {lab}", model="mlp", norm=n, dtype="float16", low_precision=True,
                     input_scale=s)
              for s in (1.0, 1000.0)
              for lab, n in (("L2 (input dtype)", "l2-input-dtype"), ("L1", "l1"), ("L∞ k=8", "linf"))),
        ],
        "decouple": [
            Config("SGD + weight decay, LR steps"),
            Config("NormScaledLR, no WD, LR steps", hook="nslr"),
            Config("Projection, no WD, norm steps", hook="projection"),
        ],
        "wn": [  # lr 0.1 is the BatchNorm recipe of the other experiments; lr 0.02 for all three as well
            *(Config(f"{lab}, lr {lr:g}", norm=n, lr=lr)
              for lr in (0.1, 0.02)
              for lab, n in (("BatchNorm (L2)", "l2"), ("torch weight_norm (learned g)", "torch-wn"),
                             ("bounded_weight_norm", "bounded-wn"))),
        ],
    }


def build_model(cfg: Config, data: Data, width: int) -> nn.Module:
    if cfg.model == "mlp":
        model = make_mlp(data.x_train[0].numel(), data.classes)
    elif cfg.norm in ("torch-wn", "bounded-wn"):
        model = ResNet(data.channels, data.classes, width, norm=Affine)
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


def train_run(cfg: Config, data: Data, seed: int, epochs: int, width: int, batch_size: int = 64,
              weight_decay: float = 5e-4, tick: Callable[[], None] = lambda: None) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build_model(cfg, data, width)
    dtype = getattr(torch, cfg.dtype)
    x_train = (data.x_train * cfg.input_scale).to(dtype)
    x_test = (data.x_test * cfg.input_scale).to(dtype)
    example = x_train[:batch_size]
    if cfg.norm in ("torch-wn", "bounded-wn"):
        data_dependent_init(model, x_train[: batch_size * 4])
    invariant: list[str] = []
    if cfg.model == "resnet" and cfg.norm not in ("torch-wn", "bounded-wn"):
        invariant = nd.scale_invariant_parameters(model, example)
    named = dict(model.named_parameters())
    decoupled = set(invariant) if cfg.hook != "none" else set()
    groups = [
        {"params": [p for n, p in named.items() if n not in decoupled], "weight_decay": weight_decay},
        {"params": [named[n] for n in sorted(decoupled)], "weight_decay": 0.0},
    ]
    opt = torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=0.9)
    hook: Any = None
    if cfg.hook == "nslr":
        hook = nd.NormScaledLR(opt, sorted(decoupled), reference="init", model=model)
    elif cfg.hook == "projection":
        hook = nd.WeightNormProjection(opt, sorted(decoupled), radius="init", model=model)
    drops = lr_drops(epochs)
    # A few scale-invariant weights to follow: the first, one in the middle, the last.
    tracked = [invariant[0], invariant[len(invariant) // 2], invariant[-1]] if invariant else []
    tracked = list(dict.fromkeys(tracked))
    gen = torch.Generator().manual_seed(seed)
    curve_loss, curve_acc, eff_lr = [], [], {n: [] for n in tracked}
    start = time.perf_counter()
    for epoch in range(epochs):
        if epoch in drops:
            if cfg.hook == "projection":
                hook.scale_radius(10 ** 0.5)  # the norm schedule replaces the LR schedule
            else:
                for g in opt.param_groups:
                    g["lr"] /= 10
        model.train()
        losses = []
        for batch in torch.randperm(len(data.y_train), generator=gen).split(batch_size):
            if len(batch) < 2:
                continue
            loss = nn.functional.cross_entropy(model(x_train[batch]).float(), data.y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            with torch.no_grad():
                for n in tracked:  # effective LR of the direction: lr · (step factor) / ‖w_i‖², channel mean
                    w = named[n].detach().float().flatten(1)
                    sq = w.square().sum(1)
                    factor = sq / hook.references[n].square() if cfg.hook == "nslr" else 1.0
                    eff_lr[n].append((opt.param_groups[0]["lr"] * factor / sq).mean().item())
        curve_loss.append(sum(losses) / max(len(losses), 1))
        curve_acc.append(evaluate(model, x_test, data.y_test, batch_size * 4))
        tick()
    finite = all(torch.isfinite(p).all().item() for p in model.parameters()) and math.isfinite(curve_loss[-1])
    return {"test_acc": curve_acc[-1], "train_loss": curve_loss[-1], "finite": finite,
            "seconds": time.perf_counter() - start, "curve_loss": curve_loss, "curve_acc": curve_acc,
            "eff_lr": eff_lr}


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    model.eval()
    with torch.no_grad():
        pairs = zip(x.split(batch_size), y.split(batch_size))
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in pairs)
    return correct / len(y)


# -------------------------------------------------------------------------------------------------------- reports


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    table: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        table.setdefault((r["experiment"], r["variant"]), []).append(r)
    out = []
    for (exp, variant), runs in table.items():
        out.append({
            "experiment": exp, "variant": variant,
            "test accuracy": mean_std([r["test_acc"] for r in runs]),
            "final train loss": mean_std([r["train_loss"] for r in runs]) if all(
                math.isfinite(r["train_loss"]) for r in runs) else "nan/inf",
            "finite runs": f"{sum(bool(r['finite']) for r in runs)}/{len(runs)}",
            "s/run": f"{statistics.mean(r['seconds'] for r in runs):.1f}",
        })
    return out


def markdown(summary: list[dict[str, str]]) -> str:
    cols = list(summary[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row[c] for c in cols) + " |" for row in summary]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, list[dict[str, Any]]]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for exp, variants in results.items():
        colors = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
        for variant, runs in variants.items():
            for i, r in enumerate(runs):
                epochs = range(1, len(r["curve_loss"]) + 1)
                kw = {"label": variant if i == 0 else None, "color": colors(list(variants).index(variant)),
                      "alpha": 0.8}
                ax_loss.plot(epochs, r["curve_loss"], **kw)
                ax_acc.plot(epochs, r["curve_acc"], **kw)
        ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title=f"{exp}: training loss (each seed)")
        ax_acc.set(xlabel="epoch", ylabel="test accuracy", title=f"{exp}: test accuracy (each seed)")
        ax_acc.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{exp}_curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    if "decouple" in results:
        variants = results["decouple"]
        fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 4), sharey=True, squeeze=False)
        for ax, (variant, runs) in zip(axes[0], variants.items()):
            for j, (name, trace) in enumerate(runs[0]["eff_lr"].items()):
                ax.plot(trace, label=name, color=f"C{j}")
            ax.set(title=variant, xlabel="step", yscale="log")
        axes[0][0].set_ylabel("effective LR  lr·f/‖w_i‖² (channel mean)")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out / "decouple_effective_lr.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="longer settings: 5 seeds, 30 epochs, width 32")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3; --full: 5)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 8; --full: 30)")
    parser.add_argument("--width", type=int, default=None, help="CNN base width (default 16; --full: 32)")
    parser.add_argument("--out", default="outputs/reproduce", help="output folder (default ./outputs/reproduce)")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 python-pickle folder; default: sklearn digits")
    parser.add_argument("--image-size", type=int, default=12, help="digits are zero-padded to this size")
    parser.add_argument("--max-train", type=int, default=None, help="use only this many training images")
    parser.add_argument("--experiments", default="bn,half,decouple,wn", help="comma-separated subset")
    parser.add_argument("--half-dtype", default=None, choices=["bfloat16", "float16"],
                        help="dtype of the pure-half CNN (default: float16 on CUDA, bfloat16 on CPU, whose fp16 "
                        "convolutions are ~50x slower)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; use 1 on a machine busy with other work)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seeds = args.seeds or (5 if args.full else 3)
    epochs = args.epochs or (30 if args.full else 8)
    width = args.width or (32 if args.full else 16)
    half_dtype = args.half_dtype or ("float16" if device.type == "cuda" else "bfloat16")
    chosen = [e.strip() for e in args.experiments.split(",") if e.strip()]
    all_exps = experiments(half_dtype)
    unknown = set(chosen) - set(all_exps)
    if unknown:
        parser.error(f"unknown experiments {sorted(unknown)}; choose from {list(all_exps)}")
    data = load_cifar10(args.data_dir, args.max_train) if args.data_dir else load_digits_data(args.image_size,
                                                                                               args.max_train)
    data = Data(data.name, *(t.to(device) for t in (data.x_train, data.y_train, data.x_test, data.y_test)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{data.name}: {len(data.y_train)} train / {len(data.y_test)} test images of {tuple(data.x_train.shape[1:])}"
          f"; {seeds} seeds × {epochs} epochs, width {width}; torch {torch.__version__}, "
          f"{device}, {torch.get_num_threads()} CPU threads")

    unique: dict[tuple, Config] = {}
    for exp in chosen:
        for cfg in all_exps[exp]:
            unique.setdefault(cfg.key, cfg)
    total = len(unique) * seeds * epochs
    cache: dict[tuple, dict[str, Any]] = {}
    start = time.perf_counter()
    with _progress(total) as tick:
        for cfg in unique.values():
            for seed in range(seeds):
                cache[(cfg.key, seed)] = train_run(cfg, data, seed, epochs, width, tick=tick)
    wall = time.perf_counter() - start

    rows, results = [], {}
    for exp in chosen:
        results[exp] = {}
        for cfg in all_exps[exp]:
            for seed in range(seeds):
                r = cache[(cfg.key, seed)]
                results[exp].setdefault(cfg.label, []).append(r)
                rows.append({"experiment": exp, "variant": cfg.label, "seed": seed, "epochs": epochs,
                             "dtype": cfg.dtype, "input_scale": cfg.input_scale, "lr": cfg.lr,
                             "test_acc": r["test_acc"],
                             "train_loss": r["train_loss"], "finite": r["finite"], "seconds": r["seconds"]})
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    table = markdown(summary)
    command = "python -m examples.reproduce" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    header = (f"`{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
              f"{device}: {data.name}, {seeds} seeds × {epochs} epochs, width {width}. Test accuracy and final "
              f"training loss: mean ± std over seeds. Training time {wall:.0f} s.\n\n")
    footer = ("\n`finite runs`: runs whose weights and final loss are finite. An fp16 L2 batch norm whose variance "
              "overflows divides by inf and outputs zeros, not NaN: such runs stay finite and learn nothing (accuracy "
              "of a constant prediction).\n")
    (out / "results.md").write_text(header + table + footer)
    plots = plot(results, out)
    _print_table(summary)
    print(f"training time {wall:.0f} s; wrote {out / 'results.csv'}, {out / 'results.md'} and "
          f"{len(plots)} plots to {out.resolve()}")
    return out


class _progress:
    """A rich progress bar when rich is installed, else a line per 10%."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def __enter__(self) -> Callable[[], None]:
        try:
            from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress("[progress.description]{task.description}", BarColumn(),
                                "{task.completed}/{task.total} epochs", TimeElapsedColumn(), TimeRemainingColumn())
            self.bar.start()
            task = self.bar.add_task("training", total=self.total)
            return lambda: self.bar.advance(task)
        except ImportError:
            self.bar = None

            def tick() -> None:
                self.done += 1
                if self.done * 10 // self.total != (self.done - 1) * 10 // self.total:
                    print(f"training: {self.done}/{self.total} epochs", flush=True)

            return tick

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_table(summary: list[dict[str, str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="results (mean ± std over seeds)")
        for c in summary[0]:
            table.add_column(c)
        for row in summary:
            table.add_row(*row.values())
        Console(width=140).print(table)
    except ImportError:
        print(markdown(summary))


if __name__ == "__main__":
    main()
