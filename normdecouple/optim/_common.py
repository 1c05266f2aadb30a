"""What the optimizer hooks share: choosing the weights, per-channel norms, keyed per-parameter state, removal.

References: arXiv:1803.01814
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..scale_invariance import scale_invariant_parameters

__all__: list[str] = []

Key = str | int
ParamsArg = str | Iterable[nn.Parameter] | Iterable[str]


def state_dtype(p: Tensor) -> torch.dtype:
    """The dtype of per-channel state (norms, radii) of ``p``: never narrower than float32."""
    return torch.promote_types(p.dtype, torch.float32)


def channel_norms(weights: Sequence[Tensor], p: float = 2) -> list[Tensor]:
    """The ``p``-norm of each output channel (slice along dimension 0) of each weight.

    Returned in the ``keepdim`` shape ``(C_out, 1, ..., 1)``, ready to broadcast against the weight, in
    :func:`state_dtype`. Works on any strides: nothing is copied to make a weight contiguous.
    """
    norms = []
    for w in weights:
        dtype = state_dtype(w)
        if w.dim() == 1:
            # Each channel is one value; a reduction would read dim=() as "every dimension".
            norms.append(w.abs().to(dtype))
            continue
        dims = tuple(range(1, w.dim()))
        # The reductions below are the fastest form of each norm on CPU (measured with
        # benchmarks/optim_overhead.py: vector_norm takes 7x longer for inf and 2x for 1). amax/amin are exact in
        # any dtype and need no temporary.
        if p == 2:
            upcast = dtype if dtype != w.dtype else None
            norms.append(torch.linalg.vector_norm(w, dim=dims, keepdim=True, dtype=upcast))
        elif p == 1:
            norms.append(w.abs().sum(dims, keepdim=True, dtype=dtype))
        else:
            norms.append(torch.maximum(w.amax(dims, keepdim=True), w.amin(dims, keepdim=True).neg_()).to(dtype))
    return norms


def check_positive_number(value: Any, what: str, remedy: str) -> float:
    """``value`` as a float if it is a positive finite real number, else a ``ValueError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"expected {what} to be a positive finite number (got {value!r}); {remedy}")
    return float(value)


def check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected optimizer to be a torch.optim.Optimizer (got {type(optimizer).__name__})")


def _example_inputs_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        "expected example_inputs to be a tuple of the model's positional inputs "
        f"(got {type(example_inputs).__name__}); pass example_inputs=(batch,)"
    )


def resolve_params(
    owner: str,
    optimizer: torch.optim.Optimizer,
    params: ParamsArg,
    model: nn.Module | None,
    example_inputs: Any,
) -> tuple[list[nn.Parameter], list[Key]]:
    """The chosen parameters and their state keys: names in ``model`` if given, else positions in the optimizer.

    A position is the parameter's index in ``[p for g in optimizer.param_groups for p in g["params"]]``, the
    numbering ``optimizer.state_dict()`` uses.
    """
    check_optimizer(optimizer)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"expected model to be a torch.nn.Module or None (got {type(model).__name__})")
    position = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}

    if isinstance(params, str):
        if params != "auto":
            raise ValueError(
                f"expected params to be 'auto' or an iterable of parameters or of parameter names (got {params!r})"
            )
        if model is None or example_inputs is None:
            raise ValueError(
                f"{owner}(params='auto') finds the scale-invariant weights by running the model once: pass "
                "model= and example_inputs=(batch,), or pass params= explicitly "
                f"(got model={'None' if model is None else type(model).__name__}, "
                f"example_inputs={'None' if example_inputs is None else type(example_inputs).__name__})"
            )
        found = scale_invariant_parameters(model, *_example_inputs_tuple(example_inputs))
        by_name = dict(model.named_parameters())
        chosen = [by_name[n] for n in found if id(by_name[n]) in position]
        if not chosen:
            raise ValueError(
                f"{owner}(params='auto') found no scale-invariant weight among the optimizer's parameters "
                f"(scale-invariant in the model: {found}); a weight qualifies when its output channels reach the "
                "output only through a batch norm. Pass params= explicitly, or do not attach the hook"
            )
    else:
        if isinstance(params, Tensor) or not isinstance(params, Iterable):
            raise TypeError(
                "expected params to be 'auto' or an iterable of parameters or of parameter names "
                f"(got {type(params).__name__}); wrap a single parameter in a list"
            )
        chosen = []
        for item in params:
            if isinstance(item, str):
                if model is None:
                    raise TypeError(
                        f"got the parameter name {item!r} without a model: pass model= to look names up, or pass "
                        "the parameters themselves"
                    )
                lookup = dict(model.named_parameters())
                if item not in lookup:
                    raise ValueError(
                        f"expected parameter names of the model (got {item!r}, which is not one); "
                        f"see model.named_parameters() (e.g. {list(lookup)[:5]})"
                    )
                item = lookup[item]
            elif not isinstance(item, Tensor):
                raise TypeError(f"expected parameters or parameter names in params (got {type(item).__name__})")
            chosen.append(item)
        if not chosen:
            raise ValueError(f"expected at least one parameter in params (got none); or use params='auto'")

    seen: set[int] = set()
    for i, p in enumerate(chosen):
        label = names.get(id(p), f"params[{i}] of shape {tuple(p.shape)}")
        if id(p) not in position:
            raise ValueError(
                f"expected every chosen parameter to be in the optimizer (got {label}, which is not in any of its "
                "param_groups): add it to the optimizer, or leave it out of params"
            )
        if id(p) in seen:
            raise ValueError(f"expected each parameter once in params (got {label} twice)")
        seen.add(id(p))
        if not p.is_floating_point() or p.dim() == 0:
            raise ValueError(
                f"expected floating-point parameters with at least one dimension, dimension 0 being the output "
                f"channels (got {label} with dtype {p.dtype})"
            )
        if model is not None and id(p) not in names:
            raise ValueError(f"expected parameters of the given model (got {label}, which is not one)")
    keys: list[Key] = [names[id(p)] for p in chosen] if model is not None else [position[id(p)] for p in chosen]
    return chosen, keys


