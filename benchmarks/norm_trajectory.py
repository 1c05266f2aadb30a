"""NormScaledLR on the settings of issue 21: the weight-norm trajectory, and the angular steps against projection.

1. **Norm trajectory.** Two conv-BN-ReLU layers (8 and 16 channels) and a linear head, 512 random 3x8x8 images
   with 10 random labels, batch 32, ``torch.optim.SGD(lr=0.1, momentum=0.9)``, no weight decay,
   ``NormScaledLR(opt, params="auto", ...)`` with ``reference="init"``. The mean channel norm of the two
   scale-invariant convolutions at steps 0, 50, 100, 150, 250, 450, 500 and at the end, with the band (the
   default, 1.05) and without it (``band=1e300``: never renormalised, the hook as it was before issue 21).
2. **Angular steps against projection.** A small float64 MLP (two Linear + BatchNorm1d blocks, random labels):
   at every step, the summed angle each channel turns, divided by the angle projection at radius ρ turns from the
   same direction with the same gradient history (SGD with momentum, Nesterov or Adam written from torch's update
   formulas, every gradient taken at ρŵ). 1.000 means the schedule's step exactly; the table gives the run's
   mean ratio and the largest deviation of any step, for no band, the default band and ``band=1``.

Usage::

    python benchmarks/norm_trajectory.py [--steps 10000] [--angle-steps 2000] [--threads 1]

(from the repository root, with normdecouple installed, or with ``PYTHONPATH=.``).

References: arXiv:1803.01814
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
from torch import nn

import normdecouple as nd
from normdecouple.optim.norm_scaled_lr import DEFAULT_BAND

NEVER = 1e300  # a band no norm leaves: the hook without renormalisation


def issue_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )
    return model, torch.randn(512, 3, 8, 8), torch.randint(0, 10, (512,))


def trajectory(band: float, steps: int, marks: list[int]) -> tuple[dict[int, float], int, float]:
    """Mean channel norm of the scale-invariant weights at each mark (NaN once not finite), renormalisations,
    seconds."""
    model, x, y = issue_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hook = nd.NormScaledLR(opt, params="auto", model=model, example_inputs=(x[:32],), band=band)
    weights = hook.params
    gen = torch.Generator().manual_seed(1)
    out: dict[int, float] = {}
    start = time.perf_counter()
    for t in range(steps + 1):
        if t in marks:
            norm = torch.cat([w.detach().flatten(1).norm(dim=1) for w in weights]).mean().item()
            out[t] = norm
            if not math.isfinite(norm):
                out.update({m: math.nan for m in marks if m > t})
                break
        if t == steps:
            break
        i = torch.randint(0, 512, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    return out, hook.renormalizations, time.perf_counter() - start


def _direction(w: torch.Tensor) -> torch.Tensor:
    return w / torch.linalg.vector_norm(w, dim=1, keepdim=True)


def _angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = _direction(a), _direction(b)
    return 2 * torch.atan2((a - b).norm(dim=1), (a + b).norm(dim=1))


OPTIMIZERS = {
    "SGD(lr=0.1, momentum=0.9)": ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "SGD(lr=0.1, momentum=0.9, nesterov=True)": ("nesterov",
                                                 lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)),
    "Adam(lr=1e-3)": ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-3)),
}


def angular_ratios(kind: str, make, band: float, steps: int) -> torch.Tensor:
    """Per step: NormScaledLR's summed angular update over projection's from the same point (see the docstring)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4),
    ).double()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=gen, dtype=torch.float64), torch.randint(0, 4, (256,), generator=gen)
    names = ["0.weight", "3.weight"]
    opt = make(model.parameters())
    hook = nd.NormScaledLR(opt, names, model=model, band=band, attach=False)
    rho = {n: r.view(-1, 1) for n, r in hook.references.items()}
    lr = opt.param_groups[0]["lr"]
    state: dict[str, dict[str, torch.Tensor]] = {}
    ratios = []
    for t in range(1, steps + 1):
        i = torch.randint(0, 256, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        expected, before = [], {}
        for n in names:
            w = model.get_parameter(n).detach()
            before[n] = w.clone()
            r = torch.linalg.vector_norm(w, dim=1, keepdim=True)
            g = model.get_parameter(n).grad * r / rho[n]  # the gradient at rho * w / |w|
            s = state.setdefault(n, {"b": torch.zeros_like(w), "m": torch.zeros_like(w), "v": torch.zeros_like(w)})
            if kind == "adam":
                s["m"] = 0.9 * s["m"] + 0.1 * g
                s["v"] = 0.999 * s["v"] + 0.001 * g * g
                d = (s["m"] / (1 - 0.9**t)) / ((s["v"] / (1 - 0.999**t)).sqrt() + 1e-8)
            else:
                s["b"] = g if t == 1 else 0.9 * s["b"] + g
                d = g + 0.9 * s["b"] if kind == "nesterov" else s["b"]
            expected.append(_angles(w, rho[n] * w / r - lr * d))
        hook.before_step()
        opt.step()
        hook.after_step()
        got = torch.cat([_angles(before[n], model.get_parameter(n).detach()) for n in names])
        ratios.append(got.sum() / torch.cat(expected).sum())
    return torch.stack(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10_000, help="length of the norm-trajectory run")
    parser.add_argument("--angle-steps", type=int, default=2000, help="length of each angular-step run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={args.threads}")
    print()
    marks = sorted({0, 50, 100, 150, 250, 450, 500, args.steps})
    print("1. Mean channel norm of the scale-invariant weights (SGD lr 0.1, momentum 0.9, reference='init')")
    print()
    print("| NormScaledLR | " + " | ".join(f"step {m}" for m in marks) + " | renormalisations | seconds |")
    print("|---|" + "---:|" * (len(marks) + 2))
    for label, band in (("no band (before issue 21)", NEVER), (f"band={DEFAULT_BAND} (default)", DEFAULT_BAND)):
        norms, count, seconds = trajectory(band, args.steps, marks)
        print(f"| {label} | " + " | ".join(f"{norms[m]:.3g}" for m in marks) + f" | {count} | {seconds:.0f} |")
    print()
    print(f"2. Angular update per step / projection's from the same point ({args.angle_steps} steps, float64)")
    print()
    print("| optimizer | band | mean ratio | largest deviation of a step | steps off by > 1% |")
    print("|---|---|---:|---:|---:|")
    for label, (kind, make) in OPTIMIZERS.items():
        for band_label, band in (("none", NEVER), (str(DEFAULT_BAND), DEFAULT_BAND), ("1", 1.0)):
            ratios = angular_ratios(kind, make, band, args.angle_steps)
            deviation = (ratios - 1).abs()
            print(f"| {label} | {band_label} | {ratios.mean():.4f} | {deviation.max():.4f} | "
                  f"{(deviation > 0.01).float().mean() * 100:.1f}% |")


if __name__ == "__main__":
    main()
