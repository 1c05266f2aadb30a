"""Model-level fusion of our BatchNorm layers with the ReLU/LeakyReLU that follows them, and its exact undo.

:func:`fuse_activations` replaces an ``L1BatchNorm{1,2,3}d``/``LinfBatchNorm{1,2,3}d`` whose output goes only
into a ``torch.nn.ReLU``/``LeakyReLU`` by the matching fused layer (:mod:`normdecouple.batchnorm_act`, which
saves its output instead of its input: half the activation memory of the pair), and the activation by a
:class:`FusedActivation` (an ``nn.Identity`` that remembers the original module). :func:`unfuse_activations`
puts both back. ``convert_batchnorm(..., fuse_activation=True, example_inputs=...)`` and ``revert_batchnorm``
call these two.

Which pairs are fused:

* **Without example inputs**: adjacent children of a plain ``nn.Sequential`` (exact class, so its ``forward``
  feeds each child's output only to the next child), each module registered once in the whole model.
* **With example inputs**: one forward is followed (module hooks and the autograd graph of its outputs): a
  layer is fused with an activation when every call of the layer feeds its output, unmodified, to that
  activation and to nothing else (one consumer in the graph, not itself a model output), and every call of the
  activation takes such an output. So a module that calls ``self.bn`` then ``self.act`` fuses, a ReLU instance
  that is also used after a residual addition (torchvision's ``self.relu``) does not, and neither does a layer
  whose output is also used elsewhere. The forward runs in the model's current mode, under
  ``torch.random.fork_rng``, and every buffer (running statistics, ``num_batches_tracked``) is restored after it.
  Uses that autograd cannot see (``.detach()``, ``torch.no_grad()`` code) are not detected: do not pass such
  models, or fuse by hand.

Never fused: layers or activations with hooks (the hooks would see other tensors), synchronised layers, our
layers' subclasses, ``LeakyReLU`` with a slope <= 0, the root module itself.

Both functions are all-or-nothing (everything is planned and built before the model is touched) and keep the
``Parameter`` objects, buffers, parametrizations, ``training``, device, dtype and ``state_dict`` keys
(``FusedActivation`` has no state, like the activation it replaces).

References: arXiv:1803.01814
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .batchnorm import (
    L1BatchNorm1d,
    L1BatchNorm2d,
    L1BatchNorm3d,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
    LinfBatchNorm3d,
    LpBatchNorm,
)
from .batchnorm_act import (
    L1BatchNormAct1d,
    L1BatchNormAct2d,
    L1BatchNormAct3d,
    LinfBatchNormAct1d,
    LinfBatchNormAct2d,
    LinfBatchNormAct3d,
)
from .convert import blank_like, transplant_state

__all__ = ["FusedActivation", "fuse_activations", "unfuse_activations", "fusable_pairs"]

_FUSED_CLASS: dict[type[LpBatchNorm], type[LpBatchNorm]] = {
    L1BatchNorm1d: L1BatchNormAct1d,
    L1BatchNorm2d: L1BatchNormAct2d,
    L1BatchNorm3d: L1BatchNormAct3d,
    LinfBatchNorm1d: LinfBatchNormAct1d,
    LinfBatchNorm2d: LinfBatchNormAct2d,
    LinfBatchNorm3d: LinfBatchNormAct3d,
}
_PLAIN_CLASS = {fused: plain for plain, fused in _FUSED_CLASS.items()}
# Attributes of the fused layers that a plain layer does not have (removed again by unfuse_activations).
_ACT_ATTRIBUTES = ("activation", "negative_slope", "double_backward", "_fused_from")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class FusedActivation(nn.Identity):
    """What :func:`fuse_activations` leaves where an activation was: the identity, remembering the original.

    The original module is kept outside the module tree (no submodule, no state), so the ``state_dict`` keys and
    ``named_modules`` of the model are those of an ``nn.Identity``; :func:`unfuse_activations` puts it back.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.__dict__["original"] = original

    def extra_repr(self) -> str:
        return f"fused into the preceding BatchNorm: {self.original!r}"


def _activation_of(module: nn.Module) -> tuple[str, float] | None:
    """(activation, negative_slope) of a fusable activation module, or None."""
    if type(module) is nn.ReLU:
        return "relu", 0.01
    if type(module) is nn.LeakyReLU and 0.0 < module.negative_slope < float("inf"):
        return "leaky_relu", float(module.negative_slope)
    return None


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOK_DICTS)


def _fusable_layer(module: nn.Module) -> bool:
    return type(module) in _FUSED_CLASS and not _has_hooks(module)


