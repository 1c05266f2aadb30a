"""Time of the optimizer hooks relative to ``optimizer.step()``, for a ResNet-50-sized parameter list.

The parameter list has ResNet-50's shapes (161 tensors, 25.6M values: 53 convolution weights holding 23.5M
values, the batch norms' affine parameters, the classifier); the hooks act on the 53 convolution weights, the
scale-invariant ones. Gradients are random and restored before every timed step, so the timings do not drift
with the values. Each row reports the fastest of ``--repeats`` steps (the least disturbed by other processes on a
shared machine) of: the plain step, the same optimizer with weight decay 5e-4 (what the hooks replace), the step
with the hook attached, and the hooked step as a multiple of the plain and of the weight-decay step.

``NormScaledLR`` is timed twice: with the weights on their reference spheres and a learning rate too small to
leave the band (the common step: norms, one comparison, the gradient scaling), and with ``band=1``, which
renormalises every weight before every step (the most a step can cost: one more read and write of the weights).

Usage::

    python benchmarks/optim_overhead.py [--threads N] [--repeats R] [--device cpu|cuda]

(from the repository root, with normdecouple installed, or with ``PYTHONPATH=.``).

References: arXiv:1803.01814
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from normdecouple.optim import NormScaledLR, WeightNormProjection


def resnet50_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """(kind, shape) of every parameter of torchvision's ResNet-50, in its order."""
    shapes: list[tuple[str, tuple[int, ...]]] = []

    def conv(cout: int, cin: int, k: int) -> None:
        shapes.append(("conv", (cout, cin, k, k)))

    def bn(c: int) -> None:
        shapes.extend([("bn", (c,)), ("bn", (c,))])

    conv(64, 3, 7)
    bn(64)
    cin = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            conv(planes, cin, 1), bn(planes)
            conv(planes, planes, 3), bn(planes)
            conv(planes * 4, planes, 1), bn(planes * 4)
            if b == 0:
                conv(planes * 4, cin, 1), bn(planes * 4)
            cin = planes * 4
    shapes.extend([("fc", (1000, 2048)), ("fc", (1000,))])
    return shapes


def _fastest_ms(step: Callable[[], None], before: Callable[[], None], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for i in range(repeats + 2):
        before()
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= 2:  # two warm-up steps: optimizer state allocation, first-touch of memory
            times.append(time.perf_counter() - start)
    return min(times) * 1e3


def run(device: str, repeats: int) -> list[tuple[str, str, float, float, float]]:
    torch.manual_seed(0)
    shapes = resnet50_shapes()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    optimizers = {
        "SGD(momentum=0.9)": lambda ps, wd: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, weight_decay=wd),
        "SGD(momentum=0.9, foreach=True)": lambda ps, wd: torch.optim.SGD(ps, lr=1e-4, momentum=0.9,
                                                                          weight_decay=wd, foreach=True),
        "Adam": lambda ps, wd: torch.optim.Adam(ps, lr=1e-6, weight_decay=wd),
    }
    hooks = {
        "WeightNormProjection(p=2)": lambda opt, ws: WeightNormProjection(opt, ws, radius=1.0),
        "WeightNormProjection(p=1)": lambda opt, ws: WeightNormProjection(opt, ws, p=1, radius=1.0),
        "WeightNormProjection(p=inf)": lambda opt, ws: WeightNormProjection(opt, ws, p=float("inf"), radius=1.0),
        "NormScaledLR (band not left)": lambda opt, ws: NormScaledLR(opt, ws, reference=1.0),
        "NormScaledLR (band=1: renormalising every step)": lambda opt, ws: NormScaledLR(opt, ws, reference=1.0,
                                                                                         band=1.0),
    }
    rows = []
    for opt_name, make_opt in optimizers.items():
        params = [nn.Parameter(torch.randn(shape, device=device) * 0.05) for _, shape in shapes]
        chosen = [p for p, (kind, _) in zip(params, shapes) if kind == "conv"]
        grads = [torch.randn_like(p) for p in params]
        opt = make_opt(params, 0.0)
        decayed = make_opt(params, 5e-4)

        def restore_grads() -> None:
            for p, g in zip(params, grads):
                p.grad = g.clone() if p.grad is None else p.grad.copy_(g)

        # Settle the optimizers' state (allocation, first touch of its memory) before any timing.
        _fastest_ms(opt.step, restore_grads, repeats, sync)
        _fastest_ms(decayed.step, restore_grads, repeats, sync)
        for hook_name, attach in hooks.items():
            # The plain steps are timed right before and after each hooked one (the faster kept): the machine's
            # speed drifts, and so does the allocator's (glibc raises its mmap threshold once large temporaries
            # are freed, which speeds up steps that allocate, like Adam's).
            plain = _fastest_ms(opt.step, restore_grads, repeats, sync)
            with_decay = _fastest_ms(decayed.step, restore_grads, repeats, sync)
            hook = attach(opt, chosen)
            hooked = _fastest_ms(opt.step, restore_grads, repeats, sync)
            hook.remove()
            plain = min(plain, _fastest_ms(opt.step, restore_grads, repeats, sync))
            with_decay = min(with_decay, _fastest_ms(decayed.step, restore_grads, repeats, sync))
            rows.append((opt_name, hook_name, plain, with_decay, hooked))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per row (the fastest is reported)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shapes = resnet50_shapes()
    numel = sum(torch.Size(s).numel() for _, s in shapes)
    conv = [s for kind, s in shapes if kind == "conv"]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device={args.device}, "
          f"threads={args.threads}, repeats={args.repeats}")
    print(f"parameters: {len(shapes)} tensors, {numel / 1e6:.2f}M values; hooked: {len(conv)} convolution weights, "
          f"{sum(torch.Size(s).numel() for s in conv) / 1e6:.2f}M values")
    print()
    print("| optimizer | hook | step (ms) | step, weight decay 5e-4 (ms) | step + hook (ms) | / step | / weight-decay step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for opt_name, hook_name, base, decay, ms in run(args.device, args.repeats):
        print(f"| {opt_name} | {hook_name} | {base:.1f} | {decay:.1f} | {ms:.1f} | {ms / base:.2f}x | "
              f"{ms / decay:.2f}x |")


if __name__ == "__main__":
    main()
