"""GPU-only behaviour of the Triton path that the interpreter cannot show (``pytest -m gpu``; skipped without CUDA).

No host synchronisation in a training step (``torch.cuda.set_sync_debug_mode("error")``), CUDA-graph capture of
forward+backward replayed against eager, the device guard for a tensor on a second GPU, and realistic large
shapes (a ResNet stage at batch 256, a launch grid above 65535 programs) against the PyTorch backend.
``benchmarks/gpu_check.py`` runs these with the rest of the GPU validation (issue 18).
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normdecouple as nd

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
        reason="needs a CUDA device (and Triton compiling for it, not its interpreter)",
    ),
]


@pytest.fixture(autouse=True)
def _triton():
    pytest.importorskip("triton", reason="Triton is not installed (pip install 'normdecouple[triton]')")


def _convnet(norm, k, fuse):
    # Two BatchNorms: 16384 values per channel at batch 16, 32x32 (streaming kernels), then 4096 (persistent).
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    kwargs = {} if norm == "l1" else {"k": k}
    return nd.convert_batchnorm(net, norm, backend="triton", fuse_activation=fuse, **kwargs).cuda()


NETS = [("l1", 1, False), ("linf", 8, True)]


@pytest.mark.parametrize("norm,k,fuse", NETS)
def test_training_step_has_no_host_sync(norm, k, fuse):
    net = _convnet(norm, k, fuse)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 3, 32, 32, device="cuda")
    target = torch.randint(0, 10, (16,), device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), target).backward()
        optimizer.step()

    for _ in range(2):  # compiles the kernels and creates the momentum buffers
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        # The mode does flag a synchronising call here, so the step above really had none.
        with pytest.raises(RuntimeError, match="synchroniz"):
            torch.ones(1, device="cuda").item()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("norm,k,fuse", NETS)
def test_cuda_graph_capture_matches_eager(norm, k, fuse, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    net = _convnet(norm, k, fuse)
    static_x = torch.randn(16, 3, 32, 32, device="cuda")
    static_t = torch.randint(0, 10, (16,), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(static_x), static_t).backward()
    torch.cuda.current_stream().wait_stream(side)
    eager = copy.deepcopy(net)
    net.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = net(static_x)
        F.cross_entropy(static_out, static_t).backward()
    for _ in range(2):  # replays see new inputs, and the running statistics advance in both
        x, t = torch.randn_like(static_x), torch.randint_like(static_t, 10)
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        out = eager(x)
        F.cross_entropy(out, t).backward()
        torch.testing.assert_close(static_out, out)
        for p, q in zip(net.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        for a, b in zip(net.buffers(), eager.buffers()):
            torch.testing.assert_close(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("cls,kwargs", [(nd.L1BatchNorm2d, {}), (nd.LinfBatchNorm2d, {"k": 4}),
                                        (nd.L1BatchNormAct2d, {})])
def test_tensor_on_second_gpu(cls, kwargs):
    # cuda:0 current, everything on cuda:1: the kernels must run on the tensors' device, not the current one.
    results = []
    for backend, current in (("triton", 0), ("torch", 1)):
        torch.manual_seed(0)
        with torch.cuda.device(current):
            layer = cls(16, backend=backend, **kwargs).to("cuda:1")
            x = torch.randn(8, 16, 12, 12, device="cuda:1", requires_grad=True)
            y = layer(x)
            grads = torch.autograd.grad(y, [x, layer.weight, layer.bias], torch.ones_like(y))
            assert torch.cuda.current_device() == current
        assert y.device == torch.device("cuda", 1)
        results.append((y, *grads, layer.running_mean, layer.running_var))
    torch.cuda.synchronize(1)
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls,kwargs", [(nd.L1BatchNorm2d, {}), (nd.LinfBatchNorm2d, {"k": 8})])
@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_stage_at_batch_256(cls, kwargs, channels_last):
    # ResNet-50's first BatchNorm at batch 256 in fp16 (fp32 parameters, as under autocast): 802816 values per
    # channel, many programs per channel.
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(256, 64, 56, 56, device="cuda", dtype=torch.float16).contiguous(memory_format=memory_format)
    dy = torch.randn_like(x)
    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(1)
        layer = cls(64, backend=backend, **kwargs).cuda()
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
        xi = x.clone().requires_grad_()
        y = layer(xi)
        grads = torch.autograd.grad(y, [xi, layer.weight, layer.bias], dy)
        if backend == "triton":
            assert y.is_contiguous(memory_format=memory_format)
        results.append((y, *grads, layer.running_mean, layer.running_var))
    for ours, theirs in zip(*results):
        scale = theirs.abs().max().item() + 1.0  # gradients are sums over a channel
        torch.testing.assert_close(ours.float(), theirs.float(), atol=4e-3 * scale, rtol=4e-3)


def test_low_precision_grid_above_65535_programs():
    # (512, 64, 112, 112) channels_last with low_precision: one program per block puts about 10^5 programs on a
    # grid axis (issue 18 item 3). Compared channel-wise with the PyTorch backend's low-precision path.
    x = torch.randn(512, 64, 112, 112, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    results = []
    for backend in ("triton", "torch"):
        layer = nd.L1BatchNorm2d(64, backend=backend, low_precision=True).cuda()
        y = layer(x)
        results.append((y, layer.running_mean, layer.running_var))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours.float(), theirs.float(), atol=6e-2, rtol=6e-2)
