"""Converters between torch's BatchNorm layers, normdecouple's L1/L∞ layers and their synchronised versions.

All four (:func:`convert_batchnorm`, :func:`revert_batchnorm`, :func:`convert_sync_batchnorm`,
:func:`revert_sync_batchnorm`) follow one rule: a user's model is never changed silently. Each walks the module
tree like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` and the root itself may be replaced (hence the
returned module), but unlike torch's converter:

* **All or nothing.** Every replacement is planned and built first, without touching the model; only when all
  of them succeeded are they put in place (plain dictionary assignments, which cannot fail). An error leaves the
  model exactly as it was: same objects, same ``state_dict``, same hooks.
* **One state transplant** (:func:`transplant_state`) for all four: the new layer holds the very same ``Parameter``
  objects (optimizers keep them, ``requires_grad`` kept), the buffers (``num_batches_tracked`` the same tensor),
  ``training``, ``qconfig`` and every other instance attribute of the source (a subclass's ``act``/``drop``...),
  the hook dictionaries themselves (forward, pre-forward with kwargs/always-called variants, backward,
  ``state_dict`` hooks: they keep firing and the user's ``RemovableHandle`` still removes them) and
  ``torch.nn.utils.parametrize`` parametrizations (the same ``ParametrizationList``, same ``original``).
* **Shared instances stay shared**: a layer reached from two parents becomes one new layer in both places.
* **BatchNorm subclasses** (timm's ``BatchNormAct2d``: ``act(drop(F.batch_norm(...)))`` or
  ``relu(super().forward(x))``) keep their behaviour with our normalisation; see :func:`_lp_subclass`.
* **Lazy and scripted layers** are refused by name, with the fix: an unmaterialised ``LazyBatchNorm*d`` has no
  statistics to keep yet (run one forward first), and a TorchScript module cannot be rebuilt from Python.
* A normdecouple layer that a converter has no rule for (a fused ``L1BatchNormAct2d``, a user's subclass of our
  layers) is an error naming it, never silently rebuilt as a plain layer that would drop its activation.

References: arXiv:1803.01814
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from . import functional as F_nd
from . import fuse
from .batchnorm import (
    L1BatchNorm1d,
    L1BatchNorm2d,
    L1BatchNorm3d,
    L1BatchNormNd,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
    LinfBatchNorm3d,
    LinfBatchNormNd,
    LpBatchNorm,
)
from ._transplant import blank_like, transplant_state
from .distributed import SyncL1BatchNorm, SyncLinfBatchNorm
from .functional import NORMS, validate_backend, validate_k
from .stats import accumulate_dtype

__all__ = ["convert_batchnorm", "revert_batchnorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]

# The per-class rules, by exact class. A new layer family (e.g. the fused BatchNorm + activation layers) adds
# its rows here; a normdecouple layer missing from a table is refused by that converter, never approximated.
_TO_OURS: dict[type[_BatchNorm], dict[str, type[LpBatchNorm]]] = {
    nn.BatchNorm1d: {"l1": L1BatchNorm1d, "linf": LinfBatchNorm1d},
    nn.BatchNorm2d: {"l1": L1BatchNorm2d, "linf": LinfBatchNorm2d},
    nn.BatchNorm3d: {"l1": L1BatchNorm3d, "linf": LinfBatchNorm3d},
    # SyncBatchNorm accepts any rank >= 2; a plain _BatchNorm subclass defines its own rank check.
    nn.SyncBatchNorm: {"l1": L1BatchNormNd, "linf": LinfBatchNormNd},
    _BatchNorm: {"l1": L1BatchNormNd, "linf": LinfBatchNormNd},
}
_TO_TORCH: dict[type[LpBatchNorm], type[_BatchNorm]] = {
    L1BatchNorm1d: nn.BatchNorm1d,
    L1BatchNorm2d: nn.BatchNorm2d,
    L1BatchNorm3d: nn.BatchNorm3d,
    L1BatchNormNd: nn.SyncBatchNorm,
    LinfBatchNorm1d: nn.BatchNorm1d,
    LinfBatchNorm2d: nn.BatchNorm2d,
    LinfBatchNorm3d: nn.BatchNorm3d,
    LinfBatchNormNd: nn.SyncBatchNorm,
    SyncL1BatchNorm: nn.SyncBatchNorm,
    SyncLinfBatchNorm: nn.SyncBatchNorm,
}
_TO_SYNC: dict[type[LpBatchNorm], type[LpBatchNorm]] = {
    L1BatchNorm1d: SyncL1BatchNorm,
    L1BatchNorm2d: SyncL1BatchNorm,
    L1BatchNorm3d: SyncL1BatchNorm,
    L1BatchNormNd: SyncL1BatchNorm,
    SyncL1BatchNorm: SyncL1BatchNorm,
    LinfBatchNorm1d: SyncLinfBatchNorm,
    LinfBatchNorm2d: SyncLinfBatchNorm,
    LinfBatchNorm3d: SyncLinfBatchNorm,
    LinfBatchNormNd: SyncLinfBatchNorm,
    SyncLinfBatchNorm: SyncLinfBatchNorm,
}
_SYNC_CLASSES = (SyncL1BatchNorm, SyncLinfBatchNorm)
_TORCH_BASES = (nn.SyncBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, _BatchNorm)
SUBCLASS_MODES = ("convert", "warn", "error")


# ---------------------------------------------------------------------------------------------------------
# Planning and committing: the all-or-nothing walk shared by the four converters.


def _replace_all(root: nn.Module, decide: Callable[[str, nn.Module], nn.Module | None],
                 undo: list[tuple[dict, str, nn.Module]] | None = None) -> nn.Module:
    """Apply ``decide(path, module) -> replacement or None`` to every distinct module, all or nothing.

    ``decide`` builds each replacement without touching the model (it may raise: nothing has changed yet); a
    module reached from several parents is decided once (``named_modules`` yields each module once, under the
    first path), and its one replacement goes into every place that held it. ``undo``, when given, receives
    ``(children dict, name, old child)`` for every change made to the original modules, so that a caller whose
    later step fails can put them back.
    """
    memo: dict[int, nn.Module | None] = {}
    modules = []
    for path, module in root.named_modules():
        memo[id(module)] = decide(path, module)
        modules.append(module)
    for module in modules:
        # A replaced parent holds a copy of the source's children dictionary: fix the copy, not the source.
        parent = memo[id(module)] or module
        for name, child in module._modules.items():
            if child is not None and memo.get(id(child)) is not None:
                if undo is not None and parent is module:
                    undo.append((module._modules, name, child))
                parent._modules[name] = memo[id(child)]
    return memo[id(root)] or root


def _where(path: str) -> str:
    return f"`{path}`" if path else "the root module"


# ---------------------------------------------------------------------------------------------------------
# The state transplant.


def _plain_class(module: nn.Module) -> type:
    """The module's class without torch.nn.utils.parametrize's injected ``Parametrized...`` class."""
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)


def _original_dtype(module: nn.Module, name: str) -> torch.dtype | None:
    """dtype of the stored parameter ``name`` (the ``original`` of a parametrization), None if there is none."""
    if parametrize.is_parametrized(module, name):
        original = module.parametrizations[name].original
        return original.dtype if isinstance(original, Tensor) else None
    tensor = module._parameters.get(name)
    return None if tensor is None else tensor.dtype


# ---------------------------------------------------------------------------------------------------------
# BatchNorm subclasses.


class _RedirectBatchNorm(TorchFunctionMode):
    """Within a converted subclass's ``forward``: ``torch.nn.functional.batch_norm`` calls become ours.

    A torch function mode, not a patch of ``torch.nn.functional``: it is local to this thread and this call,
    and it catches ``F.batch_norm`` however the subclass reached it (``super().forward()``, a copy of torch's
    forward calling ``F.batch_norm``, ``torch.nn.functional.batch_norm``). The arguments are the call's own
    (running statistics, weight, momentum factor, eps); the layer gives the norm and its settings. While the
    mode runs a function it is switched off, so our functional's own torch calls are not redirected again.
    """

    def __init__(self, layer: LpBatchNorm) -> None:
        super().__init__()
        self.layer = layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.batch_norm:
            return _redirected_batch_norm(self.layer, *args, **kwargs)
        return func(*args, **kwargs)


def _redirected_batch_norm(layer: LpBatchNorm, input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.batch_norm``'s signature, computed with ``layer``'s norm and settings.

    A synchronised layer (made by :func:`convert_sync_batchnorm`) computes it over its process group in training.
    """
    if isinstance(layer, _SYNC_CLASSES):
        return layer._functional_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    fn = F_nd.linf_batch_norm if _norm_name(layer.norm) == "linf" else F_nd.l1_batch_norm
    return fn(input, running_mean, running_var, weight, bias, training, momentum, eps,
              **layer._functional_kwargs())


