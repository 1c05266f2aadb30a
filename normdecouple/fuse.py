"""Model-level fusion of our BatchNorm layers with the activation (and residual addition) that follows them.

The fused layers (:mod:`normdecouple.batchnorm_act`) compute ``act(BN(x) + r)`` and save their output instead of
their input: half the activation memory of ``BN -> ReLU``. This module finds where a model can use them, without
changing what the model computes, and undoes it exactly.

:func:`fusion_plan` says what would fuse and why not (one row per BatchNorm, changing nothing);
:func:`fuse_activations` (called by ``convert_batchnorm(..., fuse_activation=True)``) applies the same plan;
:func:`unfuse_activations` and ``revert_batchnorm`` undo it. Four ways to fuse, tried in this order:

* **A BatchNorm whose output goes only into its own ReLU/LeakyReLU module** becomes the matching fused layer
  (same ``Parameter`` objects, buffers, settings), and the activation a :class:`FusedActivation` (an
  ``nn.Identity`` that remembers the original). Without example inputs: adjacent children of a plain
  ``nn.Sequential`` (exact class), each module registered once. With them: one forward is followed (module
  hooks and the autograd graph of its outputs): every call of the layer feeds its output, unmodified, to that
  activation and to nothing else, and every call of the activation takes such an output.
* **A block whose forward holds** ``bn -> [Identity/Dropout(p=0)] -> add(., r) -> act`` (``out += identity;
  out = relu(out)``, ``out + r``, ``torch.add``, ``F.relu(..., inplace=True)``, an ``nn.ReLU`` module, shared
  or not) **or** ``bn -> act`` (a shared or functional activation), with example inputs: the block's forward is
  traced by ``torch.fx`` alone (its children stay calls, except those on the way to the BatchNorm, whose code is
  inlined) and the pattern replaced by one call that computes ``act(BN(x) + r)`` with the BatchNorm's own
  parameters and statistics. The block keeps its class, submodules, names, ``Parameter`` objects, buffers,
  hooks and ``state_dict`` keys: only an instance attribute ``forward`` is added (a :class:`RewrittenForward`),
  which :func:`unfuse_activations`/``revert_batchnorm`` delete. The BatchNorm stays a plain layer, so calling it
  (or the block's children) directly still computes what it did.
* **A converted BatchNorm subclass whose forward is BatchNorm -> identity dropout -> ReLU/LeakyReLU** (timm's
  ``BatchNormAct2d``), proved by tracing that forward with ``torch.fx`` in both modes (the ``F.batch_norm`` call
  takes the layer's own statistics, parameters, mode, momentum and eps; the dropout is ``nn.Identity`` or
  ``nn.Dropout(p=0)``; nothing else touches the data), gets the same kind of rewritten forward. With an
  ``nn.Identity`` activation it counts as a plain BatchNorm for the block patterns above.
* **A BatchNorm whose output is kept for the backward anyway**, with example inputs: by the operation after it
  (a convolution keeps its input, ReLU6 its input), as seen in the followed forward, or as the residual ``r``
  that a fused block keeps (the downsampling BatchNorm of a ResNet block). Fused with the identity (the fused
  layer, or a rewritten forward for a proven subclass), it keeps that same output instead of its own input:
  the same values, one activation-sized tensor less. Not when its output is modified in place later.

**Never silently wrong.** A block is rewritten only if: its trace is the same in training and eval mode, switches
no grad, inference or autocast mode while tracing (``torch.fx`` would drop a ``torch.no_grad()`` region) and
leaves its attributes and tensors as they were; ``a += b`` is traced as the in-place operation it is; the
BatchNorm is called once in the followed forward and its output (and the sum) has no other use there; moving
the BatchNorm to the addition cannot change its input (no operation in between may write to it); the modules
whose calls the rewrite skips (the BatchNorm, the activation module, identities, inlined containers) have no
hooks; and on the example the rewritten forward gives the original's outputs (same structure, dtype, shape,
values within rounding) and gradients (with respect to its inputs and the block's parameters, within the
fused backward's rounding). Every call then checks that those modules still have no hooks and the same classes
(and that no global module hooks exist); if not, the block runs its own forward (the same values, without the
saving). Python state that ``torch.fx`` reads once while tracing (a global flag, an attribute changed later by
the user) is the limit of this proof: fuse such blocks by hand instead.

Never fused: layers or activations with hooks, synchronised layers, our layers' own subclasses, parametrized
layers, ``LeakyReLU`` with a slope <= 0, activations other than ReLU/LeakyReLU (ReLU6, SiLU, GELU, ...: the
fused layers do not implement them; the BatchNorm before them still fuses with the identity where the activation
keeps its input), a residual sum with no activation after it (the fused layer would keep ``r`` as well: nothing
to gain).

Everything is planned and built before the model is touched (all or nothing); buffers and the random number
generators are restored after the followed forwards.

References: arXiv:1803.01814
"""

from __future__ import annotations

import copy
import inspect
import itertools
import linecache
import logging
import math
import operator
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Graph, Node, Proxy, Tracer
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from ._act_backend import activate
from ._transplant import TRANSIENT_MARK, blank_like, transplant_state
from .batchnorm import (
    L1BatchNorm1d,
    L1BatchNorm2d,
    L1BatchNorm3d,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
    LinfBatchNorm3d,
    LpBatchNorm,
    _layer_forward,
)
from .batchnorm_act import (
    L1BatchNormAct1d,
    L1BatchNormAct2d,
    L1BatchNormAct3d,
    LinfBatchNormAct1d,
    LinfBatchNormAct2d,
    LinfBatchNormAct3d,
    batch_norm_act_forward,
)

__all__ = [
    "FusedActivation",
    "FusionPlan",
    "FusionRow",
    "RewrittenForward",
    "fusable_pairs",
    "fuse_activations",
    "fusion_plan",
    "unfuse_activations",
]

logger = logging.getLogger(__name__)

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
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")

# Pattern names used in the plan's rows.
BN_ACT = "bn → act"
BN_ADD_ACT = "bn → add → act"
BN_ACT_LAYER = "BatchNormAct"
RESIDUAL_OPERAND = "residual operand"
BN_KEPT = "bn, output kept"
NO_PATTERN = "—"


# ---------------------------------------------------------------------------------------------------------
# What counts as an activation, an identity, an addition.


def _activation_of(module: nn.Module) -> tuple[str, float] | None:
    """(activation, negative_slope) of a fusable activation module, or None."""
    if type(module) is nn.ReLU:
        return "relu", 0.01
    if type(module) is nn.LeakyReLU and 0.0 < module.negative_slope < float("inf"):
        return "leaky_relu", float(module.negative_slope)
    return None


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOK_DICTS)


def _global_hooks() -> bool:
    return any(getattr(torch.nn.modules.module, name) for name in _GLOBAL_HOOKS)


def _fusable_layer(module: nn.Module) -> bool:
    return type(module) in _FUSED_CLASS and not _has_hooks(module)


def _fusable_activation(module: nn.Module) -> bool:
    return _activation_of(module) is not None and not _has_hooks(module)


