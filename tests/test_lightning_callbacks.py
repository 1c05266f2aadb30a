"""Tests of lightning_callbacks on a tiny real LightningModule (CPU, a few steps each)."""

from __future__ import annotations

import copy
import csv
import math
import os
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

import normdecouple  # noqa: E402
from lightning_callbacks import (  # noqa: E402
    BatchNormSwap,
    NormScaledLR,
    SyncLpBatchNorm,
    WeightNormMonitor,
    WeightNormProjection,
)
from pytorch_lightning.callbacks import Callback, ModelCheckpoint  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402
from pytorch_lightning.plugins import MixedPrecision  # noqa: E402

# The two Linear weights feeding a batch norm are scale-invariant; the classifier "net.6.weight" is not.
CHOSEN = ["net.0.weight", "net.3.weight"]


class TinyModule(pl.LightningModule):
    """Two Linear+BatchNorm blocks and a head: small enough for many fits within the time budget."""

    def __init__(self, dtype=torch.float32, optimizer="sgd", lr=0.1, momentum=0.0, batches=4, batch_size=4,
                 example=False, inf_batch=None):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
            nn.Linear(8, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(),
            nn.Linear(5, 1),
        ).to(dtype)
        self.optimizer, self.lr, self.momentum = optimizer, lr, momentum
        g = torch.Generator().manual_seed(1)
        n = batches * batch_size
        # Scaled so that the batch norms see activations well away from unit variance.
        self.x = (3 * torch.randn(n, 6, generator=g)).to(dtype)
        self.y = torch.randn(n, 1, generator=g).to(dtype)
        self.batch_size = batch_size
        self.inf_batch = inf_batch
        if example:
            self.example_input_array = self.x[:batch_size]

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if batch_idx == self.inf_batch:
            loss = loss * math.inf  # every gradient becomes inf/NaN: AMP's scaler must skip this step
        return loss

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=False)


def make_trainer(tmp_path=None, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, logger=False,
                    default_root_dir=tmp_path, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def channel_norms(w):
    return torch.linalg.vector_norm(w.detach().double().reshape(w.shape[0], -1), dim=1)


def params_of(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------
# Packaging and argument validation


def test_normdecouple_imports_without_lightning():
    # A fresh interpreter in which importing pytorch_lightning fails, as when it is not installed.
    code = ("import sys; sys.modules['pytorch_lightning'] = None; sys.modules['lightning'] = None; "
            "import normdecouple; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: BatchNormSwap("l2"), ValueError, "l1"),
        (lambda: BatchNormSwap("l1", k=2), TypeError, "k"),
        (lambda: BatchNormSwap("linf", k=0), ValueError, "k"),
        (lambda: BatchNormSwap(backend="cuda"), ValueError, "backend"),
        (lambda: BatchNormSwap(low_precision="yes"), TypeError, "low_precision"),
        (lambda: WeightNormProjection(p=3), ValueError, "p"),
        (lambda: WeightNormProjection(radius=-1.0), ValueError, "radius"),
        (lambda: WeightNormProjection(radius="initial"), ValueError, "radius"),
        (lambda: WeightNormProjection(params="net.0.weight"), ValueError, "wrap a single name"),
        (lambda: WeightNormProjection(params=[nn.Parameter(torch.ones(2))]), TypeError, "names"),
        (lambda: WeightNormProjection(batch_to_inputs=3), TypeError, "batch_to_inputs"),
        (lambda: NormScaledLR(power=3), ValueError, "power"),
        (lambda: NormScaledLR(power=True), ValueError, "power"),
        (lambda: NormScaledLR(reference=0.0), ValueError, "reference"),
        (lambda: WeightNormMonitor("batch"), ValueError, "logging_interval"),
        (lambda: WeightNormMonitor(power=0), ValueError, "power"),
    ],
)
def test_arguments_validated_at_construction(make, error, words):
    with pytest.raises(error, match=words):
        make()


@pytest.mark.parametrize("make", [lambda: WeightNormProjection(params=["net.9.weight"]),
                                  lambda: NormScaledLR(params=["net.9.weight"]),
                                  lambda: WeightNormMonitor(params=["net.9.weight"])],
                         ids=["projection", "norm_scaled_lr", "monitor"])
def test_unknown_parameter_name_fails_at_fit_start(make):
    with pytest.raises(ValueError, match=r"net\.9\.weight"):
        make_trainer(max_steps=1, callbacks=[make()]).fit(TinyModule())


# ---------------------------------------------------------------------------------------------------------------
# BatchNormSwap


def test_batchnorm_swap_converts_before_optimizers_are_built():
    model = TinyModule()
    trainer = make_trainer(max_steps=2, callbacks=[BatchNormSwap("linf", k=2)])
    trainer.fit(model)
    assert type(model.net[1]) is normdecouple.LinfBatchNorm1d and model.net[1].k == 2
    assert type(model.net[4]) is normdecouple.LinfBatchNorm1d
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(model.net[1].weight), id(model.net[4].bias)} <= held
    assert model.net[1].num_batches_tracked.item() == 2  # the converted layers are the ones that trained


