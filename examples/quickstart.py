"""Swap a CNN's BatchNorm for L1 and L∞ BatchNorm and train it on real handwritten digits, in plain PyTorch.

Runs in well under a minute on a laptop CPU, with no download (scikit-learn ships the 1,797 8x8 digits):

    python -m examples.quickstart

It trains the same small network three times (torch's L2 BatchNorm, ours with L1, ours with top-k L∞), prints
the test accuracy of each, then reverts the L1 model to torch's BatchNorm and checks that its eval outputs are
unchanged.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import normdecouple as nd


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return images[train], labels[train], images[test], labels[test]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def train(model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int, seed: int) -> float:
    x_train, y_train, x_test, y_test = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y_train), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(dim=1) == y_test).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = load_digits_tensors(args.seed)
    print(f"digits: {len(data[1])} train / {len(data[3])} test images, {args.epochs} epochs each")
    print(f"{'batch norm':<22}{'test accuracy':>14}{'time':>8}")
    models = {}
    for name, convert in [
        ("torch L2 (BatchNorm2d)", lambda m: m),
        ("L1BatchNorm2d", lambda m: nd.convert_batchnorm(m, "l1")),
        ("LinfBatchNorm2d k=8", lambda m: nd.convert_batchnorm(m, "linf", k=8)),
    ]:
        torch.manual_seed(args.seed)
        model = convert(make_model())
        start = time.perf_counter()
        accuracy = train(model, data, args.epochs, args.seed)
        print(f"{name:<22}{accuracy:>14.3f}{time.perf_counter() - start:>7.1f}s")
        models[name] = model
    l1_model = models["L1BatchNorm2d"]
    with torch.no_grad():
        before = l1_model(data[2])
        exported = nd.revert_batchnorm(l1_model)
        same = torch.equal(exported(data[2]), before)
    print(f"revert_batchnorm: L1 model back to torch's BatchNorm2d, eval outputs identical: {same}")


if __name__ == "__main__":
    main()