def _identity_module(module: nn.Module) -> bool:
    """``nn.Identity`` or ``nn.Dropout(p=0)`` (exact classes): modules whose call returns their input's values."""
    return type(module) is nn.Identity or (type(module) is nn.Dropout and module.p == 0)


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_LEAKY_FUNCTIONS = (F.leaky_relu, F.leaky_relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
# Activations met in real models that the fused layers cannot take, for the plan's reasons.
_OTHER_ACTIVATIONS = (
    nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.PReLU, nn.Softplus, nn.LeakyReLU, nn.ReLU, nn.RReLU, nn.GLU,
)
_OTHER_ACTIVATION_FUNCTIONS = (
    F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.hardtanh, F.elu, F.selu, F.celu, F.mish, F.sigmoid,
    F.tanh, torch.sigmoid, torch.tanh, F.prelu, F.softplus,
)
_OTHER_ACTIVATION_METHODS = ("sigmoid", "tanh", "sigmoid_", "tanh_", "clamp", "clamp_", "clip", "clamp_min")


def _not_invertible(what: str) -> str:
    return (f"followed by {what}, which the fused layers do not take (they recover the activation's input from its "
            f"output: ReLU and LeakyReLU with a positive slope)")


# ---------------------------------------------------------------------------------------------------------
# The fused layer the pairs become, and what stands where their activation was.


class FusedActivation(nn.Identity):
    """What :func:`fuse_activations` leaves where an activation was: the identity, remembering the original.

    The original module is kept outside the module tree (no submodule, no state), so the ``state_dict`` keys and
    ``named_modules`` of the model are those of an ``nn.Identity``; :func:`unfuse_activations` puts it back.

    Args:
        original: the activation module it replaces.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.__dict__["original"] = original

    def extra_repr(self) -> str:
        return f"fused into the preceding BatchNorm: {self.original!r}"


# ---------------------------------------------------------------------------------------------------------
# Rewritten forwards.


def _fused_call(layer: LpBatchNorm, input: Tensor, residual: Tensor | None, activation: str,
                negative_slope: float, inplace_add: bool = False) -> Tensor:
    """What a rewritten forward calls in place of ``act(layer(input) + residual)``.

    The fused computation when the residual has the input's shape, dtype and device (the fused layers add
    without broadcasting or type promotion); otherwise the original operations themselves (``layer``'s own
    batch norm, then ``+``/``+=`` as the code had it, then the activation), so that broadcasting and promotion
    stay what they were. Under ``torch.fx`` tracing of a whole model it records itself as one call.
    """
    if isinstance(input, Proxy) or isinstance(residual, Proxy):
        tracer = (input if isinstance(input, Proxy) else residual).tracer
        return tracer.create_proxy("call_function", _fused_call,
                                   (layer, input, residual, activation, negative_slope, inplace_add), {})
    if residual is not None and not (isinstance(residual, Tensor) and residual.shape == input.shape
                                     and residual.dtype == input.dtype and residual.device == input.device):
        y = LpBatchNorm._forward_impl(layer, input)
        y = y.add_(residual) if inplace_add else y + residual
        return activate(y, activation, negative_slope)
    return batch_norm_act_forward(layer, input, residual, activation, negative_slope, False)


@dataclass(frozen=True)
class _Check:
    """A module a rewritten forward skips the call of: it must keep its class (and ``p == 0`` for a dropout)
    and have no hooks, or the original forward runs."""

    path: str
    cls: type


class RewrittenForward:
    """The forward that :func:`fuse_activations` gives a block (or a BatchNorm subclass): an instance attribute.

    Calling it runs the rewritten code when every module whose call it skips is still as it was planned (class,
    no hooks, no global module hooks), else the module's own class ``forward``: the same values either way.
    It refers to its module, so it is never carried over to another object by the converters, and it is
    rebuilt from its source when copied or unpickled.

    Args:
        module: the block (or layer) it belongs to.
        source: the Python source of the rewritten forward (``def forward(self, ...)``).
        globals_: the names that source refers to.
        checks: the modules whose calls it skips, relative to ``module``, with their planned classes.
        fusions: ``(path, pattern)`` of each BatchNorm it fuses (the path relative to ``module``).

    Raises:
        TypeError: when pickled, if a name its source refers to cannot be written as an import (the message says
            to pickle the ``state_dict``, or to unfuse before pickling and fuse again after loading).
    """

    def __init__(self, module: nn.Module, source: str, globals_: dict[str, Any], checks: tuple[_Check, ...],
                 fusions: tuple[tuple[str, str], ...]) -> None:
        self.module = module
        self.source = source
        self.fusions = fusions
        self._globals = globals_
        self._checks = checks
        self._fn = _compile(source, globals_, type(module).__qualname__)

    def intact(self) -> bool:
        """Whether the skipped modules are as planned.

        Returns:
            True when the rewritten code runs; False when the module's own forward runs instead (a skipped
            module has hooks or another class, or global module hooks exist).
        """
        if _global_hooks():
            return False
        for check in self._checks:
            try:
                sub = self.module.get_submodule(check.path)
            except AttributeError:
                return False
            if type(sub) is not check.cls or _has_hooks(sub) or (check.cls is nn.Dropout and sub.p != 0):
                return False
        return True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.intact():
            return self._fn(self.module, *args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def _run_rewritten(self, *args: Any, **kwargs: Any) -> Any:
        # The rewritten code itself, without the check: what _verify compares with the original.
        return self._fn(self.module, *args, **kwargs)

    def __repr__(self) -> str:
        return f"RewrittenForward(fusing {', '.join(path or '(itself)' for path, _ in self.fusions)})"

    def __getstate__(self) -> dict[str, Any]:
        from torch.fx.graph_module import _format_import_block
        from torch.package import sys_importer

        try:
            imports = _format_import_block(self._globals, sys_importer)
        except Exception as error:
            raise TypeError(
                f"cannot pickle the forward that normdecouple.fuse rewrote for a {type(self.module).__name__} "
                f"({error}); pickle the model's state_dict, or call normdecouple.fuse.unfuse_activations(model) "
                f"before pickling the model and fuse again after loading"
            ) from error
        return {"module": self.module, "source": self.source, "fusions": self.fusions, "checks": self._checks,
                "imports": imports}

    def __setstate__(self, state: dict[str, Any]) -> None:
        globals_: dict[str, Any] = {}
        exec(compile(state["imports"], "<normdecouple.fuse imports>", "exec"), globals_)
        self.__init__(state["module"], state["source"], globals_, state["checks"], state["fusions"])

    def __deepcopy__(self, memo: dict[int, Any]) -> RewrittenForward:
        new = copy.copy(self)
        memo[id(self)] = new
        new.module = copy.deepcopy(self.module, memo)
        return new


setattr(RewrittenForward, TRANSIENT_MARK, True)

_compiled = itertools.count()


def _compile(source: str, globals_: dict[str, Any], name: str) -> Callable[..., Any]:
    # Registered with linecache so that tracebacks through the rewritten code show its lines.
    filename = f"<normdecouple.fuse: rewritten {name}.forward #{next(_compiled)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = dict(globals_)
    exec(compile(source, filename, "exec"), namespace)
    return namespace["forward"]


def _rewrite_of(module: nn.Module) -> RewrittenForward | None:
    found = vars(module).get("forward")
    return found if isinstance(found, RewrittenForward) else None


def rewritten_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that carry a forward rewritten by :func:`fuse_activations`."""
    return [m for m in model.modules() if _rewrite_of(m) is not None]


def remove_rewrites(modules: list[nn.Module]) -> None:
    """Give ``modules`` their own class forward back (plain dictionary deletions, which cannot fail)."""
    for module in modules:
        if _rewrite_of(module) is not None:
            del module.__dict__["forward"]


# ---------------------------------------------------------------------------------------------------------
# torch.fx tracing of one block or one layer.


class _InplaceProxy(Proxy):
    """A Proxy that records ``a += b`` as the in-place operator it is: torch.fx's own Proxy has no ``__iadd__``,
    so Python falls back to ``a = a + b`` and a rewritten forward would silently stop writing into ``a``."""


def _inplace_method(op: Callable[[Any, Any], Any]) -> Callable[[Proxy, Any], Proxy]:
    def method(self: Proxy, other: Any) -> Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift",
              "rshift"):
    setattr(_InplaceProxy, f"__i{_name}__", _inplace_method(getattr(operator, f"i{_name}")))


def _context() -> tuple:
    """The thread-local modes that ``torch.fx`` does not record: grad mode, inference mode and autocast."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            *(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")))


class _BlockTracer(Tracer):
    """Traces a block's forward; its children stay calls except those named in ``inline`` (the way down to the
    BatchNorms), whose forward is traced through. Records whether any operation was traced under another grad,
    inference or autocast mode than the trace began in (``with torch.no_grad():`` in the forward), which the
    graph would silently drop."""

    def __init__(self, inline: frozenset[str]) -> None:
        super().__init__(autowrap_modules=(math,))
        self._inline = inline
        self._start = _context()
        self.mode_changed = False

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name not in self._inline

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, *rest: Any, **more: Any) -> Proxy:
        if _context() != self._start:
            self.mode_changed = True
        return super().create_proxy(kind, target, args, kwargs, *rest, **more)

    def proxy(self, node: Node) -> Proxy:
        return _InplaceProxy(node, self)


class _LayerTracer(Tracer):
    """Traces a BatchNorm subclass's own ``forward`` (the user's class, not the converted class's redirect):
    every child is a call, the layer's tensors are named ``get_attr`` nodes, the layer itself is ``get_attr ''``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self._layer = layer
        self._tensors = {id(t): name for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers())}
        self._children = {id(m): name for name, m in layer.named_modules() if name}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def path_of_module(self, mod: nn.Module) -> str:
        if id(mod) not in self._children:
            raise NameError(f"{type(mod).__name__} is not a child of the traced layer")
        return self._children[id(mod)]

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, Tensor) and id(a) in self._tensors:
            return self.create_node("get_attr", self._tensors[id(a)], (), {})
        if a is self._layer:
            return self.create_node("get_attr", "", (), {})
        return super().create_arg(a)

    def proxy(self, node: Node) -> Proxy:
        return _InplaceProxy(node, self)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _tensor_versions(module: nn.Module) -> list[tuple[Tensor, int]]:
    return [(t, t._version) for t in itertools.chain(module.parameters(), module.buffers())]


def _attributes(modules: list[nn.Module]) -> list[tuple[nn.Module, dict[str, int]]]:
    """Identity of every attribute (and of every entry of the parameter/buffer/child dictionaries)."""
    snapshot = []
    for m in modules:
        ids = {name: id(value) for name, value in vars(m).items()}
        for group in ("_parameters", "_buffers", "_modules"):
            ids.update({f"{group}.{k}": id(v) for k, v in vars(m)[group].items()})
        snapshot.append((m, ids))
    return snapshot


def _changed_attributes(snapshot: list[tuple[nn.Module, dict[str, int]]]) -> list[str]:
    return [name for m, before in snapshot for name, now in _attributes([m])[0][1].items() if before.get(name) != now
            ] + [name for m, before in snapshot for name in before if name not in _attributes([m])[0][1]]