def test_batchnorm_swap_running_stats_are_l1(tmp_path):
    # One step with lr=0: running_var must be the L1 variance-equivalent of the first batch, not torch's variance.
    model = TinyModule(lr=0.0)
    make_trainer(max_steps=1, callbacks=[BatchNormSwap("l1")]).fit(model)
    x = model.x[:4].double()
    with torch.no_grad():
        h = x @ model.net[0].weight.double().T
    d = h - h.mean(0)
    s = math.sqrt(math.pi / 2) * d.abs().mean(0)
    expected = 0.9 * torch.ones(8, dtype=torch.float64) + 0.1 * s.square() * 4 / 3
    torch.testing.assert_close(model.net[1].running_var.double(), expected, rtol=1e-5, atol=1e-6)


def test_checkpoint_saved_before_swap_resumes_into_swapped_module(tmp_path):
    plain = TinyModule(batches=2)
    trainer = make_trainer(max_epochs=1)
    trainer.fit(plain)
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)

    model = TinyModule(batches=2)
    make_trainer(max_epochs=2, callbacks=[BatchNormSwap("l1")]).fit(model, ckpt_path=path)
    assert type(model.net[1]) is normdecouple.L1BatchNorm1d
    assert model.net[1].num_batches_tracked.item() == 4  # the 2 steps of the checkpoint, then 2 more


def test_checkpoint_saved_after_swap_loads_into_unmodified_module(tmp_path):
    model = TinyModule()
    trainer = make_trainer(max_steps=3, callbacks=[BatchNormSwap("l1")])
    trainer.fit(model)
    path = tmp_path / "swapped.ckpt"
    trainer.save_checkpoint(path)

    plain = TinyModule.load_from_checkpoint(path)
    assert type(plain.net[1]) is nn.BatchNorm1d
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(model.x), model(model.x))


class BuiltLate(TinyModule):
    """TinyModule whose network is built in ``setup()`` or ``configure_model()`` (Lightning's documented places
    to build layers, called after the callbacks' setup), as a copy of ``template`` so that a module built in
    ``__init__`` can be compared with it."""

    def __init__(self, where, template, **kwargs):
        super().__init__(**kwargs)
        del self.net
        self.where = where
        self.template = [template]  # a list: not registered as a submodule
        self.seen = []  # the batch-norm class each training or validation step ran

    def _build(self):
        # Lightning calls the hooks again for every fit/validate: build once (its documented idiom).
        if "net" not in self._modules:
            self.net = copy.deepcopy(self.template[0])

    def setup(self, stage):
        if self.where == "setup":
            self._build()

    def configure_model(self):
        if self.where == "configure_model":
            self._build()

    def training_step(self, batch, batch_idx):
        self.seen.append(type(self.net[1]))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.seen.append(type(self.net[1]))
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def val_dataloader(self):
        return self.train_dataloader()


@pytest.mark.parametrize("where", ["setup", "configure_model"])
def test_batchnorm_swap_converts_layers_built_in_setup_or_configure_model(where):
    # Side by side: the same network built in __init__ and in the hook trains identically, with L1 layers whose
    # Parameter objects are the ones the optimizer (built before the conversion) holds.
    early = TinyModule(dtype=torch.float64, lr=0.3, momentum=0.9)
    late = BuiltLate(where, copy.deepcopy(early.net), dtype=torch.float64, lr=0.3, momentum=0.9)
    make_trainer(max_steps=3, callbacks=[BatchNormSwap("l1")]).fit(early)
    trainer = make_trainer(max_steps=3, callbacks=[BatchNormSwap("l1")])
    trainer.fit(late)
    assert late.seen == [normdecouple.L1BatchNorm1d] * 3
    assert type(late.net[4]) is normdecouple.L1BatchNorm1d
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in late.parameters()} == held
    for name, t in early.state_dict().items():
        torch.testing.assert_close(late.state_dict()[name], t, rtol=0, atol=0, msg=name)


def test_batchnorm_swap_late_layers_running_stats_are_l1():
    # lr=0: one step's running_var is the L1 variance-equivalent of the first batch (float64 from the formula).
    model = BuiltLate("configure_model", TinyModule().net, lr=0.0)
    make_trainer(max_steps=1, callbacks=[BatchNormSwap("l1")]).fit(model)
    h = model.x[:4].double() @ model.net[0].weight.detach().double().T
    s = math.sqrt(math.pi / 2) * (h - h.mean(0)).abs().mean(0)
    expected = 0.9 + 0.1 * s.square() * 4 / 3
    torch.testing.assert_close(model.net[1].running_var.double(), expected, rtol=1e-5, atol=1e-6)


def test_batchnorm_swap_late_layers_in_validate():
    model = BuiltLate("configure_model", TinyModule().net)
    make_trainer(callbacks=[BatchNormSwap("linf", k=2)]).validate(model)
    assert model.seen and set(model.seen) == {normdecouple.LinfBatchNorm1d} and model.net[1].k == 2


