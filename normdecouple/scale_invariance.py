"""Finding the weights whose scale a model's output does not depend on.

A weight ``w`` whose output channels reach the loss only through a batch norm is *scale-invariant*: scaling any
output channel of ``w`` by ``c > 0`` leaves the training loss unchanged (PAPER.md §1). Those are the weights the
optimizer hooks of :mod:`normdecouple.optim` act on. :func:`scale_invariant_parameters` finds them once, from one
forward pass on an example batch, by following how a per-channel scaling of each weight travels through the
operations the model actually runs.

References: arXiv:1803.01814
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from numbers import Number
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["scale_invariant_parameters"]


@dataclass(frozen=True)
class _Scaled:
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


# The weight's influence on the tensor is anything else: the weight is not scale-invariant if it reaches an output.
_TAINT = "taint"
_IDENTITY = "identity"

Entry = _Scaled | str
Tag = dict[int, Entry]

# Elementwise and positively homogeneous of degree 1 (f(c·x) = c·f(x) for c > 0); a constant shift does not pass.
_HOMOGENEOUS_UNARY = frozenset(
    {
        "relu", "relu_", "leaky_relu", "leaky_relu_", "rrelu", "rrelu_", "prelu",
        "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "feature_dropout_",
    }
)
# Value-preserving: both a scaling and a constant shift pass unchanged.
_IDENTITY_LIKE = frozenset(
    {
        "clone", "contiguous", "detach", "detach_", "to", "float", "double", "half", "bfloat16", "cpu", "cuda",
        "requires_grad_", "positive", "neg", "negative", "__neg__", "__pos__",
    }
)
_ADD = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__isub__",
                  "subtract", "__rsub__", "rsub"})
_MUL = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply"})
_DIV = frozenset({"div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__", "__div__", "__idiv__"})
_REDUCE = frozenset({"sum", "mean", "nansum", "nanmean", "amax", "amin", "max", "min"})
# Channel-wise linear or max-like maps over the trailing spatial dimensions, whose number ends the name.
_POOL = frozenset(
    f"{op}{k}d{suffix}"
    for op in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool", "fractional_max_pool")
    for k in (1, 2, 3)
    for suffix in ("", "_with_indices")
)
_INTERPOLATE = frozenset({"interpolate", "upsample", "upsample_nearest", "upsample_bilinear"})
# Ops that only move, select or repeat elements: where each channel goes is found by running them on a probe.
_STRUCTURAL = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze",
        "unsqueeze_", "expand", "expand_as", "broadcast_to", "permute", "transpose", "transpose_", "swapaxes",
        "swapdims", "movedim", "moveaxis", "t", "t_", "__getitem__", "narrow", "select", "index_select", "chunk",
        "split", "tensor_split", "split_with_sizes", "unbind", "flip", "fliplr", "flipud", "roll", "repeat",
        "tile", "unfold", "pad", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
    }
)
# Second tensor argument read for its shape only.
_SHAPE_ONLY_OTHER = frozenset({"view_as", "reshape_as", "expand_as"})
_CONV = frozenset({"conv1d", "conv2d", "conv3d"})
_CAT = frozenset({"cat", "concat", "concatenate"})
# Turning a value into Python lets it steer control flow, which this analysis cannot follow.
_ESCAPE = frozenset({"__bool__", "__float__", "__int__", "__index__", "__complex__", "item", "tolist", "numpy",
                     "__array__"})


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _tensors(tree: Any) -> list[Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, Tensor)]


class _ScaleTracer(TorchFunctionMode):
    """Runs a forward pass and tags every tensor with how it depends on each weight's per-channel scale.

    Every parameter with two or more dimensions (all convolution and linear weights) starts tagged with a scaling
    of its own dimension 0. Each torch function called during the forward maps its inputs' tags to its outputs'
    by a rule (the ``_rule_*`` methods); a function without a rule marks its outputs as depending on every weight
    its inputs depend on in an unknown way, which keeps the analysis sound: it may miss an invariant weight, never
    report one that is not. Batch-norm modules are handled as a whole by module hooks (:meth:`enter_batch_norm`,
    :meth:`exit_batch_norm`), so that any implementation of the normalisation (ours or torch's) is recognised.
    """

    def __init__(self, parameters: list[nn.Parameter]) -> None:
        super().__init__()
        self.tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.used_as_weight: set[int] = set()
        self.normalized: set[int] = set()
        self.escaped: set[int] = set()
        self._bn_depth = 0
        self._bn_input_tags: list[Tag] = []
        for p in parameters:
            if p.dim() >= 2:
                self.tags[p] = {id(p): _Scaled("hom", -p.dim(), _IDENTITY)}

    def tag(self, t: Any) -> Tag:
        if isinstance(t, Tensor):
            return self.tags.get(t, {})
        return {}

    def _set(self, t: Tensor, tag: Tag, *, index_like: bool = False) -> None:
        if index_like:
            # Indices (an argmax) do not change when a channel is scaled by c > 0 or shifted by a constant.
            tag = {w: e for w, e in tag.items() if e == _TAINT}
        elif not (t.is_floating_point() or t.is_complex()):
            # A conversion to integers rounds, which does not commute with a scaling.
            tag = {w: _TAINT for w in tag}
        if tag:
            self.tags[t] = tag
        elif t in self.tags:
            del self.tags[t]

    # -- batch norm modules -------------------------------------------------------------------------------------

    def enter_batch_norm(self, module: nn.Module, args: tuple) -> None:
        if self._bn_depth == 0:
            self._bn_input_tags.append(self.tag(args[0]) if args else {})
        self._bn_depth += 1

    def exit_batch_norm(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._bn_depth -= 1
        if self._bn_depth > 0:
            return
        in_tag = self._bn_input_tags.pop()
        batch_stats = module.training or (module.running_mean is None and module.running_var is None)
        ndim = args[0].dim() if args and isinstance(args[0], Tensor) else 0
        out_tag = self._normalize(in_tag, ndim, batch_stats)
        for t in _tensors(output):
            self._set(t, out_tag)

    def _normalize(self, in_tag: Tag, ndim: int, batch_stats: bool) -> Tag:
        # Batch statistics are taken per channel (dimension 1) over all other dimensions, so a per-channel factor
        # and a per-channel constant both cancel (exactly, up to the eps added to the variance).
        out: Tag = {}
        for w, e in in_tag.items():
            if batch_stats and isinstance(e, _Scaled) and ndim >= 2 and e.dim + ndim == 1:
                self.normalized.add(w)
            else:
                out[w] = _TAINT
        return out

    # -- the mode -----------------------------------------------------------------------------------------------

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self._bn_depth > 0:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs = _tensors((args, kwargs))
        tagged = any(t in self.tags for t in inputs)
        out = func(*args, **kwargs)
        if not tagged:
            return out
        if name in _ESCAPE:
            for t in inputs:
                self.escaped.update(self.tag(t))
            return out
        rule = self._rule_for(name)
        rule(func, name, args, kwargs, out)
        mutated = [t for t in _tensors(out) if any(t is i for i in inputs)]
        if name == "__setitem__" and args:
            mutated = [args[0]]
            self._set(args[0], self._union_taint(inputs))
        for t in mutated:
            self._propagate_to_aliases(t)
        return out

    def _rule_for(self, name: str) -> Callable[..., None]:
        if name in _HOMOGENEOUS_UNARY:
            return self._rule_homogeneous_unary
        if name in _IDENTITY_LIKE:
            return self._rule_identity_like
        if name in _ADD:
            return self._rule_add
        if name in _MUL or name in _DIV:
            return self._rule_mul_div
        if name in _REDUCE:
            return self._rule_reduce
        if name in _POOL or name in _INTERPOLATE:
            return self._rule_pool
        if name in _STRUCTURAL:
            return self._rule_structural
        if name in _CONV:
            return self._rule_conv
        if name == "linear":
            return self._rule_linear
        if name in _CAT:
            return self._rule_cat
        if name == "batch_norm":
            return self._rule_functional_batch_norm
        return self._rule_generic

    def _union_taint(self, tensors: list[Tensor]) -> Tag:
        return {w: _TAINT for t in tensors for w in self.tag(t)}

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
            merged = {w: other_tag.get(w) if other_tag.get(w) == new.get(w) else _TAINT
                      for w in set(other_tag) | set(new)}
            self._set(other, merged)

    # -- rules: each sets the tags of ``out`` from those of the inputs ------------------------------------------

    def _rule_generic(self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        tag = self._union_taint(_tensors((args, kwargs)))
        for t in _tensors(out):
            self._set(t, tag)

    def _first_and_rest(self, args: tuple, kwargs: dict) -> tuple[Tag, Tag]:
        first = args[0] if args else kwargs.get("input")
        rest = _tensors((args[1:] if args else (), {k: v for k, v in kwargs.items() if k != "input"}))
        return self.tag(first), self._union_taint(rest)

    @staticmethod
    def _merge(*tags: Tag) -> Tag:
        # The same weight reaching one tensor by two routes is a product or sum of its scalings: unknown.
        out: Tag = {}
        for tag in tags:
            for w, e in tag.items():
                out[w] = _TAINT if w in out else e
        return out

    def _rule_homogeneous_unary(self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        first, rest = self._first_and_rest(args, kwargs)
        tag = {w: e if isinstance(e, _Scaled) and e.kind == "hom" else _TAINT for w, e in first.items()}
        for t in _tensors(out):
            self._set(t, self._merge(tag, rest))

    def _rule_identity_like(self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        first, rest = self._first_and_rest(args, kwargs)
        for t in _tensors(out):
            self._set(t, self._merge(first, rest))

    @staticmethod
    def _per_channel_constant(x: Any, dim: int, out_ndim: int) -> bool:
        """Whether ``x``, broadcast to the output, is constant along every dimension except ``dim``."""
        if isinstance(x, Number):
            return True
        if not isinstance(x, Tensor):
            return False
        shape = (1,) * (out_ndim - x.dim()) + tuple(x.shape)
        return all(size == 1 for i, size in enumerate(shape) if i - out_ndim != dim)

    def _rule_add(self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other")
        ta, tb = self.tag(a), self.tag(b)
        outs = _tensors(out)
        out_ndim = outs[0].dim() if outs else 0
        tag: Tag = {}
        for w in set(ta) | set(tb):
            ea, eb = ta.get(w), tb.get(w)
            if ea == _TAINT or eb == _TAINT:
                tag[w] = _TAINT
            elif ea is not None and eb is not None:
                same = ea.dim == eb.dim and ea.key == eb.key
                kind = "aff" if "aff" in (ea.kind, eb.kind) else "hom"
                tag[w] = _Scaled(kind, ea.dim, ea.key) if same else _TAINT
            else:
                e, other = (ea, b) if ea is not None else (eb, a)
                constant = self._per_channel_constant(other, e.dim, out_ndim)
                tag[w] = _Scaled("aff", e.dim, e.key) if constant else _TAINT
        for t in outs:
            self._set(t, tag)

    def _rule_mul_div(self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other")
        ta, tb = self.tag(a), self.tag(b)
        outs = _tensors(out)
        out_ndim = outs[0].dim() if outs else 0
        is_div = name in _DIV
        rounded = is_div and kwargs.get("rounding_mode") is not None
        tag: Tag = {}
        for w in set(ta) | set(tb):
            ea, eb = ta.get(w), tb.get(w)
            # A product is symmetric; a quotient passes a scaling of its numerator only.
            if not is_div and ea is None:
                ea, eb, other = eb, ea, a
            else:
                other = b
            if rounded or ea is None or ea == _TAINT or eb is not None:
                tag[w] = _TAINT
            elif ea.kind == "hom" or self._per_channel_constant(other, ea.dim, out_ndim):
                tag[w] = ea
            else:
                tag[w] = _TAINT
        for t in outs:
            self._set(t, tag)

    def _rule_reduce(self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        first, rest = self._first_and_rest(args, kwargs)
        source = args[0] if args else kwargs.get("input")
        dims = _arg(args, kwargs, 1, "dim", kwargs.get("axis"))
        keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
        ndim = source.dim()
        if isinstance(dims, Tensor) or dims is None:
            # No dimension (a reduction over everything) or an elementwise max/min against another tensor.
            return self._rule_generic(func, name, args, kwargs, out)
        dims = [dims] if isinstance(dims, int) else list(dims)
        reduced = {d % ndim for d in dims} if ndim else set()
        outs = _tensors(out)
        out_ndim = outs[0].dim() if outs else 0
        tag: Tag = {}
        for w, e in first.items():
            position = e.dim + ndim if isinstance(e, _Scaled) else None
            if position is None or position in reduced:
                tag[w] = _TAINT
                continue
            new_position = position if keepdim else position - sum(1 for d in reduced if d < position)
            tag[w] = _Scaled(e.kind, new_position - out_ndim, e.key)
        tag = self._merge(tag, rest)
        for i, t in enumerate(outs):
            self._set(t, tag, index_like=i > 0)

    def _rule_pool(self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        first, rest = self._first_and_rest(args, kwargs)
        source = args[0] if args else kwargs.get("input")
        spatial = int(re.search(r"(\d)d", name).group(1)) if name in _POOL else source.dim() - 2
        tag = {w: e if isinstance(e, _Scaled) and e.kind == "hom" and e.dim < -spatial else _TAINT
               for w, e in first.items()}
        tag = self._merge(tag, rest)
        for i, t in enumerate(_tensors(out)):
            self._set(t, tag, index_like=i > 0)

    def _rule_structural(self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        source = args[0] if args else kwargs.get("input")
        first = self.tag(source)
        rest_tensors = [] if name in _SHAPE_ONLY_OTHER else _tensors((args[1:], kwargs))
        rest = self._union_taint(rest_tensors)
        outs = _tensors(out)
        tags: list[Tag] = [{} for _ in outs]
        padded_with_nonzero = name == "pad" and _arg(args, kwargs, 3, "value", None) not in (None, 0, 0.0)
        for w, e in first.items():
            mapped = None
            if isinstance(e, _Scaled) and not padded_with_nonzero:
                mapped = self._probe(func, args, kwargs, source, e)
            for i in range(len(outs)):
                tags[i][w] = mapped[i] if mapped is not None and len(mapped) == len(outs) else _TAINT
        for t, tag in zip(outs, tags):
            self._set(t, self._merge(tag, rest))

    @staticmethod
    def _probe(func: Callable, args: tuple, kwargs: dict, source: Tensor, e: _Scaled) -> list[Entry] | None:
        """Runs ``func`` on a tensor holding each element's channel number (1-based) to see where channels go."""
        ndim = source.dim()
        position = e.dim + ndim
        n = source.shape[position]
        view_shape = [1] * ndim
        view_shape[position] = n
        probe = torch.arange(1, n + 1, dtype=torch.float64, device=source.device).view(view_shape)
        probe = probe.expand(source.shape).contiguous()
        try:
            if args:
                result = func(probe, *args[1:], **kwargs)
            else:
                result = func(**{**kwargs, "input": probe})
        except (RuntimeError, TypeError, ValueError, IndexError):
            return None
        entries: list[Entry] = []
        for q in _tensors(result):
            entries.append(_ScaleTracer._read_probe(q, n, e))
        return entries

    @staticmethod
    def _read_probe(q: Tensor, n: int, e: _Scaled) -> Entry:
        if q.dim() == 0 or q.numel() == 0:
            return _TAINT
        if not bool(((q == q.round()) & (q >= 0) & (q <= n)).all()):
            return _TAINT
        # Zeros are padding: fine for a scaling (0·c = 0), not for a constant shift.
        if e.kind == "aff" and bool((q == 0).any()):
            return _TAINT
        for d in range(q.dim()):
            if q.shape[d] == 1:
                continue
            columns = q.movedim(d, 0).reshape(q.shape[d], -1)
            if not bool((columns == columns[:, :1]).all()):
                continue
            index = tuple(int(v) for v in columns[:, 0].tolist())
            if len(set(index)) == 1:
                # One channel spread over the tensor: a uniform factor, which no per-channel rule follows.
                return _TAINT
            key = e.key if index == tuple(range(1, n + 1)) else (e.key, index)
            return _Scaled(e.kind, d - q.dim(), key)
        return _TAINT

    def _rule_conv(self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        source = _arg(args, kwargs, 0, "input")
        weight = _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
        groups = _arg(args, kwargs, 6, "groups", 1)
        channel_dim = 1 - weight.dim()
        kind = "hom" if bias is None else "aff"
        from_weight: Tag = {}
        for w, e in self.tag(weight).items():
            if isinstance(e, _Scaled) and e.kind == "hom" and e.dim == -weight.dim():
                from_weight[w] = _Scaled(kind, channel_dim, e.key)
                self.used_as_weight.add(w)
            else:
                from_weight[w] = _TAINT
        # A depthwise convolution maps input channel j to output channel j alone, so it passes a scaling on.
        depthwise = isinstance(groups, int) and groups == source.shape[channel_dim] == weight.shape[0]
        from_input = {w: _Scaled(kind, channel_dim, e.key)
                      if depthwise and isinstance(e, _Scaled) and e.kind == "hom" and e.dim == channel_dim
                      else _TAINT
                      for w, e in self.tag(source).items()}
        tag = self._merge(from_weight, from_input, self._union_taint([bias] if bias is not None else []))
        for t in _tensors(out):
            self._set(t, tag)

    def _rule_linear(self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        source = _arg(args, kwargs, 0, "input")
        weight = _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
        kind = "hom" if bias is None else "aff"
        from_weight: Tag = {}
        for w, e in self.tag(weight).items():
            if isinstance(e, _Scaled) and e.kind == "hom" and e.dim == -2 and weight.dim() == 2:
                from_weight[w] = _Scaled(kind, -1, e.key)
                self.used_as_weight.add(w)
            else:
                from_weight[w] = _TAINT
        # Dimensions other than the last one (the features) pass through a linear map unchanged.
        from_input = {w: _Scaled(kind, e.dim, e.key)
                      if isinstance(e, _Scaled) and e.kind == "hom" and e.dim != -1 else _TAINT
                      for w, e in self.tag(source).items()}
        tag = self._merge(from_weight, from_input, self._union_taint([bias] if bias is not None else []))
        for t in _tensors(out):
            self._set(t, tag)

    def _rule_cat(self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        pieces = list(_arg(args, kwargs, 0, "tensors", ()))
        outs = _tensors(out)
        if not outs or not all(isinstance(p, Tensor) for p in pieces):
            return self._rule_generic(func, name, args, kwargs, out)
        out_ndim = outs[0].dim()
        cat_dim = _arg(args, kwargs, 1, "dim", kwargs.get("axis", 0)) % out_ndim - out_ndim
        piece_tags = [self.tag(p) for p in pieces]
        tag: Tag = {}
        for w in {w for t in piece_tags for w in t}:
            entries = [t.get(w) for t in piece_tags]
            scaled = [e for e in entries if e is not None]
            if any(e == _TAINT for e in scaled) or len({e.dim for e in scaled}) != 1:
                tag[w] = _TAINT
            elif scaled[0].dim == cat_dim:
                # Along the scaled dimension: a new map of positions to channels; untouched pieces have factor 1.
                kind = "aff" if any(e.kind == "aff" for e in scaled) else "hom"
                key = tuple((e.key if e is not None else None, p.shape[cat_dim]) for e, p in zip(entries, pieces))
                tag[w] = _Scaled(kind, cat_dim, key)
            elif None not in entries and len(set(entries)) == 1 and scaled[0].kind == "hom":
                tag[w] = scaled[0]
            else:
                tag[w] = _TAINT
        for t in outs:
            self._set(t, tag)

    def _rule_functional_batch_norm(self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        source = _arg(args, kwargs, 0, "input")
        running = (_arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var"))
        training = bool(_arg(args, kwargs, 5, "training", False))
        batch_stats = training or (running[0] is None and running[1] is None)
        tag = self._normalize(self.tag(source), source.dim(), batch_stats)
        others = [t for t in _tensors((args[1:], kwargs)) if t is not source]
        tag = self._merge(tag, self._union_taint(others))
        for t in _tensors(out):
            self._set(t, tag)


def _output_tensors(output: Any, depth: int = 0) -> list[Tensor]:
    """Every tensor in a model's output: containers, dataclasses and other objects' attributes included."""
    if isinstance(output, Tensor):
        return [output]
    if depth > 8:
        return []
    if isinstance(output, dict):
        items = list(output.values())
    elif isinstance(output, (list, tuple, set, frozenset)):
        items = list(output)
    elif hasattr(output, "__dict__"):
        items = list(vars(output).values())
    else:
        return []
    return [t for item in items for t in _output_tensors(item, depth + 1)]


def scale_invariant_parameters(model: nn.Module, *example_inputs: Any) -> list[str]:
    r"""Names of the parameters whose output channels the model's output does not depend on the scale of.

    A weight ``W`` is reported when scaling any of its output channels (slices along dimension 0) by any
    :math:`c > 0` leaves every output of ``model(*example_inputs)`` in training mode unchanged, because each
    route from that channel to an output passes through a batch norm that normalises it with batch statistics:

    .. math::
        f(W_1, \dots, \operatorname{diag}(c)\,W, \dots) = f(W_1, \dots, W, \dots)
        \quad \text{for all } c \in \mathbb{R}^{C_\text{out}}_{>0}.

    These are the weights :class:`~normdecouple.WeightNormProjection` and :class:`~normdecouple.NormScaledLR`
    act on (PAPER.md §1).

    **Method.** One forward pass on the example inputs, in training mode and without gradients, under a
    :class:`torch.overrides.TorchFunctionMode` that tags every tensor with how it depends on each weight's
    per-channel scale ``c``: a scaling ``c·t`` along one dimension, a scaling plus a per-channel constant
    ``c·t + b`` (a convolution's bias), or an unknown dependence. Convolutions (``conv1d/2d/3d``) and ``linear``
    turn a scaling of their weight's dimension 0 into a scaling of the output's channel dimension; positively
    homogeneous operations pass a scaling on (ReLU, leaky ReLU, PReLU, dropout, max/average/adaptive pooling,
    interpolation, products and quotients by tensors that do not depend on the weight, sums of two tensors scaled
    by the same channels, reductions and concatenations that keep the channel dimension); operations that only
    move elements (views, reshapes, transposes, indexing, padding, splitting, ...) are run once more on a probe
    tensor holding each element's channel number, which shows exactly where each channel goes; a batch norm
    (any :class:`torch.nn.modules.batchnorm._BatchNorm`, which includes torch's ``BatchNorm{1,2,3}d``,
    ``SyncBatchNorm`` and normdecouple's L1/L∞ layers, or ``torch.nn.functional.batch_norm`` with batch
    statistics) removes a scaling and a constant of its channel dimension. Every other operation makes its outputs
    depend on its inputs' weights in an unknown way, and a value read into Python (``.item()``, ``bool``) does the
    same for every weight it depends on. A weight is reported when it is used as the weight of a convolution or
    linear layer, reaches at least one batch norm, and no output of the model depends on it.

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
        model: the model, as it is called in training.
        *example_inputs: positional inputs of one call ``model(*example_inputs)``; a batch of at least two
            samples, as batch norm needs in training.

    Returns:
        list[str]: the qualified names (as in ``model.named_parameters()``) of the scale-invariant parameters, in
        that order. Parameters with ``requires_grad=False`` are included when they qualify.

    Raises:
        TypeError: if ``model`` is not a :class:`torch.nn.Module`, contains TorchScript modules (whose operations
            cannot be followed), or no example input is given.

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
    if not example_inputs:
        raise TypeError(
            "expected at least one example input (got none): pass a batch as the model is called, "
            "scale_invariant_parameters(model, batch)"
        )
    scripted = [name or type(model).__name__ for name, m in model.named_modules()
                if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise TypeError(
            f"expected an eager model (got TorchScript modules: {scripted}): the operations inside TorchScript "
            "cannot be followed; analyse the module before torch.jit.script, or pass params= explicitly"
        )
    named = [(name, p) for name, p in model.named_parameters()
             if not isinstance(p, nn.parameter.UninitializedParameter)]
    tracer = _ScaleTracer([p for _, p in named])

    handles = []
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            handles.append(m.register_forward_pre_hook(tracer.enter_batch_norm))
            handles.append(m.register_forward_hook(tracer.exit_batch_norm))

    training = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in _tensors(example_inputs) + [p for _, p in named] if t.is_cuda})
    # A compiled model (torch.compile's wrapper) runs its original module eagerly, so that the mode sees each
    # operation; compiled submodules are made eager by set_stance (torch >= 2.6).
    eager = model._orig_mod if isinstance(getattr(model, "_orig_mod", None), nn.Module) else model
    set_stance = getattr(torch.compiler, "set_stance", None)
    try:
        model.train()
        with (
            torch.random.fork_rng(devices=devices),
            torch.no_grad(),
            set_stance("force_eager") if set_stance is not None else contextlib.nullcontext(),
            tracer,
        ):
            output = eager(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)

    reaching = {w for t in _output_tensors(output) for w in tracer.tag(t)}
    return [
        name
        for name, p in named
        if id(p) in tracer.used_as_weight
        and id(p) in tracer.normalized
        and id(p) not in reaching
        and id(p) not in tracer.escaped
    ]
