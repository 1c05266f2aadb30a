"""Memory saved for the backward, and forward+backward time, of BatchNorm + ReLU: fused (ours) against torch's.

Saved bytes are counted exactly: every tensor that autograd saves during the forward passes through
``torch.autograd.graph.saved_tensors_hooks``; the table sums the sizes of the distinct storages among them
("activations": parameters excluded; "all": with them). A tensor saved by two layers (a ReLU's output that the
next convolution keeps too) counts once, as in real memory. Times are medians of interleaved forward+backward
repeats (every variant once per round, rotating order): only ratios within one run mean anything.

(a) a chain of 8 conv -> BN -> ReLU blocks (target: fused <= 0.56x torch's activations);
(b) a ResNet-50-shaped bottleneck network built with the fused layers, the last BatchNorm of each block in the
    residual form ``act(BN(x) + identity)`` and the downsampling BatchNorm fused with the identity activation
    (target <= 0.55x);
(c) the same network built with torch's modules, converted by ``convert_batchnorm`` and fused by
    ``normdecouple.fuse.fuse_activations`` (followed forwards; residual blocks rewritten): what it fuses and the
    ratio;
(d) Hugging Face ``transformers`` ResNet-50 (``ResNetConfig()``, random weights, no download), and
(e) MobileNetV2 (``MobileNetV2Config()``): the original model, ``convert_batchnorm(model, "l1")`` (unfused) and
    ``convert_batchnorm(model, "l1", fuse_activation=True, example_inputs=...)`` (one call). Bytes against the
    original model, time against the unfused converted model (target for ResNet-50: <= 0.60x the original's
    activation bytes, time no worse than unfused). Needs ``pip install ".[bench]"`` (transformers).

    python benchmarks/memory.py --device cpu            # a few minutes on 2 CPU cores
    python benchmarks/memory.py --device cpu --quick    # smaller inputs, fewer repeats
    python benchmarks/memory.py --device cpu --threads 1  # steadier times on a shared machine
    python benchmarks/memory.py --device cpu --threads 1 --only hf --hf-batch 8 --hf-size 224
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

import normdecouple as nd
from timing import interleaved_medians  # benchmarks/timing.py, next to this script
from normdecouple.fuse import fuse_activations, fusion_plan

# Bottleneck stages of ResNet-50: (width, blocks, stride); output channels = 4 * width.
RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(activation bytes, all bytes) of the distinct storages autograd saves in one forward of ``model``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.detach().requires_grad_())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(n for ptr, n in storages.items() if ptr not in params)
    return activations, sum(storages.values())


def fwd_bwd_run(model: nn.Module, x: torch.Tensor) -> Callable[[], float]:
    grad: list[torch.Tensor] = []

    def run() -> float:
        xi = x.detach().requires_grad_()
        start = time.perf_counter()
        y = model(xi)
        if not grad:
            grad.append(torch.randn_like(y))
        y.backward(grad[0])
        return time.perf_counter() - start
    return run


# ---------------------------------------------------------------------------------------------------------
# (a) the chain


def chain(kind: str, channels: int, blocks: int = 8) -> nn.Module:
    layers: list[nn.Module] = []
    cin = 3
    for _ in range(blocks):
        layers.append(nn.Conv2d(cin, channels, 3, padding=1, bias=False))
        if kind == "torch":
            layers += [nn.BatchNorm2d(channels), nn.ReLU()]
        elif kind == "l1":
            layers += [nd.L1BatchNorm2d(channels), nn.ReLU()]
        elif kind == "linf":
            layers += [nd.LinfBatchNorm2d(channels, k=4), nn.ReLU()]
        elif kind == "l1 fused":
            layers.append(nd.L1BatchNormAct2d(channels))
        elif kind == "linf fused":
            layers.append(nd.LinfBatchNormAct2d(channels, k=4))
        cin = channels
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------------------
# (b) and (c): ResNet-50-shaped bottleneck networks


class TorchBottleneck(nn.Module):
    """torch's modules, one activation module per use (timm's layout), so the converter can fuse bn1 and bn2."""

    def __init__(self, cin: int, width: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1, self.act1 = nn.Conv2d(cin, width, 1, bias=False), norm(width), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), norm(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), norm(cout)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.act3(self.bn3(self.conv3(out)) + identity)


class FusedBottleneck(nn.Module):
    """The fused layers: ``act(BN(conv3(out)) + identity)`` in one layer; the downsampling BatchNorm fused with
    the identity activation, so that its output (the residual, which bn3 keeps) is the only tensor it saves."""

    def __init__(self, cin: int, width: int, stride: int, fused: Callable[..., nn.Module]):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), fused(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), fused(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), fused(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            fused(cout, activation="identity"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        return self.bn3(self.conv3(out), identity)


def resnet50_shaped(block: Callable[[int, int, int], nn.Module], stem_norm: nn.Module, stem_act: nn.Module,
                    num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), stem_norm, stem_act, nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in RESNET50_STAGES:
        for i in range(blocks):
            layers.append(block(cin, width, stride if i == 0 else 1))
            cin = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def resnet(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "torch":
        return resnet50_shaped(lambda c, w, s: TorchBottleneck(c, w, s, nn.BatchNorm2d), nn.BatchNorm2d(64),
                               nn.ReLU(inplace=True))
    if kind == "l1":
        return resnet50_shaped(lambda c, w, s: TorchBottleneck(c, w, s, nd.L1BatchNorm2d), nd.L1BatchNorm2d(64),
                               nn.ReLU(inplace=True))
    fused_cls = {"l1 fused": nd.L1BatchNormAct2d, "linf fused": nd.LinfBatchNormAct2d}[kind]
    kwargs = {} if fused_cls is nd.L1BatchNormAct2d else {"k": 4}
    fused = lambda c, **kw: fused_cls(c, **kwargs, **kw)  # noqa: E731
    return resnet50_shaped(lambda c, w, s: FusedBottleneck(c, w, s, fused), fused(64), nn.Identity())


# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# (d) and (e): Hugging Face models


class Logits(nn.Module):
    """A transformers image classifier returning its logits (a tensor to backpropagate from)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


