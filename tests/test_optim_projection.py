"""WeightNormProjection: norms on the sphere, exactness claims against float64 runs, and the optimizer contract.

torch's BatchNorm with eps=1e-300 makes the networks scale-invariant to float64 rounding (eps is the only term
that breaks the invariance; at 1e-300 it stays defined but is negligible next to variances of order one).
"""

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import normdecouple as nd
from normdecouple.optim import WeightNormProjection


from _optim_support import EPS, F64, INVARIANT, _batches, _net, _scaled  # noqa: F401

# Tiny models: one intra-op thread (the shared fixture in conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")


def _step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _train(model, opt, batches, sched=None, each_step=None):
    """Trains on the batches; returns the network function (train-mode output on a fixed batch) after each step."""
    probe = _batches(1)[0][0] + 1.0
    outputs = []
    for t, (x, y) in enumerate(batches):
        if each_step is not None:
            each_step(t)
        _step(model, opt, x, y)
        if sched is not None:
            sched.step()
        with torch.no_grad():
            outputs.append(model(probe))
    return outputs


def _norms(w, p=2):
    return torch.linalg.vector_norm(w.flatten(1), ord=p, dim=1)


@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("radius", ["init", 0.8])
def test_norms_equal_the_radius_after_every_step(p, radius):
    model = _net()
    initial = {n: _norms(model.get_parameter(n), p) for n in INVARIANT}
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    proj = WeightNormProjection(opt, INVARIANT, model=model, p=p, radius=radius)
    for x, y in _batches(4):
        _step(model, opt, x, y)
        for n in INVARIANT:
            expected = initial[n] if radius == "init" else torch.full_like(initial[n], radius)
            torch.testing.assert_close(_norms(model.get_parameter(n), p), expected, rtol=1e-13, atol=0)
            torch.testing.assert_close(proj.radii[n], expected, rtol=1e-15, atol=0)


def test_absolute_radius_projects_when_attached():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    WeightNormProjection(opt, INVARIANT, model=model, radius=2.5)
    for n in INVARIANT:
        torch.testing.assert_close(_norms(model.get_parameter(n)), torch.full((model.get_parameter(n).shape[0],),
                                   2.5, dtype=F64), rtol=1e-14, atol=0)


OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("c", [3.0, 0.25])
def test_training_from_scaled_weights_is_the_same_function(name, c):
    # With an absolute radius both runs start on the same sphere, hence the same computation for any optimizer
    # (up to the rounding of the first projection).
    model = _net()
    batches = _batches(8)
    outs = []
    for m in (model, _scaled(model, c)):
        opt = OPTIMIZERS[name](m.parameters())
        WeightNormProjection(opt, INVARIANT, model=m, radius=1.3)
        outs.append(_train(m, opt, batches))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


def test_control_plain_sgd_depends_on_the_weight_scale():
    model = _net()
    batches = _batches(8)
    outs = [_train(m, torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9), batches)[-1]
            for m in (model, _scaled(model, 3.0))]
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def _tan_angle(w_old, w_new):
    """Per output channel, tan of the angle between the directions before and after a step."""
    a, b = w_old.flatten(1), w_new.flatten(1)
    unit = a / a.norm(dim=1, keepdim=True)
    parallel = (b * unit).sum(1)
    return (b - parallel[:, None] * unit).norm(dim=1) / parallel


def test_effective_step_follows_the_lr_schedule():
    # SGD without momentum: the gradient g is orthogonal to w, and the projection keeps the direction of w - η g,
    # so tan θ = η ‖g‖ / ρ = (η/ρ²) ‖∇L(ŵ)‖ with ∇L(ŵ) = ρ g. Hence η_eff = tan θ ρ / ‖g‖ equals the scheduled lr.
    model = _net()
    rho = 0.6
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
    WeightNormProjection(opt, INVARIANT, model=model, radius=rho)
    for x, y in _batches(6):
        lr = opt.param_groups[0]["lr"]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        olds = {n: (model.get_parameter(n).detach().clone(), model.get_parameter(n).grad.clone()) for n in INVARIANT}
        opt.step()
        sched.step()
        for n, (w_old, g) in olds.items():
            effective = _tan_angle(w_old, model.get_parameter(n).detach()) * rho / _norms(g)
            torch.testing.assert_close(effective, torch.full_like(effective, lr), rtol=1e-9, atol=0)