def _norm_name(norm: Any) -> str:
    """``"l1"``/``"linf"`` from a layer's ``norm`` or the converter's argument (a string or an enum member)."""
    return getattr(norm, "value", norm)


def _redirected_forward(self: LpBatchNorm, *args: Any, **kwargs: Any) -> Any:
    if self.training and isinstance(self, _SYNC_CLASSES):
        # Training without a process group is an error; raised here, before the user's forward has counted the
        # batch in num_batches_tracked, as the synchronised layers' own forward does.
        self._sync_group()
    with _RedirectBatchNorm(self):
        return self._user_class.forward(self, *args, **kwargs)


def _restore_subclass(user_class: type, ours: type) -> nn.Module:
    cls = _lp_subclass(user_class, ours)
    return cls.__new__(cls)


def _reduce_ex(self: nn.Module, protocol: int) -> tuple:
    # The generated class cannot be found by name when unpickling: rebuild it from its two bases.
    return _restore_subclass, (self._user_class, self._ours_class), self.__getstate__()


def _overridden_forward(user_class: type) -> bool:
    """Whether ``user_class`` or a class between it and torch's BatchNorm classes defines ``forward``."""
    for cls in user_class.__mro__:
        if cls in _TORCH_BASES:
            return False
        if "forward" in vars(cls):
            return True
    return False


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _lp_subclass(user_class: type[_BatchNorm], ours: type[LpBatchNorm]) -> type[LpBatchNorm]:
    """The class ``(user_class, ours)``: the user's BatchNorm subclass with our normalisation.

    Why a generated class rather than a plain ``L1BatchNorm2d`` (what torch's converter does, dropping the
    subclass's activation) or leaving the layer as it is (silently L2): the user's class comes first in the
    method resolution order, so its ``forward``, its attributes (``act``, ``drop``, ...) and methods stay; our
    class comes after it and before torch's ``_BatchNorm``, so ``super().forward()`` reaches our forward,
    ``isinstance(layer, normdecouple.LpBatchNorm)`` holds, and the running statistics stay at least float32.
    A ``forward`` the subclass defines runs under :class:`_RedirectBatchNorm`, so a direct
    ``F.batch_norm`` call (timm's ``BatchNormAct2d`` copies torch's forward) uses our norm as well. One class
    per pair, cached, so ``type(a) is type(b)`` for two converted layers of one class. ``revert_batchnorm``
    restores ``user_class``. With ``ours`` a synchronised layer (:func:`convert_sync_batchnorm`), that call is
    synchronised over the process group, and ``revert_sync_batchnorm`` restores ``(user_class, unsynchronised)``.
    """
    key = (user_class, ours)
    if key not in _SUBCLASSES:
        namespace = {
            "__module__": user_class.__module__,
            "__doc__": f"{user_class.__name__} with {ours.__name__}'s normalisation (made by normdecouple's "
                       f"converters).",
            "_user_class": user_class,
            "_ours_class": ours,
            "__reduce_ex__": _reduce_ex,
            # Without an own forward the subclass's behaviour is torch's forward: ours, whatever the MRO says
            # (nn.SyncBatchNorm.forward would otherwise come first and synchronise L2 statistics).
            "forward": _redirected_forward if _overridden_forward(user_class) else ours.forward,
        }
        _SUBCLASSES[key] = type(f"{ours.__name__}[{user_class.__name__}]", (user_class, ours), namespace)
    return _SUBCLASSES[key]


