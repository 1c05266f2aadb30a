"""Finding the weights whose scale a model's output does not depend on.

A weight ``w`` whose output channels reach the loss only through a batch norm is *scale-invariant*: scaling any
output channel of ``w`` by ``c > 0`` leaves the training loss unchanged (PAPER.md §1). Those are the weights the
optimizer hooks of :mod:`normdecouple.optim` act on. :func:`scale_invariant_parameters` finds them from one
forward pass on an example batch; :class:`ScaleInvarianceTrace` does the same while any code runs (a real training
step, for a Lightning module without ``forward``). Both follow how a per-channel scaling of each weight travels
through the operations the model actually runs: each torch function has a *rule*, a pure function from its
arguments and their tags to its outputs' tags, looked up by name in :data:`RULES`.

References: arXiv:1803.01814
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable, Hashable, Mapping
from numbers import Number
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "RULES", "Call", "Outcome", "Scaled", "ScaleInvarianceTrace", "TAINT", "scale_invariant_parameters",
    "scale_invariant_parameters_as_set",
]


@dataclasses.dataclass(frozen=True)
class Scaled:
    """How a tensor depends on the per-channel scale ``c`` of one weight.

    ``kind == "hom"``: the tensor becomes ``c[key(j)] * t`` along dimension ``dim`` (index ``j``).
    ``kind == "aff"``: it becomes ``c[key(j)] * t + b`` with ``b`` constant along every dimension but ``dim``.
    ``dim`` is counted from the end (negative), so that broadcasting does not move it. ``key`` names the map from
    positions along ``dim`` to the weight's output channels: two tensors combine elementwise only if their keys
    are equal.
    """

    kind: str
    dim: int
    key: Hashable


TAINT = "taint"
"""The weight's influence on the tensor is anything else: the weight is not scale-invariant if it reaches an output."""
_IDENTITY = "identity"

Entry = Scaled | str
Tag = dict[int, Entry]
"""``{id(weight): Entry}`` for each weight a tensor depends on."""


class Call(NamedTuple):
    """One torch function call as a rule sees it: the function, its arguments, its inputs' tags, its outputs."""

    func: Callable
    name: str
    args: tuple
    kwargs: dict
    tag: Callable[[Any], Tag]
    outs: list[Tensor]

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        return self.args[index] if len(self.args) > index else self.kwargs.get(name, default)


class Outcome(NamedTuple):
    """What a rule returns: one tag per output tensor, and the weights the call used as a layer's weight or
    normalised by batch statistics."""

    tags: list[Tag]
    used_as_weight: frozenset[int] = frozenset()
    normalized: frozenset[int] = frozenset()


Rule = Callable[[Call], Outcome]


def _tensors(tree: Any) -> list[Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, Tensor)]


def _taint(tags: list[Tag]) -> Tag:
    return {w: TAINT for tag in tags for w in tag}


def _merge(*tags: Tag) -> Tag:
    # The same weight reaching one tensor by two routes is a product or sum of its scalings: unknown.
    out: Tag = {}
    for tag in tags:
        for w, e in tag.items():
            out[w] = TAINT if w in out else e
    return out


def _hom(e: Entry) -> bool:
    return isinstance(e, Scaled) and e.kind == "hom"


def _first_and_rest(call: Call) -> tuple[Any, Tag, Tag]:
    first = call.arg(0, "input")
    rest = _tensors((call.args[1:], {k: v for k, v in call.kwargs.items() if k != "input"}))
    return first, call.tag(first), _taint([call.tag(t) for t in rest])


def _every(call: Call, tag: Tag, indices_after_first: bool = False) -> Outcome:
    # Indices (an argmax) do not change when a channel is scaled by c > 0 or shifted by a constant.
    index_tag = {w: e for w, e in tag.items() if e == TAINT}
    return Outcome([index_tag if indices_after_first and i else tag for i in range(len(call.outs))])


def _out_ndim(call: Call) -> int:
    return call.outs[0].dim() if call.outs else 0


def _per_channel_constant(x: Any, dim: int, out_ndim: int) -> bool:
    """Whether ``x``, broadcast to the output, is constant along every dimension except ``dim``."""
    if isinstance(x, Number):
        return True
    if not isinstance(x, Tensor):
        return False
    shape = (1,) * (out_ndim - x.dim()) + tuple(x.shape)
    return all(size == 1 for i, size in enumerate(shape) if i - out_ndim != dim)


def _uses_batch_statistics(module: nn.Module) -> bool:
    """Whether a ``_BatchNorm`` module normalises by the batch's statistics in its current mode (torch's rule)."""
    return module.training or (module.running_mean is None and module.running_var is None)


