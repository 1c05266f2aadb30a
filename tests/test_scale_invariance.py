"""scale_invariant_parameters: the detection on plain, residual and branching networks, checked twice: against
the expected names, and numerically (scaling random output channels of a reported weight leaves the float64
output unchanged; scaling those of an unreported convolution or linear weight changes it).

torch's BatchNorm with eps=1e-300 makes the invariance exact to float64 rounding (eps is the only term that
breaks it; at 1e-300 it stays defined and is negligible next to variances of order one).
"""

import collections
import copy
import dataclasses
import typing
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normdecouple as nd
from normdecouple import scale_invariant_parameters
from normdecouple.scale_invariance import (
    RULES,
    TAINT,
    Call,
    Scaled,
    ScaleInvarianceTrace,
    rule_add,
    rule_homogeneous,
)


# Tiny models: one intra-op thread (the shared fixture in conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")


F64 = torch.float64
EPS = 1e-300


def _bn2d(c):
    return nn.BatchNorm2d(c, eps=EPS)


def _output(model, x):
    torch.manual_seed(7)  # the same dropout masks in both calls
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out])


def _invariant_numerically(model, name, x, as_set=False) -> bool:
    """Whether scaling random output channels of ``name`` by random factors leaves the output unchanged, in
    training mode (``as_set``: in the modes the modules are in, e.g. with a BatchNorm frozen in eval)."""
    if not as_set:
        model.train()
    before = _output(model, x)
    w = model.get_parameter(name)
    saved = w.detach().clone()
    factors = torch.rand(w.shape[0], dtype=w.dtype) * 4 + 0.25
    with torch.no_grad():
        w.mul_(factors.view(-1, *([1] * (w.dim() - 1))))
    after = _output(model, x)
    with torch.no_grad():
        w.copy_(saved)
    return torch.allclose(after, before, rtol=1e-10, atol=1e-12)


def _check(model, x, expected):
    model = model.to(F64)
    x = x.to(F64)
    names = scale_invariant_parameters(model, x)
    assert names == expected
    # The detection agrees with the definition on every convolution and linear weight of the model.
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() >= 2:
            assert _invariant_numerically(model, name, x) == (name in expected), name


def _check_as_set(model, x, expected):
    """:func:`_check` in the modes the model is in (a frozen BatchNorm stays in eval mode)."""
    names = scale_invariant_parameters(model, x)
    assert names == expected
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() >= 2:
            assert _invariant_numerically(model, name, x, as_set=True) == (name in expected), name


def _frozen(bn):
    """A BatchNorm in eval mode with pretrained-like statistics and affine parameters (not the identity)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t, (lo, hi) in ((bn.running_mean, (-1, 1)), (bn.running_var, (0.5, 2)), (bn.weight, (0.5, 1.5)),
                            (bn.bias, (-0.5, 0.5))):
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo)
    return bn.eval()


class _Basic(nn.Module):
    """A post-activation ResNet block: out = relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x)), in place."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _bn2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class _PreAct(nn.Module):
    """A pre-activation block: conv2's output joins the residual stream un-normalised, so it is not invariant."""

    def __init__(self, c):
        super().__init__()
        self.bn1, self.conv1 = _bn2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = _bn2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + x


def _resnet(block):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), _bn2d(4), nn.ReLU(),
        block(4, 6, 2) if block is _Basic else block(4), block(6, 6) if block is _Basic else block(4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6 if block is _Basic else 4, 3),
    )


X = torch.randn(4, 3, 8, 8)


def test_plain_network():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), _bn2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.2),
        nn.Conv2d(4, 5, 3, padding=1, bias=False), _bn2d(5), nn.LeakyReLU(0.1),
        nn.Flatten(), nn.Linear(45, 6, bias=False), nn.BatchNorm1d(6, eps=EPS), nn.ReLU(), nn.Linear(6, 2),
    )
    _check(model, X, ["0.weight", "5.weight", "9.weight"])


