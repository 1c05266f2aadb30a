"""normdecouple in a plain PyTorch loop: convert the BatchNorm layers, then hook the optimizer you already have.

    python -m examples.plain_pytorch          # a few seconds on a CPU; prints the test accuracy
"""

import torch
from torch import nn

import normdecouple as nd
from examples.quickstart import load_digits_tensors, make_model


def main(epochs: int = 3) -> float:
    x_train, y_train, x_test, y_test = load_digits_tensors()
    torch.manual_seed(0)
    model = nd.convert_batchnorm(make_model(), "l1")                 # 1. torch BatchNorm -> L1 BatchNorm
    invariant = nd.scale_invariant_parameters(model, x_train[:64])   # conv weights followed by a batch norm
    params = dict(model.named_parameters())
    opt = torch.optim.SGD([                                          # no weight decay on scale-invariant weights
        {"params": [p for n, p in params.items() if n not in invariant], "weight_decay": 5e-4},
        {"params": [params[n] for n in invariant], "weight_decay": 0.0},
    ], lr=0.1, momentum=0.9)
    proj = nd.WeightNormProjection(opt, invariant, model=model, radius="init")  # 2. keep them on their spheres
    for epoch in range(epochs):
        if epoch == epochs - 1:
            proj.scale_radius(10 ** 0.5)                             # 3. norm schedule: like lr / 10
        model.train()
        for batch in torch.randperm(len(y_train)).split(64):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"L1 BatchNorm + WeightNormProjection, {epochs} epochs: test accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
