"""The lifecycle shared by the callbacks that attach a normdecouple optimizer hook to every optimizer.

Attach at fit start (explicit names, or the names in the checkpoint being resumed), else as soon as the weights
are found at the first training batch, in the modes its step runs in (before its forward, with
``example_input_array`` or the batch, or after its backward when the step itself is traced); keep the state Lightning restores from a checkpoint until the hooks exist; detach at
teardown.

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

from ._common import AutoWeights, check_no_torch_layer_sync, check_params, split_by_optimizer

__all__: list[str] = []


class OptimizerHookCallback(Callback):
    """Base: subclasses build one normdecouple hook per optimizer in :meth:`_make_hook`."""

    _owner = "OptimizerHookCallback"

    def __init__(self, params: Any, batch_to_inputs: Callable[[Any], tuple] | None) -> None:
        self.params = check_params(params, self._owner)
        self._auto = AutoWeights(self._owner, batch_to_inputs)
        self.batch_to_inputs = batch_to_inputs
        # One hook per optimizer index; None for an optimizer that holds none of the chosen weights.
        self._hooks: list[Any] = []
        # State restored from a checkpoint before the hooks exist (Lightning restores callbacks before fit start).
        self._pending: dict[str, Any] | None = None
        # Names found by tracing the first training step, waiting for its backward to end.
        self._found: list[str] | None = None

    @property
    @override
    def state_key(self) -> str:
        # Two instances with different settings (e.g. projections of two weight sets) keep separate states.
        return self._generate_state_key(params=self.params, **self._settings())

    def _settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def _saved_names(self, hook_state: dict[str, Any]) -> list[str]:
        """The parameter names a saved hook state is keyed by, those it was waiting for included."""
        raise NotImplementedError

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_no_torch_layer_sync(trainer, pl_module, self._owner)
        if stage == "fit":
            self._pending = None
            self._found = None
            self._auto.reset(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Attach before anything can step whenever the weights are known without a batch.
        if self.params != "auto":
            self._attach(trainer, pl_module, self.params)
        elif self._pending:
            # A resumed run acts on the weights the checkpoint's hooks acted on.
            self._attach(trainer, pl_module, self._names_in(self._pending))
        else:
            names = self._auto.at_fit_start(trainer, pl_module)
            if names is not None:
                self._attach(trainer, pl_module, names)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The first batch as the training step gets it (already on the device); reading one from the dataloader
        # here would draw from the global RNG and make the run differ from one without the callback.
        if not self.attached and self._found is None:
            names = self._auto.at_batch_start(trainer, pl_module, batch)
            if names is not None:
                self._attach(trainer, pl_module, names)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not self.attached and self._found is None:
            self._found = self._auto.at_before_backward(trainer, loss)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the backward, before the step: a hook that moves the weights now must not touch the ones saved for
        # the backward, and its gradients are rescaled to those at the moved weights.
        if not self.attached and self._found is not None:
            found, self._found = self._found, None
            self._attach(trainer, pl_module, found, after_backward=True)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.attached:
            self._auto.at_batch_end(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._auto.reset(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._auto.reset(trainer)
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

    def _names_in(self, state_dict: dict[str, Any]) -> list[str]:
        hooks = state_dict.get("hooks") if isinstance(state_dict, dict) else None
        if not isinstance(hooks, dict):
            raise ValueError(
                f"{self._owner}: expected the checkpoint's state to hold 'hooks', a dict of per-optimizer hook "
                f"states (got {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}); "
                "resume from a checkpoint saved with this callback"
            )
        names = [name for key in sorted(hooks) for name in self._saved_names(hooks[key])]
        return list(dict.fromkeys(names))  # a weight waited for by several hooks, once

    def _attach(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str], after_backward: bool = False
    ) -> None:
        optimizers = list(trainer.optimizers)
        auto = self.params == "auto"
        by_name = dict(pl_module.named_parameters())
        if auto:
            # Each optimizer's hook gets the weights it holds, plus those no optimizer holds yet: they join when a
            # param group adds them (BackboneFinetuning's backbone), and the hooks follow param groups.
            unknown = [n for n in names if n not in by_name]
            if unknown or not names:
                split_by_optimizer(names, pl_module, optimizers, self._owner, strict=False)  # raises, with the why
            held = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in optimizers]
            orphans = [n for n in names if not any(id(by_name[n]) in ids for ids in held)]
            split = [[n for n in names if id(by_name[n]) in ids] for ids in held]
            chosen_by = [own + orphans if own or orphans else [] for own in split]
        else:
            split = split_by_optimizer(names, pl_module, optimizers, self._owner, strict=True)
            chosen_by = split
        before = {n: by_name[n].detach().clone() for n in names} if after_backward else {}
        self._hooks = [
            self._make_hook(opt, chosen, pl_module, auto) if chosen else None
            for opt, chosen in zip(optimizers, chosen_by)
        ]
        rank_zero_info(
            f"{self._owner}: attached to {sum(h is not None for h in self._hooks)} optimizer(s) for "
            f"{sum(map(len, split))} weight(s)" + (f", waiting for {len(orphans)} not in any optimizer yet"
                                                    if auto and orphans else "")
        )
        if self._pending is not None:
            self._load_into_hooks(self._pending)
            self._pending = None
        self._after_attach()
        if after_backward:
            self._rescale_gradients(before, by_name)

    def _after_attach(self) -> None:
        """Runs once the hooks exist and hold their restored state."""

    def _rescale_gradients(self, before: dict[str, torch.Tensor], by_name: dict[str, torch.nn.Parameter]) -> None:
        # The weights are scale-invariant, so the gradient at w' = c·w (per output channel) is g / c: a hook that
        # moved the weights after the backward leaves the step equal to the one taken had it moved them before.
        with torch.no_grad():
            for hook in self._hooks:
                if hook is None:
                    continue
                for key, p, dim in zip(hook.keys, hook.params, hook.channel_dims):
                    if p.grad is None or key not in before or torch.equal(p, before[key]):
                        continue
                    dims = tuple(d for d in range(p.dim()) if d != dim)
                    old = torch.linalg.vector_norm(before[key], dim=dims, keepdim=True)
                    p.grad.mul_((old / torch.linalg.vector_norm(p, dim=dims, keepdim=True)).to(p.grad.dtype))

    def _make_hook(
        self, optimizer: torch.optim.Optimizer, names: list[str], pl_module: pl.LightningModule, auto: bool
    ) -> Any:
        """The hook for ``optimizer``: on the weights ``names`` (``auto``: those found scale-invariant, of which
        the ones not in ``optimizer`` yet are waited for), keyed by name in ``pl_module``."""
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