def test_residual_network():
    _check(_resnet(_Basic), X, ["0.weight", "3.conv1.weight", "3.conv2.weight", "3.down.0.weight",
                                "4.conv1.weight", "4.conv2.weight"])


def test_pre_activation_residual_network_excludes_the_convolutions_into_the_residual_sum():
    _check(_resnet(_PreAct), X, ["0.weight", "3.conv1.weight", "4.conv1.weight"])


class _Branching(nn.Module):
    """Inception-like branches concatenated after their batch norms, and DenseNet-like features concatenated
    before one (each convolution's channels keep their own positions in the concatenation)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), _bn2d(2), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False), _bn2d(3), nn.ReLU())
        self.dense1 = nn.Conv2d(5, 2, 3, padding=1, bias=False)
        self.dense2 = nn.Conv2d(5, 2, 1, bias=False)
        self.bn = _bn2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        x = self.bn(torch.cat([self.dense1(x), self.dense2(x)], 1))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_branching_network():
    _check(_Branching(), X, ["a.0.weight", "b.0.weight", "dense1.weight", "dense2.weight"])


class _AlsoUnnormalized(nn.Module):
    """conv.weight feeds a batch norm, and the same weight is also applied a second time without one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = _bn2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = y + self.conv(x)  # the second use: the scale of conv.weight now reaches the output
        return self.head(y.mean((2, 3)))


def test_a_weight_that_is_also_used_unnormalized_is_excluded():
    _check(_AlsoUnnormalized(), X, [])


class _ReturnsWeightNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, bias=False)
        self.bn = _bn2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3)), self.conv.weight.square().sum()


def test_a_weight_read_directly_into_an_output_is_excluded():
    _check(_ReturnsWeightNorm(), X, [])


def test_bias_before_batch_norm_is_removed_by_it_but_not_after_an_activation():
    # conv(bias) -> BN (VGG-BN): the bias is a per-channel constant the batch norm subtracts.
    vgg = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), _bn2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    _check(vgg, X, ["0.weight"])
    # conv(bias) -> ReLU -> BN: relu(c·z + b) is not a scaling of relu(z + b).
    shifted = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.ReLU(), _bn2d(4), nn.Flatten(), nn.Linear(144, 2))
    _check(shifted, X, [])


def test_per_channel_not_whole_tensor_invariance():
    # conv1 -> ReLU -> conv2 -> BN: scaling all of conv1 is harmless, scaling one channel is not.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False), _bn2d(4),
                          nn.Flatten(), nn.Linear(64, 2))
    _check(model, X, ["2.weight"])


def test_depthwise_convolution_keeps_channels():
    # pointwise -> depthwise -> BN: each channel of the pointwise weight reaches the batch norm alone.
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(4, 4, 3, groups=4, bias=False), _bn2d(4),
                          nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    _check(model, X, ["0.weight", "1.weight"])


class _Sequence(nn.Module):
    """Linear layers on (N, L, C) features: a batch norm over the wrong dimension does not normalise channels."""

    def __init__(self, transpose):
        super().__init__()
        self.proj = nn.Linear(5, 6, bias=False)
        self.bn = nn.BatchNorm1d(6, eps=EPS) if transpose else nn.BatchNorm1d(7, eps=EPS)
        self.head = nn.Linear(6, 2)
        self.transpose = transpose

    def forward(self, x):
        y = self.proj(x)  # (N, 7, 6)
        y = self.bn(y.transpose(1, 2)).transpose(1, 2) if self.transpose else self.bn(y)
        return self.head(y.mean(1))


@pytest.mark.parametrize("transpose", [True, False])
def test_channel_dimension_is_followed_through_transposes(transpose):
    _check(_Sequence(transpose), torch.randn(4, 7, 5), ["proj.weight"] if transpose else [])


