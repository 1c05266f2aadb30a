"""Lightning callback: log per-layer weight norms, effective learning rates and angular updates.

References: arXiv:1803.01814
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from normdecouple.optim import default_power, output_channel_dim
from normdecouple.optim.checks import check_power

from ._common import AutoWeights, check_no_torch_layer_sync, check_params, logging_step, should_log_step
from .norm_scaled_lr import NormScaledLR as NormScaledLRCallback

__all__ = ["WeightNormMonitor"]

_INTERVALS = ("step", "epoch")


def _channels(w: Tensor, dim: int) -> Tensor:
    """``w`` as ``(C_out, rest)`` in at least float32, one row per output channel (slice along ``dim``)."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    return w.detach().to(dtype).movedim(dim, 0).reshape(w.shape[dim], -1)


class WeightNormMonitor(Callback):
    r"""Logs, for each chosen weight, its norm, its effective learning rate and its angular update.

    Like :class:`~pytorch_lightning.callbacks.LearningRateMonitor`, it writes to every logger of the Trainer,
    under keys that name the quantity and the parameter's qualified name in the LightningModule:

    - ``weight_norm/<name>``: the mean over output channels of :math:`\lVert w_i\rVert_2` after the step (with
      :class:`WeightNormProjection` at ``radius=r``, exactly ``r``);
    - ``effective_lr/<name>``: the mean over output channels of the step size of the channel's direction
      (PAPER.md §1): the angle it turns per unit of the loss's gradient on the unit sphere,
      :math:`\nabla L(\hat w_i)`, for SGD-like optimizers, per unit of the optimizer's own (scale-free) update
      for Adam-like ones. With :math:`\eta` the learning rate of the weight's param group and
      :math:`\lVert w_i\rVert` the norm before the step, that is :math:`\eta/\lVert w_i\rVert^{p}`: power
      :math:`p = 2` for optimizers whose update is proportional to the gradient (SGD, ASGD: the gradient of a
      scale-invariant weight shrinks as :math:`1/\lVert w\rVert`), :math:`p = 1` for those whose update
      ignores the gradient's scale (Adam, AdamW, Adamax, NAdam, RMSprop, Adagrad, Rprop). Under the
      :class:`NormScaledLR` callback, which multiplies the step by :math:`(\lVert w_i\rVert/\rho_i)^{q}` (its
      reference :math:`\rho_i`, its power :math:`q`), it is :math:`\eta\,\lVert w_i\rVert^{q-p}/\rho_i^{q}`,
      that is :math:`\eta/\rho_i^{p}` when the hook's power is the optimizer's: the LR schedule alone sets it.
      Under :class:`WeightNormProjection` the norm before each step is the radius. For a weight that is not
      scale-invariant it is the same formula, without that meaning. Other optimizers need ``power=`` (or a
      ``NormScaledLR`` hook on the optimizer, whose power is then used), else this key is left out;
    - ``angular_update/<name>``: the mean over output channels of the angle (radians) between :math:`w_i` before
      and after the step (``"epoch"``: between the start and the end of the epoch), computed as
      :math:`2\,\mathrm{atan2}(\lVert u-v\rVert, \lVert u+v\rVert)` of the unit vectors, accurate for small
      angles where ``acos`` is not.

    ``logging_interval="step"`` logs at the steps and under the step numbers Lightning logs ``self.log`` and
    ``LearningRateMonitor`` at: every ``Trainer(log_every_n_steps=...)`` optimizer steps, at steps
    ``n - 1, 2n - 1, ...`` (counted once per batch that steps, so once per real step under gradient accumulation;
    a step AMP skipped shows an angular update of 0), and at the last step when the Trainer stops early; nothing
    with ``log_every_n_steps=0``. Whether a step is logged is decided before its optimizer step (the weights are
    copied then). ``"epoch"`` logs at the end of every training epoch, at the step number ``self.log(...,
    on_epoch=True)`` uses there. Under DDP every rank computes the values and they are averaged over ranks with
    the strategy's all-reduce (one collective per log) before rank zero writes them; the replicas hold the same
    weights, so this guards against ranks drifting apart rather than changing the value. Sharded strategies
    (FSDP, DeepSpeed stage 3) are not supported: each rank would see only its shard.

    Args:
        logging_interval: ``"step"`` or ``"epoch"``. Default: ``"step"``.
        params: ``"auto"`` (the scale-invariant weights, found by :func:`normdecouple.scale_invariant_parameters`
            on ``example_input_array`` or the first training batch; for a module without ``forward``, by following
            its first training step as it runs, so the first step's values are logged from the second on) or an
            iterable of parameter names. Default:
            ``"auto"``.
        power: the optimizer family's power :math:`p` above: ``"auto"`` (from the optimizer's type, else from a
            ``NormScaledLR`` hook on it), 1 or 2. Default: ``"auto"``.
        batch_to_inputs: for ``params="auto"`` without ``example_input_array``: a function from a training batch
            to the tuple of ``forward``'s positional arguments. Default: ``None``.

    Raises:
        ValueError: at construction for a bad ``logging_interval``, ``params`` or ``power``; at setup if the
            Trainer has ``sync_batchnorm=True`` and the module has normdecouple layers.

    Example::

        >>> import pytorch_lightning as pl
        >>> from lightning_callbacks import WeightNormMonitor
        >>> trainer = pl.Trainer(callbacks=[WeightNormMonitor(logging_interval="step")], accelerator="cpu")

    References: arXiv:1803.01814
    """

    def __init__(
        self,
        logging_interval: str = "step",
        params: str | Iterable[str] = "auto",
        *,
        power: int | str = "auto",
        batch_to_inputs: Callable[[Any], tuple] | None = None,
    ) -> None:
        if logging_interval not in _INTERVALS:
            raise ValueError(
                f"WeightNormMonitor: expected logging_interval to be 'step' or 'epoch' (got {logging_interval!r})"
            )
        self.power = check_power(power, "WeightNormMonitor")
        self._auto = AutoWeights("WeightNormMonitor", batch_to_inputs)
        self.logging_interval = logging_interval
        self.params = check_params(params, "WeightNormMonitor")
        self.batch_to_inputs = batch_to_inputs
        self._names: list[str] | None = None
        # Copies of the weights before the step (or the epoch) being measured, and what the step used: the
        # learning rate, the optimizer family's power, and a NormScaledLR hook's references and power.
        self._before: dict[str, Tensor] = {}
        self._lr: dict[str, tuple[float, int | None, Tensor | None, int | None]] = {}
        self._step: int = 0
        self._warned_power = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(logging_interval=self.logging_interval, params=self.params)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_no_torch_layer_sync(trainer, pl_module, "WeightNormMonitor")
        if stage == "fit":
            self._names = None
            self._before = {}
            self._auto.reset(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.loggers:
            rank_zero_warn("WeightNormMonitor: the Trainer has no logger, so nothing will be logged")
        if self.params != "auto":
            unknown = set(self.params) - {n for n, _ in pl_module.named_parameters()}
            if unknown:
                raise ValueError(
                    f"WeightNormMonitor: expected parameter names of the LightningModule (got {sorted(unknown)})"
                )
            self._names = list(self.params)
        else:
            self._names = self._auto.at_fit_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._names is None:
            self._names = self._auto.at_batch_start(trainer, pl_module, batch)
        self._start_epoch_record(trainer, pl_module)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._names is None:
            # Found by following this first training step; no optimizer has stepped yet in it.
            self._names = self._auto.at_before_backward(trainer, loss)
            self._start_epoch_record(trainer, pl_module)

    def _start_epoch_record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.logging_interval == "epoch" and self._names is not None and not self._before:
            self._record(trainer, pl_module, list(trainer.optimizers))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._auto.reset(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._auto.reset(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.logging_interval != "step" or self._names is None:
            return
        # Lightning's own cadence and step numbers, read as LearningRateMonitor reads them.
        if should_log_step(trainer):
            self._step = logging_step(trainer)
            self._record(trainer, pl_module, [optimizer])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._names is None:
            self._auto.at_batch_end(trainer)
        if self.logging_interval == "step" and self._before:
            self._log(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.logging_interval == "epoch" and self._before:
            # Lightning writes a training epoch's metrics under the number of its last step (one less than the
            # count of batches that stepped, which it lowers by one around that write).
            self._step = logging_step(trainer) - 1
            self._log(trainer, pl_module)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizers: list) -> None:
        by_name = dict(pl_module.named_parameters())
        for opt in optimizers:
            scaled = _norm_scaled_lr_references(trainer, opt)
            power = self.power if self.power != "auto" else default_power(opt)
            groups = {id(p): g for g in opt.param_groups for p in g["params"]}
            for name in self._names or []:
                p = by_name[name]
                if id(p) not in groups:
                    continue
                reference, hook_power = scaled.get(id(p), (None, None))
                family = power if power is not None else hook_power
                if family is None and not self._warned_power:
                    self._warned_power = True
                    rank_zero_warn(
                        f"WeightNormMonitor: power='auto' does not know {type(opt).__name__}; effective_lr/* is "
                        "not logged for its weights. Pass power=2 (SGD-like) or power=1 (Adam-like)"
                    )
                self._before[name] = p.detach().clone()
                self._lr[name] = (float(groups[id(p)]["lr"]), family, reference, hook_power)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        by_name = dict(pl_module.named_parameters())
        keys: list[str] = []
        values: list[Tensor] = []
        for name, before in self._before.items():
            owner, _, leaf = name.rpartition(".")
            dim = output_channel_dim(pl_module.get_submodule(owner), leaf) if before.dim() >= 2 else 0
            a, b = _channels(before, dim), _channels(by_name[name], dim)
            norm_a, norm_b = a.norm(dim=1), b.norm(dim=1)
            lr, power, reference, hook_power = self._lr[name]
            keys.append(f"weight_norm/{name}")
            values.append(norm_b.mean())
            if power is not None:
                effective = lr / norm_a.pow(power)
                if reference is not None:
                    # NormScaledLR multiplied the step by (‖w‖/ρ)^q: η ‖w‖^(q-p) / ρ^q.
                    effective = effective * (norm_a / reference.to(norm_a)).pow(hook_power)
                keys.append(f"effective_lr/{name}")
                values.append(effective.mean())
            # A zero channel has no direction: it counts as not turning.
            u = a / norm_a.clamp_min(torch.finfo(a.dtype).tiny).unsqueeze(1)
            v = b / norm_b.clamp_min(torch.finfo(b.dtype).tiny).unsqueeze(1)
            angle = 2 * torch.atan2((u - v).norm(dim=1), (u + v).norm(dim=1))
            keys.append(f"angular_update/{name}")
            values.append(torch.where((norm_a > 0) & (norm_b > 0), angle, 0.0).mean())
        self._before = {}
        self._lr = {}
        if not keys:
            return
        # One all-reduce for every value; every rank reaches this point at the same steps.
        stacked = trainer.strategy.reduce(torch.stack([v.double() for v in values]), reduce_op="mean")
        metrics = dict(zip(keys, stacked.tolist()))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._step)


def _norm_scaled_lr_references(trainer: pl.Trainer, optimizer: torch.optim.Optimizer
                               ) -> dict[int, tuple[Tensor, int]]:
    """``{id(parameter): (per-channel reference norms, power)}`` of the hooks the Trainer's NormScaledLR callbacks
    hold on ``optimizer`` (a ``normdecouple.NormScaledLR`` attached to it directly cannot run under Lightning,
    which steps with a closure: see the callback)."""
    hooks = [h for cb in trainer.callbacks if isinstance(cb, NormScaledLRCallback)
             for h in cb.hooks if h is not None and h.optimizer is optimizer]
    found: dict[int, tuple[Tensor, int]] = {}
    for hook in hooks:
        references = hook.references
        for p, key in zip(hook.params, hook.keys):
            found[id(p)] = (references[key], hook.power)
    return found
