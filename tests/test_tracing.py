"""TorchScript and folding, side by side with torch's BatchNorm: ``torch.jit.trace`` (training and eval),
``torch.jit.script`` (refused with the export path), and folding a BatchNorm into its convolution.

torch's layer traces exactly: the traced graph, run for several steps and other batch sizes, gives the eager
layer's outputs, gradients and running statistics. Ours must too (float64, so that a statistic computed in
float32 shows). The oracle is an eager twin of the traced module, and torch's own traced layer passes the same test.
"""

import io
import warnings

import pytest
import torch
from torch import nn

import normdecouple as nd

# torch 2.13 deprecates TorchScript but still supports it; these tests are about what it does.
_TORCHSCRIPT_DEPRECATED = "ignore:.*is deprecated. Please switch to:DeprecationWarning"
pytestmark = pytest.mark.filterwarnings(_TORCHSCRIPT_DEPRECATED)
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", ".*is deprecated. Please switch to", DeprecationWarning)
    import torch.fx.experimental.optimization  # defines TorchScript modules (torch.utils.mkldnn) on import

# name -> a layer over 3 channels of a 4-D input.
LAYERS = {
    "torch": lambda: nn.BatchNorm2d(3),
    "L1": lambda: nd.L1BatchNorm2d(3),
    "Linf_k1": lambda: nd.LinfBatchNorm2d(3),
    "Linf_k3": lambda: nd.LinfBatchNorm2d(3, k=3),
    "L1_fused": lambda: nd.L1BatchNormAct2d(3),
    "Linf_fused": lambda: nd.LinfBatchNormAct2d(3, k=2, activation="leaky_relu"),
}

# The example batch of the trace, then other batch sizes (a different n must change running_var's n / (n - 1) and
# L∞'s constant c(n, k) in the traced graph).
BATCHES = [(4, 3, 5, 5), (6, 3, 2, 3), (2, 3, 4, 4), (4, 3, 5, 5)]


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), LAYERS[name]()).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def _trace(model, example):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, example)
    return traced, [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


def _step(model, x, grad):
    x = x.detach().requires_grad_()
    y = model(x)
    params = list(model.parameters())
    return (y.detach(), *torch.autograd.grad(y, [x, *params], grad))


@pytest.mark.parametrize("name", list(LAYERS))
def test_jit_trace_in_training_matches_eager_over_steps_and_batch_sizes(one_thread, name):
    model, twin = _model(name), _model(name)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn((n, 2, *rest), dtype=torch.float64, generator=generator) for n, _, *rest in BATCHES]
    # Tracing runs the model (a few times: torch checks the trace); the twin starts from the state it leaves.
    traced, _ = _trace(model, batches[0])
    twin.load_state_dict(model.state_dict())
    for x in batches:
        grad = torch.randn((x.shape[0], 3, *x.shape[2:]), dtype=torch.float64, generator=generator)
        for got, expected in zip(_step(traced, x, grad), _step(twin, x, grad)):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
        for key, expected in twin.state_dict().items():
            # running_var to 1e-13 relative: n / (n - 1) computed in float32 would be 1.5e-8 off.
            torch.testing.assert_close(traced.state_dict()[key], expected, rtol=1e-13, atol=0, msg=key)


@pytest.mark.parametrize("name", ["L1", "Linf_k3"])
def test_traced_training_graph_saves_loads_and_follows_the_batch_size(one_thread, name):
    # The training graph is made of torch ops (no call back into Python), so torch.jit.save takes it; loaded, it
    # computes for batch sizes other than the example's.
    model, twin = _model(name), _model(name)
    traced, caught = _trace(model, torch.randn(4, 2, 5, 5, dtype=torch.float64))
    ours = [w for w in caught if "normdecouple" in w.filename]
    assert not ours, [str(w.message) for w in ours]  # nothing of the example baked into the graph
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    twin.load_state_dict(loaded.state_dict())
    x = torch.randn(7, 2, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), twin(x), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(loaded.state_dict(), twin.state_dict(), rtol=1e-13, atol=0)