def test_other_normalizations_and_embeddings_are_not_batch_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(144, 2))
    _check(model, X, [])

    class _Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.bn = nn.BatchNorm1d(4, eps=EPS)

        def forward(self, idx):
            return self.bn(self.emb(idx))

    assert scale_invariant_parameters(_Embed(), torch.tensor([1, 2, 3])) == []


class _HandWrittenBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Any _BatchNorm subclass is a batch norm, however it computes (as normdecouple's own layers are)."""

    def forward(self, x):
        mean = x.mean((0, 2, 3), keepdim=True)
        scale = (x - mean).abs().mean((0, 2, 3), keepdim=True)
        return (x - mean) / scale * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def test_any_batch_norm_subclass_is_recognised():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), _HandWrittenBatchNorm(4), nn.Flatten(),
                          nn.Linear(144, 2))
    _check(model, X, ["0.weight"])


def test_normdecouple_l1_batch_norm_is_recognised():
    layer = getattr(nd, "L1BatchNorm2d", None)
    if layer is None:
        pytest.skip("normdecouple.L1BatchNorm2d is not available")
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), layer(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    assert scale_invariant_parameters(model, X) == ["0.weight"]


class _Escapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, bias=False)
        self.bn = _bn2d(3)

    def forward(self, x):
        z = self.conv(x)
        if z.abs().max().item() > 1e6:  # control flow on the weight's scale: not followed, so not reported
            z = z / 2
        return self.bn(z)


def test_values_read_into_python_exclude_their_weights():
    assert scale_invariant_parameters(_Escapes(), X) == []


def test_model_state_random_state_and_mode_are_left_as_they_were():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), _bn2d(4), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(144, 2))
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    # Found in training mode even when the model is in eval mode (the invariance is of the training loss).
    assert scale_invariant_parameters(model, X) == ["0.weight"]
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(torch.get_rng_state(), rng, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)


def test_compiled_model_uses_its_own_parameter_names():
    model = torch.compile(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), _bn2d(4), nn.Flatten(),
                                        nn.Linear(144, 2)), backend="eager")
    assert scale_invariant_parameters(model, X) == ["_orig_mod.0.weight"]


def test_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        scale_invariant_parameters(lambda x: x, X)
    with pytest.raises(TypeError, match="at least one example input"):
        scale_invariant_parameters(nn.Linear(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated, still supported
        scripted = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), torch.jit.script(_bn2d(4)))
    with pytest.raises(TypeError, match="TorchScript"):
        scale_invariant_parameters(scripted, X)


# ---------------------------------------------------------------------------------------------------------------
# Output containers: every tensor read, or a clear refusal; a weight carried raw is never reported


@dataclasses.dataclass(slots=True)
class _SlotsOut:
    logits: torch.Tensor
    weight_norm: torch.Tensor


@dataclasses.dataclass
class _PlainOut:
    logits: torch.Tensor
    extra: dict


class _NamedOut(typing.NamedTuple):
    logits: torch.Tensor
    weight_norm: torch.Tensor


@dataclasses.dataclass
class _ModelOutput(collections.OrderedDict):
    """Hugging Face's ModelOutput pattern (transformers is not installed): a dataclass and an OrderedDict whose
    keys are the fields that are not None."""

    logits: torch.Tensor = None
    weight_norm: torch.Tensor = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None:
                self[f.name] = getattr(self, f.name)


class _Opaque:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class _Carrier(nn.Module):
    """conv.weight reaches the output only through the batch norm, unless ``wrap`` also carries it raw."""

    def __init__(self, wrap):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, bias=False)
        self.bn = _bn2d(3)
        self.wrap = wrap

    def forward(self, x):
        return self.wrap(self.bn(self.conv(x)).mean((2, 3)), self.conv.weight.square().sum())