def _user_class_of(module: nn.Module) -> type | None:
    """For a layer made by :func:`_lp_subclass`, the user's class it came from."""
    cls = _plain_class(module)
    return vars(cls).get("_user_class")


def _torch_base(cls: type) -> type[_BatchNorm]:
    return next(base for base in _TORCH_BASES if issubclass(cls, base))


def _shadowed_names(source: _BatchNorm, user_class: type, ours: type[LpBatchNorm]) -> list[str]:
    """Names our layer relies on that the user's subclass (or instance) also defines: combining the two would
    let the user's value silently decide our norm or its settings."""
    ours_names = {"low_precision", "backend", "k"} | {
        name for cls in ours.__mro__ if cls not in _BatchNorm.__mro__ for name in vars(cls)
        if not name.startswith("__") and not hasattr(_BatchNorm, name)
    }
    user_names = set(vars(source)) | {
        name for cls in user_class.__mro__ if cls not in _TORCH_BASES and cls not in _BatchNorm.__mro__
        for name in vars(cls)
    }
    return sorted(ours_names & user_names)


# ---------------------------------------------------------------------------------------------------------
# convert_batchnorm / revert_batchnorm.


def convert_batchnorm(
    module: nn.Module,
    norm: str = "l1",
    *,
    low_precision: bool = False,
    backend: str = "auto",
    subclasses: str = "convert",
    fuse_activation: bool = False,
    example_inputs: Any = None,
    **norm_kwargs: Any,
) -> nn.Module:
    """Replace every torch BatchNorm (1d, 2d, 3d, ``SyncBatchNorm`` and their subclasses) by an L1 or L∞ layer.

    ``BatchNorm{1,2,3}d`` become ``L1BatchNorm{1,2,3}d`` / ``LinfBatchNorm{1,2,3}d``; ``SyncBatchNorm``,
    which accepts any rank, becomes ``L1BatchNormNd`` / ``LinfBatchNormNd`` (unsynchronised: see
    :func:`convert_sync_batchnorm`). Layers that are already normdecouple layers are left alone.

    Kept exactly (see :mod:`normdecouple.convert`): the same ``weight``/``bias`` Parameter objects
    (``requires_grad``, device, dtype and optimizer references with them), the running statistics (widened to
    float32 if they were fp16/bf16, see the layers' docs), ``num_batches_tracked``, ``training``, ``eps``,
    ``momentum``, ``affine``, ``track_running_stats``, ``qconfig`` and other instance attributes, hooks,
    parametrizations, and sharing (one layer in two places stays one layer).

    A subclass of torch's BatchNorm (e.g. timm's ``BatchNormAct2d``) becomes, with ``subclasses="convert"``,
    a layer of a class derived from both the user's class and ours: its own ``forward`` and attributes are
    kept and every ``torch.nn.functional.batch_norm`` it calls (directly or through ``super().forward()``)
    computes the L1/L∞ norm; ``revert_batchnorm`` gives the user's class back. A subclass of
    ``SyncBatchNorm`` that defines ``forward`` is refused (its ``super().forward()`` is torch's synchronised
    L2 path).

    Several processes: synchronise the converted model with ``normdecouple.convert_sync_batchnorm(model)``, never
    with torch's ``SyncBatchNorm.convert_sync_batchnorm`` or timm's ``timm.layers.convert_sync_batchnorm`` (what
    ``--sync-bn`` in timm's ``train.py`` calls): both turn every layer of ours, a converted ``BatchNormAct2d``
    included, back into an L2 ``SyncBatchNorm``/``SyncBatchNormAct`` without a word, and this library cannot
    intercept them (the documentation's "Several processes" page, docs/distributed.md, shows the edit of timm's
    ``train.py``).

    Args:
        module: the model, or a single BatchNorm layer.
        norm: ``"l1"`` or ``"linf"``. Default: ``"l1"``.
        low_precision: passed to every new layer. Default: ``False``.
        backend: passed to every new layer. Default: ``"auto"``.
        subclasses: what to do with subclasses of torch's BatchNorm classes: ``"convert"`` (as above),
            ``"warn"`` (leave them as they are, with a warning naming each), or ``"error"``. Default:
            ``"convert"``.
        fuse_activation: also fuse the converted layers with what follows them, as
            :func:`normdecouple.fuse.fuse_activations` does (its module docstring says which patterns and how):
            a layer followed only by its own ``ReLU``/``LeakyReLU`` module becomes ``L1BatchNormAct*d``/
            ``LinfBatchNormAct*d`` (which save their output instead of their input) and the activation an
            identity; with ``example_inputs``, also ``bn -> add(., r) -> act`` and ``bn -> act`` inside a block's
            forward (the block's forward is rewritten, its class, children, names, parameters and hooks kept),
            timm-style ``BatchNormAct2d`` subclasses, and layers whose output the next operation keeps anyway
            (fused with the identity). The plan's one-line summary is logged at INFO on the
            ``normdecouple.fuse`` logger; :func:`normdecouple.fuse.fusion_plan` gives the whole table.
            ``revert_batchnorm`` undoes it. Default: ``False``.
        example_inputs: with ``fuse_activation``, inputs of the followed forwards (a tensor or a tuple) used to
            find the patterns beyond ``nn.Sequential`` adjacency and to check every rewritten forward against the
            original; buffers and random number generators are restored after them. Default: ``None``
            (``nn.Sequential`` adjacency only).
        **norm_kwargs: extra arguments of the norm's layers: ``k`` for ``"linf"``.

    Returns:
        The converted module: ``module`` itself, changed in place, or a new layer if ``module`` was a BatchNorm.

    Raises:
        ValueError: for an unknown ``norm``, ``backend`` or ``subclasses``, or a bad ``k``; for an
            unmaterialised ``LazyBatchNorm*d`` or a TorchScript BatchNorm in the tree (named, with the fix);
            for a subclass with ``subclasses="error"``. The model is then unchanged.
        TypeError: for keyword arguments the chosen norm does not take.

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        >>> model = nd.convert_batchnorm(model, norm="linf", k=4)
        >>> type(model[1]).__name__
        'LinfBatchNorm2d'

    References: arXiv:1803.01814
    """
    norm = _norm_name(norm)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} (L1 or top-k L-infinity batch norm), got {norm!r}")
    validate_backend(backend)
    if subclasses not in SUBCLASS_MODES:
        raise ValueError(f"subclasses must be one of {SUBCLASS_MODES}, got {subclasses!r}")
    allowed = {"k"} if norm == "linf" else set()
    unexpected = sorted(set(norm_kwargs) - allowed)
    if unexpected:
        raise TypeError(
            f"convert_batchnorm(norm={norm!r}) got unexpected keyword arguments {unexpected}; "
            f"norm='l1' takes none, norm='linf' takes k"
        )
    if norm == "linf":
        validate_k(norm_kwargs.get("k", 1))
    layer_kwargs = {"low_precision": low_precision, "backend": backend, **norm_kwargs}
    # Names of every BatchNorm class defined so far: how a TorchScript module says what it was compiled from.
    batchnorm_names = {cls.__name__ for cls in _all_subclasses(_BatchNorm)}

    def decide(path: str, source: nn.Module) -> nn.Module | None:
        if isinstance(source, torch.jit.ScriptModule):
            if getattr(source, "original_name", None) in batchnorm_names:
                raise ValueError(
                    f"convert_batchnorm: {_where(path)} is a TorchScript-compiled {source.original_name} "
                    f"(torch.jit.script/trace), which cannot be rebuilt from Python; expected eager BatchNorm "
                    f"layers. Convert the eager model first and script it afterwards, or leave this part "
                    f"unscripted"
                )
            return None
        if not isinstance(source, _BatchNorm) or isinstance(source, LpBatchNorm):
            return None
        if isinstance(source, LazyModuleMixin):
            raise ValueError(
                f"convert_batchnorm: {_where(path)} is an uninitialised {type(source).__name__}, whose size is "
                f"not known before its first forward; expected materialised layers. Run one forward pass first "
                f"(model(example_input)), which makes it a torch BatchNorm, then convert"
            )
        cls = _plain_class(source)
        base = _torch_base(cls)
        ours = _TO_OURS[base][norm]
        if cls is base:
            return transplant_state(source, blank_like(ours, source, **layer_kwargs), _stats_dtype_widened(source))
        # A subclass of torch's layers.
        if subclasses == "warn":
            warnings.warn(
                f"convert_batchnorm: {_where(path)} ({cls.__qualname__}, a subclass of torch's "
                f"{base.__name__}) is left as it is, still L2 batch norm, because subclasses='warn'; pass "
                f"subclasses='convert' to give it our normalisation",
                stacklevel=4,
            )
            return None
        if subclasses == "error":
            raise ValueError(
                f"convert_batchnorm: {_where(path)} is a {cls.__qualname__}, a subclass of torch's "
                f"{base.__name__}, and subclasses='error' was given; expected torch's own BatchNorm classes. "
                f"Pass subclasses='convert' to convert it keeping its forward, or subclasses='warn' to leave it"
            )
        if base is nn.SyncBatchNorm and _overridden_forward(cls):
            raise ValueError(
                f"convert_batchnorm: {_where(path)} is a {cls.__qualname__}, a subclass of torch's SyncBatchNorm "
                f"with its own forward, whose super().forward() is torch's synchronised L2 path; expected a "
                f"subclass of BatchNorm1d/2d/3d. Pass subclasses='warn' to leave it as it is, or build it on "
                f"BatchNorm2d (and synchronise with normdecouple.convert_sync_batchnorm). timm's SyncBatchNormAct "
                f"comes from timm.layers.convert_sync_batchnorm (train.py --sync-bn): convert the model before it "
                f"and call normdecouple.convert_sync_batchnorm(model) in its place"
            )
        shadowed = _shadowed_names(source, cls, ours)
        if shadowed:
            raise ValueError(
                f"convert_batchnorm: {_where(path)} is a {cls.__qualname__} that defines {shadowed}, which "
                f"normdecouple.{ours.__name__} uses for its own settings; expected a subclass without these "
                f"names. Rename them in {cls.__name__}, or pass subclasses='warn' to leave it as it is"
            )
        target = blank_like(ours, source, **layer_kwargs)
        target.__class__ = _lp_subclass(cls, ours)
        return transplant_state(source, target, _stats_dtype_widened(source))

    if not isinstance(fuse_activation, bool):
        raise TypeError(f"fuse_activation must be a bool, got {fuse_activation!r}")
    if example_inputs is not None and not fuse_activation:
        raise ValueError("convert_batchnorm: example_inputs is only used with fuse_activation=True; pass both or "
                         "neither")
    undo: list[tuple[dict, str, nn.Module]] = []
    converted = _replace_all(module, decide, undo)
    if fuse_activation:
        try:
            fuse.apply_plan(converted, example_inputs)
        except BaseException:
            # fuse_activations changes nothing when it fails: restoring the children undoes the conversion.
            for children, name, child in reversed(undo):
                children[name] = child
            raise
    return converted