def test_radius_schedule_is_the_lr_schedule():
    # The paper's norm schedule: radius × √10 at step k with a fixed lr trains exactly like lr / 10 at step k on
    # a fixed radius (SGD without momentum: w' = √10 w has gradient g/√10, and w' - η g/√10 = √10 (w - η/10 g)).
    model = _net()
    batches = _batches(6)
    milestone = 3

    norm_run = copy.deepcopy(model)
    # The classifier is not scale-invariant: it keeps the LR schedule in both runs, in its own param group.
    opt = torch.optim.SGD([{"params": [p for n, p in norm_run.named_parameters() if n in INVARIANT]},
                           {"params": [p for n, p in norm_run.named_parameters() if n not in INVARIANT]}], lr=0.3)
    proj = WeightNormProjection(opt, INVARIANT, model=norm_run, radius=1.0)

    def at(t):
        if t == milestone:
            proj.scale_radius(math.sqrt(10))
            opt.param_groups[1]["lr"] *= 0.1
            for n in INVARIANT:  # on the new sphere at once
                w = norm_run.get_parameter(n)
                torch.testing.assert_close(_norms(w), torch.full((w.shape[0],), math.sqrt(10), dtype=F64))

    got = _train(norm_run, opt, batches, each_step=at)
    assert proj.radius_scale == pytest.approx(math.sqrt(10))

    lr_run = copy.deepcopy(model)
    opt = torch.optim.SGD(lr_run.parameters(), lr=0.3)
    WeightNormProjection(opt, INVARIANT, model=lr_run, radius=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [milestone], gamma=0.1)
    expected = _train(lr_run, opt, batches, sched)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _checkpoint(obj) -> dict:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("with_model", [True, False], ids=["keyed_by_name", "keyed_by_position"])
def test_state_dict_round_trip_mid_training_continues_identically(with_model):
    model = _net()
    batches = _batches(8)

    def build(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 8)
        if with_model:
            proj = WeightNormProjection(opt, INVARIANT, model=m, p=1)
        else:
            proj = WeightNormProjection(opt, [m[0].weight, m[3].weight], p=1)
        return opt, sched, proj

    reference_model = copy.deepcopy(model)
    opt, sched, proj = build(reference_model)
    proj.scale_radius(2.0)
    expected = _train(reference_model, opt, batches, sched)[-1]

    opt, sched, proj = build(model)
    proj.scale_radius(2.0)
    _train(model, opt, batches[:4], sched)
    saved = _checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                         "proj": proj.state_dict()})
    assert saved["proj"]["radius_scale"] == 2.0
    assert set(saved["proj"]["radius"]) == ({"0.weight", "3.weight"} if with_model else {0, 3})

    torch.manual_seed(123)
    fresh = _net()  # other initial weights, hence other "init" radii until the state is loaded
    opt, sched, proj = build(fresh)
    fresh.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    proj.load_state_dict(saved["proj"])
    assert proj.radius_scale == 2.0 and proj.p == 1
    got = _train(fresh, opt, batches[4:], sched)[-1]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_load_state_dict_rejects_other_parameters():
    model = _net()
    proj = WeightNormProjection(torch.optim.SGD(model.parameters(), lr=0.1), INVARIANT, model=model)
    state = proj.state_dict()
    with pytest.raises(ValueError, match="unexpected"):
        proj.load_state_dict({**state, "radius": {**state["radius"], "8.weight": torch.ones(3)}})
    with pytest.raises(ValueError, match="one per output channel"):
        proj.load_state_dict({**state, "radius": {**state["radius"], "3.weight": torch.ones(4)}})
    with pytest.raises(ValueError, match="p to be"):
        proj.load_state_dict({**state, "p": 3})


def test_gradscaler_skipped_step_does_nothing():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    proj = WeightNormProjection(opt, INVARIANT, model=model)
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append(1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x, y = _batches(1)[0]
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # off its sphere: a projection would show
    weights = [p.detach().clone() for p in model.parameters()]
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    model[3].weight.grad[0, 0, 0, 0] = math.nan
    scaler.step(opt)
    scaler.update()
    assert not calls and scaler.get_scale() < 2.0**4
    for p, w in zip(model.parameters(), weights):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=0)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    assert calls
    torch.testing.assert_close(_norms(model[0].weight), proj.radii["0.weight"], rtol=1e-13, atol=0)


def test_parameters_without_gradient_are_left_alone():
    model = _net()
    spare = nn.Parameter(torch.randn(4, 3, dtype=F64))  # in the optimizer, never used: no gradient
    opt = torch.optim.SGD([*model.parameters(), spare], lr=0.1)
    WeightNormProjection(opt, [model[0].weight, spare], radius=1.0)
    after_attach = spare.detach().clone()
    torch.testing.assert_close(_norms(after_attach), torch.ones(4, dtype=F64))
    with torch.no_grad():
        spare.mul_(2.0)
    _train(model, opt, _batches(2))
    assert spare.grad is None
    torch.testing.assert_close(spare.detach(), 2.0 * after_attach, rtol=0, atol=0)


