"""In-place ops on a layer's output, as every ResNet does after a BatchNorm (``out += identity``,
``ReLU(inplace=True)``).

torch's BatchNorm returns a new tensor, never a view, so such ops are allowed after it. An autograd.Function whose
output is a view of one of its intermediates makes them fail ("Output 0 of ... is a view and is being modified
inplace"): every layer here must return a tensor of its own. The oracle is the same computation written out of
place (a new tensor per op), whose values and gradients the in-place one must reproduce exactly.
"""

import pytest
import torch
from torch import nn

import normdecouple as nd

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# name -> (layer rank, input shape, memory format or "slice"). Shapes are small, with odd sizes; the strided slice
# is a layout that is neither contiguous nor channels_last.
LAYOUTS = {
    "1d_NC": (1, (6, 5), torch.contiguous_format),
    "1d_NCL": (1, (3, 5, 4), torch.contiguous_format),
    "2d_NCHW": (2, (3, 5, 4, 3), torch.contiguous_format),
    "2d_channels_last": (2, (3, 5, 4, 3), torch.channels_last),
    "2d_slice": (2, (3, 5, 4, 6), "slice"),
    "3d_NCDHW": (3, (2, 5, 3, 2, 3), torch.contiguous_format),
    "3d_channels_last": (3, (2, 5, 3, 2, 3), torch.channels_last_3d),
}

# (norm, k): L1, the plain maximum and a top-k.
NORMS = [("l1", 1), ("linf", 1), ("linf", 3)]


def _input(layout, dtype, seed=0):
    _, shape, memory_format = LAYOUTS[layout]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if memory_format == "slice":
        return x[..., ::2]
    return x.contiguous(memory_format=memory_format)


def _layer(norm, k, dim, dtype, **kw):
    torch.manual_seed(1)
    if norm == "l1":
        layer = getattr(nd, f"L1BatchNorm{dim}d")(5, **kw)
    else:
        layer = getattr(nd, f"LinfBatchNorm{dim}d")(5, k=k, **kw)
    with torch.no_grad():  # parameters away from 1 and 0, so that their gradients are not trivial
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer.to(dtype)


def _run(layer, x, residual, grad, op):
    """One training step through ``layer`` and ``op``; returns the output and the gradients of the input, the
    residual and the parameters. ``op`` ends in ``_inplace`` or ``_out_of_place`` (the oracle)."""
    x = x.detach().requires_grad_()
    residual = residual.detach().requires_grad_()
    y = layer(x)
    if op == "add_inplace":
        y += residual
    elif op == "add_out_of_place":
        y = y + residual
    elif op == "relu_inplace":
        y = nn.ReLU(inplace=True)(y)
    elif op == "relu_out_of_place":
        y = nn.ReLU()(y)
    elif op == "block_inplace":  # a ResNet block's tail: out += identity; out = relu(out) in place
        y += residual
        y.relu_()
    else:
        y = torch.relu(y + residual)
    grads = torch.autograd.grad(y, [x, residual, layer.weight, layer.bias], grad, allow_unused=True)
    return y.detach(), grads


@pytest.mark.parametrize("norm,k", NORMS)
@pytest.mark.parametrize("low_precision", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_ops_after_the_layer_equal_out_of_place(one_thread, dtype, layout, low_precision, norm, k):
    dim = LAYOUTS[layout][0]
    layer = _layer(norm, k, dim, dtype, low_precision=low_precision)
    x = _input(layout, dtype)
    residual = torch.randn(x.shape).to(dtype)
    grad = torch.randn(x.shape).to(dtype)

    y = layer(x.detach().requires_grad_())
    # torch's BatchNorm returns a tensor of its own (no view of another tensor); so must ours.
    assert y._base is None

    for op in ("add", "relu", "block"):
        y_in, grads_in = _run(layer, x, residual, grad, f"{op}_inplace")
        y_out, grads_out = _run(layer, x, residual, grad, f"{op}_out_of_place")
        torch.testing.assert_close(y_in, y_out, rtol=0, atol=0, msg=op)
        for got, expected in zip(grads_in, grads_out):
            if expected is None:  # the residual of the ReLU-only op
                assert got is None
            else:
                torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=op)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("low_precision", [False, True])
@pytest.mark.parametrize("cls", [nd.L1BatchNormAct2d, nd.LinfBatchNormAct2d])
def test_fused_layer_with_inplace_op_after_it_behaves_as_torchs_relu(one_thread, cls, low_precision, dtype):
    # The fused layers save their output for the backward, as torch's ReLU does: an in-place op after them is then
    # refused at backward with torch's own error, as after BatchNorm2d + ReLU; never the view error, and an
    # out-of-place op after them is fine.
    x = _input("2d_channels_last", dtype).requires_grad_()
    fused = cls(5, low_precision=low_precision).to(dtype)
    torch_block = nn.Sequential(nn.BatchNorm2d(5), nn.ReLU()).to(dtype)
    for block in (fused, torch_block):
        y = block(x)
        assert y._base is None
        y += 1
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.float().sum().backward()
    y = fused(x) + 1
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("norm", ["l1", "linf"])
@pytest.mark.parametrize("low_precision,dtype", [(False, torch.float64), (True, torch.bfloat16)])
def test_synchronised_function_output_allows_inplace_ops(tmp_path, norm, low_precision, dtype):
    # The synchronised Function (in a group of one process: the layer itself would take the unsynchronised path)
    # returns a tensor of its own too; in-place and out-of-place ops after it give the same gradients.
    import torch.distributed as dist

    from normdecouple.distributed import SyncLpBatchNormFunction
    from normdecouple.stats import Norm

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x0 = _input("2d_channels_last", dtype)
        grad = torch.randn(x0.shape).to(dtype)

        def run(inplace):
            x = x0.detach().requires_grad_()
            y = SyncLpBatchNormFunction.apply(x, None, None, 1e-5, Norm(norm), 2, low_precision, dist.group.WORLD,
                                              1)[0]
            assert y._base is None
            if inplace:
                y += 1
                y.relu_()
            else:
                y = torch.relu(y + 1)
            return y.detach(), torch.autograd.grad(y, x, grad)[0]

        for got, expected in zip(run(True), run(False)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_hugging_face_resnet_trains_in_bf16_with_low_precision_layers():
    # The report's case: HF's ResNet does `hidden_state += residual` and an in-place ReLU after BatchNorms.
    # Oracle: the same model with every normdecouple output cloned by a forward hook (then the in-place ops act
    # on the clones): identical loss and parameter gradients.
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="bottleneck", num_labels=3)
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config)
    model = nd.convert_batchnorm(model, norm="l1", low_precision=True).to(torch.bfloat16).train()
    pixels = torch.randn(4, 3, 16, 16).to(torch.bfloat16)
    labels = torch.tensor([0, 1, 2, 1])

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    loss, grads = step()
    hooks = [m.register_forward_hook(lambda _m, _i, out: out.clone())
             for m in model.modules() if isinstance(m, nd.LpBatchNorm)]
    try:
        loss_ref, grads_ref = step()
    finally:
        for hook in hooks:
            hook.remove()
    assert len(hooks) > 0
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
