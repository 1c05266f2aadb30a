"""The optimizer-hook callbacks with Lightning's own callbacks: BackboneFinetuning (param groups added during
training), StochasticWeightAveraging (a step without a backward after the statistics are recomputed), and resume
across a NormScaledLR renormalisation (issues 19 and 21). CPU, float64, a few epochs of a tiny module each."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from lightning_callbacks import NormScaledLR, WeightNormProjection  # noqa: E402
from pytorch_lightning.callbacks import BackboneFinetuning, Callback, ModelCheckpoint  # noqa: E402
from pytorch_lightning.callbacks import StochasticWeightAveraging  # noqa: E402

# Tiny modules: one intra-op thread (the shared fixture in conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")


class Finetune(pl.LightningModule):
    """A ``backbone`` (Linear + batch norm: scale-invariant) and a head, BoringModel-style, for BackboneFinetuning:
    ``configure_optimizers`` takes the trainable parameters only, so the backbone joins the optimizer later.

    ``invariant_head``: the head has a scale-invariant Linear too (so some weight is hooked from the start)."""

    def __init__(self, invariant_head=True, optimizer="sgd", lr=0.1, example=False):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU())
        if invariant_head:
            self.head = nn.Sequential(nn.Linear(8, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 1))
        else:
            self.head = nn.Sequential(nn.Linear(8, 1))
        self.to(torch.float64)
        g = torch.Generator().manual_seed(1)
        self.x = 3 * torch.randn(32, 6, generator=g, dtype=torch.float64)
        self.y = torch.randn(32, 1, generator=g, dtype=torch.float64)
        self.optimizer, self.lr = optimizer, lr
        if example:
            self.example_input_array = self.x[:8]

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "adam":
            return torch.optim.Adam(trainable, lr=self.lr)
        return torch.optim.SGD(trainable, lr=self.lr, momentum=0.9)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=8)


def make_trainer(**kwargs):
    defaults = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, logger=False, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def channel_norms(w):
    return torch.linalg.vector_norm(w.detach().flatten(1), dim=1)


class NormsAfterEachStep(Callback):
    """The backbone weight's channel norms after every batch, and whether it was in the optimizer."""

    def __init__(self):
        self.norms, self.held = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        w = pl_module.backbone[0].weight
        self.norms.append(channel_norms(w).clone())
        self.held.append(any(p is w for g in trainer.optimizers[0].param_groups for p in g["params"]))


# ---------------------------------------------------------------------------------------------------------------
# BackboneFinetuning (issue 19, item 10)


@pytest.mark.parametrize("invariant_head", [True, False], ids=["head-hooked-too", "backbone-only"])
@pytest.mark.parametrize("example", [True, False], ids=["example_input_array", "first-batch"])
def test_projection_follows_the_backbone_added_by_backbone_finetuning(invariant_head, example):
    model = Finetune(invariant_head=invariant_head, example=example)
    initial = channel_norms(model.backbone[0].weight).clone()
    spy = NormsAfterEachStep()
    callbacks = [BackboneFinetuning(unfreeze_backbone_at_epoch=1), WeightNormProjection(radius=1.0), spy]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_epochs=3, callbacks=callbacks).fit(model)
    # Epoch 0: frozen, not in the optimizer: untouched. Epochs 1-2: on the unit sphere after every step.
    assert spy.held == [False] * 4 + [True] * 8
    for norms in spy.norms[:4]:
        torch.testing.assert_close(norms, initial, rtol=0, atol=0)
    for norms in spy.norms[4:]:
        torch.testing.assert_close(norms, torch.ones(8, dtype=torch.float64), rtol=1e-13, atol=0)
    if invariant_head:
        torch.testing.assert_close(channel_norms(model.head[0].weight), torch.ones(5, dtype=torch.float64),
                                   rtol=1e-13, atol=0)
    else:
        # Nothing was in the optimizer when the hook attached: the user is told it waits.
        assert any("none of the model's scale-invariant weights ['backbone.0.weight']" in str(w.message)
                   for w in caught)


