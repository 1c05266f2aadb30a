"""The layers' module contract, side by side with torch.nn.BatchNorm{1,2,3}d of the installed torch."""

import copy
import inspect
import io
import pickle

import pytest
import torch
from torch import nn

import normdecouple as nd
from normdecouple._reference import reference_batch_norm

# (our class, torch's class, an input shape, extra constructor kwargs)
PAIRS = [
    (nd.L1BatchNorm1d, nn.BatchNorm1d, (6, 4), {}),
    (nd.L1BatchNorm1d, nn.BatchNorm1d, (5, 4, 3), {}),
    (nd.L1BatchNorm2d, nn.BatchNorm2d, (4, 4, 3, 5), {}),
    (nd.L1BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 2, 3), {}),
    (nd.LinfBatchNorm1d, nn.BatchNorm1d, (6, 4), {"k": 2}),
    (nd.LinfBatchNorm2d, nn.BatchNorm2d, (4, 4, 3, 5), {"k": 1}),
    (nd.LinfBatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 2, 3), {"k": 3}),
]
IDS = [f"{ours.__name__}-{len(shape)}D" for ours, _, shape, _ in PAIRS]


def _norm_of(layer):
    return layer.norm, getattr(layer, "k", 1)


@pytest.mark.parametrize("ours", [p[0] for p in PAIRS[::2]] + [nd.LinfBatchNorm2d])
def test_signature_extends_torchs(ours):
    theirs = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[int(ours.__name__[-2])]
    torch_params = list(inspect.signature(theirs.__init__).parameters.values())
    our_params = inspect.signature(ours.__init__).parameters
    for p in torch_params:
        assert p.name in our_params, f"{ours.__name__} lacks torch's argument {p.name}"
        q = our_params[p.name]
        assert (q.kind, q.default) == (p.kind, p.default), p.name
    positional = [p.name for p in torch_params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [n for n, q in our_params.items() if q.kind is q.POSITIONAL_OR_KEYWORD] == positional
    extra = [n for n in our_params if n not in {p.name for p in torch_params}]
    assert all(our_params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in extra)


@pytest.mark.parametrize("ours,theirs,shape,kw", PAIRS, ids=IDS)
def test_buffers_parameters_and_state_dict_keys(ours, theirs, shape, kw):
    a, b = ours(4, **kw), theirs(4)
    assert isinstance(a, torch.nn.modules.batchnorm._BatchNorm)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    for (name, t1), (_, t2) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(t1, t2, msg=name)


@pytest.mark.parametrize("ours,theirs,shape,kw", PAIRS, ids=IDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_steps_match_reference_and_torch_bookkeeping(ours, theirs, shape, kw, momentum):
    a, b = ours(4, momentum=momentum, **kw), theirs(4, momentum=momentum)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    norm, k = _norm_of(a)
    for step in range(3):
        x = torch.randn(shape) * (step + 1) + step
        y = a(x)
        b(x)
        factor = 1.0 / (step + 1) if momentum is None else momentum
        y64 = reference_batch_norm(x.double(), rm, rv, training=True, momentum=factor, norm=norm, k=k)
        torch.testing.assert_close(y.double(), y64, atol=2e-5, rtol=1e-4)
        assert a.num_batches_tracked == b.num_batches_tracked == step + 1
        # The running mean has torch's definition exactly; the variance follows our scale.
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var.double(), rv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ours,theirs,shape,kw", PAIRS, ids=IDS)
def test_state_dict_moves_both_ways_and_eval_is_torchs(ours, theirs, shape, kw):
    a = ours(4, **kw)
    for _ in range(2):
        a(torch.randn(shape) * 3 + 1)
    with torch.no_grad():
        a.weight.uniform_(0.5, 1.5)
        a.bias.normal_()
    b = theirs(4)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    # torch -> ours
    c = theirs(4)
    c(torch.randn(shape) * 2)
    d = ours(4, **kw)
    d.load_state_dict(c.state_dict())
    c.eval(), d.eval()
    torch.testing.assert_close(d(x), c(x), rtol=0, atol=0)


@pytest.mark.parametrize("ours,theirs,shape,kw", PAIRS[2:4] + PAIRS[5:6], ids=IDS[2:4] + IDS[5:6])
def test_options_track_running_stats_affine_bias(ours, theirs, shape, kw):
    x = torch.randn(shape)
    norm, k = _norm_of(ours(4, **kw))
    # No running statistics: batch statistics in eval too, buffers None as in torch.
    a, b = ours(4, track_running_stats=False, **kw), theirs(4, track_running_stats=False)
    assert a.running_mean is None and a.num_batches_tracked is None and b.running_mean is None
    a.eval()
    y64 = reference_batch_norm(x.double(), None, None, a.weight.double(), a.bias.double(), True, norm=norm, k=k)
    torch.testing.assert_close(a(x).double(), y64, atol=2e-5, rtol=1e-4)
    # Not affine: no parameters at all.
    a = ours(4, affine=False, **kw)
    assert a.weight is None and a.bias is None and list(a.parameters()) == []
    torch.testing.assert_close(
        a(x).double(), reference_batch_norm(x.double(), None, None, training=True, norm=norm, k=k),
        atol=2e-5, rtol=1e-4,
    )
    # bias=False (torch's keyword): a weight but no bias.
    a, b = ours(4, bias=False, **kw), theirs(4, bias=False)
    assert a.bias is None and a.state_dict().keys() == b.state_dict().keys()
    a(x).sum().backward()
    assert a.weight.grad is not None


@pytest.mark.parametrize("ours,theirs,shape,kw", PAIRS, ids=IDS)
def test_resets_repr_deepcopy_pickle(ours, theirs, shape, kw):
    a = ours(4, **kw)
    a(torch.randn(shape) + 3)
    with torch.no_grad():
        a.weight.mul_(2)
    clone = copy.deepcopy(a)
    buffer = io.BytesIO()
    torch.save(a, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(a))
    x = torch.randn(shape)
    a.eval()
    for other in (clone, loaded, unpickled):
        other.eval()
        assert type(other) is type(a) and repr(other) == repr(a)
        torch.testing.assert_close(other(x), a(x), rtol=0, atol=0)
    assert repr(a).startswith(f"{ours.__name__}(" + theirs(4).extra_repr())
    assert "low_precision=False" in repr(a) and "backend='auto'" in repr(a)
    a.reset_running_stats()
    assert a.num_batches_tracked == 0 and torch.all(a.running_mean == 0) and torch.all(a.running_var == 1)
    a.reset_parameters()
    assert torch.all(a.weight == 1) and torch.all(a.bias == 0)


@pytest.mark.parametrize("ours,theirs,shape,kw", PAIRS, ids=IDS)
def test_errors_are_torchs(ours, theirs, shape, kw):
    a, b = ours(4, **kw), theirs(4)
    for bad in (torch.randn(4), torch.randn(*([2] * (len(shape) + 2)))[:, :4]):
        with pytest.raises(ValueError) as theirs_error:
            b(bad)
        with pytest.raises(ValueError) as ours_error:
            a(bad)
        assert str(ours_error.value) == str(theirs_error.value)
    one = torch.randn(1, 4, *([1] * (len(shape) - 2)))
    with pytest.raises(ValueError) as theirs_error:
        b(one)
    with pytest.raises(ValueError) as ours_error:
        a(one)
    assert str(ours_error.value) == str(theirs_error.value)
    a.eval()
    a(one)  # eval mode accepts one value per channel, as torch does


def test_odd_shapes_minimum_batch():
    # N=2 with HW=1 (two values per channel), C=1, and odd spatial sizes.
    for layer, x in [
        (nd.L1BatchNorm2d(1), torch.randn(2, 1, 1, 1)),
        (nd.LinfBatchNorm2d(3, k=2), torch.randn(2, 3, 1, 1)),
        (nd.LinfBatchNorm1d(5, k=7), torch.randn(7, 5)),
        (nd.L1BatchNorm3d(2), torch.randn(2, 2, 3, 1, 5)),
    ]:
        y = layer(x)
        norm, k = _norm_of(layer)
        torch.testing.assert_close(
            y.double(), reference_batch_norm(x.double(), None, None, training=True, norm=norm, k=k),
            atol=2e-5, rtol=1e-4,
        )


def test_k_larger_than_batch_is_a_clear_error():
    layer = nd.LinfBatchNorm2d(3, k=8)
    with pytest.raises(ValueError, match=r"k=8 exceeds the n=6 values per channel"):
        layer(torch.randn(2, 3, 1, 3))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"k": 0}, ValueError, "k must be at least 1"),
        ({"k": 1.5}, TypeError, "k must be an int"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"low_precision": "yes"}, TypeError, "low_precision must be a bool"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        nd.LinfBatchNorm2d(4, **kwargs)