def _fusable_activation(module: nn.Module) -> bool:
    return _activation_of(module) is not None and not _has_hooks(module)


def _slots(root: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """Every (parent, name, child) place in the tree, shared children once per place."""
    for parent in root.modules():
        for name, child in parent._modules.items():
            if child is not None:
                yield parent, name, child


def _sequential_pairs(root: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    places = Counter(id(child) for _, _, child in _slots(root))
    pairs = []
    for module in root.modules():
        if type(module) is not nn.Sequential:
            continue
        children = list(module._modules.values())
        for layer, act in zip(children, children[1:]):
            if (layer is not None and act is not None and _fusable_layer(layer) and _fusable_activation(act)
                    and places[id(layer)] == 1 and places[id(act)] == 1 and layer is not act):
                pairs.append((layer, act))
    return pairs


def _with_grad(inputs: tuple) -> tuple:
    """Floating-point tensors as fresh leaves that require grad, so that every use shows in the graph."""
    return tuple(
        t.detach().clone().requires_grad_() if isinstance(t, Tensor) and t.is_floating_point() else t for t in inputs
    )


def _traced_pairs(root: nn.Module, example_inputs: tuple) -> list[tuple[nn.Module, nn.Module]]:
    layers = [m for m in root.modules() if _fusable_layer(m)]
    acts = [m for m in root.modules() if _fusable_activation(m)]
    layer_calls: list[tuple[nn.Module, Tensor, Any, int, int]] = []  # layer, output, its node, output_nr, version
    act_calls: list[tuple[nn.Module, Any, Any, Any]] = []  # act, input, input's node before the act, act's node
    pending: dict[int, tuple[Any, Any]] = {}

    def after_layer(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, Tensor):
            layer_calls.append((module, output, output.grad_fn, output.output_nr, output._version))

    def before_act(module: nn.Module, args: tuple) -> None:
        first = args[0] if args else None
        pending[id(module)] = (first, None if not isinstance(first, Tensor) else (first.grad_fn, first._version))

    def after_act(module: nn.Module, args: tuple, output: Any) -> None:
        first, before = pending.pop(id(module), (None, None))
        act_calls.append((module, first, before, output.grad_fn if isinstance(output, Tensor) else None))

    handles = [m.register_forward_hook(after_layer) for m in layers]
    handles += [m.register_forward_pre_hook(before_act) for m in acts]
    handles += [m.register_forward_hook(after_act) for m in acts]
    buffers = [(b, b.detach().clone()) for b in root.buffers()]
    devices = sorted({t.device.index for t in example_inputs if isinstance(t, Tensor) and t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            outputs = root(*_with_grad(example_inputs))
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)

    # Consumers of every node output in the graph of the model's outputs; the outputs themselves count as uses.
    uses: Counter = Counter()
    reachable: set[int] = set()
    stack = []
    for leaf in tree_leaves(outputs):
        if isinstance(leaf, Tensor) and leaf.grad_fn is not None:
            uses[(id(leaf.grad_fn), leaf.output_nr)] += 1
            stack.append(leaf.grad_fn)
    while stack:
        node = stack.pop()
        if id(node) in reachable:
            continue
        reachable.add(id(node))
        for child, nr in node.next_functions:
            if child is not None:
                uses[(id(child), nr)] += 1
                stack.append(child)

    partner: dict[int, nn.Module | None] = {}  # id(layer) -> its activation, None when a call does not fuse
    fused_calls: Counter = Counter()  # id(act) -> calls that take a fusable layer's output
    act_total = Counter(id(act) for act, *_ in act_calls)
    for layer, output, node, nr, version in layer_calls:
        match = None
        for act, first, before, act_node in act_calls:
            if first is output and before is not None and before == (node, version):
                match = act, act_node
                break
        ok = (
            match is not None
            and node is not None
            and uses[(id(node), nr)] == 1
            and match[1] is not None
            and id(match[1]) in reachable
            and any(child is node and child_nr == nr for child, child_nr in match[1].next_functions)
        )
        previous = partner.get(id(layer), match[0] if ok else None)
        partner[id(layer)] = match[0] if ok and previous is match[0] else None
        if ok:
            fused_calls[id(match[0])] += 1
    by_id = {id(m): m for m in layers}
    pairs = []
    for layer_id, act in partner.items():
        if act is not None and fused_calls[id(act)] == act_total[id(act)]:
            pairs.append((by_id[layer_id], act))
    # An activation whose every call follows a fused layer is replaced once, whichever layers feed it; but
    # only if all of those layers fuse with it (a layer that failed for one call leaves its activation alone).
    blocked = {id(act) for layer_id, act in partner.items() if act is None}
    for layer, output, node, nr, version in layer_calls:
        if partner.get(id(layer)) is None:
            for act, first, *_ in act_calls:
                if first is output:
                    blocked.add(id(act))
    return [(layer, act) for layer, act in pairs if id(act) not in blocked]


def fusable_pairs(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
    """The (layer path, activation path) pairs that :func:`fuse_activations` would fuse, without changing them.

    Args:
        model: a model holding our ``L1BatchNorm*d``/``LinfBatchNorm*d`` layers (e.g. after
            ``convert_batchnorm``).
        example_inputs: ``None`` (``nn.Sequential`` adjacency only), a tensor, or a tuple of positional inputs
            for one forward that is followed.
    """
    names = {id(m): name for name, m in model.named_modules()}
    return [(names[id(layer)], names[id(act)]) for layer, act in _pairs(model, example_inputs)]


def _pairs(model: nn.Module, example_inputs: Any) -> list[tuple[nn.Module, nn.Module]]:
    if example_inputs is None:
        return _sequential_pairs(model)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    return _traced_pairs(model, example_inputs)


def fuse_activations(model: nn.Module, example_inputs: Any = None) -> nn.Module:
    """Fuse each of our BatchNorm layers whose output goes only into a ReLU/LeakyReLU with that activation.

    The layer becomes the matching ``L1BatchNormAct*d``/``LinfBatchNormAct*d`` (same ``Parameter`` objects,
    buffers, settings, ``training``), the activation a :class:`FusedActivation`; the model computes the same
    outputs and gradients, with about half the activation memory for these pairs. Which pairs qualify: see the
    module docstring (``nn.Sequential`` adjacency without ``example_inputs``; one followed forward with them).

    Args:
        model: the model, already converted to our layers (``convert_batchnorm``); changed in place.
        example_inputs: ``None``, a tensor, or a tuple of positional inputs for one forward (its buffers are
            restored afterwards). Default: ``None``.

    Returns:
        ``model`` (the root is never replaced).

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> from normdecouple.fuse import fuse_activations, unfuse_activations
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), nd.L1BatchNorm2d(8), torch.nn.ReLU())
        >>> model = fuse_activations(model)
        >>> type(model[1]).__name__, type(model[2]).__name__
        ('L1BatchNormAct2d', 'FusedActivation')
        >>> type(unfuse_activations(model)[1]).__name__
        'L1BatchNorm2d'

    References: arXiv:1803.01814
    """
    pairs = _pairs(model, example_inputs)
    replacements: dict[int, nn.Module] = {}
    for layer, act in pairs:
        activation, slope = _activation_of(act)
        kwargs: dict[str, Any] = {"activation": activation, "negative_slope": slope,
                                  "low_precision": layer.low_precision, "backend": layer.backend}
        if hasattr(layer, "k"):
            kwargs["k"] = layer.k
        fused = transplant_state(layer, blank_like(_FUSED_CLASS[type(layer)], layer, **kwargs))
        fused.__dict__["_fused_from"] = type(layer)
        replacements[id(layer)] = fused
        if id(act) not in replacements:
            replacements[id(act)] = FusedActivation(act)
    _commit(model, replacements)
    return model


def unfuse_activations(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_activations` exactly: the plain layers and the original activation modules come back.

    Only what :func:`fuse_activations` made is changed: fused layers built directly by the user stay as they are.
    The plain layer holds the same ``Parameter`` objects and buffers; the activation is the very module object
    that was there before fusing.

    Returns:
        ``model``, changed in place.
    """
    replacements: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, FusedActivation):
            replacements[id(module)] = module.original
        plain_class = module.__dict__.get("_fused_from")
        if plain_class is not None and type(module) in _PLAIN_CLASS:
            kwargs: dict[str, Any] = {"low_precision": module.low_precision, "backend": module.backend}
            if hasattr(module, "k"):
                kwargs["k"] = module.k
            plain = transplant_state(module, blank_like(plain_class, module, **kwargs))
            for name in _ACT_ATTRIBUTES:
                plain.__dict__.pop(name, None)
            replacements[id(module)] = plain
    _commit(model, replacements)
    return model


def _commit(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put every replacement in every place that holds its source (plain dictionary assignments)."""
    places = [(parent, name, replacements[id(child)]) for parent, name, child in _slots(model)
              if id(child) in replacements]
    for parent, name, new in places:
        parent._modules[name] = new
