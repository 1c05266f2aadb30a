"""Shared fixtures: deterministic seeds and a fresh 'warn once' state for every test."""

import os

import pytest
import torch

# Triton decides at decoration time whether its kernels are compiled or interpreted, and any test may import
# them first (a dispatch test, a doctest): without a GPU, switch the interpreter on before any test runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import normdecouple.functional as functional


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_warning_state(monkeypatch):
    """Lets a test see the once-per-process non-finite warning again."""
    monkeypatch.setattr(functional, "_nonfinite_warned", False)


# (dtype, atol, rtol) against the float64 reference: float32 loses ~1e-6 relative per op over a few reductions;
# half precision inputs are compared after one rounding of the output to 11 (fp16) or 8 (bf16) significant bits.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: threads gain nothing there, and on a busy 2-core machine
    a parallel region waiting for a descheduled thread costs a scheduler quantum per op (seconds per test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_against_reference(x, norm, k, *, affine=True, momentum=0.1, low_precision=False, tol=None,
                             backend="auto", param_dtype=None):
    """One training step of ``normdecouple.functional`` against the float64 reference.

    Checks the output (dtype, shape, and the input's layout), the updated running statistics and the input and
    parameter gradients. ``param_dtype`` is the dtype of weight and bias (default: the input's).
    """
    from normdecouple._reference import reference_batch_norm
    from normdecouple.functional import l1_batch_norm, linf_batch_norm

    c = x.shape[1]
    device = x.device
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    param_dtype = param_dtype or x.dtype
    weight = torch.empty(c, dtype=param_dtype, device=device).uniform_(0.5, 1.5) if affine else None
    bias = torch.randn(c, dtype=param_dtype, device=device) if affine else None
    rm = torch.randn(c, dtype=stat_dtype, device=device)
    rv = torch.rand(c, dtype=stat_dtype, device=device) + 0.5
    grad = torch.randn(x.shape, dtype=x.dtype, device=device)

    def leaves_of(x, weight, bias, dtype=None):
        return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_()
                for t in (x, weight, bias)]

    ref_leaves = leaves_of(x, weight, bias, torch.float64)
    rm64, rv64 = rm.to(torch.float64), rv.to(torch.float64)
    y64 = reference_batch_norm(*ref_leaves[:1], rm64, rv64, *ref_leaves[1:], True, momentum, 1e-5, norm=norm, k=k)
    ref_grads = torch.autograd.grad(y64, [t for t in ref_leaves if t is not None], grad.to(torch.float64))

    leaves = leaves_of(x, weight, bias)
    fn = l1_batch_norm if norm == "l1" else (lambda *a, **kw: linf_batch_norm(*a, k=k, **kw))
    y = fn(leaves[0], rm, rv, leaves[1], leaves[2], training=True, momentum=momentum, low_precision=low_precision,
           backend=backend)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad)

    atol, rtol = tol or TOLERANCES[x.dtype]
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        # The output keeps the input's layout (the strides of size-1 dimensions mean nothing).
        assert [st for st, size in zip(y.stride(), x.shape) if size > 1] == [
            st for st, size in zip(x.stride(), x.shape) if size > 1
        ]
    torch.testing.assert_close(y.to(torch.float64), y64, atol=atol, rtol=rtol)
    torch.testing.assert_close(rm.to(torch.float64), rm64, atol=atol, rtol=rtol)
    torch.testing.assert_close(rv.to(torch.float64), rv64, atol=atol, rtol=rtol)
    for ours, ref, leaf in zip(grads, ref_grads, [t for t in leaves if t is not None]):
        assert ours.dtype == leaf.dtype
        # Gradients are sums over the channel: compared relative to their largest entry.
        scale = ref.abs().max().item() + 1.0
        torch.testing.assert_close(ours.to(torch.float64), ref, atol=atol * scale, rtol=rtol)
    return y


@pytest.fixture(scope="session")
def check_against_reference():
    """The function :func:`_check_against_reference` (a fixture, so that every test file shares one copy)."""
    return _check_against_reference