def test_norm_scaled_lr_follows_the_backbone_added_by_backbone_finetuning():
    # With reference="init" the backbone's references are its norms when it joins; with band 1.02 its norm stays
    # within 2% of them before every step from then on (the reference run without the band leaves them).
    def run(band):
        model = Finetune(lr=0.3)
        callback = NormScaledLR(reference="init", band=band)
        ratios = []

        class Ratios(Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                # Runs after NormScaledLR's own on_before_optimizer_step (callback order): the norms the step uses.
                hook = callback.hooks[0]
                if "backbone.0.weight" in hook.keys:
                    r = channel_norms(pl_module.backbone[0].weight) / hook.references["backbone.0.weight"]
                    ratios.append(torch.maximum(r, 1 / r).max().item())

        initial = channel_norms(model.backbone[0].weight).clone()
        make_trainer(max_epochs=4, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), callback, Ratios()]
                     ).fit(model)
        return model, callback, ratios, initial

    model, callback, ratios, initial = run(band=1.02)
    assert len(ratios) == 12 and max(ratios) <= 1.02 * (1 + 1e-12)
    saved = callback.state_dict()["hooks"]["0"]
    assert set(saved["reference"]) == {"head.0.weight", "backbone.0.weight"} and saved["waiting"] == []
    _, _, free_ratios, _ = run(band=1e300)
    assert max(free_ratios) > 1.02  # the band did something


def test_resume_before_the_backbone_joins_equals_uninterrupted(tmp_path):
    # The epoch-0 checkpoint holds the backbone as waited for; the resumed hooks wait for it too and take it on
    # when BackboneFinetuning adds it at epoch 1 (its references measured then), as the uninterrupted run did.
    # (A checkpoint taken after the unfreeze epoch does not resume exactly even without our callbacks: Lightning's
    # BackboneFinetuning restores the param group on resume but leaves the backbone frozen, requires_grad=False.)
    def callbacks(*extra):
        return [BackboneFinetuning(unfreeze_backbone_at_epoch=1), NormScaledLR(reference="init", band=1.02),
                WeightNormProjection(["head.0.weight"], radius=1.3), *extra]

    straight = Finetune(lr=0.3)
    every = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    make_trainer(max_epochs=4, enable_checkpointing=True, callbacks=callbacks(every)).fit(straight)
    saved = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)["callbacks"]
    hook_state = next(v for k, v in saved.items() if k.startswith("NormScaledLR"))["hooks"]["0"]
    assert hook_state["waiting"] == ["backbone.0.weight"] and list(hook_state["reference"]) == ["head.0.weight"]
    resumed = Finetune(lr=0.3)
    with torch.no_grad():
        for p in resumed.parameters():
            p.mul_(0.7)  # other weights until the checkpoint is loaded
    make_trainer(max_epochs=4, callbacks=callbacks()).fit(resumed, ckpt_path=tmp_path / "epoch=0.ckpt")
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)


# ---------------------------------------------------------------------------------------------------------------
# StochasticWeightAveraging (issue 19, item 11)


class SWACapture(Callback):
    """In SWA's batch-norm epoch: the averaged weights, and what the optimizer's last step starts from."""

    def __init__(self):
        self.averaged = None
        self.before_step = None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == trainer.max_epochs - 1:  # the extra epoch SWA adds for the statistics
            self.averaged = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.current_epoch == trainer.max_epochs - 1:
            self.before_step = {
                n: (p.detach().clone(), p.grad.clone(), optimizer.state[p]["momentum_buffer"].clone(),
                    optimizer.param_groups[0]["lr"])
                for n, p in pl_module.named_parameters()
            }