def test_batchnorm_swap_late_layers_resume_with_the_checkpoints_exact_statistics(tmp_path):
    # "16-true" builds the layers in fp16 and Lightning loads the checkpoint into them before the conversion:
    # 1e5 overflows fp16 and 0.1 rounds; the converted float32 statistics must be the checkpoint's own values.
    model = BuiltLate("configure_model", TinyModule().net)
    trainer = make_trainer(max_steps=2, precision="16-true", callbacks=[BatchNormSwap("l1")])
    trainer.fit(model)
    path = tmp_path / "late.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["state_dict"]
    assert state["net.1.running_var"].dtype == torch.float32
    state["net.1.running_var"] = torch.linspace(0.1, 1e5, 8)
    state["net.4.running_mean"] = torch.full((5,), 0.1)
    torch.save(checkpoint, path)
    resumed = BuiltLate("configure_model", TinyModule().net)
    make_trainer(max_steps=2, precision="16-true", callbacks=[BatchNormSwap("l1")]).fit(resumed, ckpt_path=path)
    for key in ("net.1.running_var", "net.4.running_mean", "net.1.running_mean", "net.4.running_var"):
        torch.testing.assert_close(resumed.get_buffer(key), state[key], rtol=0, atol=0, msg=key)
    assert resumed.net[0].weight.dtype == torch.float16  # the run was "16-true"


def test_batchnorm_swap_late_layers_with_sync_batchnorm_true_are_refused():
    model = BuiltLate("configure_model", TinyModule().net)
    with pytest.raises(ValueError, match=r"net\.1, net\.4.*plugins=\[SyncLpBatchNorm\(\)\]"):
        make_trainer(max_steps=1, sync_batchnorm=True, callbacks=[BatchNormSwap("l1")]).fit(model)


@pytest.fixture
def restored_environment():
    """Lightning's DDP sets MASTER_ADDR/PORT and ranks in os.environ and leaves the process group initialised."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def test_batchnorm_swap_late_layers_join_the_sync_plugin_under_ddp(restored_environment):
    # One DDP process in this one (gloo): the strategy applied SyncLpBatchNorm before the late layers were ours;
    # they are synchronised for training all the same, and reverted with the rest at teardown.
    model = BuiltLate("configure_model", TinyModule().net)
    make_trainer(max_steps=2, strategy="ddp", plugins=[SyncLpBatchNorm()], callbacks=[BatchNormSwap("l1")]).fit(
        model)
    assert model.seen == [normdecouple.SyncL1BatchNorm] * 2
    assert type(model.net[1]) is normdecouple.L1BatchNorm1d


def test_batchnorm_swap_late_layers_under_a_sharded_strategy_are_refused():
    # FSDP needs CUDA: its hook is called as the Trainer would, with the strategy that has wrapped the layers.
    from pytorch_lightning.strategies import FSDPStrategy

    model = BuiltLate("configure_model", TinyModule().net)
    model.configure_model()
    trainer = types.SimpleNamespace(strategy=FSDPStrategy(), state=types.SimpleNamespace(fn="fit"))
    with pytest.raises(ValueError, match=r"net\.1', 'net\.4'.*FSDPStrategy.*configure_model"):
        BatchNormSwap("l1").on_fit_start(trainer, model)
    assert type(model.net[1]) is nn.BatchNorm1d  # left as it was


# ---------------------------------------------------------------------------------------------------------------
# WeightNormProjection


class StepCounter:
    """Counts the projections that touch at least one weight, by wrapping the hook's method."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = normdecouple.WeightNormProjection._after_step

        def counting(hook, *args):
            self.count += 1
            return original(hook, *args)

        monkeypatch.setattr(normdecouple.WeightNormProjection, "_after_step", counting)


@pytest.mark.parametrize("example", [False, True], ids=["first-batch", "example_input_array"])
def test_projection_keeps_chosen_weights_on_sphere(example):
    model = TinyModule(lr=0.5, momentum=0.9, example=example)
    head_before = model.net[6].weight.detach().clone()
    callback = WeightNormProjection(radius=2.0)
    make_trainer(max_steps=4, callbacks=[callback]).fit(model)
    for name in CHOSEN:
        w = model.get_parameter(name)
        torch.testing.assert_close(channel_norms(w), torch.full((w.shape[0],), 2.0, dtype=torch.float64))
    assert not torch.allclose(channel_norms(model.net[6].weight), torch.full((1,), 2.0, dtype=torch.float64))
    assert not torch.equal(model.net[6].weight, head_before)  # the head trained, unprojected
    assert not callback.attached  # removed at teardown
    assert sorted(callback.state_dict()["hooks"]["0"]["radius"]) == CHOSEN


class TwoOptimizers(TinyModule):
    """Manual optimization with one optimizer per block, as in GAN-style modules."""

    def __init__(self):
        super().__init__(lr=0.5)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        first, second = self.optimizers()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self):
        first = torch.optim.SGD(self.net[:3].parameters(), lr=self.lr)
        second = torch.optim.Adam(self.net[3:].parameters(), lr=self.lr)
        return first, second


def test_projection_attaches_to_every_optimizer():
    model = TwoOptimizers()
    callback = WeightNormProjection(radius=1.5)
    make_trainer(max_steps=4, callbacks=[callback]).fit(model)
    state = callback.state_dict()["hooks"]
    assert list(state["0"]["radius"]) == ["net.0.weight"] and list(state["1"]["radius"]) == ["net.3.weight"]
    for name in CHOSEN:
        w = model.get_parameter(name)
        torch.testing.assert_close(channel_norms(w), torch.full((w.shape[0],), 1.5, dtype=torch.float64))


