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

from ._common import AutoWeights, check_no_torch_layer_sync, check_params

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
    - ``effective_lr/<name>``: the mean over output channels of :math:`\eta/\lVert w_i\rVert^{\text{power}}`
      with the norm before the step and :math:`\eta` the learning rate of the weight's param group. For a
      scale-invariant weight this is the step size of its direction: power 2 for optimizers whose update is
      proportional to the gradient (SGD, ASGD: the gradient shrinks as :math:`1/\lVert w\rVert`), power 1 for
      those whose update ignores the gradient's scale (Adam, AdamW, Adamax, NAdam, RMSprop, Adagrad, Rprop);
      other optimizers need ``power=``, else this key is left out;
    - ``angular_update/<name>``: the mean over output channels of the angle (radians) between :math:`w_i` before
      and after the step (``"epoch"``: between the start and the end of the epoch), computed as
      :math:`2\,\mathrm{atan2}(\lVert u-v\rVert, \lVert u+v\rVert)` of the unit vectors, accurate for small
      angles where ``acos`` is not.

    ``logging_interval="step"`` logs every ``Trainer(log_every_n_steps=...)`` optimizer steps (once per real step
    under gradient accumulation; a step AMP skipped shows an angular update of 0); ``"epoch"`` logs at the end of
    every training epoch. Under DDP every rank computes the values and they are averaged over ranks with the
    strategy's all-reduce (one collective per log) before rank zero writes them; the replicas hold the same weights,
    so this guards against ranks drifting apart rather than changing the value. Sharded strategies (FSDP,
    DeepSpeed stage 3) are not supported: each rank would see only its shard.

    Args:
        logging_interval: ``"step"`` or ``"epoch"``. Default: ``"step"``.
        params: ``"auto"`` (the scale-invariant weights, found by :func:`normdecouple.scale_invariant_parameters`
            on ``example_input_array`` or the first training batch; for a module without ``forward``, by following
            its first training step as it runs, so the first step's values are logged from the second on) or an
            iterable of parameter names. Default:
            ``"auto"``.
        power: ``"auto"`` (from the optimizer's type, as above), 1 or 2. Default: ``"auto"``.
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
        # Copies of the weights before the step (or the epoch) being measured, and what the step used.
        self._before: dict[str, Tensor] = {}
        self._lr: dict[str, tuple[float, int | None]] = {}
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
            self._step = trainer.global_step

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
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._step = trainer.global_step
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
            self._log(trainer, pl_module)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizers: list) -> None:
        by_name = dict(pl_module.named_parameters())
        for opt in optimizers:
            power = self.power if self.power != "auto" else default_power(opt)
            if power is None and not self._warned_power:
                self._warned_power = True
                rank_zero_warn(
                    f"WeightNormMonitor: power='auto' does not know {type(opt).__name__}; effective_lr/* is not "
                    "logged for its weights. Pass power=2 (SGD-like) or power=1 (Adam-like)"
                )
            groups = {id(p): g for g in opt.param_groups for p in g["params"]}
            for name in self._names or []:
                p = by_name[name]
                if id(p) in groups:
                    self._before[name] = p.detach().clone()
                    self._lr[name] = (float(groups[id(p)]["lr"]), power)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        by_name = dict(pl_module.named_parameters())
        keys: list[str] = []
        values: list[Tensor] = []
        for name, before in self._before.items():
            owner, _, leaf = name.rpartition(".")
            dim = output_channel_dim(pl_module.get_submodule(owner), leaf) if before.dim() >= 2 else 0
            a, b = _channels(before, dim), _channels(by_name[name], dim)
            norm_a, norm_b = a.norm(dim=1), b.norm(dim=1)
            lr, power = self._lr[name]
            keys.append(f"weight_norm/{name}")
            values.append(norm_b.mean())
            if power is not None:
                keys.append(f"effective_lr/{name}")
                values.append((lr / norm_a.pow(power)).mean())
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