def _trace_block(block: nn.Module, inline: frozenset[str]) -> Graph | str:
    """The block's forward traced with ``inline`` traced through, or why it cannot be (a sentence)."""
    inlined = [block.get_submodule(path) for path in sorted(inline)]
    snapshot = _attributes(inlined)
    versions = _tensor_versions(block)
    modes = [m.training for m in inlined]
    codes = []
    mode_changed = False
    try:
        for training in (True, False):
            for m in inlined:
                m.training = training
            # Traced once with grad enabled and once without, so that a region switching it either way shows.
            with torch.set_grad_enabled(training):
                tracer = _BlockTracer(inline)
                graph = tracer.trace(block)
            mode_changed |= tracer.mode_changed
            codes.append(graph.python_code(root_module="self").src)
            if training == modes[0]:
                kept = graph
    except Exception as error:  # torch.fx raises many kinds (TraceError, TypeError, NotImplementedError...)
        return f"torch.fx cannot trace its forward ({_first_line(error)})"
    finally:
        for m, training in zip(inlined, modes):
            m.training = training
    if mode_changed:
        return ("its forward switches grad, inference or autocast mode (torch.no_grad(), torch.autocast...), "
                "which a traced forward would drop")
    changed = _changed_attributes(snapshot)
    if changed:
        return f"its forward sets attributes that a traced forward would not ({', '.join(changed[:3])})"
    if any(t._version != v for t, v in versions):
        return "its forward writes into the module's tensors outside of what torch.fx records"
    if codes[0] != codes[1]:
        return "its forward differs between training and eval mode, which one traced forward cannot follow"
    return kept


# ---------------------------------------------------------------------------------------------------------
# Pattern matching in a traced block.


def _module_at(node: Node, block: nn.Module) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return block.get_submodule(node.target)


def _single_tensor_call(node: Node, prev: Node) -> bool:
    return len(node.args) >= 1 and node.args[0] is prev and not any(
        isinstance(a, Node) for a in list(node.args[1:]) + list(node.kwargs.values()))


def _act_spec(node: Node, prev: Node, block: nn.Module) -> tuple[str, float] | str | None:
    """(activation, slope) if ``node`` applies a fusable activation to ``prev``; a reason if it applies another
    activation; None if it is not an activation at all."""
    if node.op == "call_module":
        m = block.get_submodule(node.target)
        if not (node.args == (prev,) and not node.kwargs):
            return None
        spec = _activation_of(m)
        if spec is not None:
            return spec if not _has_hooks(m) else f"its activation `{node.target}` has hooks"
        if isinstance(m, _OTHER_ACTIVATIONS):
            return _not_invertible(f"{type(m).__name__} (`{node.target}`)")
        return None
    if node.op == "call_function" and _single_tensor_call(node, prev):
        if node.target in _RELU_FUNCTIONS:
            return "relu", 0.01
        if node.target in _LEAKY_FUNCTIONS:
            bound = inspect.signature(F.leaky_relu).bind(*node.args, **node.kwargs)
            bound.apply_defaults()
            slope = bound.arguments["negative_slope"]
            if isinstance(slope, (int, float)) and not isinstance(slope, bool) and 0 < slope < float("inf"):
                return "leaky_relu", float(slope)
            return _not_invertible(f"a leaky ReLU of slope {slope!r}")
        if node.target in _OTHER_ACTIVATION_FUNCTIONS:
            return _not_invertible(getattr(node.target, "__name__", str(node.target)))
        return None
    if node.op == "call_method" and _single_tensor_call(node, prev):
        if node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs:
            return "relu", 0.01
        if node.target in _OTHER_ACTIVATION_METHODS:
            return _not_invertible(f"Tensor.{node.target}")
    return None


def _add_of(node: Node, prev: Node) -> tuple[Node, bool] | str | None:
    """(r, in place) if ``node`` adds a tensor r to ``prev``; a reason if it is an addition that cannot fuse."""
    alpha = node.kwargs.get("alpha", 1)
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        inplace = node.target is operator.iadd
    elif node.op == "call_method" and node.target in ("add", "add_"):
        inplace = node.target == "add_"
    else:
        return None
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    a, b = node.args
    if alpha != 1:
        return "its output is added with alpha != 1"
    other = b if a is prev else a
    if other is prev or not isinstance(other, Node):
        return "its output is added to a constant, not to a residual tensor"
    if inplace and a is not prev:
        return "it is added in place into the residual (`r += bn(x)`), which the residual's other users would see"
    return other, inplace


@dataclass
class _Match:
    """One fusable pattern found in a block's traced forward."""

    bn: Node
    chain: list[Node]  # the identity calls between the BatchNorm and the addition/activation
    add: Node | None
    residual: Node | None
    inplace_add: bool
    act: Node
    spec: tuple[str, float]

    @property
    def pattern(self) -> str:
        return BN_ACT if self.add is None else BN_ADD_ACT


_RETURNED = "returned"


def _match(graph: Graph, block: nn.Module, target: str) -> _Match | str:
    """The pattern after the BatchNorm called as ``target`` in ``graph``; ``_RETURNED`` if its output leaves the
    block unchanged (the pattern may continue in the parent), or a reason."""
    bns = [n for n in graph.nodes if n.op == "call_module" and n.target == target]
    if not bns:
        return "its parent's forward does not call it"
    if len(bns) > 1:
        return f"the forward of its block calls it {len(bns)} times"
    bn = bns[0]
    if len(bn.args) != 1 or bn.kwargs or not isinstance(bn.args[0], Node):
        return "it is called with more than one input"
    chain: list[Node] = []
    prev = bn
    while True:
        users = list(prev.users)
        if len(users) != 1:
            return "its output has no use" if not users else f"its output has {len(users)} uses"
        node = users[0]
        if node.op == "output":
            return _RETURNED if node.args[0] is prev else "its output is returned inside a container"
        m = _module_at(node, block)
        if m is not None and _identity_module(m) and node.args == (prev,) and not node.kwargs:
            if _has_hooks(m):
                return f"`{node.target}` after it has hooks"
            chain.append(node)
            prev = node
            continue
        break
    spec = _act_spec(node, prev, block)
    if isinstance(spec, tuple):
        return _Match(bn, chain, None, None, False, node, spec)
    if isinstance(spec, str):
        return spec
    added = _add_of(node, prev)
    if added is None:
        return f"its output goes into `{node.name}` ({node.op} {getattr(node.target, '__name__', node.target)})"
    if isinstance(added, str):
        return added
    residual, inplace = added
    add = node
    users = list(add.users)
    if len(users) != 1:
        return f"the sum has {len(users)} uses" if users else "the sum has no use"
    act = users[0]
    if act.op == "output":
        return "no activation after the residual addition: nothing to gain (the fused layer would keep r)"
    spec = _act_spec(act, add, block)
    if isinstance(spec, tuple):
        return _Match(bn, chain, add, residual, inplace, act, spec)
    if isinstance(spec, str):
        return spec.replace("followed by", "its residual sum is followed by")
    return "no activation after the residual addition: nothing to gain (the fused layer would keep r)"


def _one_per_addition(matches: list[tuple[nn.Module, _Match]]) -> list[tuple[nn.Module, _Match]]:
    """Where both operands of one addition are BatchNorm outputs (``bn3(...) + downsample_bn(...)``), only one
    can take the other as its residual: the left operand (``out + identity``, ``out += identity``)."""
    kept: dict[Node, tuple[nn.Module, _Match]] = {}
    for m, match in matches:
        key = match.act
        if key not in kept or (match.add is not None and match.add.args[0] in (match.bn, *match.chain[-1:])):
            kept[key] = (m, match)
    return list(kept.values())


def _movable(graph: Graph, match: _Match) -> bool:
    """Whether the BatchNorm can run at the activation's place: nothing in between may write into its input.

    Safe when nothing else runs in between, or when the input is a tensor made in this forward that nothing but
    the BatchNorm uses (no other reference exists through which it could be changed)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    skipped = {match.bn, *match.chain, match.add, match.act}
    between = [n for n in graph.nodes if order[match.bn] < order[n] < order[match.act] and n not in skipped]
    x = match.bn.args[0]
    return not between or (x.op not in ("placeholder", "get_attr") and len(x.users) == 1)


def _rewrite(graph: Graph, matches: list[_Match]) -> None:
    """Replace each match by one ``_fused_call`` at its activation's place (the graph is changed in place)."""
    for match in matches:
        with graph.inserting_before(match.act):
            layer = graph.get_attr(match.bn.target)
            fused = graph.call_function(_fused_call, (layer, match.bn.args[0], match.residual, *match.spec,
                                                      match.inplace_add))
        match.act.replace_all_uses_with(fused)
        for node in [match.act, match.add, *reversed(match.chain), match.bn]:
            if node is not None:
                graph.erase_node(node)
    graph.lint()


# ---------------------------------------------------------------------------------------------------------
# BatchNorm subclasses: what their own forward computes.


@dataclass(frozen=True)
class _Proof:
    """A converted subclass proven to compute ``act(drop(BN(x)))`` with the identity ``drop``."""

    spec: tuple[str, float] | None  # None: the identity activation (a plain BatchNorm for the block patterns)
    checks: tuple[_Check, ...]  # the dropout and activation children, skipped by the rewrite


_ASSERT_FUNCTIONS = (torch._assert, getattr, len, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                     operator.ge, operator.not_, operator.and_, operator.or_, operator.getitem)


