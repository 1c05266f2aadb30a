"""The lifecycle shared by the callbacks that attach a normdecouple optimizer hook to every optimizer.

Attach at fit start (or at the first training batch when the weights are found from it), keep the state Lightning
restores from a checkpoint until the hooks exist, detach at teardown.

References: arXiv:1803.01814
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

from ._common import check_no_torch_layer_sync, check_params, example_inputs, scale_invariant_names, split_by_optimizer

__all__: list[str] = []


class _OptimizerHookCallback(Callback):
    """Base: subclasses build one normdecouple hook per optimizer in :meth:`_make_hook`."""

    _owner = "_OptimizerHookCallback"

    def __init__(self, params: Any, batch_to_inputs: Callable[[Any], tuple] | None) -> None:
        self.params = check_params(params, self._owner)
        if batch_to_inputs is not None and not callable(batch_to_inputs):
            raise TypeError(
                f"{self._owner}: expected batch_to_inputs to be a callable from a batch to forward's positional "
                f"arguments, or None (got {type(batch_to_inputs).__name__})"
            )
        self.batch_to_inputs = batch_to_inputs
        # One hook per optimizer index; None for an optimizer that holds none of the chosen weights.
        self._hooks: list[Any] = []
        # State restored from a checkpoint before the hooks exist (Lightning restores callbacks before fit start).
        self._pending: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        # Two instances with different settings (e.g. projections of two weight sets) keep separate states.
        return self._generate_state_key(params=self.params, **self._settings())

    def _settings(self) -> dict[str, Any]:
        raise NotImplementedError

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_no_torch_layer_sync(trainer, pl_module, self._owner)
        if stage == "fit":
            self._pending = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Explicit names or an example_input_array need no batch: attach before anything can step.
        if self.params != "auto" or pl_module.example_input_array is not None:
            self._attach(trainer, pl_module, batch=None)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The first batch as the training step gets it (already on the device); reading one from the dataloader
        # here would draw from the global RNG and make the run differ from one without the callback.
        if not self.attached:
            self._attach(trainer, pl_module, batch=batch)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.attached:
            # Kept so that a checkpoint saved after fit (trainer.save_checkpoint) still holds the state.
            self._pending = self.state_dict()
            for hook in self._hooks:
                if hook is not None:
                    hook.remove()
            self._hooks = []

    @property
    def attached(self) -> bool:
        """Whether the hooks are attached to the Trainer's optimizers."""
        return bool(self._hooks)

    @property
    def hooks(self) -> list[Any]:
        """The normdecouple hook of each optimizer (``None`` where it holds no chosen weight); empty if detached."""
        return list(self._hooks)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        optimizers = list(trainer.optimizers)
        if self.params == "auto":
            inputs = example_inputs(pl_module, batch, self.batch_to_inputs)
            if inputs is None:
                return
            names = scale_invariant_names(trainer, pl_module, inputs)
            split = split_by_optimizer(names, pl_module, optimizers, self._owner, strict=False)
        else:
            split = split_by_optimizer(self.params, pl_module, optimizers, self._owner, strict=True)
        self._hooks = [
            self._make_hook(opt, chosen, pl_module) if chosen else None for opt, chosen in zip(optimizers, split)
        ]
        rank_zero_info(
            f"{self._owner}: attached to {sum(h is not None for h in self._hooks)} optimizer(s) for "
            f"{sum(map(len, split))} weight(s)"
        )
        if self._pending is not None:
            self._load_into_hooks(self._pending)
            self._pending = None

    def _make_hook(self, optimizer: torch.optim.Optimizer, names: list[str], pl_module: pl.LightningModule) -> Any:
        raise NotImplementedError

    @override
    def state_dict(self) -> dict[str, Any]:
        if not self.attached:
            return dict(self._pending) if self._pending is not None else {}
        return {"hooks": {str(i): h.state_dict() for i, h in enumerate(self._hooks) if h is not None}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.attached:
            # Strategies that restore after setup (restore_checkpoint_after_setup) hand the state back late.
            self._load_into_hooks(state_dict)
        else:
            self._pending = dict(state_dict)

    def _load_into_hooks(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("hooks", {})
        mine = {str(i) for i, h in enumerate(self._hooks) if h is not None}
        if set(saved) != mine:
            raise ValueError(
                f"{self._owner}: the checkpoint holds hook state for optimizers {sorted(saved)} but this run "
                f"attached to optimizers {sorted(mine)}; resume with the same configure_optimizers and params"
            )
        for key, hook_state in saved.items():
            self._hooks[int(key)].load_state_dict(hook_state)