def _all_subclasses(cls: type) -> set[type]:
    found, todo = set(), [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def _stats_dtype_widened(source: _BatchNorm) -> torch.dtype | None:
    stat = source._buffers.get("running_mean")
    if stat is None:
        return None
    return accumulate_dtype(stat.dtype)


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every normdecouple L1/L∞ layer in ``module`` by torch's BatchNorm, with identical eval outputs.

    Our running statistics are torch's (``running_var`` is variance-equivalent), so eval mode is unchanged and
    the model exports wherever torch's BatchNorm does (TorchScript, ONNX, folding into convolutions).
    ``L1BatchNorm{1,2,3}d``/``LinfBatchNorm{1,2,3}d`` become ``BatchNorm{1,2,3}d``; the any-rank layers made from
    ``SyncBatchNorm`` and the synchronised layers become ``SyncBatchNorm``; a converted subclass becomes the
    user's class again (with its attributes); a layer fused with its activation by
    ``convert_batchnorm(..., fuse_activation=True)`` becomes torch's BatchNorm again and the activation module
    it replaced comes back (the very object), in the same all-or-nothing step. Everything else is kept as in :func:`convert_batchnorm`: the same
    Parameter objects, buffers, hooks, parametrizations, sharing. Running statistics take the parameters' dtype
    when that is narrower (torch's BatchNorm needs them to match in half precision).

    Args:
        module: the model, or a single normdecouple layer.

    Returns:
        The reverted module: ``module`` itself, changed in place, or a new layer if ``module`` was one of ours.

    Raises:
        ValueError: if a running statistic does not fit the parameters' half-precision dtype (revert a
            ``.float()`` copy of the model instead), or for a normdecouple layer with no torch counterpart
            (e.g. a fused BatchNorm + activation layer, or a subclass of our layers), named. The model is then
            unchanged.

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> model = nd.convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
        >>> type(nd.revert_batchnorm(model)[0]).__name__
        'BatchNorm1d'

    References: arXiv:1803.01814
    """

    def decide(path: str, source: nn.Module) -> nn.Module | None:
        if isinstance(source, fuse.FusedActivation):
            return source.original
        if not isinstance(source, LpBatchNorm):
            return None
        cls = vars(source).get("_fused_from") or _plain_class(source)
        user_class = _user_class_of(source)
        if user_class is None and cls not in _TO_TORCH:
            raise ValueError(
                f"revert_batchnorm: {_where(path)} is a {cls.__qualname__}, a normdecouple layer with no "
                f"torch counterpart that keeps its behaviour; expected one of "
                f"{sorted(c.__name__ for c in _TO_TORCH)} or a layer made by convert_batchnorm from a BatchNorm "
                f"subclass. Revert the rest of the model by calling revert_batchnorm on the submodules that do "
                f"not hold it"
            )
        stats_dtype = _narrowed_stats_dtype(path, source)
        torch_class = _TO_TORCH[cls] if user_class is None else _torch_base(user_class)
        # torch's SyncBatchNorm takes its group as a constructor argument: the one our layer held, if any.
        group = {"process_group": vars(source).get("process_group")} if torch_class is nn.SyncBatchNorm else {}
        if user_class is None:
            return transplant_state(source, blank_like(torch_class, source, **group), stats_dtype)
        target = blank_like(torch_class, source, **group)
        target.__class__ = user_class
        return transplant_state(source, target, stats_dtype)

    # Rewritten forwards (normdecouple.fuse) go once every layer is reverted: blocks keep their own objects; a
    # rewritten layer's new torch layer never carries its forward (transplant_state leaves it behind).
    rewritten = fuse.rewritten_modules(module)
    reverted = _replace_all(module, decide)
    fuse.remove_rewrites(rewritten)
    return reverted


def _narrowed_stats_dtype(path: str, source: LpBatchNorm) -> torch.dtype | None:
    """The parameters' dtype where the running statistics are wider; a ValueError where they would not fit."""
    weight_dtype = _original_dtype(source, "weight")
    stats = [source._buffers.get(name) for name in ("running_mean", "running_var")]
    if weight_dtype is None or stats[0] is None or stats[0].dtype == weight_dtype:
        return None
    if weight_dtype.itemsize < 4:
        for stat in stats:
            if not torch.isfinite(stat.to(weight_dtype)).all():
                raise ValueError(
                    f"revert_batchnorm: a running statistic of {_where(path)} ({source!r}) does not fit in "
                    f"{weight_dtype}, which torch's BatchNorm needs beside parameters of that dtype; revert a "
                    f"float32 copy (model.float()) instead"
                )
    return weight_dtype


# ---------------------------------------------------------------------------------------------------------
# convert_sync_batchnorm / revert_sync_batchnorm.


def _our_kwargs(source: LpBatchNorm) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"low_precision": source.low_precision, "backend": source.backend}
    if _norm_name(source.norm) == "linf":
        kwargs["k"] = source.k
    return kwargs