def _prove_layer(layer: LpBatchNorm) -> _Proof | str:
    """Trace the user's ``forward`` of a converted BatchNorm subclass in both modes and check it is
    ``act(drop(F.batch_norm(x, <the layer's own arguments>)))``; a reason if it is not provably so."""
    user_forward = type(layer)._user_class.forward
    params = list(inspect.signature(user_forward).parameters.values())[1:]
    if len(params) != 1 or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return "its forward takes more than one input"

    def forward(x: Tensor) -> Tensor:
        return user_forward(layer, x)

    buffers = [(b, b.detach().clone()) for b in layer.buffers()]
    params_versions = [(p, p._version) for p in layer.parameters()]
    training = layer.training
    proofs = []
    try:
        for mode in (True, False):
            layer.training = mode
            counted = layer.num_batches_tracked
            before = None if counted is None else int(counted)
            try:
                graph = _LayerTracer(layer).trace(forward)
            except Exception as error:
                return f"torch.fx cannot trace its forward ({_first_line(error)})"
            after = None if counted is None else int(counted)
            proof = _check_layer_graph(graph, layer, before, after)
            if isinstance(proof, str):
                return proof
            proofs.append(proof)
            for buffer, saved in buffers:
                if not torch.equal(buffer, saved) and buffer is not counted:
                    return "its forward changes its buffers outside of F.batch_norm"
                buffer.detach().copy_(saved)
            if any(p._version != v for p, v in params_versions):
                return "its forward changes its parameters"
    finally:
        layer.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    if proofs[0] != proofs[1]:
        return "its forward differs between training and eval mode"
    return proofs[0]


def _check_layer_graph(graph: Graph, layer: LpBatchNorm, before: int | None, after: int | None) -> _Proof | str:
    nodes = list(graph.nodes)
    (x,) = [n for n in nodes if n.op == "placeholder"]
    (out,) = [n for n in nodes if n.op == "output"]
    # Walk back from the output: [identity | activation]* then the batch norm.
    spec: tuple[str, float] | None = None
    checks: list[_Check] = []
    path: list[Node] = []
    cur = out.args[0]
    seen_act = False
    while isinstance(cur, Node) and cur.op == "call_module":
        m = layer.get_submodule(cur.target)
        if cur.args and isinstance(cur.args[0], Node):
            prev = cur.args[0]
        else:
            return "its forward calls a child with no input"
        act = _act_spec(cur, prev, layer)
        if _identity_module(m) and cur.args == (prev,) and not cur.kwargs:
            checks.append(_Check(cur.target, type(m)))
        elif isinstance(act, tuple) and not seen_act:
            spec, seen_act = act, True
            checks.append(_Check(cur.target, type(m)))
        elif isinstance(act, str):
            return act
        else:
            return f"its forward calls `{cur.target}` ({type(m).__name__}), not an identity or an activation"
        if _has_hooks(m):
            return f"its child `{cur.target}` has hooks"
        path.append(cur)
        cur = prev
    if isinstance(cur, Node) and cur.op == "call_function" and not seen_act:
        act = _act_spec(cur, cur.args[0] if cur.args else None, layer)
        if isinstance(act, tuple):
            spec = act
            path.append(cur)
            cur = cur.args[0]
        elif isinstance(act, str):
            return act
    if not isinstance(cur, Node):
        return "its forward does not return a tensor computed from its input"
    bn = cur
    if bn.op == "call_function" and bn.target is _layer_forward:
        if not (len(bn.args) == 2 and bn.args[0].op == "get_attr" and bn.args[0].target == "" and bn.args[1] is x):
            return "its forward calls the batch norm with other arguments"
        if before != after:
            return "its forward counts batches itself besides the batch norm's own counting"
    elif bn.op == "call_function" and bn.target is F.batch_norm:
        reason = _check_batch_norm_arguments(bn, x, layer, before, after)
        if reason:
            return reason
    else:
        return "its forward does not end with BatchNorm -> dropout -> activation"
    for node in path + [bn]:
        if len(node.users) != 1:
            return "an intermediate result of its forward has another use"
    allowed = {x, out, bn, *path}
    for node in nodes:
        if node in allowed or node.op == "get_attr":
            continue
        if node.op == "call_function" and node.target in _ASSERT_FUNCTIONS or (
                node.op == "call_method" and node.target in ("dim", "size")):
            continue
        return f"its forward computes more than BatchNorm -> dropout -> activation (`{node.name}`)"
    # Only checks reach nodes outside the path: the input's other users must end in assertions.
    for node in nodes:
        if node not in allowed and node.op != "get_attr" and any(u in allowed - {x} for u in node.users):
            return f"its forward mixes `{node.name}` into the data"
    return _Proof(spec, tuple(reversed(checks)))


def _check_batch_norm_arguments(bn: Node, x: Node, layer: LpBatchNorm, before: int | None,
                                after: int | None) -> str | None:
    try:
        bound = inspect.signature(F.batch_norm).bind(*bn.args, **bn.kwargs)
    except TypeError:
        return "its F.batch_norm call has unexpected arguments"
    bound.apply_defaults()
    args = bound.arguments

    def named(value: Any, name: str | None) -> bool:
        if name is None:
            return value is None
        return isinstance(value, Node) and value.op == "get_attr" and value.target == name

    track = not layer.training or layer.track_running_stats
    stats = layer.running_mean is not None and track
    counting = layer.training and layer.track_running_stats and layer.num_batches_tracked is not None
    factor = 0.0 if layer.momentum is None else layer.momentum
    if counting and layer.momentum is None:
        factor = 1.0 / float(after)
    expected_count = before + 1 if counting else before
    checks = [
        (args["input"] is x, "its input"),
        (named(args["running_mean"], "running_mean" if stats else None), "running_mean"),
        (named(args["running_var"], "running_var" if layer.running_var is not None and track else None),
         "running_var"),
        (named(args["weight"], "weight" if layer._parameters.get("weight") is not None else None), "weight"),
        (named(args["bias"], "bias" if layer._parameters.get("bias") is not None else None), "bias"),
        (args["training"] == (layer.training or (layer.running_mean is None and layer.running_var is None)),
         "training"),
        (isinstance(args["momentum"], (int, float)) and args["momentum"] == factor, "momentum"),
        (args["eps"] == layer.eps, "eps"),
        (after == expected_count, "num_batches_tracked"),
    ]
    wrong = [name for ok, name in checks if not ok]
    if wrong:
        return f"its F.batch_norm call does not use the layer's own {', '.join(wrong)}"
    return None


# ---------------------------------------------------------------------------------------------------------
# The followed forward.


@dataclass
class _Observation:
    pairs: list[tuple[nn.Module, nn.Module]]
    calls: Counter  # id(module) -> calls in the forward, for our layers
    single_use: dict[int, bool]  # id(layer) -> every call's output has exactly one use (none is a model output)
    consumer: dict[int, str]  # id(layer) -> the autograd node consuming its output (its first call)
    sum_single_use: dict[int, bool]  # id(layer) -> where that consumer is an addition: its result has one use
    after_sum: dict[int, str]  # id(layer) -> the autograd node consuming that sum (when it has one use)
    kept_by_others: dict[int, bool]  # id(layer) -> every call's output is saved for backward by a later operation
    # and not modified in place afterwards
    residual_of: dict[int, int]  # id(layer) -> id(layer2): layer's output is the other operand of layer2's sum


def _with_grad(inputs: tuple) -> tuple:
    """Floating-point tensors as fresh leaves that require grad, so that every use shows in the graph."""
    return tuple(
        t.detach().clone().requires_grad_() if isinstance(t, Tensor) and t.is_floating_point() else t for t in inputs
    )


def _devices(example_inputs: tuple) -> list[int]:
    return sorted({t.device.index for t in tree_leaves(example_inputs) if isinstance(t, Tensor) and t.is_cuda})


