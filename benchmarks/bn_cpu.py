"""CPU time of L1 and L∞ BatchNorm relative to torch.nn.BatchNorm2d: single layers and a whole training step.

Three tables, every ratio against torch's layer measured in the same run:

1. One layer, forward+backward, float32, at ResNet shapes (NCHW and channels_last); the geometric mean of the
   eager ratios over all rows. Target (issue 13): <= 1.5x (goal 1.0x). ``--compile`` adds rows for
   ``torch.compile`` of each layer (slow: minutes of compilation).
2. A whole training step (forward, cross-entropy, backward, SGD with momentum) of a ResNet-18-shaped model built
   here (BasicBlocks [2, 2, 2, 2], widths 64-512) in float32, every BatchNorm2d replaced by ours.
   Targets: L1 <= 1.05x, L∞ k=8 <= 1.10x.
3. The same step with the model and input in bfloat16, our layers with ``low_precision=True`` (statistics
   computed in bfloat16) against torch's BatchNorm2d in bfloat16. Target: <= 1.25x.

Times are medians over interleaved repeats (every variant runs once per round, in rotating order), so machine
noise hits all variants alike; only the ratios are meaningful. Record ``uptime``'s load with every table.

    python benchmarks/bn_cpu.py                # all three tables, eager (a few minutes on 2 cores)
    python benchmarks/bn_cpu.py --quick        # two shapes, fewer repeats
    python benchmarks/bn_cpu.py --threads 1    # one intra-op thread (steadier on a shared machine)
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import torch
from torch import nn

import normdecouple as nd
from timing import interleaved_medians  # benchmarks/timing.py, next to this script

# ResNet-like (N, C, H, W), the batch scaled down for a CPU.
SHAPES = [(16, 64, 56, 56), (16, 128, 28, 28), (16, 256, 14, 14), (16, 512, 7, 7), (64, 64, 16, 16)]
QUICK_SHAPES = [(16, 64, 56, 56), (16, 256, 14, 14)]

LAYER_TARGET, L1_STEP_TARGET, LINF_STEP_TARGET, BF16_STEP_TARGET = 1.5, 1.05, 1.10, 1.25


def variants(channels: int) -> dict[str, nn.Module]:
    return {
        "torch BN": nn.BatchNorm2d(channels),
        "L1": nd.L1BatchNorm2d(channels),
        "Linf k=1": nd.LinfBatchNorm2d(channels, k=1),
        "Linf k=8": nd.LinfBatchNorm2d(channels, k=8),
    }


def layer_run(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, inner: int = 1) -> Callable[[], float]:
    """One sample: ``inner`` forward+backward passes in a row (a sample of a few ms is at the mercy of one
    preemption on a shared machine; ~20 ms samples average over it), returned per pass."""
    def run() -> float:
        start = time.perf_counter()
        for _ in range(inner):
            module(x.detach().requires_grad_()).backward(grad)
        return (time.perf_counter() - start) / inner
    return run


def resnet18_shaped(norm_layer: Callable[[int], nn.Module], num_classes: int = 10) -> nn.Module:
    """ResNet-18's layer shapes (torchvision's layout, written out so that no torchvision is needed)."""

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = norm_layer(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = norm_layer(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + (x if self.downsample is None else self.downsample(x)))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), norm_layer(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def step_run(norm_layer: Callable[[int], nn.Module], x: torch.Tensor, target: torch.Tensor) -> Callable[[], float]:
    torch.manual_seed(1)  # the same convolution weights in every variant
    model = resnet18_shaped(norm_layer).to(x.dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def run() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start
    return run


def step_variants(low_precision: bool) -> dict[str, Callable[[int], nn.Module]]:
    return {
        "torch BN": nn.BatchNorm2d,
        "L1": lambda c: nd.L1BatchNorm2d(c, low_precision=low_precision),
        "Linf k=8": lambda c: nd.LinfBatchNorm2d(c, k=8, low_precision=low_precision),
    }


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def layer_table(shapes: list[tuple[int, ...]], repeats: int, compile_too: bool) -> None:
    print(f"\n1. One layer, forward+backward, float32, median of {repeats} interleaved samples of ~20 ms; "
          "ratio = time / torch.nn.BatchNorm2d eager (same shape and layout)")
    header = f"{'shape':<18}{'layout':<8}{'mode':<10}" + "".join(f"{n:>11}" for n in variants(1)) + f"{'BN ms':>9}"
    print(header)
    print("-" * len(header))
    eager_ratios: dict[str, list[float]] = {name: [] for name in variants(1)}
    for shape in shapes:
        for layout in ("NCHW", "NHWC"):
            x = torch.randn(shape)
            if layout == "NHWC":
                x = x.to(memory_format=torch.channels_last)
            grad = torch.randn_like(x)
            probe = layer_run(nn.BatchNorm2d(shape[1]), x, grad)
            inner = max(1, round(0.02 / min(probe() for _ in range(3))))
            runs = {name: layer_run(m, x, grad, inner) for name, m in variants(shape[1]).items()}
            eager = interleaved_medians(runs, repeats, warmup=2)
            base = eager["torch BN"]
            for name, t in eager.items():
                eager_ratios[name].append(t / base)
            rows = [("eager", eager)]
            if compile_too:
                compiled = {name: layer_run(torch.compile(m, dynamic=False), x, grad)
                            for name, m in variants(shape[1]).items()}
                rows.append(("compiled", interleaved_medians(compiled, repeats, warmup=2)))
            for mode, times in rows:
                ratios = "".join(f"{times[n] / base:>10.2f}x" for n in times)
                print(f"{str(shape):<18}{layout:<8}{mode:<10}{ratios}{base * 1e3:>9.2f}", flush=True)
    means = "".join(f"{geomean(r):>10.2f}x" for r in eager_ratios.values())
    print(f"{'geomean (eager)':<36}{means}   target <= {LAYER_TARGET}x (goal 1.0x)")


def step_table(batch: int, size: int, repeats: int) -> None:
    print(f"\n2./3. Training step of a ResNet-18-shaped model, input ({batch}, 3, {size}, {size}), SGD(momentum=0.9), "
          f"median of {repeats} interleaved repeats; ratio = time / the same step with torch.nn.BatchNorm2d")
    header = f"{'dtype':<10}{'our layers':<22}" + "".join(f"{n:>11}" for n in step_variants(False)) + \
        f"{'BN ms':>9}   targets"
    print(header)
    print("-" * len(header))
    for dtype, low_precision, targets in (
        (torch.float32, False, f"L1 <= {L1_STEP_TARGET}x, Linf k=8 <= {LINF_STEP_TARGET}x"),
        (torch.bfloat16, True, f"both <= {BF16_STEP_TARGET}x"),
    ):
        torch.manual_seed(0)
        x = torch.randn(batch, 3, size, size).to(dtype)
        target = torch.randint(0, 10, (batch,))
        runs = {name: step_run(layer, x, target) for name, layer in step_variants(low_precision).items()}
        times = interleaved_medians(runs, repeats, warmup=2)
        base = times["torch BN"]
        ratios = "".join(f"{times[n] / base:>10.2f}x" for n in times)
        kind = "low_precision=True" if low_precision else "default"
        print(f"{str(dtype).removeprefix('torch.'):<10}{kind:<22}{ratios}{base * 1e3:>9.1f}   {targets}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two layer shapes, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per table (default 15, quick 7)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows to the layer table")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--step-batch", type=int, default=16)
    parser.add_argument("--step-size", type=int, default=112, help="input height and width of the step")
    parser.add_argument("--only", choices=("layers", "step"), default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (7 if args.quick else 15)
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 256
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average at start "
          + ", ".join(f"{v:.2f}" for v in load))
    if args.only != "step":
        layer_table(QUICK_SHAPES if args.quick else SHAPES, repeats, args.compile)
    if args.only != "layers":
        step_table(args.step_batch, args.step_size, max(5, repeats // 2 if args.quick else repeats))
    if load:
        print("load average at end " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