def test_running_statistics_never_narrower_than_float32():
    layer = nd.L1BatchNorm2d(4).half()
    assert layer.weight.dtype == torch.float16 and layer.running_var.dtype == torch.float32
    assert nd.LinfBatchNorm2d(4, dtype=torch.bfloat16).running_mean.dtype == torch.float32
    assert nd.L1BatchNorm2d(4).to(torch.bfloat16).running_var.dtype == torch.float32
    assert nd.L1BatchNorm2d(4).double().running_var.dtype == torch.float64
    assert nd.L1BatchNorm2d(4).half().float().running_var.dtype == torch.float32
    # A variance of 1e6 (activations around 1e3) fits: torch's fp16 buffer would hold inf.
    layer = nd.LinfBatchNorm2d(4, k=4, low_precision=True).half()
    x = (1000.0 * torch.randn(8, 4, 8, 8)).half()
    layer.train()(x)
    assert torch.isfinite(layer.running_var).all() and layer.running_var.min() > 5e4
    layer.eval()
    assert layer(x).dtype == torch.float16 and torch.isfinite(layer(x)).all()
    # A torch fp16 state_dict loads (widened) and ours loads back into a float32 torch layer.
    torch_half = nn.BatchNorm2d(4).half()
    layer.load_state_dict(torch_half.state_dict())
    assert layer.running_var.dtype == torch.float32
    nn.BatchNorm2d(4).load_state_dict(layer.float().state_dict())


def test_old_checkpoint_without_num_batches_tracked_loads():
    state = nn.BatchNorm2d(4).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    nd.L1BatchNorm2d(4).load_state_dict(state)


@pytest.mark.parametrize("cls,kw", [(nd.L1BatchNorm2d, {}), (nd.LinfBatchNorm2d, {"k": 2})])
def test_torch_compile_fullgraph_matches_eager(cls, kw):
    torch._dynamo.reset()
    # Convolutions without bias: a bias before a batch norm has an exactly-zero gradient, all rounding noise.
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False), cls(6, **kw), nn.ReLU(), nn.Conv2d(6, 4, 1, bias=False), cls(4, **kw)
    )
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for batch in (4, 4, 6):  # the third call recompiles with a dynamic batch size
        x = torch.randn(batch, 3, 8, 8)
        probe = torch.randn(batch, 4, 6, 6)
        (compiled(x) * probe).sum().backward()
        (eager(x) * probe).sum().backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
        for (name, b), c in zip(model.named_buffers(), eager.buffers()):
            torch.testing.assert_close(b, c, msg=name)