class _Restore:
    """Restores every buffer of ``root`` (running statistics, ``num_batches_tracked``) when leaving."""

    def __init__(self, root: nn.Module) -> None:
        self.saved = [(b, b.detach().clone()) for b in root.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, saved in self.saved:
                buffer.copy_(saved)


def _observe(root: nn.Module, example_inputs: tuple, restore: _Restore) -> _Observation:
    layers = [m for m in root.modules() if isinstance(m, LpBatchNorm)]
    fusable = {id(m) for m in layers if _fusable_layer(m)}
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

    # Storages saved for backward by operations other than our layers' own: a layer whose output is among them
    # gains from fusing with the identity (it then keeps that output instead of its input).
    saved_elsewhere: set[int] = set()
    inside: list[int] = []

    def pack(t: Tensor) -> Tensor:
        if not inside:
            saved_elsewhere.add(t.untyped_storage().data_ptr())
        return t

    def enter_layer(module: nn.Module, args: tuple) -> None:
        inside.append(id(module))

    def leave_layer(module: nn.Module, args: tuple, output: Any) -> None:
        inside.pop()
        after_layer(module, args, output)

    handles = [m.register_forward_pre_hook(enter_layer) for m in layers]
    handles += [m.register_forward_hook(leave_layer, always_call=True) for m in layers]
    handles += [m.register_forward_pre_hook(before_act) for m in acts]
    handles += [m.register_forward_hook(after_act) for m in acts]
    try:
        with torch.random.fork_rng(devices=_devices(example_inputs)), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = root(*_with_grad(example_inputs))
    finally:
        for handle in handles:
            handle.remove()
        restore.restore()
    kept_by_others: dict[int, bool] = {}
    for layer, output, _, _, version in layer_calls:
        kept = output._version == version and output.untyped_storage().data_ptr() in saved_elsewhere
        kept_by_others[id(layer)] = kept_by_others.get(id(layer), True) and kept

    # Consumers of every node output in the graph of the model's outputs; the outputs themselves count as uses.
    uses: Counter = Counter()
    consumers: dict[tuple[int, int], list[Any]] = defaultdict(list)
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
                consumers[(id(child), nr)].append(node)
                stack.append(child)

    calls = Counter(id(layer) for layer, *_ in layer_calls)
    single_use: dict[int, bool] = {}
    consumer: dict[int, str] = {}
    sum_single_use: dict[int, bool] = {}
    after_sum: dict[int, str] = {}
    residual_of: dict[int, int] = {}
    outputs_of = {(id(node), nr): layer for layer, _, node, nr, _ in layer_calls if node is not None}
    for layer, _, node, nr, _ in layer_calls:
        ok = node is not None and uses[(id(node), nr)] == 1
        single_use[id(layer)] = single_use.get(id(layer), True) and ok
        if id(layer) in consumer or node is None:
            continue
        found = consumers.get((id(node), nr), [])
        consumer[id(layer)] = type(found[0]).__name__ if found else ""
        if found and type(found[0]).__name__.startswith("AddBackward"):
            add = found[0]
            sum_single_use[id(layer)] = uses[(id(add), 0)] == 1
            after = consumers.get((id(add), 0), [])
            after_sum[id(layer)] = type(after[0]).__name__ if len(after) == 1 and uses[(id(add), 0)] == 1 else ""
            for child, child_nr in add.next_functions:
                if child is not None and (child is not node or child_nr != nr):
                    other = outputs_of.get((id(child), child_nr))
                    if other is not None:
                        residual_of[id(other)] = id(layer)

    partner: dict[int, nn.Module | None] = {}  # id(layer) -> its activation, None when a call does not fuse
    fused_calls: Counter = Counter()  # id(act) -> calls that take a fusable layer's output
    act_total = Counter(id(act) for act, *_ in act_calls)
    for layer, output, node, nr, version in layer_calls:
        if id(layer) not in fusable:
            continue
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
        if id(layer) in fusable and partner.get(id(layer)) is None:
            for act, first, *_ in act_calls:
                if first is output:
                    blocked.add(id(act))
    pairs = [(layer, act) for layer, act in pairs if id(act) not in blocked]
    return _Observation(pairs, calls, single_use, consumer, sum_single_use, after_sum, kept_by_others, residual_of)


def _capture(root: nn.Module, example_inputs: tuple, modules: list[nn.Module],
             restore: _Restore) -> dict[int, tuple[tuple, dict]]:
    """The arguments of the first call of each of ``modules`` in one forward (copies, detached, same
    ``requires_grad``)."""
    captured: dict[int, tuple[tuple, dict]] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(module) not in captured:
            captured[id(module)] = _clone((args, kwargs))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        with torch.random.fork_rng(devices=_devices(example_inputs)), torch.enable_grad():
            root(*_with_grad(example_inputs))
    finally:
        for handle in handles:
            handle.remove()
        restore.restore()
    return captured


def _clone(tree: Any) -> Any:
    return tree_map(lambda t: t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t,
                    tree)


# Relative gradient differences accepted between a rewritten forward and the original on the example: the
# fused backward recovers x_hat from the output, which rounds (float32 within about 1e-4 of x_hat, see
# normdecouple._act_backend.max_gain); a region that autograd sees differently (a dropped no_grad, a detach)
# changes gradients by far more.
_GRAD_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def _run_with_grads(fn: Callable[..., Any], module: nn.Module, arguments: tuple[tuple, dict], example_inputs: tuple,
                    restore: _Restore) -> tuple[Any, list[Tensor | None]]:
    """``fn(*args, **kwargs)`` on fresh copies of the arguments, and the gradients of its outputs (against fixed
    random output gradients) with respect to the tensor arguments and the module's parameters."""
    args, kwargs = _clone(arguments)
    targets = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.requires_grad]
    targets += [p for p in module.parameters() if p.requires_grad]
    try:
        with torch.random.fork_rng(devices=_devices(example_inputs)), torch.enable_grad():
            out = fn(*args, **kwargs)
            outs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
            torch.manual_seed(0)
            upstream = [torch.randn_like(t) for t in outs]
            grads: list[Tensor | None] = [None] * len(targets)
            if outs and targets:
                grads = list(torch.autograd.grad(outs, targets, upstream, allow_unused=True))
    finally:
        restore.restore()
    return out, grads


def _verify(module: nn.Module, rewrite: RewrittenForward, arguments: tuple[tuple, dict], example_inputs: tuple,
            restore: _Restore) -> str | None:
    """Run the module's own forward and the rewritten one on the same arguments, forward and backward, and
    compare; a reason if they differ (outputs' structure, dtypes, shapes, values beyond rounding, or the
    gradients of the arguments and parameters beyond rounding)."""
    expected, expected_grads = _run_with_grads(lambda *a, **k: type(module).forward(module, *a, **k), module,
                                               arguments, example_inputs, restore)
    try:
        got, got_grads = _run_with_grads(rewrite._run_rewritten, module, arguments, example_inputs, restore)
    except Exception as error:
        return f"its rewritten forward fails on the example ({_first_line(error)})"
    flat_expected, spec_expected = tree_flatten(expected)
    flat_got, spec_got = tree_flatten(got)
    if spec_expected != spec_got:
        return "its rewritten forward returns another structure on the example"
    for a, b in zip(flat_got, flat_expected):
        if isinstance(a, Tensor) != isinstance(b, Tensor):
            return "its rewritten forward returns another structure on the example"
        if isinstance(a, Tensor):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                return "its rewritten forward returns tensors of another shape, dtype or device on the example"
            try:
                torch.testing.assert_close(a.detach(), b.detach(), equal_nan=True)
            except AssertionError:
                return "its rewritten forward gives other values on the example"
        elif a != b:
            return "its rewritten forward returns other values on the example"
    present = [b for b in expected_grads if b is not None]
    # Gradients that are zero in exact arithmetic (a convolution's bias before a BatchNorm) are rounding noise
    # in both: each tensor is compared at least on the scale of the typical gradient value of all of them.
    total = sum(float(b.double().square().sum()) for b in present)
    count = sum(b.numel() for b in present)
    typical = math.sqrt(total / count) if count else 0.0
    for a, b in zip(got_grads, expected_grads):
        if (a is None) != (b is None):
            return "its rewritten forward differentiates other tensors than its own (a no_grad or detach region?)"
        if a is not None:
            tolerance = _GRAD_TOLERANCE.get(b.dtype, 1e-3)
            difference = float(torch.linalg.vector_norm((a - b).double()))
            scale = float(torch.linalg.vector_norm(b.double())) + typical * math.sqrt(b.numel())
            if not difference <= tolerance * scale:
                return "its rewritten forward gives other gradients on the example"
    return None


# ---------------------------------------------------------------------------------------------------------
# The plan.


class FusionRow(NamedTuple):
    """One BatchNorm of the model in a :class:`FusionPlan` (a named tuple).

    Attributes:
        path: its qualified name in the model (the first one if it is registered in several places).
        layer: its class name.
        pattern: what follows it: ``"bn → act"``, ``"bn → add → act"``, ``"BatchNormAct"`` (a subclass whose
            forward applies the activation), ``"residual operand"`` (its output is the ``r`` of a fused sum),
            ``"bn, output kept"`` (the next operation keeps its output for the backward anyway), ``"—"`` (none
            of these).
        fused: whether it is (or would be) fused.
        detail: how it fuses, or why not.
    """

    path: str
    layer: str
    pattern: str
    fused: bool
    detail: str