@pytest.mark.parametrize(
    "wrap",
    [
        _SlotsOut,  # the case: a dataclass(slots=True) has no __dict__
        _NamedOut,
        lambda a, b: _PlainOut(a, {"nested": [(b,)]}),
        lambda a, b: _ModelOutput(logits=a, weight_norm=b),
        lambda a, b: {"logits": a, "more": {"deep": [[[[[[[[[[b]]]]]]]]]]}},  # deeper than any fixed limit
    ],
    ids=["dataclass-slots", "namedtuple", "dataclass-nested", "model-output", "deep-dict"],
)
def test_a_weight_carried_raw_in_any_output_container_is_not_reported(wrap):
    assert scale_invariant_parameters(_Carrier(wrap).to(F64), X.to(F64)) == []
    # Control: the same container without the raw weight reports it, so the container is really read.
    assert scale_invariant_parameters(_Carrier(lambda a, b: wrap(a, torch.zeros(()))).to(F64), X.to(F64)) == [
        "conv.weight"]


def test_an_output_that_cannot_be_read_is_refused():
    with pytest.raises(TypeError, match=r"_Opaque at output\.value|_Opaque at output"):
        scale_invariant_parameters(_Carrier(lambda a, b: _Opaque(b)), X)
    with pytest.raises(TypeError, match="params="):
        scale_invariant_parameters(_Carrier(lambda a, b: (a, iter([b]))), X)


# ---------------------------------------------------------------------------------------------------------------
# The rules alone: pure functions of one call


def _call(name, args, kwargs, tags, outs):
    return Call(func=getattr(torch, name, None), name=name, args=args, kwargs=kwargs,
                tag=lambda t: tags.get(id(t), {}) if isinstance(t, torch.Tensor) else {}, outs=outs)


def test_rules_table_and_add_rule_alone():
    assert RULES["relu"] is rule_homogeneous and RULES["__add__"] is rule_add and "cosh" not in RULES
    a, b, out = torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3)
    scaled = Scaled("hom", -1, "k")
    # Two terms scaled by the same channels: a scaling; by another key: unknown.
    assert rule_add(_call("add", (a, b), {}, {id(a): {7: scaled}, id(b): {7: scaled}}, [out])).tags == [{7: scaled}]
    other = Scaled("hom", -1, "other")
    assert rule_add(_call("add", (a, b), {}, {id(a): {7: scaled}, id(b): {7: other}}, [out])).tags == [{7: TAINT}]
    # Plus a per-channel constant (shape (3,) broadcast along dim -1): affine; plus a full tensor: unknown.
    bias = torch.ones(3)
    assert rule_add(_call("add", (a, bias), {}, {id(a): {7: scaled}}, [out])).tags == [{7: Scaled("aff", -1, "k")}]
    assert rule_add(_call("add", (a, b), {}, {id(a): {7: scaled}}, [out])).tags == [{7: TAINT}]


def test_layer_and_batch_norm_rules_report_what_they_establish():
    x, w, out = torch.ones(4, 3, 5, 5), torch.ones(2, 3, 1, 1), torch.ones(4, 2, 5, 5)
    weight_tag = {9: Scaled("hom", -4, "id")}
    outcome = RULES["conv2d"](_call("conv2d", (x, w), {}, {id(w): weight_tag}, [out]))
    assert outcome.tags == [{9: Scaled("hom", -3, "id")}] and outcome.used_as_weight == {9}
    bn = RULES["batch_norm"](_call("batch_norm", (out, None, None), {"training": True},
                                    {id(out): outcome.tags[0]}, [torch.ones(4, 2, 5, 5)]))
    assert bn.tags == [{}] and bn.normalized == {9}
    # With running statistics in eval mode nothing is normalised: y = a_c x + b_c passes a channel scaling on
    # with a per-channel constant added; a scaling of another dimension meets a per-channel b_c: unknown.
    rm, rv = torch.zeros(2), torch.ones(2)
    bn = RULES["batch_norm"](_call("batch_norm", (out, rm, rv), {"training": False},
                                    {id(out): outcome.tags[0]}, [torch.ones(4, 2, 5, 5)]))
    assert bn.tags == [{9: Scaled("aff", -3, "id")}] and bn.normalized == frozenset()
    bn = RULES["batch_norm"](_call("batch_norm", (out, rm, rv), {"training": False},
                                    {id(out): {9: Scaled("hom", -1, "id")}}, [torch.ones(4, 2, 5, 5)]))
    assert bn.tags == [{9: TAINT}] and bn.normalized == frozenset()