def normalize(tag: Tag, ndim: int, batch_stats: bool) -> tuple[Tag, frozenset[int]]:
    """A batch norm's output tag from its input's, and the weights it normalises.

    With batch statistics (training mode, or no running statistics), they are taken per channel (dimension 1)
    over all other dimensions, so a per-channel factor and a per-channel constant both cancel (exactly, up to
    the eps added to the variance). With running statistics (eval mode, e.g. a frozen BatchNorm inside a model
    that trains) the layer is the per-channel affine map :math:`y = a_c x + b_c`: it normalises nothing, and a
    scaling ``c·t`` of the channel dimension leaves it as ``c·(a t) + b``, a scaling plus a per-channel constant.
    """
    channel = {w for w, e in tag.items() if isinstance(e, Scaled) and ndim >= 2 and e.dim + ndim == 1}
    if batch_stats:
        return {w: TAINT for w in tag if w not in channel}, frozenset(channel)
    return {w: Scaled("aff", e.dim, e.key) if w in channel else TAINT for w, e in tag.items()}, frozenset()


# -- the rules: each a pure function of one call --------------------------------------------------------------


def rule_generic(call: Call) -> Outcome:
    """Any function without a rule: its outputs depend on its inputs' weights in an unknown way."""
    return _every(call, _taint([call.tag(t) for t in _tensors((call.args, call.kwargs))]))


def rule_homogeneous(call: Call) -> Outcome:
    """Elementwise and positively homogeneous of degree 1, ``f(c·x) = c·f(x)``: a constant shift does not pass."""
    _, first, rest = _first_and_rest(call)
    return _every(call, _merge({w: e if _hom(e) else TAINT for w, e in first.items()}, rest))


def rule_identity(call: Call) -> Outcome:
    """Value-preserving: a scaling and a constant shift both pass unchanged."""
    _, first, rest = _first_and_rest(call)
    return _every(call, _merge(first, rest))


def rule_add(call: Call) -> Outcome:
    """A sum passes a scaling of both terms by the same channels, or of one term plus a per-channel constant."""
    a, b = call.arg(0, "input"), call.arg(1, "other")
    ta, tb = call.tag(a), call.tag(b)
    tag: Tag = {}
    for w in set(ta) | set(tb):
        ea, eb = ta.get(w), tb.get(w)
        if TAINT in (ea, eb):
            tag[w] = TAINT
        elif ea is not None and eb is not None:
            kind = "aff" if "aff" in (ea.kind, eb.kind) else "hom"
            tag[w] = Scaled(kind, ea.dim, ea.key) if (ea.dim, ea.key) == (eb.dim, eb.key) else TAINT
        else:
            e, other = (ea, b) if ea is not None else (eb, a)
            constant = _per_channel_constant(other, e.dim, _out_ndim(call))
            tag[w] = Scaled("aff", e.dim, e.key) if constant else TAINT
    return _every(call, tag)


def rule_mul(call: Call, divide: bool = False) -> Outcome:
    """A product by a factor independent of the weight passes a scaling; a quotient passes its numerator's."""
    a, b = call.arg(0, "input"), call.arg(1, "other")
    ta, tb = call.tag(a), call.tag(b)
    rounded = divide and call.kwargs.get("rounding_mode") is not None
    tag: Tag = {}
    for w in set(ta) | set(tb):
        ea, eb, other = ta.get(w), tb.get(w), b
        if not divide and ea is None:
            ea, eb, other = eb, ea, a
        ok = not rounded and isinstance(ea, Scaled) and eb is None
        tag[w] = ea if ok and (ea.kind == "hom" or _per_channel_constant(other, ea.dim, _out_ndim(call))) else TAINT
    return _every(call, tag)


def rule_reduce(call: Call) -> Outcome:
    """A sum, mean, max or min over dimensions other than the scaled one keeps the scaling."""
    source, first, rest = _first_and_rest(call)
    dims = call.arg(1, "dim", call.kwargs.get("axis"))
    if isinstance(dims, Tensor) or dims is None:
        # No dimension (a reduction over everything) or an elementwise max/min against another tensor.
        return rule_generic(call)
    ndim, out_ndim = source.dim(), _out_ndim(call)
    reduced = {d % ndim for d in ([dims] if isinstance(dims, int) else dims)} if ndim else set()
    keepdim = bool(call.arg(2, "keepdim", False))
    tag: Tag = {}
    for w, e in first.items():
        position = e.dim + ndim if isinstance(e, Scaled) else None
        if position is None or position in reduced:
            tag[w] = TAINT
        else:
            new = position if keepdim else position - sum(1 for d in reduced if d < position)
            tag[w] = Scaled(e.kind, new - out_ndim, e.key)
    return _every(call, _merge(tag, rest), indices_after_first=True)