def test_jit_trace_with_cumulative_momentum_behaves_as_torchs(one_thread):
    # momentum=None: torch's layer computes 1 / num_batches_tracked on the host, so the graphs of two trace runs
    # differ and torch.jit.trace's own check fails; without the check the example's factor is kept. Ours does the
    # same. running_mean follows the batch mean in both, so the two traced layers must agree.
    torch.manual_seed(0)
    ours, torchs = nd.L1BatchNorm2d(3, momentum=None).double(), nn.BatchNorm2d(3, momentum=None).double()
    example = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    for layer in (ours, torchs):
        with pytest.raises(torch.jit.TracingCheckError, match="Graphs differed across invocations"):
            _trace(layer, example)
    ours.load_state_dict(torchs.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced_ours = torch.jit.trace(ours, example, check_trace=False)
        traced_torch = torch.jit.trace(torchs, example, check_trace=False)
    for _ in range(3):
        x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
        traced_ours(x)
        traced_torch(x)
        torch.testing.assert_close(ours.running_mean, torchs.running_mean, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ["torch", "L1", "Linf_k3", "L1_fused"])
def test_jit_trace_in_eval_is_torchs_eval(one_thread, name):
    model = _model(name)
    for _ in range(2):
        model(torch.randn(5, 2, 4, 4, dtype=torch.float64))
    model.eval()
    traced, _ = _trace(model, torch.randn(2, 2, 4, 4, dtype=torch.float64))
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [nd.L1BatchNorm2d, nd.LinfBatchNorm2d])
def test_jit_trace_with_low_precision_computes_the_statistics_in_float32(one_thread, cls):
    # The traced training graph is the differentiable form, whose statistics run in float32 also for
    # low_precision=True (documented): the eager low-precision layer within bf16 rounding.
    torch.manual_seed(0)
    layer, twin = cls(3, low_precision=True).bfloat16(), cls(3, low_precision=True).bfloat16()
    x = torch.randn(8, 3, 4, 4).bfloat16()
    traced, _ = _trace(layer, x)
    twin.load_state_dict(layer.state_dict())
    torch.testing.assert_close(traced(x), twin(x), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(traced.state_dict(), twin.state_dict(), rtol=1e-2, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# torch.jit.script


class _ReluBatchNorm(nn.BatchNorm2d):
    """A user's BatchNorm subclass with its own forward (timm's BatchNormAct2d pattern)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def _scriptable_model():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))


@pytest.mark.parametrize("layer", [
    nd.L1BatchNorm2d(3), nd.LinfBatchNorm2d(3, k=2), nd.L1BatchNormAct2d(3), nd.SyncLinfBatchNorm(3),
    nd.convert_batchnorm(_ReluBatchNorm(3)),
], ids=["L1", "Linf", "fused", "sync", "converted_subclass"])
def test_jit_script_names_revert_batchnorm(layer):
    model = nn.Sequential(nn.Conv2d(2, 3, 3), layer)
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile.*revert_batchnorm\(model\.eval\(\)\)"):
        torch.jit.script(model)


def test_jit_script_of_unconverted_and_reverted_models_is_torchs():
    # torch's own layers script (the reference); an unconverted model is untouched by us, and the documented
    # export path, revert_batchnorm, gives a model that scripts with our eval outputs.
    torch.manual_seed(0)
    model = _scriptable_model().double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    model.eval()
    torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=0, atol=0)

    converted = nd.convert_batchnorm(model.train(), norm="linf", k=2)
    for _ in range(3):
        converted(torch.randn(6, 2, 5, 5, dtype=torch.float64))
    converted.eval()
    expected = converted(x)
    scripted = torch.jit.script(nd.revert_batchnorm(converted))
    torch.testing.assert_close(scripted(x), expected, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------------------------------------
# Folding BatchNorm into convolutions


def _fused_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()).double()
    model = nd.convert_batchnorm(model, fuse_activation=True, example_inputs=(torch.randn(2, 2, 4, 4).double(),))
    assert isinstance(model[1], nd.L1BatchNormAct2d)
    for _ in range(3):
        model(torch.randn(6, 2, 4, 4, dtype=torch.float64))
    return model.eval()


def test_revert_then_fold_keeps_the_eval_outputs():
    # The deployment path of the README: revert_batchnorm (BatchNorm + the very activation module back), then
    # fold each BatchNorm into its convolution with torch's FX pass.
    model = _fused_model()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    expected = model(x)
    folded = torch.fx.experimental.optimization.fuse(nd.revert_batchnorm(model))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)


def test_fuse_conv_bn_eval_reads_only_the_statistics_as_the_fused_layers_document():
    # torch.nn.utils.fusion.fuse_conv_bn_eval accepts any _BatchNorm and reads only its running statistics and
    # affine parameters: for a fused layer it folds the normalisation and drops the activation. We cannot
    # intercept it; the fused layers' docstring says so and names the path that works.
    model = _fused_model()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    folded = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])
    plain = nn.BatchNorm2d(3).double().eval()
    plain.load_state_dict(model[1].state_dict())
    torch.testing.assert_close(folded(x), plain(model[0](x)), rtol=1e-12, atol=1e-12)
    assert (folded(x) < 0).any() and not (model(x) < 0).any()  # the ReLU is gone
    for doc in (nd.L1BatchNormAct2d.__doc__, nd.batchnorm_act.__doc__):
        assert "fuse_conv_bn_eval" in doc and "revert_batchnorm" in doc