def test_trace_of_a_real_training_step_has_no_side_effect_of_its_own():
    # The same step with and without the trace: identical loss, gradients and running statistics.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), _bn2d(4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                          nn.Linear(144, 2)).to(F64)
    plain = copy.deepcopy(model)
    x = X.to(F64)
    torch.manual_seed(3)
    with ScaleInvarianceTrace(model) as trace:
        loss = model(x).square().mean()
    loss.backward()
    torch.manual_seed(3)
    plain_loss = plain(x).square().mean()
    plain_loss.backward()
    assert trace.invariant_parameters(loss) == ["0.weight"] and not trace.active
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    for b, c in zip(model.buffers(), plain.buffers()):
        torch.testing.assert_close(b, c, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The modes the model trains in (API.md §7): frozen BatchNorms, a model wholly in eval, the fused layers' residual


def _frozen_bn_model():
    """conv -> BatchNorm -> ReLU -> conv -> BatchNorm -> head, in float64; the first BatchNorm is the one frozen."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), _bn2d(4), nn.ReLU(),
                         nn.Conv2d(4, 5, 3, padding=1, bias=False), _bn2d(5), nn.ReLU(),
                         nn.Flatten(), nn.Linear(180, 2)).to(F64)


class _BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: a BatchNorm subclass with its own activation in forward."""

    def forward(self, x):
        return F.relu(super().forward(x))


FROZEN_LAYERS = {
    "torch": lambda c: nn.BatchNorm2d(c),
    "l1": lambda c: nd.L1BatchNorm2d(c),
    "linf": lambda c: nd.LinfBatchNorm2d(c, k=2),
    "l1-fused-relu": lambda c: nd.L1BatchNormAct2d(c),
    "subclass-with-relu": _BatchNormAct,
}


@pytest.mark.parametrize("layer", FROZEN_LAYERS.values(), ids=FROZEN_LAYERS.keys())
def test_a_batch_norm_frozen_in_eval_inside_a_training_model_is_not_a_normalisation(layer):
    # The fine-tuning idiom model.train(); model.bn.eval(): the frozen layer is an affine map with its pretrained
    # statistics, so the convolution before it is not scale-invariant (scaling it changes the output).
    model = _frozen_bn_model().train()
    model[1] = _frozen(layer(4).to(F64))
    _check_as_set(model, X.to(F64), ["3.weight"])
    assert model.training and not model[1].training  # analysed in these modes, and left in them


def test_a_model_wholly_in_eval_is_analysed_as_model_train_sets_it():
    model = _frozen_bn_model()
    _frozen(model[1])
    model.eval()
    assert scale_invariant_parameters(model, X.to(F64)) == ["0.weight", "3.weight"]
    assert not any(m.training for m in model.modules())  # restored
    # That is the answer for the model as model.train() sets it (every BatchNorm normalising).
    _check(model, X, ["0.weight", "3.weight"])
    # A model with any module in training mode is analysed as set, even with the root in eval.
    model.eval()
    model[4].train()
    _check_as_set(model, X.to(F64), ["3.weight"])


def test_a_frozen_batch_norm_before_a_normalising_one_passes_the_scale_on():
    # conv -> frozen BN (c·a·t + b per channel) -> BatchNorm with batch statistics, which removes both.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), _bn2d(4), _bn2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(144, 2)).to(F64).train()
    _frozen(model[1])
    _check_as_set(model, X.to(F64), ["0.weight"])


def test_batch_norms_frozen_inside_residual_blocks():
    # One in a shortcut (its convolution's scale reaches the sum unnormalised), one on the main path just
    # before the sum (the same for conv2 of that block); every other weight stays scale-invariant.
    model = _resnet(_Basic).to(F64).train()
    _frozen(model[3].down[1])
    _frozen(model[4].bn2)
    _check_as_set(model, X.to(F64), ["0.weight", "3.conv1.weight", "3.conv2.weight", "4.conv1.weight"])


def test_batch_norms_without_gradients_or_running_statistics_follow_torchs_rule():
    # torch normalises with batch statistics in training mode, or in eval mode when the layer has no running
    # statistics; Lightning's BaseFinetuning.freeze_module sets requires_grad=False and track_running_stats=False
    # and leaves the layer in training mode, where it still normalises.
    def model(bn):
        return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bn, nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).to(F64)

    frozen_params = model(_bn2d(4)).train()
    frozen_params[1].requires_grad_(False)
    frozen_params[1].track_running_stats = False
    _check_as_set(frozen_params, X.to(F64), ["0.weight"])
    frozen_params[0].train()
    frozen_params[1].eval()  # the buffers are still there: torch uses them in eval
    _check_as_set(frozen_params, X.to(F64), [])
    no_buffers = model(nn.BatchNorm2d(4, eps=EPS, track_running_stats=False)).train()
    no_buffers[1].eval()
    _check_as_set(no_buffers, X.to(F64), ["0.weight"])