def test_projection_once_per_real_step_under_accumulation(monkeypatch):
    counter = StepCounter(monkeypatch)
    make_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[WeightNormProjection(radius=1.0)]).fit(
        TinyModule(batches=4))
    assert counter.count == 2  # 4 batches, one optimizer step every 2


def test_projection_skipped_with_amp_skipped_step(monkeypatch):
    # Lightning forbids "16-mixed" on CPU; its MixedPrecision plugin with a CPU GradScaler is the same code path.
    counter = StepCounter(monkeypatch)
    model = TinyModule(batches=4, inf_batch=2)
    seen = {}

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[batch_idx] = pl_module.net[0].weight.detach().clone()

    # A small initial scale: with the default 2**16 a legitimate first step can overflow fp16 and be skipped as
    # well (correctly, but then the count would depend on the data).
    precision = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))
    make_trainer(max_epochs=1, plugins=[precision], callbacks=[WeightNormProjection(radius=1.0), Watch()]).fit(
        model)
    assert counter.count == 3  # 4 batches, the one with inf gradients skipped by the scaler
    torch.testing.assert_close(seen[2], seen[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# NormScaledLR: the Lightning run equals a plain PyTorch loop with the normdecouple hook


def plain_loop(model, steps, accumulate=1, reference=1.0):
    opt = model.configure_optimizers()
    hook = normdecouple.NormScaledLR(opt, CHOSEN, reference=reference, model=model)
    loader = model.train_dataloader()
    for i, (x, y) in enumerate(loader):
        if i == steps * accumulate:
            break
        (nn.functional.mse_loss(model(x), y) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    hook.remove()
    return model


@pytest.mark.parametrize("optimizer, momentum, accumulate", [("sgd", 0.9, 1), ("adam", 0.0, 1), ("sgd", 0.0, 2)],
                         ids=["sgd-momentum(power2)", "adam(power1)", "sgd-accumulate2"])
def test_norm_scaled_lr_matches_plain_loop(optimizer, momentum, accumulate):
    # float64 so that the two runs agree to rounding; the reference 1.0 is far from the weights' norms (~1.3-2),
    # so the rescaling changes the result (checked against a run without the callback).
    kwargs = dict(dtype=torch.float64, optimizer=optimizer, lr=0.05, momentum=momentum, batches=4)
    torch.manual_seed(0)
    ours = TinyModule(**kwargs)
    reference = TinyModule(**kwargs)
    reference.load_state_dict(ours.state_dict())
    unscaled = TinyModule(**kwargs)
    unscaled.load_state_dict(ours.state_dict())
    steps = 4 // accumulate
    callback = NormScaledLR(CHOSEN, reference=1.0)
    make_trainer(max_epochs=1, accumulate_grad_batches=accumulate, callbacks=[callback]).fit(ours)
    make_trainer(max_epochs=1, accumulate_grad_batches=accumulate).fit(unscaled)
    plain_loop(reference, steps, accumulate)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, reference.get_parameter(name))
    assert not torch.allclose(ours.net[0].weight, unscaled.net[0].weight)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"], ids=["power2", "power1"])
def test_norm_scaled_lr_leaves_amp_skipped_step_alone(optimizer):
    model = TinyModule(optimizer=optimizer, lr=0.01, batches=4, inf_batch=2)
    seen = {}

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[batch_idx] = pl_module.net[0].weight.detach().clone()

    precision = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))
    make_trainer(max_epochs=1, plugins=[precision], callbacks=[NormScaledLR(reference=1.0), Watch()]).fit(model)
    torch.testing.assert_close(seen[2], seen[1], rtol=0, atol=0)  # skipped: the weights untouched
    assert not torch.equal(seen[3], seen[2]) and torch.isfinite(seen[3]).all()  # and the next step is normal


# ---------------------------------------------------------------------------------------------------------------
# Resume equals the uninterrupted run


class RadiusSchedule(Callback):
    """The paper's norm schedule: the radii grow by sqrt(2) at the start of epoch 1."""

    def __init__(self, projection):
        self.projection = projection

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.projection.scale_radius(math.sqrt(2))


def resume_callbacks():
    projection = WeightNormProjection(radius="init")
    # NormScaledLR's references ("init") and the projection's radius scale both differ between the start of the
    # run and the resumption point, so a resume that lost their state would diverge.
    return [BatchNormSwap("l1"), projection, NormScaledLR(reference="init"), RadiusSchedule(projection)]


