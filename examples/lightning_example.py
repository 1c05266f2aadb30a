"""normdecouple's Lightning callbacks on an unmodified LightningModule (torch's BatchNorm inside), on real digits.

    python -m examples.lightning_example                 # about 15 s on a CPU
    python -m examples.lightning_example --epochs 10 --out outputs/lightning

BatchNormSwap turns the module's BatchNorm2d layers into top-k L∞ BatchNorm at setup; WeightNormProjection keeps
the scale-invariant conv weights on fixed-norm spheres and a norm schedule (radius × √10 at 2/3 of training)
replaces the LR drop; WeightNormMonitor logs weight_norm/..., effective_lr/... and angular_update/... per epoch
into a CSV (``<out>/lightning_logs/version_*/metrics.csv``).
"""

from __future__ import annotations

import argparse
import csv
import os

import pytorch_lightning as pl
import torch
from torch import nn

from examples.quickstart import load_digits_tensors, make_model
from lightning_callbacks import BatchNormSwap, WeightNormMonitor, WeightNormProjection


class DigitsModule(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about normdecouple."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = make_model()  # torch's BatchNorm2d
        self.data = load_digits_tensors()
        self.example_input_array = self.data[0][:64]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)  # no weight decay

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(self.data[0], self.data[1])
        return torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)

    def val_dataloader(self):
        data = torch.utils.data.TensorDataset(self.data[2], self.data[3])
        return torch.utils.data.DataLoader(data, batch_size=512)


class NormSchedule(pl.Callback):
    """The paper's norm schedule: multiply the projection radius by √10 at the given epochs (instead of lr / 10)."""

    def __init__(self, projection: WeightNormProjection, epochs: list[int]) -> None:
        self.projection, self.epochs = projection, set(epochs)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch in self.epochs:
            self.projection.scale_radius(10 ** 0.5)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default="outputs/lightning")
    parser.add_argument("--no-progress-bar", action="store_true")
    args = parser.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    projection = WeightNormProjection(radius="init")
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", default_root_dir=args.out, log_every_n_steps=10,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=not args.no_progress_bar,
        logger=pl.loggers.CSVLogger(args.out),
        callbacks=[BatchNormSwap("linf", k=8), projection, NormSchedule(projection, [max(1, 2 * args.epochs // 3)]),
                   WeightNormMonitor(logging_interval="epoch")],
    )
    module = DigitsModule()
    trainer.fit(module)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv"), newline="") as f:  # WeightNormMonitor's values
        rows = [r for r in csv.DictReader(f) if any(r[k] for k in r if k.startswith("effective_lr/"))]
    print(f"{type(module.net[1]).__name__} after BatchNormSwap; val accuracy {metrics['val_acc']:.3f}")
    print("effective LR lr/‖w‖² per epoch (WeightNormMonitor):")
    for key in sorted(k for k in rows[0] if k.startswith("effective_lr/")):
        print(f"  {key:<28}" + " ".join(f"{float(r[key]):.3g}" for r in rows))
        metrics[key] = float(rows[-1][key])
    print(f"metrics CSV: {os.path.join(trainer.logger.log_dir, 'metrics.csv')}")
    return metrics


if __name__ == "__main__":
    main()