class _FusedResidual(nn.Module):
    """h = stem(x); out = act(bn1(conv(bn0(h))) + h), fused (``bn1(z, residual=h)``) or not."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn0 = _bn2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nd.L1BatchNorm2d(4, eps=EPS) if how == "unfused" else nd.L1BatchNormAct2d(4, eps=EPS)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(256, 2))

    def forward(self, x):
        h = self.stem(x)
        z = self.conv(self.bn0(h))
        if self.how == "unfused":
            return self.head(F.relu(self.bn1(z) + h))
        return self.head(self.bn1(z, h) if self.how == "positional" else self.bn1(z, residual=h))


@pytest.mark.parametrize("how", ["residual=", "positional", "unfused"])
def test_the_fused_layers_residual_is_part_of_the_output_scale(how):
    # The residual carries stem's scale past bn1: stem is not invariant, conv (normalised by bn1) is; the fused
    # layer must give the unfused sum's answer, checked by scaling each weight.
    _check(_FusedResidual(how), X, ["conv.weight"])


@pytest.mark.parametrize("how", ["residual=", "unfused"])
def test_a_fused_layer_with_a_residual_frozen_in_eval(how):
    model = _FusedResidual(how).to(F64).train()
    _frozen(model.bn1)
    _check_as_set(model, X.to(F64), [])


@pytest.mark.parametrize("build", ["frozen", "fused-residual"])
def test_projection_attached_by_auto_leaves_the_output_unchanged(build):
    # WeightNormProjection(params="auto", radius=1.0) puts every weight it chose on the unit sphere at attach:
    # for truly scale-invariant weights the model's output is unchanged.
    if build == "frozen":
        model = _frozen_bn_model().train()
        _frozen(model[1])
        expected = ["3.weight"]
    else:
        model = _FusedResidual("residual=").to(F64).train()
        expected = ["conv.weight"]
    x = X.to(F64)
    before = _output(model, x)
    hook = nd.WeightNormProjection(torch.optim.SGD(model.parameters(), lr=0.1), radius=1.0, model=model,
                                   example_inputs=(x,))
    assert hook.keys == expected
    norms = torch.linalg.vector_norm(model.get_parameter(expected[0]).flatten(1), dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))  # moved onto the sphere
    torch.testing.assert_close(_output(model, x), before, rtol=1e-10, atol=1e-12)