def test_several_param_groups_and_one_dimensional_parameters():
    model = _net()
    groups = [{"params": [model[0].weight], "lr": 0.3}, {"params": list(model[1:].parameters()), "lr": 0.05}]
    opt = torch.optim.SGD(groups, lr=0.1)
    # A 1-D parameter has one value per channel: its "sphere" is ±radius.
    proj = WeightNormProjection(opt, [model[0].weight, model[3].weight, model[8].bias], radius=0.5, allow_1d=True)
    _train(model, opt, _batches(2))
    for w in (model[0].weight, model[3].weight):
        torch.testing.assert_close(_norms(w), torch.full((w.shape[0],), 0.5, dtype=F64), rtol=1e-13, atol=0)
    torch.testing.assert_close(model[8].bias.abs(), torch.full((3,), 0.5, dtype=F64), rtol=1e-15, atol=0)
    assert proj.keys == [0, 3, 7]


def test_non_contiguous_parameters_match_contiguous_ones():
    model = _net()
    other = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        other[8].weight = nn.Parameter(model[8].weight.detach().t().contiguous().t())
    outs = []
    for m in (model, other):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        WeightNormProjection(opt, [m[0].weight, m[3].weight, m[8].weight], radius=1.0)
        outs.append(_train(m, opt, _batches(3))[-1])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-14)
    assert not other[0].weight.is_contiguous() and not other[8].weight.is_contiguous()


def test_remove_detaches_and_lr_scheduler_and_optimizer_state_are_untouched():
    model = _net()
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    proj = WeightNormProjection(opt, INVARIANT, model=model)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler must not think optimizer.step() was bypassed
        _train(model, opt, _batches(2), sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    _train(plain, plain_opt, _batches(2), torch.optim.lr_scheduler.StepLR(plain_opt, 1, gamma=0.5))
    assert opt.state_dict()["param_groups"][0].keys() == plain_opt.state_dict()["param_groups"][0].keys()
    assert opt.state_dict()["state"].keys() == plain_opt.state_dict()["state"].keys()
    proj.remove()
    proj.remove()
    assert not proj.attached
    before = _norms(model[0].weight).clone()
    _train(model, opt, _batches(3))
    assert not torch.allclose(_norms(model[0].weight), before, rtol=1e-6, atol=0)


def test_params_auto_and_names():
    model = _net()
    x = _batches(1)[0][0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for args, kwargs, keys in (((), dict(example_inputs=(x,)), INVARIANT), ((), dict(example_inputs=x), INVARIANT),
                               ((["3.weight"],), {}, ["3.weight"])):
        hook = nd.WeightNormProjection(opt, *args, model=model, **kwargs)
        assert hook.keys == keys
        assert "p=2" in repr(hook)
        hook.remove()  # one projection per parameter: the next is refused while this one is attached


@pytest.mark.slow
def test_works_with_a_compiled_model():
    model = _net()
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    outs = []
    for m in (model, compiled):
        opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)
        proj = WeightNormProjection(opt, model=m, example_inputs=(_batches(1)[0][0],), radius=1.0)
        outs.append(_train(m, opt, _batches(3))[-1])
    assert proj.keys == ["_orig_mod.0.weight", "_orig_mod.3.weight"]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)