class FusionPlan:
    """What :func:`fuse_activations` does to a model: one :class:`FusionRow` per BatchNorm, in module order.

    ``str(plan)`` is a table; :meth:`summary` is the one line that ``convert_batchnorm(...,
    fuse_activation=True)`` logs. Iterating yields the rows; ``plan["layer1.0.bn3"]`` is the row of one path (a
    ``KeyError`` listing the paths for one that holds no BatchNorm). Built by :func:`fusion_plan`.

    Args:
        rows: one row per BatchNorm.
        blocks: the paths of the modules whose forward is (or would be) rewritten. Default: ``()``.
    """

    def __init__(self, rows: tuple[FusionRow, ...], blocks: tuple[str, ...] = ()) -> None:
        self.rows = tuple(rows)
        self.blocks = tuple(blocks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FusionPlan) and (self.rows, self.blocks) == (other.rows, other.blocks)

    def __repr__(self) -> str:
        return f"FusionPlan({self.summary()!r})"

    def __iter__(self) -> Iterator[FusionRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, path: str) -> FusionRow:
        for row in self.rows:
            if row.path == path:
                return row
        raise KeyError(f"no BatchNorm at {path!r} in this plan; paths: {[r.path for r in self.rows]}")

    @property
    def fused(self) -> list[FusionRow]:
        """The rows that fuse."""
        return [row for row in self.rows if row.fused]

    def summary(self) -> str:
        """One line: how many BatchNorms fuse, by pattern, and how many do not, by pattern.

        Returns:
            The line, e.g. ``"fused 53 of 53 BatchNorm layers (33 bn → act, 16 bn → add → act, 4 residual
            operand) with 16 rewritten forwards"``.
        """
        fused = Counter(row.pattern for row in self.rows if row.fused)
        unfused = Counter(row.pattern for row in self.rows if not row.fused)
        text = f"fused {sum(fused.values())} of {len(self.rows)} BatchNorm layers"
        if fused:
            text += " (" + ", ".join(f"{n} {p}" for p, n in fused.most_common()) + ")"
        if self.blocks:
            text += f" with {len(self.blocks)} rewritten forwards"
        if unfused:
            text += "; not fused: " + ", ".join(f"{n} {p}" for p, n in unfused.most_common() if p != NO_PATTERN)
            others = Counter(_short(row.detail) for row in self.rows if not row.fused and row.pattern == NO_PATTERN)
            if others:
                text += (", " if len(unfused) > 1 else "") + f"{sum(others.values())} other (" + ", ".join(
                    f"{n}: {reason}" for reason, n in others.most_common(2)) + (", ..." if len(others) > 2 else "") + ")"
        return text

    def __str__(self) -> str:
        header = ("path", "layer", "pattern", "fused", "detail")
        table = [header] + [(r.path or "(root)", r.layer, r.pattern, "yes" if r.fused else "no", r.detail)
                            for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]
                 for row in table]
        lines.insert(1, "-" * min(120, sum(widths) + 8 + len("detail")))
        return "\n".join(lines + [self.summary()])


def _short(detail: str) -> str:
    """The first clause of a row's detail, to group reasons in the summary."""
    for stop in (" (", ", ", ": ", "; "):
        detail = detail.split(stop)[0]
    return detail


@dataclass
class _Built:
    """A plan and what applying it puts in place."""

    plan: FusionPlan
    replacements: dict[int, nn.Module]  # id(old module) -> its replacement (the pairs)
    rewrites: list[tuple[nn.Module, RewrittenForward]]
    warnings: list[str]


# Autograd nodes of activations the fused layers cannot take (for the plan's reasons when only the followed
# forward, not a traced one, shows what comes after a BatchNorm).
_AUTOGRAD_ACTIVATIONS = {"Hardtanh": "ReLU6 (or Hardtanh)", "Silu": "SiLU", "Gelu": "GELU", "Hardswish": "Hardswish",
                         "Hardsigmoid": "Hardsigmoid", "Elu": "ELU", "Sigmoid": "a sigmoid", "Tanh": "tanh",
                         "Mish": "Mish", "Softplus": "Softplus", "Prelu": "PReLU", "PreluKernel": "PReLU",
                         "Clamp": "a clamp", "ClampMin": "a clamp"}
_FUSABLE_NODES = ("Relu", "LeakyRelu")


def _node_kind(name: str) -> str:
    return name[: name.index("Backward")] if "Backward" in name else name


def _observed_pattern(seen: _Observation, layer: nn.Module) -> tuple[bool, str]:
    """(whether the followed forward shows a fusable pattern after ``layer``, a description of what follows)."""
    kind = _node_kind(seen.consumer.get(id(layer), ""))
    if kind in _FUSABLE_NODES:
        return True, "followed by its activation"
    if kind == "Add":
        after = _node_kind(seen.after_sum.get(id(layer), ""))
        if after in _FUSABLE_NODES:
            return True, "followed by a residual addition and its activation"
        if after in _AUTOGRAD_ACTIVATIONS:
            return False, _not_invertible(_AUTOGRAD_ACTIVATIONS[after]).replace("followed by",
                                                                                 "its residual sum is followed by")
        return False, "no activation after the residual addition: nothing to gain (the fused layer would keep r)"
    if kind in _AUTOGRAD_ACTIVATIONS:
        return False, _not_invertible(_AUTOGRAD_ACTIVATIONS[kind])
    if not kind:
        return False, "its output is not used by a differentiable operation"
    return False, f"its output goes into {kind}, not an activation"


