"""Shared pieces of the optimizer-hook tests: a tiny scale-invariant float64 network and its data."""

import copy

import torch
from torch import nn

F64 = torch.float64
EPS = 1e-300
INVARIANT = ["0.weight", "3.weight"]


def _net() -> nn.Sequential:
    # Two scale-invariant convolutions (no bias, each followed by a batch norm) and an un-normalised classifier.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=EPS), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5, eps=EPS), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).to(F64)


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 6, 6, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g))
            for _ in range(steps)]


def _scaled(model: nn.Module, c: float) -> nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in INVARIANT:
                p.mul_(c)
    return model