def rule_pool(call: Call) -> Outcome:
    """Channel-wise linear or max-like maps over the trailing spatial dimensions pass a scaling."""
    source, first, rest = _first_and_rest(call)
    found = re.search(r"(\d)d", call.name)
    spatial = int(found.group(1)) if found else source.dim() - 2
    tag = {w: e if _hom(e) and e.dim < -spatial else TAINT for w, e in first.items()}
    return _every(call, _merge(tag, rest), indices_after_first=True)


def rule_structural(call: Call, shape_only_other: bool = False) -> Outcome:
    """Ops that only move, select or repeat elements: where each channel goes is found by running them on a probe."""
    source = call.arg(0, "input")
    rest = [] if shape_only_other else _tensors((call.args[1:], call.kwargs))
    rest_tag = _taint([call.tag(t) for t in rest])
    nonzero_pad = call.name == "pad" and call.arg(3, "value", None) not in (None, 0, 0.0)
    tags: list[Tag] = [{} for _ in call.outs]
    for w, e in call.tag(source).items():
        mapped = _probe(call, source, e) if isinstance(e, Scaled) and not nonzero_pad else None
        for i, tag in enumerate(tags):
            tag[w] = mapped[i] if mapped is not None and len(mapped) == len(tags) else TAINT
    return Outcome([_merge(tag, rest_tag) for tag in tags])


def _probe(call: Call, source: Tensor, e: Scaled) -> list[Entry] | None:
    """Runs the function on a tensor holding each element's channel number (1-based) to see where channels go."""
    position, n = e.dim + source.dim(), source.shape[e.dim]
    shape = [1] * source.dim()
    shape[position] = n
    probe = torch.arange(1, n + 1, dtype=torch.float64, device=source.device).view(shape)
    probe = probe.expand(source.shape).contiguous()
    try:
        if call.args:
            result = call.func(probe, *call.args[1:], **call.kwargs)
        else:
            result = call.func(**{**call.kwargs, "input": probe})
    except (RuntimeError, TypeError, ValueError, IndexError):
        return None
    return [_read_probe(q, n, e) for q in _tensors(result)]


def _read_probe(q: Tensor, n: int, e: Scaled) -> Entry:
    if q.dim() == 0 or q.numel() == 0 or not bool(((q == q.round()) & (q >= 0) & (q <= n)).all()):
        return TAINT
    # Zeros are padding: fine for a scaling (0·c = 0), not for a constant shift.
    if e.kind == "aff" and bool((q == 0).any()):
        return TAINT
    for d in range(q.dim()):
        if q.shape[d] == 1:
            continue
        columns = q.movedim(d, 0).reshape(q.shape[d], -1)
        if not bool((columns == columns[:, :1]).all()):
            continue
        index = tuple(int(v) for v in columns[:, 0].tolist())
        if len(set(index)) == 1:
            # One channel spread over the tensor: a uniform factor, which no per-channel rule follows.
            return TAINT
        return Scaled(e.kind, d - q.dim(), e.key if index == tuple(range(1, n + 1)) else (e.key, index))
    return TAINT


def rule_layer(call: Call, linear: bool = False) -> Outcome:
    """``conv{1,2,3}d`` and ``linear`` turn a scaling of their weight's dimension 0 into one of the output's
    channel dimension (with a bias: plus a per-channel constant)."""
    source, weight, bias = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    kind = "hom" if bias is None else "aff"
    channel = -1 if linear else 1 - weight.dim()
    used = {w for w, e in call.tag(weight).items()
            if _hom(e) and e.dim == -weight.dim() and (weight.dim() == 2 or not linear)}
    from_weight = {w: Scaled(kind, channel, e.key) if w in used else TAINT for w, e in call.tag(weight).items()}
    if linear:
        # Dimensions other than the last one (the features) pass through a linear map unchanged.
        passes = lambda e: e.dim != -1  # noqa: E731
    else:
        # A depthwise convolution maps input channel j to output channel j alone, so it passes a scaling on.
        groups = call.arg(6, "groups", 1)
        depthwise = isinstance(groups, int) and groups == source.shape[channel] == weight.shape[0]
        passes = lambda e: depthwise and e.dim == channel  # noqa: E731
    from_input = {w: Scaled(kind, e.dim, e.key) if _hom(e) and passes(e) else TAINT
                  for w, e in call.tag(source).items()}
    bias_tag = _taint([call.tag(bias)]) if bias is not None else {}
    return Outcome(_every(call, _merge(from_weight, from_input, bias_tag)).tags, used_as_weight=frozenset(used))