def _build(model: nn.Module, example_inputs: Any) -> _Built:
    """Plan everything and build the replacements and rewritten forwards, without changing the model."""
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    names: dict[int, str] = {}
    places: Counter = Counter()
    for path, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), path)
        places[id(module)] += 1
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    rows: dict[int, tuple[str, bool, str]] = {}  # id(bn) -> (pattern, fused, detail)
    warned: list[str] = []

    def unfused(m: nn.Module, detail: str, pattern: str = NO_PATTERN) -> None:
        rows.setdefault(id(m), (pattern, False, detail))

    # What an earlier fuse_activations rewrote stays as it is.
    for module in rewritten_modules(model):
        where = names[id(module)] or "(root)"
        for path, pattern in _rewrite_of(module).fusions:
            layer = module.get_submodule(path)
            detail = "its own forward is rewritten already" if not path else f"in the rewritten forward of `{where}`"
            rows[id(layer)] = (pattern, True, detail)

    # Layers that cannot take part at all.
    proofs: dict[int, _Proof] = {}
    candidates: list[nn.Module] = []  # plain batch norms (or proven ones) that a block pattern can fuse
    for m in norms:
        cls = type(m)
        if id(m) in rows:
            continue
        if not isinstance(m, LpBatchNorm):
            unfused(m, "torch's BatchNorm: convert it with normdecouple.convert_batchnorm first")
        elif cls in _PLAIN_CLASS:
            rows[id(m)] = (BN_KEPT if m.activation == "identity" else BN_ACT, True,
                           f"a fused layer (activation={m.activation!r})")
        elif vars(cls).get("_user_class") is not None:
            proof = _prove_layer(m) if example_inputs is not None else "needs example_inputs"
            if isinstance(proof, str):
                unfused(m, f"{vars(cls)['_user_class'].__name__}: {proof}", BN_ACT_LAYER)
            else:
                proofs[id(m)] = proof
                if proof.spec is None and not _has_hooks(m):
                    candidates.append(m)
        elif cls in _FUSED_CLASS:
            if _has_hooks(m):
                unfused(m, "it has hooks, which would see the fused layer's output")
            else:
                candidates.append(m)
        elif "Parametrized" in cls.__name__:
            unfused(m, "it is parametrized (torch.nn.utils.parametrize)")
        else:
            unfused(m, f"{cls.__name__} has no fused form")

    # Pairs by Sequential adjacency only, without example inputs.
    if example_inputs is None:
        pairs = _sequential_pairs(model)
        paired = {id(layer) for layer, _ in pairs}
        for m in candidates:
            if id(m) not in paired:
                unfused(m, "not followed by its activation in an nn.Sequential (pass example_inputs to find more)")
        return _finish(model, norms, rows, names, pairs, [], warned)

    # Static: for each candidate, the innermost block whose traced forward holds a pattern.
    traces: dict[tuple[int, frozenset[str]], Graph | str] = {}

    def trace(block: nn.Module, inline: frozenset[str]) -> Graph | str:
        key = (id(block), inline)
        if key not in traces:
            traces[key] = _trace_block(block, inline)
        return traces[key]

    static: dict[int, tuple[str, frozenset[str], _Match]] = {}  # id(bn) -> (block path, inline, match)
    static_reason: dict[int, tuple[str, bool]] = {}  # id(bn) -> (reason, a block could not be rewritten)
    for m in candidates:
        path = names[id(m)]
        if places[id(m)] > 1:
            static_reason[id(m)] = (f"it is registered in {places[id(m)]} places", False)
            continue
        parts = path.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            block_path = ".".join(parts[:depth])
            block = model.get_submodule(block_path)
            relative = parts[depth:]
            inline = frozenset({""} | {".".join(relative[:i]) for i in range(1, len(relative))})
            if _rewrite_of(block) is not None:
                static_reason[id(m)] = (f"the forward of `{block_path}` is rewritten already", False)
                break
            graph = trace(block, inline)
            if isinstance(graph, str):
                static_reason[id(m)] = (f"its block `{block_path or '(root)'}`: {graph}", True)
                break
            found = _match(graph, block, ".".join(relative))
            if found == _RETURNED:
                continue
            if isinstance(found, str):
                static_reason[id(m)] = (found, False)
            else:
                static[id(m)] = (block_path, inline, found)
            break
        else:
            static_reason.setdefault(id(m), ("its output is the model's output", False))

    restore = _Restore(model)
    seen = _observe(model, example_inputs, restore)
    paired = {id(layer): act for layer, act in seen.pairs}

    # Decide the block rewrites: group by block, retrace with the union of the inlined paths, match again.
    chosen: dict[str, list[nn.Module]] = defaultdict(list)
    for m in candidates:
        if id(m) in paired:
            continue
        if id(m) not in static:
            reason, is_block = static_reason.get(id(m), ("no pattern found", False))
            if is_block:
                # The block could not be analysed: what the followed forward saw says whether that matters.
                fusable, observed = _observed_pattern(seen, m)
                if fusable:
                    warned.append(f"`{names[id(m)]}` ({reason})")
                else:
                    reason = observed
            if seen.calls[id(m)] == 0:
                reason = "it is not called in the example forward"
            unfused(m, reason)
            continue
        block_path, inline, match = static[id(m)]
        if seen.calls[id(m)] != 1:
            unfused(m, f"it is called {seen.calls[id(m)]} times in one forward (a shared layer)", match.pattern)
            continue
        if not seen.single_use[id(m)]:
            unfused(m, "its output has another use in the followed forward", match.pattern)
            continue
        if match.add is not None and not seen.sum_single_use.get(id(m), False):
            unfused(m, "the residual sum has another use in the followed forward", match.pattern)
            continue
        chosen[block_path].append(m)

    rewrites: list[tuple[nn.Module, RewrittenForward]] = []
    rewritten_blocks: set[str] = set()
    for block_path in sorted(chosen, key=lambda p: -p.count(".") if p else 1):
        block = model.get_submodule(block_path)
        layers = chosen[block_path]
        inline = frozenset().union(*(static[id(m)][1] for m in layers))
        inner = sorted(p for p in rewritten_blocks if block_path == "" or p.startswith(block_path + "."))
        nested = [p for p in inner if any(i and p == ".".join(filter(None, (block_path, i))) for i in inline)]
        if nested:
            for m in layers:
                unfused(m, f"its block `{block_path or '(root)'}` would inline `{nested[0]}`, whose forward is "
                           f"rewritten for other layers", static[id(m)][2].pattern)
            continue
        graph = trace(block, inline)
        if isinstance(graph, str):
            for m in layers:
                unfused(m, f"its block `{block_path or '(root)'}`: {graph}", static[id(m)][2].pattern)
            continue
        graph = copy.deepcopy(graph)
        matches: list[tuple[nn.Module, _Match]] = []
        for m in layers:
            relative = names[id(m)][len(block_path) + 1 if block_path else 0:]
            found = _match(graph, block, relative)
            if isinstance(found, str) or found == _RETURNED:
                unfused(m, f"its pattern is not found with its block's other layers inlined ({found})")
            elif not _movable(graph, found):
                unfused(m, "something between it and the addition could write into its input", found.pattern)
                warned.append(f"`{names[id(m)]}` (its block `{block_path or '(root)'}`: its input may change "
                              f"before the addition)")
            else:
                matches.append((m, found))
        matches = _one_per_addition(matches)
        if not matches:
            continue
        checks = _checks_of(block, graph, [match for _, match in matches], inline, proofs, names, block_path)
        fusions = tuple((str(match.bn.target), match.pattern) for _, match in matches)
        patterns = {id(m): match.pattern for m, match in matches}
        _rewrite(graph, [match for _, match in matches])
        code = graph.python_code(root_module="self")
        rewrite = RewrittenForward(block, code.src, code.globals, checks, fusions)
        rewrites.append((block, rewrite))
        rewritten_blocks.add(block_path)
        for m, match in matches:
            detail = f"in the rewritten forward of `{block_path or '(root)'}`"
            if match.residual is not None:
                detail += f", with the residual `{match.residual.name}`"
            rows[id(m)] = (patterns[id(m)], True, detail)

    # BatchNormAct subclasses that apply a fusable activation themselves.
    for m in norms:
        proof = proofs.get(id(m))
        if proof is not None and proof.spec is not None:
            rewrites.append((m, _layer_rewrite(m, proof.spec, proof.checks, BN_ACT_LAYER)))
            rows[id(m)] = (BN_ACT_LAYER, True, f"its own forward rewritten ({proof.spec[0]})")

    # Fused with the identity: a layer whose output is kept for the backward anyway (by the next layer, or as
    # the residual of a layer fused above) then keeps that output instead of its input.
    def residual_targets(done: list[tuple[nn.Module, RewrittenForward]]) -> set[int]:
        return {id(module.get_submodule(path)) for module, rewrite in done for path, pattern in rewrite.fusions
                if pattern == BN_ADD_ACT}

    targets = residual_targets(rewrites)
    identity: dict[int, nn.Module] = {}
    identity_why: dict[int, str] = {}
    for m in norms:
        if (id(m) in rows and rows[id(m)][1]) or id(m) in paired:
            continue
        operand = seen.residual_of.get(id(m)) in targets
        if not (operand or seen.kept_by_others.get(id(m), False)):
            continue
        obstacle = _identity_obstacle(m, seen, proofs, operand)
        if obstacle:
            if operand:
                rows[id(m)] = (RESIDUAL_OPERAND, False, f"its output is the residual of "
                               f"`{names[seen.residual_of[id(m)]]}`, but {obstacle}")
            continue
        identity_why[id(m)] = "operand" if operand else "kept"
        if type(m) in _FUSED_CLASS:
            identity[id(m)] = m
        else:
            pattern = RESIDUAL_OPERAND if operand else BN_KEPT
            rewrites.append((m, _layer_rewrite(m, ("identity", 0.01), proofs[id(m)].checks, pattern)))
        if operand:
            rows[id(m)] = (RESIDUAL_OPERAND, True, f"fused with the identity: its output is the residual that "
                                                   f"`{names[seen.residual_of[id(m)]]}` keeps, so it keeps no input")
        else:
            after = _node_kind(seen.consumer.get(id(m), "")) or "a later operation"
            rows[id(m)] = (BN_KEPT, True, f"fused with the identity: {after} keeps its output for the backward "
                                          f"anyway, so it keeps no input")

    # Verify every rewrite on the example.
    if rewrites:
        captured = _capture(model, example_inputs, [module for module, _ in rewrites], restore)
        kept = []
        for module, rewrite in rewrites:
            arguments = captured.pop(id(module), None)
            reason = ("it is not called in the example forward" if arguments is None
                      else _verify(module, rewrite, arguments, example_inputs, restore))
            if reason is None:
                kept.append((module, rewrite))
                continue
            where = names[id(module)] or "(root)"
            for path, _ in rewrite.fusions:
                layer = module.get_submodule(path)
                pattern = rows[id(layer)][0]
                rows[id(layer)] = (pattern, False, f"its block `{where}`: {reason}")
                warned.append(f"`{names[id(layer)]}` (its block `{where}`: {reason})")
                identity_why.pop(id(layer), None)
        rewrites = kept
        # A residual sum whose block could not be rewritten keeps nothing: its other operand gains nothing.
        targets = residual_targets(rewrites)
        for m in norms:
            if identity_why.get(id(m)) == "operand" and seen.residual_of.get(id(m)) not in targets:
                identity.pop(id(m), None)
                rewrites = [(module, rewrite) for module, rewrite in rewrites if module is not m]
                rows[id(m)] = (RESIDUAL_OPERAND, False, f"its output is the residual of "
                               f"`{names[seen.residual_of[id(m)]]}`, which does not fuse: nothing to gain")

    # Layers fused with the identity by an earlier fuse_activations: say which are residual operands.
    for m in norms:
        target = seen.residual_of.get(id(m))
        if type(m) in _PLAIN_CLASS and m.activation == "identity" and target is not None and rows.get(target, ("",))[
                0] == BN_ADD_ACT and rows[target][1]:
            rows[id(m)] = (RESIDUAL_OPERAND, True, f"a fused layer (activation='identity'), the residual of "
                                                   f"`{names[target]}`")

    # The other operand of a fused residual sum that is not fused itself.
    for m in norms:
        target = seen.residual_of.get(id(m))
        if target in targets and rows.get(id(m), (None,))[0] in (None, NO_PATTERN):
            rows[id(m)] = (RESIDUAL_OPERAND, False, f"its output is the residual of `{names[target]}`")
    for m in candidates:
        if id(m) not in rows and id(m) not in paired:
            unfused(m, _observed_pattern(seen, m)[1])
    return _finish(model, norms, rows, names, seen.pairs, rewrites, warned, list(identity.values()))


def _layer_rewrite(layer: nn.Module, spec: tuple[str, float], checks: tuple[_Check, ...],
                   pattern: str) -> RewrittenForward:
    """The forward of a proven BatchNorm subclass as one fused call with ``spec``'s activation."""
    name = _input_name(layer)
    source = (f"def forward(self, {name}):\n"
              f"    return _fused_call(self, {name}, None, {spec[0]!r}, {spec[1]!r})\n")
    return RewrittenForward(layer, source, {"_fused_call": _fused_call}, checks, (("", pattern),))


def _identity_obstacle(layer: nn.Module, seen: _Observation, proofs: dict[int, _Proof], operand: bool) -> str:
    """Why ``layer`` cannot be fused with the identity ("" if it can)."""
    if type(layer) not in _FUSED_CLASS and not (id(layer) in proofs and proofs[id(layer)].spec is None):
        return f"{type(layer).__name__} has no fused form"
    if _has_hooks(layer):
        return "it has hooks"
    if seen.calls[id(layer)] != 1:
        return f"it is called {seen.calls[id(layer)]} times in one forward"
    if operand and not seen.single_use.get(id(layer), False):
        return "its output has another use"
    return ""


def _input_name(layer: nn.Module) -> str:
    params = list(inspect.signature(type(layer)._user_class.forward).parameters)
    return params[1]