def test_resume_equals_uninterrupted(tmp_path):
    kwargs = dict(dtype=torch.float64, lr=0.2, momentum=0.9, batches=2)
    torch.manual_seed(0)
    straight = TinyModule(**kwargs)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    # Saves at every epoch end while the hooks are attached: the mid-run checkpoint of a real job.
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    make_trainer(max_epochs=4, enable_checkpointing=True, callbacks=resume_callbacks() + [every_epoch]).fit(straight)

    # A checkpoint saved after fit, once the hooks are detached (their state kept for it).
    first = TinyModule(**kwargs)
    first.load_state_dict(init)
    trainer = make_trainer(max_epochs=2, callbacks=resume_callbacks())
    trainer.fit(first)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)

    for ckpt_path in (tmp_path / "epoch=1.ckpt", path):
        resumed = TinyModule(**kwargs)
        make_trainer(max_epochs=4, callbacks=resume_callbacks()).fit(resumed, ckpt_path=ckpt_path)
        for name, p in straight.named_parameters():
            torch.testing.assert_close(resumed.get_parameter(name), p)
        for name, b in straight.named_buffers():
            torch.testing.assert_close(resumed.get_buffer(name), b)

    # Control: the same resume without the callbacks' saved state diverges, so the test above has teeth.
    ckpt = torch.load(path, weights_only=False)
    ckpt["callbacks"] = {k: v for k, v in ckpt["callbacks"].items()
                         if "WeightNormProjection" not in k and "NormScaledLR" not in k}
    stripped = tmp_path / "stripped.ckpt"
    torch.save(ckpt, stripped)
    lost = TinyModule(**kwargs)
    make_trainer(max_epochs=4, callbacks=resume_callbacks()).fit(lost, ckpt_path=stripped)
    assert not torch.allclose(lost.net[0].weight, straight.net[0].weight)