def convert_sync_batchnorm(module: nn.Module, process_group: Any | None = None) -> nn.Module:
    """Replace every normdecouple L1/L∞ layer in ``module`` by its synchronised counterpart.

    Like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, but for our layers, which torch's converter
    would silently turn into L2 ``SyncBatchNorm``. ``L1BatchNorm*`` become :class:`SyncL1BatchNorm` and
    ``LinfBatchNorm*`` :class:`SyncLinfBatchNorm`, keeping the very same Parameter objects (optimizers keep
    working), the running statistics and ``num_batches_tracked`` (same tensors), the ``training`` flag,
    ``eps``, ``momentum``, ``affine``, ``track_running_stats``, ``k``, ``low_precision`` and ``backend``, and
    hooks, parametrizations and sharing as :func:`convert_batchnorm` does. The replaced class is recorded so
    that :func:`revert_sync_batchnorm` restores it exactly. Synchronised layers already present are rebuilt for
    ``process_group``. torch's own ``BatchNorm*d`` layers are left alone (convert them with
    :func:`normdecouple.convert_batchnorm` first, or apply torch's converter to the submodules that hold only
    torch layers).

    A BatchNorm subclass converted by :func:`convert_batchnorm` (timm's ``BatchNormAct2d`` in EfficientNet,
    MobileNetV3, RegNet, DenseNet, ...) becomes a class derived from the user's class and the synchronised layer:
    its own ``forward`` runs (``drop``, ``act`` and its input-rank check kept) and the batch norm inside it, a
    ``torch.nn.functional.batch_norm`` call or ``super().forward()``, is synchronised.
    :func:`revert_sync_batchnorm` gives back the converted layer and :func:`revert_batchnorm` the user's class,
    with the same state. This function is the one to call in place of timm's ``timm.layers.convert_sync_batchnorm``
    (``--sync-bn`` in timm's ``train.py``), which, like torch's converter, would silently turn every layer of ours
    into L2 ``SyncBatchNorm``/``SyncBatchNormAct``: in ``train.py`` replace its ``convert_sync_batchnorm(model)``
    call by ``normdecouple.convert_sync_batchnorm(model)`` (see the "Several processes" page, docs/distributed.md).

    Args:
        module: the model, or a single normdecouple layer.
        process_group: the group to synchronise over; ``None`` for the default group. Default: ``None``.

    Returns:
        The converted module: ``module`` itself, changed in place, or a new layer if ``module`` was one of ours.

    Raises:
        ValueError: for a normdecouple layer with no synchronised counterpart (a fused BatchNorm + activation
            layer, a subclass of our layers), or a converted BatchNorm subclass that defines a name the
            synchronised layer uses, named. The model is then unchanged.

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = nd.convert_sync_batchnorm(nd.convert_batchnorm(model, norm="l1"))
        >>> type(model[1]).__name__
        'SyncL1BatchNorm'

    References: arXiv:1803.01814
    """

    def decide(path: str, source: nn.Module) -> nn.Module | None:
        if not isinstance(source, LpBatchNorm):
            return None
        cls = _plain_class(source)
        user_class = _user_class_of(source)
        # A converted BatchNorm subclass is synchronised through the layer of ours it was built on.
        ours = cls if user_class is None else vars(cls)["_ours_class"]
        if ours not in _TO_SYNC:
            raise ValueError(
                f"convert_sync_batchnorm: {_where(path)} is a {cls.__qualname__}, a normdecouple layer with no "
                f"synchronised counterpart; expected one of {sorted(c.__name__ for c in _TO_SYNC)} or a "
                f"BatchNorm subclass converted by convert_batchnorm. Leave it unsynchronised by converting only "
                f"the submodules that do not hold it"
            )
        sync_class = _TO_SYNC[ours]
        unsync_class = source._unsync_class if isinstance(source, _SYNC_CLASSES) else ours
        target = blank_like(sync_class, source, process_group=process_group, **_our_kwargs(source))
        if user_class is not None:
            shadowed = _sync_shadowed_names(user_class, sync_class)
            if shadowed:
                raise ValueError(
                    f"convert_sync_batchnorm: {_where(path)} is a {cls.__qualname__} whose class "
                    f"{user_class.__qualname__} defines {shadowed}, which normdecouple.{sync_class.__name__} uses "
                    f"to synchronise; expected a subclass without these names. Rename them in "
                    f"{user_class.__name__}, or leave this layer unsynchronised by converting only the "
                    f"submodules that do not hold it"
                )
            target.__class__ = _lp_subclass(user_class, sync_class)
        # The class of ours, never a generated one: it is pickled with the layer (see _reduce_ex).
        target._unsync_class = unsync_class
        return transplant_state(source, target)

    return _replace_all(module, decide)