def check_nonzero(norms: Sequence[Tensor], keys: Sequence[Key], owner: str, remedy: str) -> None:
    """A channel of norm zero has no direction to keep or to rescale relative to: a ``ValueError``."""
    for n, key in zip(norms, keys):
        if not bool((n > 0).all()):
            zero = (n.flatten() == 0).nonzero().flatten().tolist()
            raise ValueError(
                f"{owner}: expected every output channel of the chosen weights to be non-zero "
                f"(got zero channels {zero} in parameter {key!r}); {remedy}"
            )


def state_to_dict(keys: Sequence[Key], tensors: Sequence[Tensor]) -> dict[Key, Tensor]:
    """Per-parameter tensors as ``{key: 1-D copy}``, one value per output channel."""
    return {key: t.detach().reshape(-1).clone() for key, t in zip(keys, tensors)}


def load_state_from_dict(
    owner: str, what: str, keys: Sequence[Key], tensors: Sequence[Tensor], saved: dict[Key, Tensor]
) -> None:
    """Copies ``saved`` (from :func:`state_to_dict`) into ``tensors``, checking keys and sizes first."""
    if not isinstance(saved, dict):
        raise TypeError(f"{owner}.load_state_dict: expected {what!r} to be a dict (got {type(saved).__name__})")
    missing = [k for k in keys if k not in saved]
    unexpected = [k for k in saved if k not in set(keys)]
    if missing or unexpected:
        raise ValueError(
            f"{owner}.load_state_dict: expected {what!r} for the same parameters as this hook "
            f"(missing: {missing}, unexpected: {unexpected}); construct the hook with the same params, and with "
            "model= if and only if the saved one had it (keys are parameter names with a model, positions in the "
            "optimizer without)"
        )
    for key, t in zip(keys, tensors):
        value = saved[key]
        if not isinstance(value, Tensor) or value.numel() != t.numel():
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"{owner}.load_state_dict: expected {what!r}[{key!r}] to hold {t.numel()} values, one per output "
                f"channel (got {got})"
            )
    with torch.no_grad():
        for key, t in zip(keys, tensors):
            t.copy_(saved[key].reshape(t.shape))


class ChannelHook:
    """Base of the optimizer hooks: the chosen parameters, their keys and the hook handles."""

    _owner = "ChannelHook"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: ParamsArg,
        model: nn.Module | None,
        example_inputs: Any,
    ) -> None:
        self.optimizer = optimizer
        self.params, self.keys = resolve_params(self._owner, optimizer, params, model, example_inputs)
        self._handles: list[RemovableHandle] = []

    def _with_grad(self) -> list[int]:
        # Like torch's optimizers, a parameter without a gradient is left alone.
        return [i for i, p in enumerate(self.params) if p.grad is not None]

    def remove(self) -> None:
        """Detaches the hook from the optimizer; the optimizer then steps as if it had never been attached.

        Calling it twice is harmless.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        """Whether the hook is still attached to the optimizer."""
        return bool(self._handles)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.params)} parameters, {self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""
