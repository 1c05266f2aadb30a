"""What the optimizer hooks share: choosing the weights and their output-channel dimension, per-channel norms,
keyed per-parameter state, removal.

References: arXiv:1803.01814
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

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


class Resolved(NamedTuple):
    """The weights a hook acts on, found by :func:`resolve_params`."""

    params: list[nn.Parameter]  # chosen and in the optimizer now
    keys: list[Key]
    dims: list[int]
    waiting: list[tuple[Key, nn.Parameter, int]]  # chosen (``params="auto"``) but not in the optimizer yet
    analysed: set[int] | None  # ids of the model's parameters at the analysis (``params="auto"``), else None


def resolve_params(
    owner: str,
    optimizer: torch.optim.Optimizer,
    params: ParamsArg,
    model: nn.Module | None,
    example_inputs: Any,
    allow_1d: bool = False,
    found: Sequence[str] | None = None,
) -> Resolved:
    """The chosen parameters, their state keys and their output-channel dimensions.

    Keys are names in ``model`` if given, else positions in the optimizer: a position is the parameter's index in
    ``[p for g in optimizer.param_groups for p in g["params"]]``, the numbering ``optimizer.state_dict()`` uses.
    The output-channel dimension comes from the module holding the parameter (:func:`output_channel_dim`), so it
    needs ``model``; without one it is 0.

    With ``params="auto"`` the scale-invariant weights of the model that are not in the optimizer yet are returned
    as ``waiting`` (the hooks take them on when they are added with ``optimizer.add_param_group``); ``found``
    replaces the analysis by names the caller found itself (the Lightning callbacks analyse the training step).
    """
    check_optimizer(optimizer)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"expected model to be a torch.nn.Module or None (got {type(model).__name__})")
    if not isinstance(allow_1d, bool):
        raise TypeError(f"{owner}: expected allow_1d to be a bool (got {allow_1d!r})")
    position = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    by_name = dict(model.named_parameters()) if model is not None else {}
    waiting_names: list[str] = []
    analysed: set[int] | None = None

    if isinstance(params, str):
        if params != "auto":
            raise ValueError(
                f"expected params to be 'auto' or an iterable of parameters or of parameter names (got {params!r})"
            )
        if model is None or (example_inputs is None and found is None):
            raise ValueError(
                f"{owner}(params='auto') finds the scale-invariant weights by running the model once: pass "
                "model= and example_inputs=(batch,), or pass params= explicitly "
                f"(got model={'None' if model is None else type(model).__name__}, "
                f"example_inputs={'None' if example_inputs is None else type(example_inputs).__name__})"
            )
        if found is None:
            found = scale_invariant_parameters(model, *_example_inputs_tuple(example_inputs))
        unknown = [n for n in found if n not in by_name]
        if unknown:
            raise ValueError(f"{owner}: expected parameter names of the model (got {unknown})")
        analysed = {id(p) for p in by_name.values()}
        chosen = [by_name[n] for n in found if id(by_name[n]) in position]
        waiting_names = [n for n in found if id(by_name[n]) not in position]
        if not found:
            raise ValueError(
                f"{owner}(params='auto') found no scale-invariant weight in the model; a weight qualifies when its "
                "output channels reach the output only through a batch norm. Pass params= explicitly, or do not "
                "attach the hook"
            )
        if not chosen:
            warnings.warn(
                f"{owner}(params='auto'): none of the model's scale-invariant weights {list(found)} is in the "
                "optimizer yet; the hook acts on each of them once it is added (optimizer.add_param_group, as "
                "Lightning's BackboneFinetuning does). If that is not your plan, pass the optimizer that holds them",
                stacklevel=4,
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
    candidates = chosen + [by_name[n] for n in waiting_names]
    for i, p in enumerate(candidates):
        label = names.get(id(p), f"params[{i}] of shape {tuple(p.shape)}")
        if id(p) not in position and i < len(chosen):
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
    waiting = [(n, by_name[n], _channel_dim_in(model, n) if by_name[n].dim() >= 2 else 0) for n in waiting_names]
    return Resolved(chosen, keys, dims, waiting, analysed)


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


def channel_count(p: Tensor, dim: int) -> int:
    """The number of output channels of ``p`` (each value is one for a 1-D parameter)."""
    return p.shape[dim] if p.dim() >= 1 else 1


def keepdim_shape(p: Tensor, dim: int) -> tuple[int, ...]:
    """The shape of per-channel state of ``p``: its channel count along ``dim``, 1 elsewhere."""
    if p.dim() == 1:
        return (p.shape[0],)
    return tuple(p.shape[dim] if d == dim else 1 for d in range(p.dim()))


# For each hook class, the hook acting on each parameter (item: a parameter may carry one hook of each kind).
_REGISTRIES: dict[str, WeakIdKeyDictionary] = {}


class ChannelHook:
    """Base of the optimizer hooks: the chosen parameters, their keys, their per-channel values and the handles.

    What every hook shares:

    - **Param groups added or removed after attach are followed.** Before each step the hook compares the
      optimizer's param groups with those it last saw (a tuple of list identities and lengths, O(groups)). A
      chosen parameter no longer in the optimizer is left alone (its per-channel value kept); one (re)added is
      acted on again, and with ``params="auto"`` a scale-invariant weight of the model added later (Lightning's
      ``BackboneFinetuning``) is taken on, its value measured or set when it joins (:meth:`_on_join`). A parameter
      added later that was not in the model when the weights were found cannot be judged: a warning names it.
    - **Only fresh gradients count.** A parameter whose gradient is the very tensor of the step the hook last
      acted on, unmodified since (no backward in between: Lightning's ``StochasticWeightAveraging`` ends its
      batch-norm epoch with such a step), is left alone, as is one without a gradient.
    - **One hook of a kind per parameter.** A second hook of the same class on a parameter would compose with the
      first; it is refused with a ``ValueError`` naming the parameter (:meth:`remove` frees them).
    """

    _owner = "ChannelHook"
    # What a value of _values is, in error messages and state dicts ("reference", "radius").
    _what = "value"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: ParamsArg,
        model: nn.Module | None,
        example_inputs: Any,
        allow_1d: bool = False,
        found: Sequence[str] | None = None,
    ) -> None:
        self.optimizer = optimizer
        resolved = resolve_params(self._owner, optimizer, params, model, example_inputs, allow_1d, found)
        self.params: list[nn.Parameter] = resolved.params
        self.keys: list[Key] = resolved.keys
        self.channel_dims: list[int] = resolved.dims
        # Every parameter the hook may act on, in the optimizer now or not: {key: (parameter, channel dim)}.
        self._known: dict[Key, tuple[nn.Parameter, int]] = dict(zip(self.keys, zip(self.params, self.channel_dims)))
        self._known.update({k: (p, d) for k, p, d in resolved.waiting})
        self._analysed = resolved.analysed
        self._model = weakref.ref(model) if model is not None else None
        self._unjudged_warned: set[int] = set()
        # Per-channel value of each measured key (keepdim shape, float32 or wider); _aligned follows self.params.
        self._values: dict[Key, Tensor] = {}
        self._aligned: list[Tensor] = []
        self._signature = self._group_signature()
        self._grads_seen: dict[Key, tuple[weakref.ref, int]] = {}
        self._handles: list[RemovableHandle] = []
        self._claimed = False

    # -- parameters and their values --------------------------------------------------------------------------

    def _label(self, key: Key) -> str:
        return repr(key) if isinstance(key, str) else f"at position {key} in the optimizer"

    def _claim(self, indices: Sequence[int]) -> None:
        """Registers this hook on ``self.params[i]``, refusing a parameter that has a live hook of this kind."""
        registry = _REGISTRIES.setdefault(self._owner, WeakIdKeyDictionary())

        def holder(p: nn.Parameter) -> ChannelHook | None:
            ref = registry.get(p)
            other = ref() if ref is not None else None
            return other if other is not None and other is not self and other._claimed else None

        clash = [i for i in indices if holder(self.params[i]) is not None]
        if clash:
            # A hook dropped without remove() stays alive until the cycle collector runs (its optimizer and it
            # refer to each other): collect (holding no reference to it) before refusing.
            gc.collect()
            clash = [i for i in clash if holder(self.params[i]) is not None]
        if clash:
            key, other = self.keys[clash[0]], holder(self.params[clash[0]])
            raise ValueError(
                f"{self._owner}: parameter {self._label(key)} already has a {self._owner} ({other!r}); a second one "
                f"would apply its rescaling on top of the first. Call .remove() on the first hook before attaching "
                "another, or leave the parameter out of params"
            )
        for i in indices:
            registry[self.params[i]] = weakref.ref(self)
        self._claimed = True

    def _release(self, params: Iterable[nn.Parameter]) -> None:
        registry = _REGISTRIES.get(self._owner)
        if registry is None:
            return
        for p in params:
            ref = registry.get(p)
            if ref is not None and ref() is self:
                del registry[p]

    def _realign(self) -> None:
        self._aligned = [self._values[k] for k in self.keys]

    def _on_join(self, indices: list[int]) -> None:
        """Gives ``self.params[i]`` (just chosen, or added to the optimizer) a value in ``self._values``."""
        raise NotImplementedError

    def _group_signature(self) -> tuple:
        return tuple((id(g["params"]), len(g["params"])) for g in self.optimizer.param_groups)

    def _follow_param_groups(self) -> None:
        """Acts on the chosen parameters that are in the optimizer now (see the class docstring)."""
        signature = self._group_signature()
        if signature == self._signature:
            return
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        before = set(self.keys)
        keys = [k for k, (p, _) in self._known.items() if id(p) in held]
        self._release(self._known[k][0] for k in before - set(keys))
        self.keys = keys
        self.params = [self._known[k][0] for k in keys]
        self.channel_dims = [self._known[k][1] for k in keys]
        joined = [i for i, k in enumerate(keys) if k not in before]
        self._claim(joined)
        self._on_join([i for i in joined if self.keys[i] not in self._values])
        self._realign()
        self._signature = signature
        if self._analysed is not None:
            self._warn_unjudged(held)

    def _warn_unjudged(self, held: set[int]) -> None:
        known = {id(p) for p, _ in self._known.values()}
        new = [p for g in self.optimizer.param_groups for p in g["params"]
               if id(p) not in self._analysed and id(p) not in known and id(p) not in self._unjudged_warned
               and p.dim() >= 2]
        if not new:
            return
        self._unjudged_warned.update(id(p) for p in new)
        model = self._model() if self._model is not None else None
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        shown = [names.get(id(p), f"a parameter of shape {tuple(p.shape)}") for p in new]
        warnings.warn(
            f"{self._owner}: the optimizer holds weights added after the hook found the scale-invariant ones, and "
            f"they were not in the model then: {shown}. Whether they are scale-invariant is unknown, so they are "
            "left out; to include them, call .remove() and attach a new hook once the model is complete",
            stacklevel=3,
        )

    def _fresh(self) -> list[int]:
        """Indices of the parameters with a gradient the hook has not acted on yet."""
        out = []
        for i, (key, p) in enumerate(zip(self.keys, self.params)):
            grad = p.grad
            if grad is None:
                continue
            seen = self._grads_seen.get(key)
            if seen is not None and seen[0]() is grad and seen[1] == grad._version:
                continue
            out.append(i)
        return out

    def _mark_seen(self, indices: Iterable[int]) -> None:
        for i in indices:
            grad = self.params[i].grad
            if grad is not None:
                self._grads_seen[self.keys[i]] = (weakref.ref(grad), grad._version)

    # -- state ------------------------------------------------------------------------------------------------

    def _values_state(self) -> dict[Key, Tensor]:
        """Per-channel values as ``{key: 1-D copy}``, one value per output channel, in the hook's key order."""
        return {k: self._values[k].detach().reshape(-1).clone() for k in self._known if k in self._values}

    def _waiting_keys(self) -> list[Key]:
        active = set(self.keys)
        return [k for k in self._known if k not in active]

    def _load_values(self, saved: Any, waiting: Any) -> None:
        """Copies saved values (from :meth:`_values_state`) in, checking keys and sizes first."""
        owner, what = self._owner, self._what
        if not isinstance(saved, dict):
            raise ValueError(
                f"{owner}.load_state_dict: expected {what!r} to be a dict of per-channel tensors keyed like the "
                f"hook's keys (got {type(saved).__name__}); pass a state from {owner}.state_dict()"
            )
        if not isinstance(waiting, (list, tuple)):
            raise ValueError(
                f"{owner}.load_state_dict: expected 'waiting' to be a list of keys (got {type(waiting).__name__}); "
                f"pass a state from {owner}.state_dict()"
            )
        missing = [k for k in self.keys if k not in saved]
        unexpected = [k for k in [*saved, *waiting] if k not in self._known]
        if missing or unexpected:
            raise ValueError(
                f"{owner}.load_state_dict: expected {what!r} for the same parameters as this hook "
                f"(missing: {missing}, unexpected: {unexpected}); construct the hook with the same params, and with "
                "model= if and only if the saved one had it (keys are parameter names with a model, positions in the "
                "optimizer without)"
            )
        for key, value in saved.items():
            p, dim = self._known[key]
            count = channel_count(p, dim)
            if not isinstance(value, Tensor) or value.numel() != count:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"{owner}.load_state_dict: expected {what!r}[{key!r}] to hold {count} values, one per output "
                    f"channel (got {got})"
                )
        with torch.no_grad():
            for key, value in saved.items():
                p, dim = self._known[key]
                if key in self._values:
                    self._values[key].copy_(value.reshape(self._values[key].shape))
                else:
                    self._values[key] = value.detach().to(p.device, state_dtype(p)).reshape(keepdim_shape(p, dim))
        self._realign()

    # -- lifecycle --------------------------------------------------------------------------------------------

    def remove(self) -> None:
        """Detaches the hook from the optimizer; the optimizer then steps as if it had never been attached.

        Calling it twice is harmless. The parameters are free for another hook of this kind afterwards.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._release(p for p, _ in self._known.values())
        self._claimed = False

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
