"""GPU times of the Triton L1/L∞ BatchNorm against cuDNN's BatchNorm2d, the same math under torch.compile, and
the paper's eager formulation; plus achieved bandwidth as a fraction of a measured device-to-device copy.

Targets (issue 3): forward+backward <= 1.0x torch.nn.BatchNorm2d (cuDNN) at every large shape, and >= 80% of
copy bandwidth on the largest. Each variant is timed with CUDA events around every call, after warm-up (which
also compiles), over inputs rotated from a pool larger than the L2 cache, and the median is reported.

    python benchmarks/bn_gpu.py                    # the full table (ResNet-50 shapes, fp32/bf16/fp16, NCHW/NHWC)
    python benchmarks/bn_gpu.py --quick            # two shapes, bf16, both layouts, no torch.compile
    python benchmarks/bn_gpu.py --dtypes fp32 --layouts NCHW --shapes 256x64x56x56

Columns: fwd / bwd / f+b are medians in ms; "x cuDNN" is f+b over cuDNN's f+b for the same shape, dtype and
layout; "%copy" is the minimal traffic of f+b (read x, write y; read x and dy, write dx: 5 tensors) per second
as a fraction of the copy bandwidth (read + write per second) measured on this device.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable

import torch
from torch import nn

import normdecouple as nd
from normdecouple._constants import L1_SCALE

# ResNet-50 BatchNorm inputs at batch 256, then small-channel / large-spatial ones (stems, segmentation heads).
SHAPES = [
    (256, 64, 56, 56),
    (256, 256, 56, 56),
    (256, 512, 28, 28),
    (256, 2048, 7, 7),
    (64, 16, 224, 224),
    (32, 3, 512, 512),
    (16, 32, 256, 256),
]
QUICK_SHAPES = [(256, 64, 56, 56), (256, 2048, 7, 7)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Inputs rotate through a pool of at least this many bytes, so that no call finds its input in the L2 cache.
ROTATION_BYTES = 512 * 2**20


class PaperL1BatchNorm(nn.Module):
    """The paper's eager formulation (norm_matters' L1 BN, training mode): plain tensor ops, autograd backward."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        mean = flat.mean(-1)
        centered = x - mean.view(1, -1, 1, 1)
        scale = (flat - mean[:, None]).abs().mean(-1) * L1_SCALE
        out = centered / (scale.view(1, -1, 1, 1) + self.eps)
        # Parameters in the input's dtype, as in a half-precision model of the paper's code.
        return out * self.weight.to(x.dtype).view(1, -1, 1, 1) + self.bias.to(x.dtype).view(1, -1, 1, 1)


def variants(channels: int, compile_too: bool) -> dict[str, nn.Module]:
    modules: dict[str, nn.Module] = {
        "cuDNN BN": nn.BatchNorm2d(channels),
        "triton L1": nd.L1BatchNorm2d(channels, backend="triton"),
        "triton Linf": nd.LinfBatchNorm2d(channels, backend="triton"),
        "triton Linf k8": nd.LinfBatchNorm2d(channels, k=8, backend="triton"),
        "paper L1 eager": PaperL1BatchNorm(channels),
    }
    if compile_too:
        modules["compiled L1"] = torch.compile(nd.L1BatchNorm2d(channels, backend="torch"), dynamic=False)
        modules["compiled Linf"] = torch.compile(nd.LinfBatchNorm2d(channels, backend="torch"), dynamic=False)
    return modules


def copy_bandwidth(device: torch.device, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes per second (bytes read plus bytes written)."""
    src = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    times = time_calls(lambda i: dst.copy_(src), repeats, warmup=3)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def time_calls(call: Callable[[int], object], repeats: int, warmup: int) -> list[float]:
    """Seconds per call (CUDA events around each call), after ``warmup`` untimed calls."""
    for i in range(warmup):
        call(i)
    torch.cuda.synchronize()
    pairs = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call(warmup + i)
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in pairs]


def measure(module: nn.Module, inputs: list[torch.Tensor], grads: list[torch.Tensor], repeats: int,
            warmup: int) -> tuple[float, float, float]:
    """Median seconds of forward, backward alone, and forward+backward, over rotating inputs."""
    pool = len(inputs)

    def forward(i: int) -> torch.Tensor:
        return module(inputs[i % pool])

    def both(i: int) -> None:
        module(inputs[i % pool]).backward(grads[i % pool])

    fwd = statistics.median(time_calls(forward, repeats, warmup))
    fwd_bwd = statistics.median(time_calls(both, repeats, warmup))
    # Backward alone: the forward runs untimed before each timed backward.
    bwd_times = []
    for i in range(warmup + repeats):
        y = forward(i)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.backward(grads[i % pool])
        end.record()
        if i >= warmup:
            bwd_times.append((start, end))
    torch.cuda.synchronize()
    bwd = statistics.median(start.elapsed_time(end) / 1e3 for start, end in bwd_times)
    return fwd, bwd, fwd_bwd


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.lower().split("x"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, bf16, no torch.compile")
    parser.add_argument("--shapes", nargs="*", type=parse_shape, help="NxCxHxW shapes (default: the ResNet-50 set)")
    parser.add_argument("--dtypes", nargs="*", choices=list(DTYPES), default=None)
    parser.add_argument("--layouts", nargs="*", choices=["NCHW", "NHWC"], default=["NCHW", "NHWC"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bn_gpu.py needs a CUDA device and none is visible (torch.cuda.is_available() is False); "
                         "use benchmarks/bn_cpu.py for CPU timings")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise SystemExit("bn_gpu.py times the Triton kernels: pip install 'normdecouple[triton]'") from None
    device = torch.device("cuda")
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 256
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    dtypes = args.dtypes or (["bf16"] if args.quick else list(DTYPES))
    compile_too = not (args.quick or args.no_compile)
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write); median of {args.repeats} calls")
    header = (f"{'shape':<20}{'dtype':<6}{'layout':<7}{'variant':<16}{'fwd ms':>9}{'bwd ms':>9}{'f+b ms':>9}"
              f"{'x cuDNN':>9}{'%copy':>8}")
    print(header)
    print("-" * len(header))
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for layout in args.layouts:
                memory_format = torch.channels_last if layout == "NHWC" else torch.contiguous_format
                nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
                pool = max(2, min(16, math.ceil(ROTATION_BYTES / nbytes)))
                inputs = [torch.randn(shape, device=device, dtype=dtype).to(memory_format=memory_format)
                          .requires_grad_() for _ in range(pool)]
                grads = [torch.randn_like(x) for x in inputs]
                base = None
                for name, module in variants(shape[1], compile_too).items():
                    module = module.to(device)
                    try:
                        fwd, bwd, both = measure(module, inputs, grads, args.repeats, args.warmup)
                    except torch.OutOfMemoryError:
                        print(f"{'x'.join(map(str, shape)):<20}{dtype_name:<6}{layout:<7}{name:<16}  out of memory")
                        torch.cuda.empty_cache()
                        continue
                    base = both if base is None else base
                    fraction = 5 * nbytes / both / bandwidth
                    print(f"{'x'.join(map(str, shape)):<20}{dtype_name:<6}{layout:<7}{name:<16}{fwd * 1e3:>9.3f}"
                          f"{bwd * 1e3:>9.3f}{both * 1e3:>9.3f}{both / base:>8.2f}x{fraction:>8.0%}", flush=True)
                del inputs, grads
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