def rule_cat(call: Call) -> Outcome:
    """Concatenation along the scaled dimension maps positions to channels anew; along another keeps a scaling
    shared by every piece."""
    pieces = list(call.arg(0, "tensors", ()))
    if not call.outs or not all(isinstance(p, Tensor) for p in pieces):
        return rule_generic(call)
    out_ndim = _out_ndim(call)
    cat_dim = call.arg(1, "dim", call.kwargs.get("axis", 0)) % out_ndim - out_ndim
    piece_tags = [call.tag(p) for p in pieces]
    tag: Tag = {}
    for w in {w for t in piece_tags for w in t}:
        entries = [t.get(w) for t in piece_tags]
        scaled = [e for e in entries if e is not None]
        if TAINT in scaled or len({e.dim for e in scaled}) != 1:
            tag[w] = TAINT
        elif scaled[0].dim == cat_dim:
            # Untouched pieces have factor 1: recorded in the key as None.
            kind = "aff" if any(e.kind == "aff" for e in scaled) else "hom"
            key = tuple((e.key if e is not None else None, p.shape[cat_dim]) for e, p in zip(entries, pieces))
            tag[w] = Scaled(kind, cat_dim, key)
        else:
            tag[w] = scaled[0] if None not in entries and len(set(entries)) == 1 and _hom(scaled[0]) else TAINT
    return _every(call, tag)


def rule_batch_norm(call: Call) -> Outcome:
    """``torch.nn.functional.batch_norm``: with batch statistics, removes a scaling and a constant of dimension 1."""
    source = call.arg(0, "input")
    running = (call.arg(1, "running_mean"), call.arg(2, "running_var"))
    batch_stats = bool(call.arg(5, "training", False)) or running == (None, None)
    tag, done = normalize(call.tag(source), source.dim(), batch_stats)
    others = [call.tag(t) for t in _tensors((call.args[1:], call.kwargs)) if t is not source]
    return Outcome(_every(call, _merge(tag, _taint(others))).tags, normalized=done)


def _table(*groups: tuple[Rule, str]) -> dict[str, Rule]:
    return {name: rule for rule, names in groups for name in names.split()}


RULES: dict[str, Rule] = _table(
    (rule_homogeneous, "relu relu_ leaky_relu leaky_relu_ rrelu rrelu_ prelu dropout dropout_ dropout1d dropout2d "
                       "dropout3d feature_dropout feature_dropout_"),
    (rule_identity, "clone contiguous detach detach_ to float double half bfloat16 cpu cuda requires_grad_ positive "
                    "neg negative __neg__ __pos__"),
    (rule_add, "add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __isub__ subtract __rsub__ rsub"),
    (rule_mul, "mul mul_ __mul__ __rmul__ __imul__ multiply"),
    (functools.partial(rule_mul, divide=True),
     "div div_ divide true_divide __truediv__ __itruediv__ __div__ __idiv__"),
    (rule_reduce, "sum mean nansum nanmean amax amin max min"),
    (rule_pool, " ".join(f"{op}{k}d{suffix}" for op in ("max_pool", "avg_pool", "adaptive_avg_pool",
                                                         "adaptive_max_pool", "lp_pool", "fractional_max_pool")
                         for k in (1, 2, 3) for suffix in ("", "_with_indices"))),
    (rule_pool, "interpolate upsample upsample_nearest upsample_bilinear"),
    (rule_structural, "view reshape flatten unflatten squeeze squeeze_ unsqueeze unsqueeze_ expand broadcast_to "
                      "permute transpose transpose_ swapaxes swapdims movedim moveaxis t t_ __getitem__ narrow "
                      "select index_select chunk split tensor_split split_with_sizes unbind flip fliplr flipud roll "
                      "repeat tile unfold pad pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle"),
    # The second tensor is read for its shape only.
    (functools.partial(rule_structural, shape_only_other=True), "view_as reshape_as expand_as"),
    (rule_layer, "conv1d conv2d conv3d"),
    (functools.partial(rule_layer, linear=True), "linear"),
    (rule_cat, "cat concat concatenate"),
    (rule_batch_norm, "batch_norm"),
)
"""The rule of each torch function, by name; functions not listed follow :func:`rule_generic`."""

# Turning a value into Python lets it steer control flow, which this analysis cannot follow.
_ESCAPE = frozenset("__bool__ __float__ __int__ __index__ __complex__ item tolist numpy __array__".split())