def test_bad_input_errors():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not in any of its param_groups"):
        WeightNormProjection(torch.optim.SGD(model[8].parameters(), lr=0.1), [model[0].weight])
    for bad in (0, -1.0, math.nan, math.inf, False, "unit"):
        with pytest.raises(ValueError, match="radius"):
            WeightNormProjection(opt, INVARIANT, model=model, radius=bad)
    for bad in (0, 3, "fro"):
        with pytest.raises(ValueError, match="p to be"):
            WeightNormProjection(opt, INVARIANT, model=model, p=bad)
    proj = WeightNormProjection(opt, INVARIANT, model=model)
    for bad in (0.0, -2.0, math.inf):
        with pytest.raises(ValueError, match="factor"):
            proj.scale_radius(bad)
    with pytest.raises(ValueError, match="model= and example_inputs="):
        WeightNormProjection(opt)
    with pytest.raises(ValueError, match="model= and example_inputs="):
        WeightNormProjection(opt, model=model)
    with pytest.raises(TypeError, match="Optimizer"):
        WeightNormProjection([model[0].weight], INVARIANT, model=model)
    with pytest.raises(ValueError, match="'auto'"):
        WeightNormProjection(opt, "all")
    extra = nn.Parameter(torch.ones(2, 2, dtype=F64))
    with pytest.raises(ValueError, match="parameters of the given model"):
        WeightNormProjection(torch.optim.SGD([*model.parameters(), extra]), [extra], model=model)
    with torch.no_grad():
        model[0].weight[1] = 0
    with pytest.raises(ValueError, match="zero channels"):
        WeightNormProjection(opt, INVARIANT, model=model, radius=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_keep_float32_radii(dtype):
    # Radii and norms are kept in float32 (never narrower), the projected weight rounds once to its dtype.
    model = _net().to(torch.float32)
    model[0].to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    proj = WeightNormProjection(opt, [model[0].weight], radius=1.0)
    assert proj.radii[0].dtype == torch.float32 and model[0].weight.dtype == dtype
    model[0].weight.grad = torch.randn_like(model[0].weight)
    opt.step()
    norms = _norms(model[0].weight.float())
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-2, atol=0)


def test_gradscaler_with_a_fused_optimizer_leaves_weights_on_an_inf_step():
    # A fused optimizer is stepped (with found_inf) even on a skipped step: projecting again is idempotent.
    w = nn.Parameter(torch.randn(4, 5, dtype=F64))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, fused=True)
    WeightNormProjection(opt, [w], radius=1.0)
    scaler = torch.amp.GradScaler("cpu")
    before = w.detach().clone()
    scaler.scale(w.square().sum()).backward()
    w.grad[0, 0] = math.inf
    scaler.step(opt)
    torch.testing.assert_close(w.detach(), before, rtol=1e-15, atol=0)


def test_one_dimensional_parameters_are_refused_unless_allowed():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # model.parameters() holds the batch norms' weights and biases and the head's bias: 1-D, refused by name.
    with pytest.raises(ValueError, match=r"1\.weight.*allow_1d=True"):
        WeightNormProjection(opt, list(model.parameters()), model=model, radius=1.0)
    with pytest.raises(ValueError, match=r"params\[1\] of shape \(4,\).*allow_1d=True"):
        WeightNormProjection(opt, list(model.parameters()), radius=1.0)
    with pytest.raises(TypeError, match="allow_1d"):
        WeightNormProjection(opt, INVARIANT, model=model, allow_1d="yes")


@pytest.mark.parametrize("conv", [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d])
def test_transposed_convolution_is_projected_per_output_channel(conv):
    # Weight shape (C_in=3, C_out=5, *kernel): the output channels are dimension 1. C_in != C_out so that a
    # projection along the wrong dimension could not pass by chance.
    dims = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}[conv]
    model = nn.Sequential(conv(3, 5, 2, bias=False), nn.BatchNorm1d(5) if dims == 1 else
                          nn.BatchNorm2d(5) if dims == 2 else nn.BatchNorm3d(5)).to(F64)
    w = model[0].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    proj = WeightNormProjection(opt, ["0.weight"], model=model)
    # The reference: each output channel's norm, computed independently in float64 from a copy moved to dim 0.
    initial = torch.linalg.vector_norm(w.detach().double().movedim(1, 0).reshape(5, -1), dim=1)
    assert proj.radii["0.weight"].shape == (5,)
    torch.testing.assert_close(proj.radii["0.weight"], initial, rtol=1e-15, atol=0)
    x = torch.randn(4, 3, *([3] * dims), dtype=F64)
    before = w.detach().clone()
    model(x).pow(3).mean().backward()
    opt.step()
    after = torch.linalg.vector_norm(w.detach().double().movedim(1, 0).reshape(5, -1), dim=1)
    torch.testing.assert_close(after, initial, rtol=1e-13, atol=0)
    assert not torch.allclose(w.detach(), before)  # the weight moved: its norms were kept by the projection


@pytest.mark.parametrize("drop", ["p", "radius_scale", "radius"])
def test_malformed_state_is_a_value_error_naming_what_is_missing(drop):
    model = _net()
    proj = WeightNormProjection(torch.optim.SGD(model.parameters(), lr=0.1), INVARIANT, model=model)
    state = {k: v for k, v in proj.state_dict().items() if k != drop}
    with pytest.raises(ValueError, match=rf"missing: \['{drop}'\]"):
        proj.load_state_dict(state)
    with pytest.raises(ValueError, match="expected a dict"):
        proj.load_state_dict([1, 2])
    with pytest.raises(ValueError, match="'radius' to be a dict"):
        proj.load_state_dict({**proj.state_dict(), "radius": 1.0})