class _Summary(logging.Handler):
    """Keeps the one-line summary that ``convert_batchnorm(..., fuse_activation=True)`` logs at INFO."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def hf_models(name: str, x: torch.Tensor) -> tuple[dict[str, nn.Module], str, float]:
    """The original model, converted (unfused) and converted + fused by the one call; the summary that call
    logged and how long it took."""
    import transformers

    torch.manual_seed(2)
    if name == "resnet50":
        original = transformers.ResNetForImageClassification(transformers.ResNetConfig())
    else:
        original = transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config())
    original = Logits(original).to(x.device).train()
    unfused = nd.convert_batchnorm(copy.deepcopy(original), "l1")
    handler = _Summary()
    logger = logging.getLogger("normdecouple.fuse")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        fused = nd.convert_batchnorm(copy.deepcopy(original), "l1", fuse_activation=True, example_inputs=(x,))
    finally:
        logger.removeHandler(handler)
    took = time.perf_counter() - start
    models = {"original (torch BN)": original, "L1 converted (unfused)": unfused, "L1 converted + fused": fused}
    return models, " ".join(handler.messages), took


def table(title: str, models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int,
          baseline: str = "torch", time_baseline: str | None = None) -> list[str]:
    memory = {name: saved_bytes(m, x) for name, m in models.items()}
    times = interleaved_medians({name: fwd_bwd_run(m, x) for name, m in models.items()}, repeats, warmup)
    time_baseline = time_baseline or baseline
    base_act, base_all = memory[baseline]
    lines = [title, f"{'variant':<28}{'activations MiB':>16}{'ratio':>8}{'all MiB':>10}{'ratio':>8}"
             f"{'fwd+bwd ms':>12}{'ratio':>8}", "-" * 90]
    for name in models:
        act, total = memory[name]
        lines.append(f"{name:<28}{act / 2**20:>16.2f}{act / base_act:>7.3f}x{total / 2**20:>10.2f}"
                     f"{total / base_all:>7.3f}x{times[name] * 1e3:>12.1f}"
                     f"{times[name] / times[time_baseline]:>7.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (1 gives steadier times on a shared machine)")
    parser.add_argument("--only", choices=("all", "synthetic", "hf"), default="all",
                        help="synthetic: tables (a)-(c); hf: the transformers models (d), (e)")
    parser.add_argument("--hf-batch", type=int, default=8)
    parser.add_argument("--hf-size", type=int, default=224)
    parser.add_argument("--hf-repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = 1

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, device {device}; "
          f"median of interleaved fwd+bwd repeats")
    print()
    if args.only in ("all", "synthetic"):
        synthetic(device, args.quick, repeats, warmup)
    if args.only in ("all", "hf"):
        hugging_face(device, args.hf_batch if not args.quick else 2, args.hf_size if not args.quick else 96,
                     args.hf_repeats if not args.quick else 2, warmup)


def synthetic(device: torch.device, quick: bool, repeats: int, warmup: int) -> None:
    print(f"(a)-(c): {repeats} repeats ({max(3, repeats // 2)} for (b, c)); ratios against torch's BatchNorm + ReLU")

    batch, size, channels = (4, 16, 32) if quick else (8, 32, 32)
    x = torch.randn(batch, 3, size, size, device=device)
    models = {kind: chain(kind, channels).to(device) for kind in ("torch", "l1", "l1 fused", "linf", "linf fused")}
    names = {"torch": "torch BN + ReLU", "l1": "L1 + ReLU (unfused)", "l1 fused": "L1BatchNormAct2d",
             "linf": "Linf k=4 + ReLU (unfused)", "linf fused": "LinfBatchNormAct2d k=4"}
    lines = table(f"(a) 8 x (conv3x3 -> BN -> ReLU), input {tuple(x.shape)}, {channels} channels",
                  {names[k]: m for k, m in models.items()}, x, repeats, warmup, baseline=names["torch"])
    print("\n".join(lines), end="\n\n")

    batch, size = (2, 64) if quick else (4, 96)
    x = torch.randn(batch, 3, size, size, device=device)
    kinds = {"torch": "torch BN + ReLU", "l1": "L1 + ReLU (unfused)", "l1 fused": "L1BatchNormAct2d (+res)",
             "linf fused": "LinfBatchNormAct2d k=4 (+res)"}
    models = {label: resnet(kind).to(device) for kind, label in kinds.items()}
    converted = nd.convert_batchnorm(resnet("torch"), norm="l1").to(device)
    fuse_activations(converted, x)
    models["(c) torch -> convert + fuse"] = converted
    lines = table(f"(b, c) ResNet-50-shaped bottleneck network, input {tuple(x.shape)}",
                  models, x, max(3, repeats // 2), warmup, baseline=kinds["torch"])
    print("\n".join(lines))
    print(f"(c) {fusion_plan(converted, x).summary()}")
    print()


def hugging_face(device: torch.device, batch: int, size: int, repeats: int, warmup: int) -> None:
    x = torch.randn(batch, 3, size, size, device=device)
    for label, name in (("(d) transformers ResNet-50", "resnet50"), ("(e) transformers MobileNetV2", "mobilenet")):
        models, summary, setup = hf_models(name, x)
        lines = table(f"{label}, input {tuple(x.shape)}, {repeats} repeats; bytes against the original, time "
                      f"against the unfused converted model", models, x, repeats, warmup,
                      baseline="original (torch BN)", time_baseline="L1 converted (unfused)")
        print("\n".join(lines))
        print(f"logged by the call: {summary}")
        print(f"convert_batchnorm(..., fuse_activation=True, example_inputs=(x,)) took {setup:.1f} s (tracing, "
              f"followed forwards and the checks of the rewritten forwards on x)")
        print()
        del models


if __name__ == "__main__":
    main()
