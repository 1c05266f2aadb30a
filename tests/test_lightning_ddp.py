"""A 2-process DDP run on CPU (gloo) with SyncLpBatchNorm equals one process on the global batch.

``strategy="ddp_spawn"``: Lightning's ``"ddp"`` launches the extra process by re-running ``sys.argv``, which
inside pytest would re-run the test session; spawn starts fresh interpreters that import this module and receive
the pickled Trainer and module, and Lightning hands rank 0's weights and buffers back to this process after fit
(into the module as it was passed: the swap and the plugin ran in the children, so its layers are still torch's,
holding the trained L1 statistics).
"""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from lightning_callbacks import (  # noqa: E402
    BatchNormSwap,
    SyncLpBatchNorm,
    WeightNormMonitor,
    WeightNormProjection,
)
from pytorch_lightning.loggers import CSVLogger  # noqa: E402
from _timm_support import BatchNormAct2d  # noqa: E402

LOCAL_BATCH = 4
STEPS = 3


class DDPModule(pl.LightningModule):
    """float64 so that one process and two agree to rounding; channel count 5 is odd on purpose."""

    def __init__(self, batch_size: int):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 1))
        self.net.double()
        g = torch.Generator().manual_seed(2)
        n = 2 * LOCAL_BATCH * STEPS
        # A shift and scale per feature so that the two halves of a global batch have different statistics.
        self.x = (torch.randn(n, 6, generator=g) * torch.arange(1, 7) + torch.arange(6)).double()
        self.y = torch.randn(n, 1, generator=g).double()
        self.batch_size = batch_size

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        # Unshuffled (Lightning's own sampler always shuffles the training data, hence use_distributed_sampler=
        # False): rank r gets the samples r, r+2, ..., so the union of the two local batches of step k is the
        # global batch k of the single process (batch statistics do not depend on the order).
        data = torch.utils.data.TensorDataset(self.x, self.y)
        sampler = torch.utils.data.DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        ) if self.trainer.world_size > 1 else None
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, sampler=sampler, shuffle=False)


class TimmDDPModule(DDPModule):
    """The same data through timm's ``BatchNormAct2d`` pattern (``F.batch_norm``, then an in-place ReLU)."""

    def __init__(self, batch_size: int):
        super().__init__(batch_size)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Unflatten(1, (5, 1, 1)), BatchNormAct2d(5),
                                 nn.Flatten(), nn.Linear(5, 1)).double()


def trainer(**kwargs):
    return pl.Trainer(accelerator="cpu", max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                      **kwargs)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_global_batch(tmp_path):
    ddp = DDPModule(LOCAL_BATCH)
    trainer(strategy="ddp_spawn", devices=2, plugins=[SyncLpBatchNorm()], logger=CSVLogger(tmp_path),
            log_every_n_steps=1,
            callbacks=[BatchNormSwap("l1"), WeightNormProjection(radius=2.0), WeightNormMonitor()]).fit(ddp)
    single = DDPModule(2 * LOCAL_BATCH)
    trainer(devices=1, logger=False, callbacks=[BatchNormSwap("l1"), WeightNormProjection(radius=2.0)]).fit(single)

    assert single.net[1].num_batches_tracked.item() == ddp.net[1].num_batches_tracked.item() == STEPS
    torch.testing.assert_close(ddp.net[1].running_mean, single.net[1].running_mean)
    torch.testing.assert_close(ddp.net[1].running_var, single.net[1].running_var)
    for name, p in single.named_parameters():
        torch.testing.assert_close(ddp.get_parameter(name), p)
    # params="auto" found net.0.weight through the synchronised layer, on each rank.
    torch.testing.assert_close(torch.linalg.vector_norm(ddp.net[0].weight, dim=1), torch.full((5,), 2.0).double())

    # Control: without the plugin each rank keeps its own statistics, which differ from the global ones.
    unsynced = DDPModule(LOCAL_BATCH)
    trainer(strategy="ddp_spawn", devices=2, logger=False, callbacks=[BatchNormSwap("l1")]).fit(unsynced)
    assert not torch.allclose(unsynced.net[1].running_var, single.net[1].running_var)

    # The monitor's all-reduce ran on both ranks (no hang) and rank 0 wrote one row per step.
    (metrics,) = list(tmp_path.rglob("metrics.csv"))
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("weight_norm/net.0.weight")]
    assert len(rows) == STEPS


@pytest.mark.slow
def test_ddp_two_processes_synchronise_a_converted_timm_layer():
    # SyncLpBatchNorm applies normdecouple.convert_sync_batchnorm, which now synchronises converted BatchNorm
    # subclasses (issue 19, item 13): two processes equal one process on the global batch.
    ddp = TimmDDPModule(LOCAL_BATCH)
    trainer(strategy="ddp_spawn", devices=2, plugins=[SyncLpBatchNorm()], logger=False,
            callbacks=[BatchNormSwap("linf", k=2), WeightNormProjection(radius=2.0)]).fit(ddp)
    single = TimmDDPModule(2 * LOCAL_BATCH)
    trainer(devices=1, logger=False, callbacks=[BatchNormSwap("linf", k=2), WeightNormProjection(radius=2.0)]
            ).fit(single)

    assert type(ddp.net[2]) is BatchNormAct2d  # this process's module: the user's class, the trained state
    assert single.net[2].num_batches_tracked.item() == ddp.net[2].num_batches_tracked.item() == STEPS
    torch.testing.assert_close(ddp.net[2].running_mean, single.net[2].running_mean)
    torch.testing.assert_close(ddp.net[2].running_var, single.net[2].running_var)
    for name, p in single.named_parameters():
        torch.testing.assert_close(ddp.get_parameter(name), p)
    # params="auto" found net.0.weight through the synchronised subclass layer, on each rank.
    torch.testing.assert_close(torch.linalg.vector_norm(ddp.net[0].weight, dim=1), torch.full((5,), 2.0).double())
