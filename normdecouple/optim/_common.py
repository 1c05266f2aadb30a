"""What the optimizer hooks share: choosing the weights and their output-channel dimension, per-channel norms,
keyed per-parameter state, removal.

References: arXiv:1803.01814
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..scale_invariance import scale_invariant_parameters
from .checks import check_optimizer

__all__ = ["output_channel_dim"]

Key = str | int
ParamsArg = str | Iterable[nn.Parameter] | Iterable[str]


def state_dtype(p: Tensor) -> torch.dtype:
    """The dtype of per-channel state (norms, radii) of ``p``: never narrower than float32."""
    return torch.promote_types(p.dtype, torch.float32)


def output_channel_dim(module: nn.Module, name: str) -> int:
    """The dimension of ``module``'s parameter ``name`` that indexes its output channels.

    1 for the weight of a transposed convolution (``ConvTranspose{1,2,3}d``, lazy ones included), whose shape is
    ``(C_in, C_out / groups, *kernel)``; 0 for every other parameter (convolutions, linear layers).

    Example::

        >>> import torch
        >>> from normdecouple.optim import output_channel_dim
        >>> output_channel_dim(torch.nn.ConvTranspose2d(3, 8, 3), "weight")
        1
    """
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return 1 if isinstance(module, transposed) and name == "weight" else 0


def channel_norms(weights: Sequence[Tensor], p: float = 2, channel_dims: Sequence[int] | None = None) -> list[Tensor]:
    """The ``p``-norm of each output channel (slice along its channel dimension, 0 by default) of each weight.

    Returned in the ``keepdim`` shape (``(C_out, 1, ..., 1)`` for dimension 0), ready to broadcast against the
    weight, in :func:`state_dtype`. Works on any strides: nothing is copied to make a weight contiguous.
    """
    norms = []
    for i, w in enumerate(weights):
        dtype = state_dtype(w)
        if w.dim() == 1:
            # Each channel is one value; a reduction would read dim=() as "every dimension".
            norms.append(w.abs().to(dtype))
            continue
        channel = channel_dims[i] if channel_dims is not None else 0
        dims = tuple(d for d in range(w.dim()) if d != channel)
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
    allow_1d: bool = False,
) -> tuple[list[nn.Parameter], list[Key], list[int]]:
    """The chosen parameters, their state keys and their output-channel dimensions.

    Keys are names in ``model`` if given, else positions in the optimizer: a position is the parameter's index in
    ``[p for g in optimizer.param_groups for p in g["params"]]``, the numbering ``optimizer.state_dict()`` uses.
    The output-channel dimension comes from the module holding the parameter (:func:`output_channel_dim`), so it
    needs ``model``; without one it is 0.
    """
    check_optimizer(optimizer)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"expected model to be a torch.nn.Module or None (got {type(model).__name__})")
    if not isinstance(allow_1d, bool):
        raise TypeError(f"{owner}: expected allow_1d to be a bool (got {allow_1d!r})")
    position = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    by_name = dict(model.named_parameters()) if model is not None else {}

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
                if item not in by_name:
                    raise ValueError(
                        f"expected parameter names of the model (got {item!r}, which is not one); "
                        f"see model.named_parameters() (e.g. {list(by_name)[:5]})"
                    )
                item = by_name[item]
            elif not isinstance(item, Tensor):
                raise TypeError(f"expected parameters or parameter names in params (got {type(item).__name__})")
            chosen.append(item)
        if not chosen:
            raise ValueError("expected at least one parameter in params (got none); or use params='auto'")

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
                f"expected floating-point parameters with at least one dimension, one of them the output "
                f"channels (got {label} with dtype {p.dtype} and shape {tuple(p.shape)})"
            )
        if p.dim() == 1 and not allow_1d:
            raise ValueError(
                f"{owner}: expected weights with output channels, of at least 2 dimensions (got "
                f"{names.get(id(p), f'params[{i}]')} of shape {tuple(p.shape)}): a 1-D parameter such as a bias or a batch norm's weight has one value per "
                "channel, which the hook would treat as that channel's whole norm. Leave it out of params, or "
                "pass allow_1d=True if that is what you want"
            )
        if model is not None and id(p) not in names:
            raise ValueError(f"expected parameters of the given model (got {label}, which is not one)")
    keys: list[Key] = [names[id(p)] for p in chosen] if model is not None else [position[id(p)] for p in chosen]
    dims = [_channel_dim_in(model, names[id(p)]) if model is not None and p.dim() >= 2 else 0 for p in chosen]
    return chosen, keys, dims


def _channel_dim_in(model: nn.Module, name: str) -> int:
    owner_name, _, leaf = name.rpartition(".")
    return output_channel_dim(model.get_submodule(owner_name), leaf)


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
        raise ValueError(
            f"{owner}.load_state_dict: expected {what!r} to be a dict of per-channel tensors keyed like the hook's "
            f"keys (got {type(saved).__name__}); pass a state from {owner}.state_dict()"
        )
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
        allow_1d: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.params, self.keys, self.channel_dims = resolve_params(
            self._owner, optimizer, params, model, example_inputs, allow_1d
        )
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


def required_entries(owner: str, state_dict: Any, names: Sequence[str]) -> list[Any]:
    """The values of ``names`` in a hook's saved state, or a ``ValueError`` naming those missing."""
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"{owner}.load_state_dict: expected a dict with keys {list(names)} (got {type(state_dict).__name__}); "
            f"pass a state from {owner}.state_dict()"
        )
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise ValueError(
            f"{owner}.load_state_dict: expected keys {list(names)} (missing: {missing}, got {sorted(state_dict)}); "
            f"pass a state from {owner}.state_dict()"
        )
    return [state_dict[n] for n in names]