def _checks_of(block: nn.Module, graph: Graph, matches: list[_Match], inline: frozenset[str],
               proofs: dict[int, _Proof], names: dict[int, str], block_path: str) -> tuple[_Check, ...]:
    """The modules whose calls the rewrite of ``block`` skips: the BatchNorms, identities and activation modules
    of the matches, the inlined containers, and the children a proven BatchNorm subclass would have called."""
    checks: dict[str, _Check] = {}
    for path in inline:
        if path:
            checks[path] = _Check(path, type(block.get_submodule(path)))
    for match in matches:
        for node in [match.bn, *match.chain, match.act]:
            if node.op == "call_module":
                sub = block.get_submodule(node.target)
                checks[node.target] = _Check(node.target, type(sub))
        layer = block.get_submodule(match.bn.target)
        for check in proofs.get(id(layer), _Proof(None, ())).checks:
            full = f"{match.bn.target}.{check.path}"
            checks[full] = _Check(full, check.cls)
    return tuple(checks.values())


def _finish(model: nn.Module, norms: list[nn.Module], rows: dict[int, tuple[str, bool, str]], names: dict[int, str],
            pairs: list[tuple[nn.Module, nn.Module]], rewrites: list[tuple[nn.Module, RewrittenForward]],
            warned: list[str], identity: list[nn.Module] = ()) -> _Built:
    replacements: dict[int, nn.Module] = {}
    for layer in identity:
        replacements[id(layer)] = _fused_layer(layer, "identity", 0.01)
    for layer, act in pairs:
        replacements[id(layer)] = _fused_layer(layer, *_activation_of(act))
        if id(act) not in replacements:
            replacements[id(act)] = FusedActivation(act)
        rows[id(layer)] = (BN_ACT, True, f"its activation `{names[id(act)]}` becomes an identity")
    table = []
    for m in norms:
        pattern, fused, detail = rows.get(id(m), (NO_PATTERN, False, "not analysed"))
        table.append(FusionRow(names[id(m)], type(m).__name__, pattern, fused, detail))
    rewritten = {id(m): m for m in rewritten_modules(model)} | {id(m): m for m, _ in rewrites}
    blocks = tuple(names[i] for i, m in rewritten.items() if not isinstance(m, _BatchNorm))
    return _Built(FusionPlan(tuple(table), blocks), replacements, rewrites, warned)


def _fused_layer(layer: LpBatchNorm, activation: str, negative_slope: float) -> LpBatchNorm:
    """The fused layer holding ``layer``'s state (the same Parameter objects and buffers), not put in place."""
    kwargs: dict[str, Any] = {"activation": activation, "negative_slope": negative_slope,
                              "low_precision": layer.low_precision, "backend": layer.backend}
    if hasattr(layer, "k"):
        kwargs["k"] = layer.k
    fused = transplant_state(layer, blank_like(_FUSED_CLASS[type(layer)], layer, **kwargs))
    fused.__dict__["_fused_from"] = type(layer)
    return fused


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


def _slots(root: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """Every (parent, name, child) place in the tree, shared children once per place."""
    for parent in root.modules():
        for name, child in parent._modules.items():
            if child is not None:
                yield parent, name, child


# ---------------------------------------------------------------------------------------------------------
# Public functions.


def fusion_plan(model: nn.Module, example_inputs: Any = None) -> FusionPlan:
    """What :func:`fuse_activations` (and ``convert_batchnorm(..., fuse_activation=True)``) would fuse, and why not.

    Changes nothing: the followed forwards restore every buffer and the random number generators. torch's own
    BatchNorm layers are listed as not fused (convert them first); to see what ``convert_batchnorm(model,
    fuse_activation=True, example_inputs=x)`` would do, plan a converted copy:
    ``fusion_plan(nd.convert_batchnorm(copy.deepcopy(model)), x)``.

    Args:
        model: the model.
        example_inputs: ``None`` (``nn.Sequential`` adjacency only), a tensor, or a tuple of positional inputs
            for the followed forwards. Default: ``None``.

    Returns:
        A :class:`FusionPlan`: one row per BatchNorm (path, class, pattern, fused or not, how or why not);
        ``print(plan)`` shows it as a table.

    Raises:
        Exception: whatever the model's own forward raises on ``example_inputs``, unchanged (the model's buffers
            and the random number generators are restored first).

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        >>> plan = nd.fuse.fusion_plan(nd.convert_batchnorm(model), torch.randn(2, 3, 8, 8))
        >>> plan["1"].fused, plan["1"].pattern
        (True, 'bn → act')
        >>> plan.summary()
        'fused 1 of 1 BatchNorm layers (1 bn → act)'

    References: arXiv:1803.01814
    """
    return _build(model, example_inputs).plan


def fusable_pairs(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
    """The (layer path, activation path) pairs that :func:`fuse_activations` replaces by a fused layer.

    Only the first way of fusing (a BatchNorm and its own activation module); :func:`fusion_plan` lists
    everything.

    Args:
        model: a model holding our ``L1BatchNorm*d``/``LinfBatchNorm*d`` layers (e.g. after
            ``convert_batchnorm``).
        example_inputs: ``None`` (``nn.Sequential`` adjacency only), a tensor, or a tuple of positional inputs
            for one forward that is followed.

    Returns:
        ``(layer path, activation path)`` of each pair, in module order.

    Raises:
        Exception: whatever the model's own forward raises on ``example_inputs``, unchanged (the model's buffers
            and the random number generators are restored first).
    """
    names = {id(m): name for name, m in model.named_modules()}
    if example_inputs is None:
        pairs = _sequential_pairs(model)
    else:
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        pairs = _observe(model, inputs, _Restore(model)).pairs
    return [(names[id(layer)], names[id(act)]) for layer, act in pairs]


def fuse_activations(model: nn.Module, example_inputs: Any = None) -> nn.Module:
    """Fuse each of our BatchNorm layers with the activation (and residual addition) that follows it.

    Follows :func:`fusion_plan` (see the module docstring for the three ways): pairs become
    ``L1BatchNormAct*d``/``LinfBatchNormAct*d`` layers (same ``Parameter`` objects, buffers, settings,
    ``training``) with a :class:`FusedActivation` where the activation was; blocks and BatchNormAct subclasses
    get a rewritten ``forward``. The model computes the same outputs and gradients, with about half the
    activation memory for the fused layers. The plan's summary is logged at INFO on ``normdecouple.fuse``; a
    block that could not be rewritten (the followed forward shows a fusable pattern there) is named in one
    warning.

    Args:
        model: the model, already converted to our layers (``convert_batchnorm``); changed in place.
        example_inputs: ``None``, a tensor, or a tuple of positional inputs for the followed forwards (the
            buffers and random number generators are restored afterwards). Default: ``None``.

    Returns:
        ``model`` (the root is never replaced).

    Raises:
        Exception: whatever the model's own forward raises on ``example_inputs``, unchanged; the model is then
            left as it was (nothing is replaced before the plan is complete; buffers and random number
            generators are restored).

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
    apply_plan(model, example_inputs)
    return model


def apply_plan(model: nn.Module, example_inputs: Any = None) -> FusionPlan:
    """:func:`fuse_activations`, returning the plan it followed (``convert_batchnorm`` uses it)."""
    built = _build(model, example_inputs)
    if built.warnings:
        warnings.warn(
            "normdecouple.fuse: these BatchNorm layers are followed by a fusable activation but stay unfused "
            "because their block cannot be rewritten: " + "; ".join(built.warnings) + ". They compute what they "
            "did; see normdecouple.fuse.fusion_plan(model, example_inputs) for the whole table",
            stacklevel=3,
        )
    _commit(model, built.replacements)
    for module, rewrite in built.rewrites:
        module.__dict__["forward"] = rewrite
    logger.info("normdecouple.fuse: %s", built.plan.summary())
    return built.plan


def unfuse_activations(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_activations` exactly: the plain layers, the original activation modules and the blocks'
    own forwards come back.

    Only what :func:`fuse_activations` made is changed: fused layers built directly by the user stay as they are.
    The plain layer holds the same ``Parameter`` objects and buffers; the activation is the very module object
    that was there before fusing; a rewritten block is the same object, without its rewritten ``forward``.

    Args:
        model: a model fused by :func:`fuse_activations` (or ``convert_batchnorm(..., fuse_activation=True)``).

    Returns:
        ``model``, changed in place.
    """
    replacements: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, FusedActivation):
            replacements[id(module)] = module.original
        unfused = unfused_layer(module)
        if unfused is not None:
            replacements[id(module)] = unfused
    rewritten = rewritten_modules(model)
    _commit(model, replacements)
    remove_rewrites(rewritten)
    return model


def unfused_layer(module: nn.Module) -> LpBatchNorm | None:
    """For a layer that :func:`fuse_activations` made from a plain one, that plain layer (rebuilt with the same
    state, not put in place); None for any other module."""
    plain_class = module.__dict__.get("_fused_from")
    if plain_class is None or type(module) not in _PLAIN_CLASS:
        return None
    kwargs: dict[str, Any] = {"low_precision": module.low_precision, "backend": module.backend}
    if hasattr(module, "k"):
        kwargs["k"] = module.k
    plain = transplant_state(module, blank_like(plain_class, module, **kwargs))
    for name in _ACT_ATTRIBUTES:
        plain.__dict__.pop(name, None)
    return plain


def _commit(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put every replacement in every place that holds its source (plain dictionary assignments)."""
    places = [(parent, name, replacements[id(child)]) for parent, name, child in _slots(model)
              if id(child) in replacements]
    for parent, name, new in places:
        parent._modules[name] = new