def _sync_shadowed_names(user_class: type, sync_class: type[LpBatchNorm]) -> list[str]:
    """Names the synchronised layer adds to the unsynchronised one that the user's subclass also defines (the
    names of the unsynchronised layer were checked by :func:`convert_batchnorm`)."""
    unsync_names = {name for cls in sync_class._unsync_default.__mro__ for name in vars(cls)}
    sync_names = {"process_group", "_unsync_class"} | {
        name for cls in sync_class.__mro__ for name in vars(cls)
        if not name.startswith("__") and name not in unsync_names
    }
    user_names = {
        name for cls in user_class.__mro__ if cls not in _TORCH_BASES and cls not in _BatchNorm.__mro__
        for name in vars(cls)
    }
    return sorted(sync_names & user_names)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every :class:`SyncL1BatchNorm`/:class:`SyncLinfBatchNorm` in ``module`` by an unsynchronised layer.

    The inverse of :func:`convert_sync_batchnorm`: each layer becomes the class it was converted from (e.g.
    ``L1BatchNorm2d``, or a converted BatchNorm subclass such as timm's ``BatchNormAct2d`` with our norm),
    recorded at conversion; a layer constructed directly as a synchronised one becomes the
    any-rank ``L1BatchNormNd``/``LinfBatchNormNd``, since its input rank is unknown. Parameters, buffers,
    ``training``, hyperparameters, hooks, parametrizations and sharing are kept as in
    :func:`convert_sync_batchnorm`. Use it to evaluate or export a model trained with synchronisation in a
    single process.

    Args:
        module: the model, or a single synchronised layer.

    Returns:
        The reverted module: ``module`` itself, changed in place, or a new layer if ``module`` was one of ours.

    Raises:
        ValueError: for a subclass of the synchronised layers, which this function has no rule for, named. The
            model is then unchanged.

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> model = nd.convert_sync_batchnorm(torch.nn.Sequential(nd.LinfBatchNorm2d(8, k=2)))
        >>> reverted = nd.revert_sync_batchnorm(model)
        >>> type(reverted[0]).__name__, reverted[0].k
        ('LinfBatchNorm2d', 2)

    References: arXiv:1803.01814
    """

    def decide(path: str, source: nn.Module) -> nn.Module | None:
        if not isinstance(source, _SYNC_CLASSES):
            return None
        cls = _plain_class(source)
        user_class = _user_class_of(source)
        if user_class is None and cls not in _SYNC_CLASSES:
            raise ValueError(
                f"revert_sync_batchnorm: {_where(path)} is a {cls.__qualname__}, a subclass of "
                f"{cls.__mro__[1].__name__} that this function has no rule for; expected SyncL1BatchNorm, "
                f"SyncLinfBatchNorm or a BatchNorm subclass synchronised by convert_sync_batchnorm. Revert the "
                f"submodules that do not hold it"
            )
        target = blank_like(source._unsync_class, source, **_our_kwargs(source))
        if user_class is not None:
            target.__class__ = _lp_subclass(user_class, source._unsync_class)
        return transplant_state(source, target)

    return _replace_all(module, decide)
