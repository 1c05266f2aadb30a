"""bounded_weight_norm: the formula against a float64 oracle, the parametrization contract, gradients, errors."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from normdecouple import bounded_weight_norm


# Tiny models: one intra-op thread (the shared fixture in conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")


F64 = torch.float64
NORMS = [1, 2, math.inf]


def _slice_norms(w, p, dim):
    """Oracle: the p-norm of each slice along dim (of the whole tensor for dim=None), from the definition."""
    if dim is None:
        return w.abs().max() if p == math.inf else w.abs().pow(p).sum().pow(1 / p)
    slices = w.movedim(dim, 0).reshape(w.shape[dim], -1)
    return slices.abs().amax(1) if p == math.inf else slices.abs().pow(p).sum(1).pow(1 / p)


@pytest.mark.parametrize("p", NORMS)
def test_radius_none_keeps_the_module_function_and_fixes_each_slice_norm(p):
    conv = nn.Conv2d(3, 5, 3).to(F64)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    before, norms = conv(x), _slice_norms(conv.weight.detach(), p, 0)
    bounded_weight_norm(conv, p=p)
    torch.testing.assert_close(conv(x), before, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(conv.parametrizations.weight[0].radius.flatten(), norms, rtol=0, atol=0)
    # Scaling v per slice changes nothing: the weight is ρ·v/‖v‖.
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(torch.rand(5, 1, 1, 1, dtype=F64) + 0.5)
    torch.testing.assert_close(_slice_norms(conv.weight, p, 0), norms, rtol=1e-13, atol=0)


@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("dim", [0, 1, -1, None])
def test_absolute_radius_for_every_slice_of_dim(p, dim):
    # dim=1 and -1 normalise the columns of a linear weight; None the whole tensor.
    lin = nn.Linear(4, 3).to(F64)
    w = lin.weight.detach()
    shape = [1, 1]
    if dim is not None:
        shape[dim] = w.shape[dim]
    direction = w / _slice_norms(w, p, dim).view(shape)
    bounded_weight_norm(lin, p=p, dim=dim, radius=0.5)
    norms = _slice_norms(lin.weight, p, dim)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.5), rtol=1e-13, atol=0)
    torch.testing.assert_close(lin.weight, 0.5 * direction, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("p", NORMS)
def test_training_keeps_the_norm_and_the_radius_gets_no_gradient(p):
    conv = bounded_weight_norm(nn.Conv2d(2, 4, 3, bias=False).to(F64), p=p, radius=2.0)
    radius = conv.parametrizations.weight[0].radius
    assert not radius.requires_grad
    assert [n for n, _ in conv.named_parameters()] == ["parametrizations.weight.original"]
    opt = torch.optim.SGD(conv.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        conv(torch.randn(2, 2, 5, 5, dtype=F64)).pow(3).mean().backward()
        opt.step()
        torch.testing.assert_close(_slice_norms(conv.weight, p, 0), torch.full((4,), 2.0, dtype=F64),
                                   rtol=1e-13, atol=0)
    assert radius.grad is None


@pytest.mark.parametrize("p", NORMS)
def test_gradcheck(p):
    # Random values: no ties for the max (p=inf) and no zeros for |·| (p=1), where the norm is not smooth.
    module = _Holder(torch.randn(3, 4, dtype=F64))
    bounded_weight_norm(module, p=p, radius=1.5)
    v = module.parametrizations.weight.original.detach().clone().requires_grad_()
    parametrization = module.parametrizations.weight[0]
    assert torch.autograd.gradcheck(parametrization, (v,))


class _Holder(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(w)


def test_remove_parametrizations_leaves_the_bounded_weight():
    conv = bounded_weight_norm(nn.Conv2d(3, 4, 3).to(F64), radius=0.7)
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    out, weight = conv(x), conv.weight.detach().clone()
    parametrize.remove_parametrizations(conv, "weight")
    assert not parametrize.is_parametrized(conv)
    assert isinstance(conv.weight, nn.Parameter)
    torch.testing.assert_close(conv.weight.detach(), weight, rtol=0, atol=0)
    torch.testing.assert_close(conv(x), out, rtol=0, atol=0)


def test_state_dict_round_trip_and_buffer_moves_with_the_module():
    conv = bounded_weight_norm(nn.Conv2d(3, 4, 3), p=1)
    state = conv.state_dict()
    assert set(state) == {"bias", "parametrizations.weight.original", "parametrizations.weight.0.radius"}
    other = bounded_weight_norm(nn.Conv2d(3, 4, 3), p=1, radius=9.0)  # other weights and radius
    other.load_state_dict(state)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(other(x), conv(x), rtol=0, atol=0)
    moved = copy.deepcopy(conv).to(F64)
    assert moved.parametrizations.weight[0].radius.dtype == F64


def test_errors():
    with pytest.raises(ValueError, match="parameter of Linear"):
        bounded_weight_norm(nn.Linear(2, 2), "weights")
    with pytest.raises(ValueError, match="p to be"):
        bounded_weight_norm(nn.Linear(2, 2), p=3)
    with pytest.raises(ValueError, match="dim in"):
        bounded_weight_norm(nn.Linear(2, 2), dim=2)
    for bad in (0.0, -1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match="radius"):
            bounded_weight_norm(nn.Linear(2, 2), radius=bad)
    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight[1] = 0
    with pytest.raises(ValueError, match=r"zero slices \[1\]"):
        bounded_weight_norm(lin)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bounded_weight_norm(torch.ones(2, 2))