class _ScaleTracer(TorchFunctionMode):
    """Tags every tensor with how it depends on each weight's per-channel scale, by the rules of :data:`RULES`.

    Every parameter with two or more dimensions starts tagged with a scaling of its own dimension 0. A function
    without a rule marks its outputs as depending on every weight its inputs depend on in an unknown way, which
    keeps the analysis sound: it may miss an invariant weight, never report one that is not. Batch-norm modules are
    handled as a whole by module hooks (:meth:`enter_batch_norm`, :meth:`exit_batch_norm`) when they normalise
    with batch statistics, so that any implementation of the normalisation (ours or torch's) is recognised; in
    eval mode their operations are followed like any others.
    """

    def __init__(self, parameters: list[nn.Parameter]) -> None:
        super().__init__()
        self.tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.used_as_weight: set[int] = set()
        self.normalized: set[int] = set()
        self.escaped: set[int] = set()
        self._bn_depth = 0
        # One entry per batch-norm forward in progress: "through", "nested", or its input's and others' tags.
        self._bn_stack: list[Any] = []
        for p in parameters:
            if p.dim() >= 2:
                self.tags[p] = {id(p): Scaled("hom", -p.dim(), _IDENTITY)}

    def tag(self, t: Any) -> Tag:
        return self.tags.get(t, {}) if isinstance(t, Tensor) else {}

    def _set(self, t: Tensor, tag: Tag) -> None:
        if not (t.is_floating_point() or t.is_complex()):
            # A conversion to integers rounds, which does not commute with a scaling.
            tag = {w: TAINT for w in tag}
        if tag:
            self.tags[t] = tag
        elif t in self.tags:
            del self.tags[t]

    def enter_batch_norm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A batch-norm module's forward starts: with batch statistics it is followed as a whole, else through.

        In eval mode (running statistics) the module is an affine map, whose operations are followed one by one
        (:func:`rule_batch_norm` and the rules of whatever the module adds: a residual, an activation), so that a
        BatchNorm frozen in a training model is never taken for a normalisation.
        """
        if self._bn_depth > 0:
            self._bn_stack.append("nested")
            self._bn_depth += 1
            return
        if not _uses_batch_statistics(module):
            self._bn_stack.append("through")
            return
        source = args[0] if args else kwargs.get("input")
        # Any other tensor argument reaches the output without normalisation: the fused layers' residual
        # (act(BN(x) + residual)), or an argument of a subclass's forward that this analysis cannot see into.
        others = [t for t in _tensors((args, kwargs)) if t is not source]
        self._bn_stack.append((self.tag(source), _taint([self.tag(t) for t in others])))
        self._bn_depth += 1

    def exit_batch_norm(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        entry = self._bn_stack.pop()
        if entry == "through":
            return
        self._bn_depth -= 1
        if entry == "nested":
            return
        source_tag, others_tag = entry
        source = args[0] if args else kwargs.get("input")
        ndim = source.dim() if isinstance(source, Tensor) else 0
        tag, done = normalize(source_tag, ndim, batch_stats=True)
        self.normalized |= done
        for t in _tensors(output):
            self._set(t, _merge(tag, others_tag))

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self._bn_depth > 0:
            return func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        tagged = any(t in self.tags for t in inputs)
        out = func(*args, **kwargs)
        if not tagged:
            return out
        name = getattr(func, "__name__", "")
        if name in _ESCAPE:
            for t in inputs:
                self.escaped.update(self.tag(t))
            return out
        outs = _tensors(out)
        outcome = RULES.get(name, rule_generic)(Call(func, name, args, kwargs, self.tag, outs))
        for t, tag in zip(outs, outcome.tags):
            self._set(t, tag)
        self.used_as_weight |= outcome.used_as_weight
        self.normalized |= outcome.normalized
        mutated = [t for t in outs if any(t is i for i in inputs)]
        if name == "__setitem__" and args:
            mutated = [args[0]]
            self._set(args[0], _taint([self.tag(t) for t in inputs]))
        for t in mutated:
            self._propagate_to_aliases(t)
        return out

    def _propagate_to_aliases(self, mutated: Tensor) -> None:
        # An in-place write changes every tensor that shares the storage; a tensor whose tag no longer matches
        # the written one mixes two dependencies and is marked unknown.
        try:
            storage = mutated.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return
        if nbytes == 0:
            return
        new = self.tag(mutated)
        for other, other_tag in list(self.tags.items()):
            if other is mutated or other.untyped_storage().data_ptr() != ptr:
                continue
            self._set(other, {w: other_tag.get(w) if other_tag.get(w) == new.get(w) else TAINT
                              for w in set(other_tag) | set(new)})


# Values that hold no tensor; numpy values come from .numpy(), which the trace already counts as an escape.
_LEAVES = (type(None), Number, str, bytes, torch.dtype, torch.device, torch.memory_format, torch.layout)


def _output_tensors(output: Any) -> list[Tensor]:
    """Every tensor in a model's output, or a ``TypeError`` for a container whose contents cannot all be read.

    Read: tensors; dicts and other mappings (Hugging Face's ``ModelOutput`` is an ``OrderedDict`` subclass);
    lists, tuples (``NamedTuple`` included) and sets; dataclasses, with or without ``slots`` (every field is read,
    and the instance's ``__dict__`` when it has one); numbers, strings and ``None``, which hold no tensor. Anything
    else could carry a weight where this function does not look, so it is refused rather than skipped.
    """
    found: list[Tensor] = []
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(output, "output")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, Tensor):
            found.append(item)
            continue
        if isinstance(item, _LEAVES) or type(item).__module__ == "numpy" or id(item) in seen:
            continue
        seen.add(id(item))
        children: list[tuple[Any, str]] = []
        if isinstance(item, Mapping):
            children += [(k, f"{path} key") for k in item.keys()]
            children += [(v, f"{path}[{k!r}]") for k, v in item.items()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            children += [(v, f"{path}[{i}]") for i, v in enumerate(item)]
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            children += [(getattr(item, f.name, None), f"{path}.{f.name}") for f in dataclasses.fields(item)]
            children += [(v, f"{path}.{k}") for k, v in getattr(item, "__dict__", {}).items()]
        elif not isinstance(item, (Mapping, list, tuple, set, frozenset)):
            raise TypeError(
                f"expected the model's output to hold its tensors in tensors, tuples, lists, dicts, NamedTuples, "
                f"dataclasses or Hugging Face ModelOutputs (got {type(item).__qualname__} at {path}, whose contents "
                "cannot all be read, so a weight it carries could not be followed); return one of those, or pass "
                "params= explicitly"
            )
        stack.extend(reversed(children))
    return found


class ScaleInvarianceTrace:
    r"""Follows the per-channel scale of ``model``'s weights through every torch operation run while it is active.

    The engine of :func:`scale_invariant_parameters`, usable on any code: a real training step, for example,
    traced as it runs (no extra forward, no side effect run twice), its loss then passed to
    :meth:`invariant_parameters`. It only observes: values, gradients, buffers and the random state are those of
    the untraced code (each operation that moves elements is run once more, on a small probe tensor, outside
    autograd). While active, compiled submodules run eagerly (``torch.compiler.set_stance("force_eager")``), so
    that their operations can be seen. Enter it with ``with`` (or :meth:`start` and :meth:`stop` from two
    callbacks of one step); the rules and the method are those of :func:`scale_invariant_parameters`.

    Args:
        model: the module whose parameters are followed.

    Raises:
        TypeError: if ``model`` is not a :class:`torch.nn.Module` or contains TorchScript modules.

    Example::

        >>> import torch
        >>> from normdecouple.scale_invariance import ScaleInvarianceTrace
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.BatchNorm1d(8),
        ...                           torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> with ScaleInvarianceTrace(net) as trace:
        ...     loss = net(torch.randn(6, 4)).square().mean()
        >>> trace.invariant_parameters(loss)
        ['0.weight']

    References: arXiv:1803.01814
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected model to be a torch.nn.Module (got {type(model).__name__})")
        scripted = [name or type(model).__name__ for name, m in model.named_modules()
                    if isinstance(m, torch.jit.ScriptModule)]
        if scripted:
            raise TypeError(
                f"expected an eager model (got TorchScript modules: {scripted}): the operations inside TorchScript "
                "cannot be followed; analyse the module before torch.jit.script, or pass params= explicitly"
            )
        self.model = model
        self._named = [(name, p) for name, p in model.named_parameters()
                       if not isinstance(p, nn.parameter.UninitializedParameter)]
        self._tracer = _ScaleTracer([p for _, p in self._named])
        self._stack: contextlib.ExitStack | None = None

    @property
    def active(self) -> bool:
        """Whether the trace is following operations now."""
        return self._stack is not None

    def start(self) -> None:
        """Starts following operations (what ``with`` does on entry)."""
        if self._stack is not None:
            raise RuntimeError("ScaleInvarianceTrace: expected a trace that is not active (got one already started)")
        stack = contextlib.ExitStack()
        for m in self.model.modules():
            if isinstance(m, _BatchNorm):
                stack.callback(m.register_forward_pre_hook(self._tracer.enter_batch_norm, with_kwargs=True).remove)
                stack.callback(m.register_forward_hook(self._tracer.exit_batch_norm, with_kwargs=True).remove)
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is not None:
            stack.enter_context(set_stance("force_eager"))
        stack.enter_context(self._tracer)
        self._stack = stack

    def stop(self) -> None:
        """Stops following operations (what ``with`` does on exit); harmless when not active."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> ScaleInvarianceTrace:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def invariant_parameters(self, *outputs: Any) -> list[str]:
        """The names of the parameters scale-invariant for ``outputs``, as :func:`scale_invariant_parameters` says.

        Args:
            *outputs: what the traced code produced and depends on the weights (the model's output, or the loss).

        Raises:
            TypeError: if an output holds an object whose contents cannot all be read (see
                :func:`scale_invariant_parameters`).
        """
        tracer = self._tracer
        reaching = {w for t in _output_tensors(outputs) for w in tracer.tag(t)}
        return [name for name, p in self._named
                if id(p) in tracer.used_as_weight and id(p) in tracer.normalized
                and id(p) not in reaching and id(p) not in tracer.escaped]


def scale_invariant_parameters(model: nn.Module, *example_inputs: Any) -> list[str]:
    r"""Names of the parameters whose output channels the model's output does not depend on the scale of.

    A weight ``W`` is reported when scaling any of its output channels (slices along dimension 0) by any
    :math:`c > 0` leaves every output of ``model(*example_inputs)`` unchanged in the modes the model trains in
    (see **Modes**), because each route from that channel to an output passes through a batch norm that
    normalises it with batch statistics:

    .. math::
        f(W_1, \dots, \operatorname{diag}(c)\,W, \dots) = f(W_1, \dots, W, \dots)
        \quad \text{for all } c \in \mathbb{R}^{C_\text{out}}_{>0}.

    These are the weights :class:`~normdecouple.WeightNormProjection` and :class:`~normdecouple.NormScaledLR`
    act on (PAPER.md §1).

    **Modes.** The analysis runs the model in the modes it trains in:

    - a model in training mode (any module with ``training=True``) is analysed with every module's ``training``
      flag as it is set. A BatchNorm left in eval mode inside it (the fine-tuning idiom ``model.train();
      model.backbone.bn.eval()``, which keeps pretrained statistics) normalises with its running statistics: it
      is a fixed per-channel affine map, not a normalisation, so the weight before it is *not* reported (its
      scale reaches the output). The same for any ``_BatchNorm`` in eval mode, torch's, ours or a subclass.
    - a model wholly in eval mode (every module's ``training`` is ``False``, as after ``model.eval()``) is
      analysed as ``model.train()`` would set it, every module in training mode, and its flags are restored
      afterwards: the documented use before training starts. To keep some BatchNorms frozen, call
      ``model.train()`` and then ``.eval()`` on those before calling this function.

    A training loop that does not call ``model.train()`` (Lightning's: it warns about modules in eval mode at
    the start of training and leaves them so) trains in the modes as set even when they are all eval;
    :func:`scale_invariant_parameters_as_set` analyses those modes in every case.

    **Method.** One forward pass on the example inputs, in the modes above and without gradients, under a
    :class:`ScaleInvarianceTrace` (a :class:`torch.overrides.TorchFunctionMode`) that tags every tensor with how
    it depends on each weight's per-channel scale ``c``: a scaling ``c·t`` along one dimension, a scaling plus a per-channel constant
    ``c·t + b`` (a convolution's bias), or an unknown dependence. Convolutions (``conv1d/2d/3d``) and ``linear``
    turn a scaling of their weight's dimension 0 into a scaling of the output's channel dimension; positively
    homogeneous operations pass a scaling on (ReLU, leaky ReLU, PReLU, dropout, max/average/adaptive pooling,
    interpolation, products and quotients by tensors that do not depend on the weight, sums of two tensors scaled
    by the same channels, reductions and concatenations that keep the channel dimension); operations that only
    move elements (views, reshapes, transposes, indexing, padding, splitting, ...) are run once more on a probe
    tensor holding each element's channel number, which shows exactly where each channel goes; a batch norm
    (any :class:`torch.nn.modules.batchnorm._BatchNorm`, which includes torch's ``BatchNorm{1,2,3}d``,
    ``SyncBatchNorm`` and normdecouple's L1/L∞ layers, or ``torch.nn.functional.batch_norm`` with batch
    statistics) removes a scaling and a constant of its channel dimension; any other tensor it is called with
    reaches the output unnormalised, such as the ``residual`` of the fused layers
    (``act(BN(input) + residual)``: a weight scaling the residual is not invariant). A batch norm in eval mode
    is followed through its operations (``batch_norm`` with running statistics is a per-channel affine map,
    then the fused layers' residual sum and activation). Every other operation makes its outputs
    depend on its inputs' weights in an unknown way, and a value read into Python (``.item()``, ``bool``) does the
    same for every weight it depends on. A weight is reported when it is used as the weight of a convolution or
    linear layer, reaches at least one batch norm, and no output of the model depends on it. Each operation's
    rule is a pure function of its call, listed by name in :data:`RULES`.

    **Outputs.** Every tensor of the output is followed: tensors in tuples, lists, dicts, ``NamedTuple``\ s,
    dataclasses (``slots=True`` included) and Hugging Face ``ModelOutput``\ s, nested in any way. An output holding
    any other object (whose attributes could carry a weight unseen) is refused with a ``TypeError``: a weight that
    could not be followed is never reported.

    The analysis is exact for the operations it has rules for and conservative otherwise: it can miss a
    scale-invariant weight (an unlisted operation in between, a transposed convolution, a weight scaled as a
    whole but not per channel, such as a convolution followed by another convolution before the batch norm), but
    it does not report a weight that is not. Biases, normalisation affine parameters, embeddings and an
    un-normalised final classifier are never reported. Invariance holds exactly up to the batch norm's ``eps``.
    It is found once, from the operations run on ``example_inputs``; a model whose control flow depends on its
    input may route another batch differently.

    The model's parameters, buffers (running statistics are restored), ``training`` flags and the global random
    state are left as they were. A compiled model (``torch.compile``) is analysed through its eager forward.

    Args:
        model: the model, as it is called in training, in the modes it trains in (or wholly in eval mode).
        *example_inputs: positional inputs of one call ``model(*example_inputs)``; a batch of at least two
            samples, as batch norm needs in training.

    Returns:
        list[str]: the qualified names (as in ``model.named_parameters()``) of the scale-invariant parameters, in
        that order. Parameters with ``requires_grad=False`` are included when they qualify.

    Raises:
        TypeError: if ``model`` is not a :class:`torch.nn.Module`, contains TorchScript modules (whose operations
            cannot be followed), no example input is given, or the output holds an object it cannot read.

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...     torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
        >>> nd.scale_invariant_parameters(model, torch.randn(4, 3, 16, 16))
        ['0.weight']

    References: arXiv:1803.01814
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected model to be a torch.nn.Module (got {type(model).__name__})")
    wholly_eval = not any(m.training for m in model.modules())
    return _analyse(model, example_inputs, train_all=wholly_eval)


def scale_invariant_parameters_as_set(model: nn.Module, *example_inputs: Any) -> list[str]:
    """:func:`scale_invariant_parameters` with every module's ``training`` flag as it is, even all ``False``.

    For a training loop that runs the model in the modes it finds (Lightning's, which does not call
    ``model.train()`` at the start of fitting and restores each module's own flag after validation): the
    analysis then sees the modes the training step runs in. A model wholly in eval mode normalises nothing
    with batch statistics, so nothing is reported for it. Everything else is as in
    :func:`scale_invariant_parameters`.

    Args:
        model: the model, in the modes its training step runs in.
        *example_inputs: positional inputs of one call ``model(*example_inputs)``.

    Returns:
        list[str]: the qualified names of the scale-invariant parameters, in ``model.named_parameters()`` order.

    Raises:
        TypeError: as :func:`scale_invariant_parameters`.

    Example::

        >>> import torch
        >>> from normdecouple.scale_invariance import scale_invariant_parameters_as_set
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.BatchNorm1d(8),
        ...                             torch.nn.Linear(8, 1))
        >>> scale_invariant_parameters_as_set(model.eval(), torch.randn(6, 4))
        []

    References: arXiv:1803.01814
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected model to be a torch.nn.Module (got {type(model).__name__})")
    return _analyse(model, example_inputs, train_all=False)


def _analyse(model: nn.Module, example_inputs: tuple, train_all: bool) -> list[str]:
    """One traced forward of ``model`` (all modules in training mode if ``train_all``), its state restored."""
    if not example_inputs:
        raise TypeError(
            "expected at least one example input (got none): pass a batch as the model is called, "
            "scale_invariant_parameters(model, batch)"
        )
    trace = ScaleInvarianceTrace(model)
    training = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in _tensors(example_inputs) + list(model.parameters()) if t.is_cuda})
    # A compiled model (torch.compile's wrapper) runs its original module, so that the trace sees each operation.
    eager = model._orig_mod if isinstance(getattr(model, "_orig_mod", None), nn.Module) else model
    try:
        if train_all:
            model.train()
        with torch.random.fork_rng(devices=devices), torch.no_grad(), trace:
            output = eager(*example_inputs)
    finally:
        for m, flag in training.items():
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return trace.invariant_parameters(output)
