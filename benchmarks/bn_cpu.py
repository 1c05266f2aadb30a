"""Forward+backward time of L1 and L∞ BatchNorm relative to torch.nn.BatchNorm2d on the CPU.

Targets (issue "Core"): eager <= 1.5x torch's BatchNorm (goal 1.0x); compiled (torch.compile of our layer)
<= 0.6x torch's eager BatchNorm. Times are medians over interleaved repeats (every variant runs once per
round, in rotating order), so machine noise hits all variants alike; only the ratios are meaningful.

    python benchmarks/bn_cpu.py            # the full table (a few minutes on 2 cores, mostly compilation)
    python benchmarks/bn_cpu.py --quick    # two shapes, eager only
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import normdecouple as nd

# ResNet-like (N, C, H, W), the batch scaled down for a CPU.
SHAPES = [(16, 64, 56, 56), (16, 128, 28, 28), (16, 256, 14, 14), (16, 512, 7, 7), (64, 64, 16, 16)]
QUICK_SHAPES = [(16, 64, 56, 56), (16, 256, 14, 14)]


def variants(channels: int) -> dict[str, nn.Module]:
    return {
        "torch BN": nn.BatchNorm2d(channels),
        "L1": nd.L1BatchNorm2d(channels),
        "Linf k=1": nd.LinfBatchNorm2d(channels, k=1),
        "Linf k=8": nd.LinfBatchNorm2d(channels, k=8),
    }


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    x = x.detach().requires_grad_()
    start = time.perf_counter()
    module(x).backward(grad)
    return time.perf_counter() - start


def measure(modules: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int) -> dict[str, float]:
    grad = torch.randn_like(x)
    names = list(modules)
    for _ in range(warmup):
        for name in names:
            fwd_bwd(modules[name], x, grad)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in order:
            times[name].append(fwd_bwd(modules[name], x, grad))
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, eager only")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 256
    shapes = QUICK_SHAPES if args.quick else SHAPES
    compile_too = not (args.quick or args.no_compile)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median of {args.repeats} "
          "interleaved fwd+bwd repeats; ratio = time / torch.nn.BatchNorm2d eager time (same shape and layout)")
    header = f"{'shape':<18}{'layout':<8}{'mode':<10}" + "".join(f"{n:>11}" for n in variants(1)) + f"{'BN ms':>9}"
    print(header)
    print("-" * len(header))
    for shape in shapes:
        for layout in ("NCHW", "NHWC"):
            x = torch.randn(shape)
            if layout == "NHWC":
                x = x.to(memory_format=torch.channels_last)
            eager = variants(shape[1])
            eager_times = measure(eager, x, args.repeats, warmup=2)
            base = eager_times["torch BN"]
            rows = [("eager", eager_times)]
            if compile_too:
                compiled = {name: torch.compile(m, dynamic=False) for name, m in variants(shape[1]).items()}
                rows.append(("compiled", measure(compiled, x, args.repeats, warmup=2)))
            for mode, times in rows:
                ratios = "".join(f"{times[n] / base:>10.2f}x" for n in times)
                print(f"{str(shape):<18}{layout:<8}{mode:<10}{ratios}{base * 1e3:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