# ---------------------------------------------------------------------------------------------------------------
# One projection per parameter, param groups added later, stale gradients (issue 19, items 5, 10, 11)


def test_a_second_projection_on_a_parameter_is_refused():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = WeightNormProjection(opt, INVARIANT, model=model, radius=1.0)
    with pytest.raises(ValueError, match=r"parameter '0.weight' already has a WeightNormProjection"):
        WeightNormProjection(opt, ["0.weight"], model=model, radius=2.0)
    # Refused before anything moved: the weights are still on the first hook's spheres.
    torch.testing.assert_close(_norms(model[0].weight), torch.ones(4, dtype=F64), rtol=1e-14, atol=0)
    first.remove()
    WeightNormProjection(opt, ["0.weight"], model=model, radius=2.0)


def _backbone_and_head():
    model = _net()
    backbone = [model[0].weight, model[1].weight, model[1].bias]
    head = [p for p in model.parameters() if all(p is not q for q in backbone)]
    return model, backbone, head


@pytest.mark.parametrize("radius", ["init", 1.5])
def test_param_groups_added_after_attach_are_projected_from_their_first_step(radius):
    model, backbone, head = _backbone_and_head()
    x = _batches(1)[0][0]
    opt = torch.optim.SGD(head, lr=0.5, momentum=0.9)
    proj = WeightNormProjection(opt, model=model, example_inputs=(x,), radius=radius)
    assert proj.keys == ["3.weight"]
    _train(model, opt, _batches(2))
    proj.scale_radius(2.0)  # a norm schedule under way: the joining weight's radius is its norm when it joins
    joined_norms = _norms(model[0].weight).clone()  # untouched so far: frozen, not in the optimizer
    opt.add_param_group({"params": backbone, "lr": 0.05})
    for t in range(3):
        _train(model, opt, _batches(1))
        expected = joined_norms if radius == "init" else torch.full_like(joined_norms, 2.0 * radius)
        torch.testing.assert_close(_norms(model[0].weight), expected, rtol=1e-13, atol=0)
    assert proj.keys == INVARIANT[::-1]
    torch.testing.assert_close(proj.radii["0.weight"], expected, rtol=1e-15, atol=0)


def test_weight_joining_between_backward_and_step_takes_the_step_of_one_projected_before_the_backward():
    # Plain PyTorch: add_param_group after backward, then step. The joining weight is projected in the step's
    # pre-hook and its gradient becomes the one at the projected weight (g(c w) = g(w)/c), so the step equals that
    # of a run in which it was on its sphere from the start (float64, eps=1e-300).
    model, backbone, head = _backbone_and_head()
    early = copy.deepcopy(model)
    x, y = _batches(1)[0]
    opt = torch.optim.SGD(head, lr=0.5)
    WeightNormProjection(opt, model=model, example_inputs=(x,), radius=1.5)
    early_backbone = [early[0].weight, early[1].weight, early[1].bias]
    early_head = [p for p in early.parameters() if all(p is not q for q in early_backbone)]
    early_opt = torch.optim.SGD([{"params": early_head}, {"params": early_backbone}], lr=0.5)
    WeightNormProjection(early_opt, INVARIANT, model=early, radius=1.5)
    for m in (model, early):
        nn.functional.cross_entropy(m(x), y).backward()
    opt.add_param_group({"params": backbone})
    opt.step()
    early_opt.step()
    for (n, p), q in zip(model.named_parameters(), early.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=n)


def test_step_without_a_fresh_gradient_is_not_projected():
    # The optimizer steps again with the gradients of the last backward (Lightning's SWA does so at the end of its
    # batch-norm epoch, after recomputing the statistics): the projection leaves the weights as the optimizer put
    # them (compared with a twin optimizer without the hook).
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    WeightNormProjection(opt, INVARIANT, model=model, radius=1.0)
    _train(model, opt, _batches(1))
    twin_model, twin_opt = copy.deepcopy((model, opt))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        q.grad = p.grad.clone()
    opt.step()
    twin_opt.step()
    for (n, p), q in zip(model.named_parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert not torch.allclose(_norms(model[0].weight), torch.ones(4, dtype=F64))  # it moved, and was left so
    # A new backward (into the same gradient tensors, as zero_grad(set_to_none=False) leaves them) projects again.
    opt.zero_grad(set_to_none=False)
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(_norms(model[0].weight), torch.ones(4, dtype=F64), rtol=1e-13, atol=0)