@pytest.mark.parametrize("hook", ["projection", "norm_scaled_lr"])
def test_swa_statistics_belong_to_the_final_weights(hook):
    # SWA's last epoch recomputes the batch norms' statistics of the averaged weights, then Lightning steps the
    # optimizer once more with the last gradients (no backward in that epoch). The hooks must not act on that
    # step: the final weights are the averaged ones moved by torch's SGD formula alone, and the statistics are
    # those torch.optim.swa_utils.update_bn computes for the averaged weights.
    model = Finetune(lr=0.1)
    model.backbone.requires_grad_(True)
    ours = WeightNormProjection(radius=1.0) if hook == "projection" else NormScaledLR(reference=1.0, band=1.01)
    capture = SWACapture()
    make_trainer(max_epochs=4, callbacks=[StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2), ours,
                                          capture]).fit(model)
    assert capture.averaged is not None and capture.before_step is not None
    # The averaged weights are off the sphere (an average of directions is shorter), which is what a projection
    # on the last step would have undone after the statistics were recomputed.
    assert not torch.allclose(channel_norms(capture.averaged["backbone.0.weight"]),
                              torch.ones(8, dtype=torch.float64), rtol=1e-3)
    for n, p in model.named_parameters():
        w, grad, buffer, lr = capture.before_step[n]
        torch.testing.assert_close(w, capture.averaged[n], rtol=0, atol=0)  # nothing moved them in the epoch
        expected = w - lr * (0.9 * buffer + grad)  # torch's SGD with momentum 0.9, dampening 0
        torch.testing.assert_close(p.detach(), expected, rtol=1e-13, atol=1e-15, msg=n)
    # The statistics: torch's own recomputation on the averaged weights.
    reference = copy.deepcopy(model)
    reference.load_state_dict({**model.state_dict(), **capture.averaged})
    torch.optim.swa_utils.update_bn(((x,) for x, _ in model.train_dataloader()), reference)
    for n, b in model.named_buffers():
        if "running" in n:
            torch.testing.assert_close(b, reference.get_buffer(n), rtol=1e-12, atol=1e-14, msg=n)


# ---------------------------------------------------------------------------------------------------------------
# NormScaledLR: the band in the callback, resume across a renormalisation (issue 21)


def test_band_is_checked_and_given_to_the_hooks():
    for bad in (0.5, 0, float("inf"), True, "1.05"):
        with pytest.raises(ValueError, match="band"):
            NormScaledLR(band=bad)
    callback = NormScaledLR(reference=1.0, band=1.2)
    make_trainer(max_steps=2, callbacks=[callback]).fit(Finetune())
    assert callback.state_dict()["hooks"]["0"]["band"] == 1.2
    # The default band keeps the state key of callbacks saved before the band existed; another band has its own.
    assert "band" not in NormScaledLR().state_key and "band" in callback.state_key


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_across_a_renormalisation_equals_uninterrupted_bit_for_bit(tmp_path, optimizer):
    # band 1.01 and a large learning rate: weights are renormalised in every epoch, so the epoch-1 checkpoint
    # lies between renormalisations on both sides.
    lr = 0.5 if optimizer == "sgd" else 0.05
    counts = []

    class Count(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            counts.append(trainer.callbacks[0].hooks[0].renormalizations)

    def callbacks(*extra):
        return [NormScaledLR(reference="init", band=1.01), Count(), *extra]

    straight = Finetune(lr=lr, optimizer=optimizer)
    straight.backbone.requires_grad_(True)
    every = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    make_trainer(max_epochs=4, enable_checkpointing=True, callbacks=callbacks(every)).fit(straight)
    assert counts[0] > 0 and counts[1] > counts[0] and counts[3] > counts[1], counts
    resumed = Finetune(lr=lr, optimizer=optimizer)
    resumed.backbone.requires_grad_(True)
    make_trainer(max_epochs=4, callbacks=callbacks()).fit(resumed, ckpt_path=tmp_path / "epoch=1.ckpt")
    assert counts[-1] == counts[3]  # the count was restored too, and the same renormalisations happened
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)
    for (n, b), c in zip(straight.named_buffers(), resumed.buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=n)