# ---------------------------------------------------------------------------------------------------------------
# Precision


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-true"])
@pytest.mark.parametrize("low_precision", [False, True])
def test_precision_settings(precision, low_precision):
    model = TinyModule(lr=0.1)
    seen = []

    class RecordInput(Callback):
        def on_fit_start(self, trainer, pl_module):
            # After BatchNormSwap's setup: the hook goes on the converted layer.
            pl_module.net[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))

    make_trainer(max_steps=2, precision=precision,
                 callbacks=[BatchNormSwap("l1", low_precision=low_precision), WeightNormProjection(radius=1.0),
                            RecordInput()]).fit(model)
    layer = model.net[1]
    assert type(layer) is normdecouple.L1BatchNorm1d and layer.low_precision is low_precision
    half = torch.float16 if precision.startswith("16") else torch.bfloat16
    assert set(seen) == {half}  # autocast ("-mixed") or the model's dtype ("-true")
    assert layer.weight.dtype == (half if precision.endswith("-true") else torch.float32)
    assert layer.running_var.dtype == torch.float32 and torch.isfinite(layer.running_var).all()
    assert (layer.running_var != 1).all()  # the statistics were updated
    # Half-precision weights hold the projected norm to their precision: bf16 ~3 digits, fp16 ~3.
    tol = 1e-2 if precision.endswith("-true") else 1e-6
    torch.testing.assert_close(channel_norms(model.net[0].weight), torch.ones(8, dtype=torch.float64),
                               rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------------
# sync_batchnorm=True guard


@pytest.mark.parametrize("callback", [BatchNormSwap("l1"), WeightNormMonitor(), WeightNormProjection(),
                                      NormScaledLR()], ids=lambda c: type(c).__name__)
def test_sync_batchnorm_true_is_refused(callback):
    model = TinyModule()
    if not isinstance(callback, BatchNormSwap):
        model = normdecouple.convert_batchnorm(model, "l1")  # a module built with our layers
    trainer = make_trainer(max_steps=1, sync_batchnorm=True, callbacks=[callback])
    with pytest.raises(ValueError, match=r"net\.1, net\.4.*plugins=\[SyncLpBatchNorm\(\)\]"):
        trainer.fit(model)


def test_sync_batchnorm_true_without_our_layers_is_allowed():
    # torch's BatchNorm only, and a monitor: nothing of ours would be turned into L2.
    make_trainer(max_steps=1, sync_batchnorm=True, callbacks=[WeightNormMonitor(params=CHOSEN)]).fit(TinyModule())


def test_lightning_refuses_plugin_with_sync_batchnorm_true():
    with pytest.raises(Exception, match="sync_batchnorm"):
        make_trainer(sync_batchnorm=True, plugins=[SyncLpBatchNorm()])


def test_sync_plugin_apply_and_revert():
    model = normdecouple.convert_batchnorm(TinyModule(), "linf", k=2)
    plugin = SyncLpBatchNorm()
    synced = plugin.apply(model)
    assert type(synced.net[1]) is normdecouple.SyncLinfBatchNorm
    reverted = plugin.revert(synced)
    assert type(reverted.net[1]) is normdecouple.LinfBatchNorm1d and reverted.net[1].k == 2


# ---------------------------------------------------------------------------------------------------------------
# WeightNormMonitor


def read_metrics(tmp_path):
    files = list(tmp_path.rglob("metrics.csv"))
    assert len(files) == 1
    with open(files[0]) as f:
        return list(csv.DictReader(f))


def test_monitor_logs_norm_effective_lr_and_angle(tmp_path):
    model = TinyModule(lr=0.3)
    before = params_of(model)
    make_trainer(tmp_path, max_steps=1, log_every_n_steps=1, logger=CSVLogger(tmp_path),
                 callbacks=[WeightNormMonitor()]).fit(model)
    (row,) = [r for r in read_metrics(tmp_path) if r.get("weight_norm/net.0.weight")]
    assert "weight_norm/net.6.weight" not in row  # not scale-invariant, so not chosen by params="auto"
    for name in CHOSEN:
        w0, w1 = before[name].double(), model.get_parameter(name).detach().double()
        n0, n1 = channel_norms(w0), channel_norms(w1)
        assert float(row[f"weight_norm/{name}"]) == pytest.approx(n1.mean().item(), rel=1e-6)
        # SGD: the direction moves with lr/||w||^2.
        assert float(row[f"effective_lr/{name}"]) == pytest.approx((0.3 / n0**2).mean().item(), rel=1e-6)
        cos = (w0 * w1).sum(1) / (n0 * n1)
        angle = torch.acos(cos.clamp(-1, 1)).mean().item()
        assert angle > 1e-3
        assert float(row[f"angular_update/{name}"]) == pytest.approx(angle, rel=1e-4)


def test_monitor_with_projection_and_adam(tmp_path):
    model = TinyModule(optimizer="adam", lr=0.01)
    make_trainer(tmp_path, max_steps=3, log_every_n_steps=1, logger=CSVLogger(tmp_path),
                 callbacks=[WeightNormProjection(radius=2.0), WeightNormMonitor()]).fit(model)
    rows = [r for r in read_metrics(tmp_path) if r.get("weight_norm/net.3.weight")]
    assert len(rows) == 3
    for r in rows:
        assert float(r["weight_norm/net.3.weight"]) == pytest.approx(2.0, rel=1e-6)
        assert float(r["effective_lr/net.3.weight"]) == pytest.approx(0.01 / 2.0, rel=1e-6)  # Adam: lr/||w||


@pytest.mark.parametrize("interval, accumulate, expected_rows", [("step", 2, 2), ("epoch", 1, 2)])
def test_monitor_intervals(tmp_path, interval, accumulate, expected_rows):
    # 2 epochs of 2 batches; with accumulation 2 that is 2 optimizer steps; by epoch, 2 rows.
    make_trainer(tmp_path, max_epochs=2, log_every_n_steps=1, accumulate_grad_batches=accumulate,
                 logger=CSVLogger(tmp_path), callbacks=[WeightNormMonitor(interval, params=CHOSEN)]).fit(
        TinyModule(batches=2))
    rows = [r for r in read_metrics(tmp_path) if r.get("angular_update/net.0.weight")]
    assert len(rows) == expected_rows
    assert all(float(r["angular_update/net.0.weight"]) > 0 for r in rows)


class SelfLogging(TinyModule):
    """Logs its loss with Lightning's own self.log, per step and per epoch: the cadence to follow."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss


def logged_steps(rows, key):
    return sorted({int(r["step"]) for r in rows if r.get(key)})


@pytest.mark.parametrize("every, accumulate", [(2, 1), (3, 1), (1, 2), (2, 2), (0, 1)])
def test_monitor_logs_at_the_steps_self_log_and_learning_rate_monitor_log_at(tmp_path, every, accumulate):
    from pytorch_lightning.callbacks import LearningRateMonitor

    make_trainer(tmp_path, max_epochs=2, log_every_n_steps=every, accumulate_grad_batches=accumulate,
                 logger=CSVLogger(tmp_path), callbacks=[WeightNormMonitor(params=CHOSEN), LearningRateMonitor("step")]).fit(
        SelfLogging(batches=7))
    rows = read_metrics(tmp_path)
    lightning = logged_steps(rows, "train_loss_step")
    assert lightning == logged_steps(rows, "lr-SGD")
    assert bool(lightning) == (every > 0)  # log_every_n_steps=0 logs no step, without an error
    for key in ("weight_norm", "effective_lr", "angular_update"):
        assert logged_steps(rows, f"{key}/net.0.weight") == lightning, key


def test_monitor_by_epoch_logs_at_the_step_of_self_logs_epoch_values(tmp_path):
    make_trainer(tmp_path, max_epochs=3, logger=CSVLogger(tmp_path),
                 callbacks=[WeightNormMonitor("epoch", params=CHOSEN)]).fit(SelfLogging(batches=3))
    rows = read_metrics(tmp_path)
    assert logged_steps(rows, "angular_update/net.0.weight") == logged_steps(rows, "train_loss_epoch") == [2, 5, 8]


class RawStep(Callback):
    """The weights and the raw gradients of the chosen weights before the step (NormScaledLR scales them later, in
    on_before_optimizer_step)."""

    def on_after_backward(self, trainer, pl_module):
        self.weights = {n: pl_module.get_parameter(n).detach().clone() for n in CHOSEN}
        self.grads = {n: pl_module.get_parameter(n).grad.detach().clone() for n in CHOSEN}


@pytest.mark.parametrize("reference", [None, 0.5])
def test_monitor_effective_lr_is_the_step_of_the_direction(tmp_path, reference):
    # Plain SGD on exactly scale-invariant weights (float64, eps=1e-300): the step f·lr·g is orthogonal to w, so
    # the channel turns by tan θ = f·lr·‖g‖/‖w‖, and the gradient on the unit sphere is ∇L(ŵ) = ‖w‖·g: the step
    # size of the direction, per unit of ∇L(ŵ), is tan θ / (‖w‖·‖g‖). NormScaledLR's f = (‖w‖/ρ)² makes it lr/ρ².
    model = NoForward(dtype=torch.float64, lr=0.3)
    raw = RawStep()
    callbacks = [WeightNormMonitor(params=CHOSEN), raw]
    if reference is not None:
        callbacks.append(NormScaledLR(params=CHOSEN, reference=reference))
    make_trainer(tmp_path, max_steps=1, log_every_n_steps=1, logger=CSVLogger(tmp_path), callbacks=callbacks).fit(
        model)
    (row,) = [r for r in read_metrics(tmp_path) if r.get("effective_lr/net.0.weight")]
    for name in CHOSEN:
        w0, g, w1 = raw.weights[name], raw.grads[name], model.get_parameter(name).detach()
        tan = channel_norms(w1 - w0) / channel_norms(w0)
        step_of_direction = tan / (channel_norms(w0) * channel_norms(g))
        logged = float(row[f"effective_lr/{name}"])
        assert logged == pytest.approx(step_of_direction.mean().item(), rel=1e-9)
        if reference is not None:
            assert logged == pytest.approx(0.3 / reference**2, rel=1e-9)


def test_monitor_effective_lr_under_norm_scaled_lr_with_adam(tmp_path):
    # Adam's update ignores the gradient's scale: the direction moves with lr/‖w‖, which NormScaledLR's factor
    # ‖w‖/ρ turns into lr/ρ whatever the norm has become.
    make_trainer(tmp_path, max_steps=3, log_every_n_steps=1, logger=CSVLogger(tmp_path),
                 callbacks=[NormScaledLR(reference=0.5), WeightNormMonitor()]).fit(
        TinyModule(optimizer="adam", lr=0.01))
    rows = [r for r in read_metrics(tmp_path) if r.get("effective_lr/net.3.weight")]
    assert len(rows) == 3
    for r in rows:
        assert float(r["weight_norm/net.3.weight"]) != pytest.approx(0.5, rel=1e-3)  # the norm is not ρ
        assert float(r["effective_lr/net.3.weight"]) == pytest.approx(0.01 / 0.5, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# A LightningModule without forward: training_step calls self.net directly (as in Lightning's own docs)


class NoForward(TinyModule):
    """TinyModule without forward; float64 batch norms with eps=1e-300 make the chosen weights exactly
    scale-invariant, so the gradient rescaling at attachment is exact."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for m in self.net:
            if isinstance(m, nn.BatchNorm1d):
                m.eps = 1e-300

    forward = pl.LightningModule.forward

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


def test_module_without_forward_trains_with_every_callback(tmp_path):
    model = NoForward(dtype=torch.float64, lr=0.3, momentum=0.9)
    projection, scaled_lr = WeightNormProjection(radius=2.0), NormScaledLR(reference=1.0)
    callbacks = [BatchNormSwap("l1"), projection, scaled_lr, WeightNormMonitor()]
    make_trainer(tmp_path, max_epochs=1, logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1,
                 callbacks=callbacks).fit(model)
    assert isinstance(model.net[1], normdecouple.L1BatchNorm1d)
    assert sorted(projection.state_dict()["hooks"]["0"]["radius"]) == CHOSEN
    assert sorted(scaled_lr.state_dict()["hooks"]["0"]["reference"]) == CHOSEN
    for name in CHOSEN:
        w = model.get_parameter(name)
        torch.testing.assert_close(channel_norms(w), torch.full((w.shape[0],), 2.0, dtype=torch.float64))
    rows = read_metrics(tmp_path)
    # The first step is the traced one (its weights are found from its loss): logged from the second step on.
    assert {f"weight_norm/{n}" for n in CHOSEN} <= set(rows[-1]) and "weight_norm/net.6.weight" not in rows[-1]


def independent_loop(model, steps):
    """The reference: a plain PyTorch loop, the hooks attached before the first forward."""
    opt = model.configure_optimizers()
    normdecouple.WeightNormProjection(opt, CHOSEN, radius=2.0, model=model)
    normdecouple.NormScaledLR(opt, CHOSEN, reference=1.0, model=model)
    for i, (x, y) in enumerate(model.train_dataloader()):
        if i == steps:
            break
        opt.zero_grad()
        nn.functional.mse_loss(model.net(x), y).backward()
        opt.step()


def test_module_without_forward_equals_hooks_attached_before_the_first_step():
    # The hooks attach after the first step's backward (the weights are found from its loss); the projection onto
    # radius 2 then rescales that step's gradients, so every step equals the plain loop's.
    lightning, plain = NoForward(dtype=torch.float64, lr=0.3, momentum=0.9), None
    plain = NoForward(dtype=torch.float64, lr=0.3, momentum=0.9)
    plain.load_state_dict(lightning.state_dict())
    make_trainer(max_steps=4, callbacks=[WeightNormProjection(radius=2.0), NormScaledLR(reference=1.0)]).fit(
        lightning)
    independent_loop(plain, 4)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(lightning.get_parameter(name), p, rtol=1e-12, atol=1e-14, msg=name)


def test_module_without_forward_and_batch_to_inputs_is_a_clear_error():
    with pytest.raises(ValueError, match="example_input_array.*params="):
        make_trainer(max_steps=1, callbacks=[WeightNormProjection(batch_to_inputs=lambda b: (b[0],))]).fit(
            NoForward())


# ---------------------------------------------------------------------------------------------------------------
# params="auto" in the modes the training step runs in (API.md §7), on every path


class FrozenFirstBatchNorm(TinyModule):
    """The fine-tuning idiom: net.1 frozen in eval mode with pretrained-like statistics by the module's own
    on_fit_start, which Lightning runs after the callbacks' on_fit_start. net.0.weight then reaches the output
    through a fixed affine map and is not scale-invariant; net.3.weight still is."""

    def __init__(self, path, **kwargs):
        super().__init__(example=path == "example_input_array", **kwargs)
        with torch.no_grad():
            self.net[1].running_mean.copy_(torch.linspace(-1, 1, 8))
            self.net[1].running_var.copy_(torch.linspace(0.5, 2, 8))

    def on_fit_start(self):
        self.net[1].eval()


class FrozenNoForward(FrozenFirstBatchNorm):
    forward = pl.LightningModule.forward

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


@pytest.mark.parametrize("path", ["example_input_array", "first-batch", "no-forward"])
def test_auto_analyses_the_modes_the_training_step_runs_in(path):
    model = (FrozenNoForward if path == "no-forward" else FrozenFirstBatchNorm)(path, lr=0.3)
    head_norms = channel_norms(model.net[0].weight)
    projection = WeightNormProjection(radius=2.0)
    make_trainer(max_steps=3, callbacks=[projection]).fit(model)
    assert not model.net[1].training and model.net[4].training  # the modes the steps ran in
    assert list(projection.state_dict()["hooks"]["0"]["radius"]) == ["net.3.weight"]
    torch.testing.assert_close(channel_norms(model.net[3].weight), torch.full((5,), 2.0, dtype=torch.float64))
    # net.0.weight trained unprojected (its norms moved, and not to 2).
    norms = channel_norms(model.net[0].weight)
    assert not torch.allclose(norms, head_norms) and not torch.allclose(norms, torch.full_like(norms, 2.0))


@pytest.mark.parametrize("module", [TinyModule, NoForward], ids=["forward", "no-forward"])
def test_a_module_wholly_in_eval_is_analysed_in_eval_on_both_paths(module):
    # Lightning trains a module left in eval mode in eval mode (it warns, and does not call train()): no
    # BatchNorm normalises with batch statistics, so no weight is scale-invariant, whichever path finds them.
    model = module(dtype=torch.float64)
    model.eval()
    with pytest.raises(ValueError, match="found no scale-invariant weight"):
        make_trainer(max_steps=2, callbacks=[WeightNormProjection(radius=2.0)]).fit(model)
    assert not model.training


# ---------------------------------------------------------------------------------------------------------------
# scale_radius at any time, and resume at a schedule epoch


def test_scale_radius_before_the_hooks_attach_is_kept():
    callback = WeightNormProjection(radius=1.0)
    callback.scale_radius(2.0)
    callback.scale_radius(1.5)
    with pytest.raises(ValueError, match="factor"):
        callback.scale_radius(0.0)
    model = TinyModule(lr=0.5)
    make_trainer(max_steps=3, callbacks=[callback]).fit(model)
    for name in CHOSEN:
        w = model.get_parameter(name)
        # float32 weights: their norms are 3 to float32 rounding.
        torch.testing.assert_close(channel_norms(w), torch.full((w.shape[0],), 3.0, dtype=torch.float64),
                                   rtol=1e-6, atol=0)
    assert callback.state_dict()["hooks"]["0"]["radius_scale"] == 3.0


class EarlySchedule(Callback):
    """The norm schedule at the start of epochs 0 and 1: before the hooks attach when they wait for a batch."""

    def __init__(self, projection):
        self.projection = projection

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch in (0, 1):
            self.projection.scale_radius(math.sqrt(2))


@pytest.mark.parametrize("module", [TinyModule, NoForward], ids=["forward", "no-forward"])
@pytest.mark.parametrize("radius", ["init", 0.7])
def test_resume_at_a_schedule_epoch_equals_uninterrupted(tmp_path, module, radius):
    def callbacks():
        projection = WeightNormProjection(radius=radius)
        return [projection, NormScaledLR(reference="init"), EarlySchedule(projection)]

    kwargs = dict(dtype=torch.float64, lr=0.2, momentum=0.9, batches=2)
    straight = module(**kwargs)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    make_trainer(max_epochs=3, enable_checkpointing=True, callbacks=callbacks() + [every_epoch]).fit(straight)
    # epoch=0.ckpt: the resumed run starts at epoch 1, whose on_train_epoch_start scales the radius.
    resumed = module(**kwargs)
    resumed.load_state_dict(init)
    make_trainer(max_epochs=3, callbacks=callbacks()).fit(resumed, ckpt_path=tmp_path / "epoch=0.ckpt")
    for name, p in straight.named_parameters():
        torch.testing.assert_close(resumed.get_parameter(name), p, rtol=1e-13, atol=1e-15, msg=name)
    for name, b in straight.named_buffers():
        torch.testing.assert_close(resumed.get_buffer(name), b, rtol=1e-13, atol=1e-15, msg=name)
