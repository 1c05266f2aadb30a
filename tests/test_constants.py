"""c(n, k): the exact expected top-k mean of |standard normal| samples, against independent computations."""

import math

import pytest
import torch

from normdecouple.functional import L1_SCALE, topk_constant


def _order_statistics_integral(n: int, k: int) -> float:
    """Direct definition: mean over j <= k of E[j-th largest of n half-normals], by the trapezoid rule."""
    x = torch.linspace(0.0, 12.0, 600001, dtype=torch.float64)
    cdf = torch.erf(x / math.sqrt(2.0))
    pdf = math.sqrt(2.0 / math.pi) * torch.exp(-0.5 * x * x)
    total = 0.0
    for j in range(1, k + 1):
        log_coef = math.lgamma(n + 1) - math.lgamma(j) - math.lgamma(n - j + 1)
        density = math.exp(log_coef) * cdf ** (n - j) * (1.0 - cdf) ** (j - 1) * pdf
        total += torch.trapezoid(x * density, x).item()
    return total / k


@pytest.mark.parametrize("n,k", [(2, 1), (3, 2), (7, 1), (10, 3), (50, 7), (64, 63), (100, 1)])
def test_matches_order_statistics_integral(n, k):
    # Measured differences are at most ~4e-14 (the trapezoid reference's own error included).
    assert topk_constant(n, k) == pytest.approx(_order_statistics_integral(n, k), rel=1e-13)


def test_closed_forms():
    # E max(|Z1|, |Z2|) = 2 / sqrt(pi); the mean of all n values has expectation E|Z| = sqrt(2 / pi).
    assert topk_constant(2, 1) == pytest.approx(2.0 / math.sqrt(math.pi), rel=1e-12)
    # k = n: the mean of all n values has expectation E|Z| = sqrt(2 / pi); checked against the direct sum of
    # the 37 order statistics (each a trapezoid integral, hence the looser tolerance), not against the shortcut.
    assert topk_constant(37, 37) == pytest.approx(_order_statistics_integral(37, 37), rel=1e-9)
    assert _order_statistics_integral(37, 37) == pytest.approx(1.0 / L1_SCALE, rel=1e-9)
    # Next to the shortcut, the general quadrature must agree with the order statistics too.
    assert topk_constant(37, 36) == pytest.approx(_order_statistics_integral(37, 36), rel=1e-13)
    # The mean of the top half is E[|Z| | |Z| > median] = 2 phi(m) / (1/2), m the half-normal median.
    m = 0.6744897501960817
    expected = 2.0 * math.exp(-0.5 * m * m) / math.sqrt(2.0 * math.pi) / 0.5
    assert topk_constant(10**8, 5 * 10**7) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n,k", [(16, 1), (16, 4), (1000, 8), (4096, 1)])
def test_matches_monte_carlo(n, k):
    gen = torch.Generator().manual_seed(1234)
    trials = 4000
    samples = torch.randn(trials, n, generator=gen, dtype=torch.float64).abs().topk(k, dim=1).values.mean(dim=1)
    stderr = samples.std().item() / math.sqrt(trials)
    assert abs(topk_constant(n, k) - samples.mean().item()) < 5 * stderr


def test_monotone_and_large_n():
    values = [topk_constant(n, 1) for n in (10, 100, 10**4, 10**6, 10**9)]
    assert values == sorted(values)
    # The maximum of n half-normals lies near the (1 - 1/(2n)) normal quantile, the location of the Gumbel
    # limit, and slightly above it (by Euler's constant over that quantile).
    location = -torch.special.ndtri(torch.tensor(0.5e-9, dtype=torch.float64)).item()
    assert location < values[-1] < location + 0.5772 / location + 0.01
    assert all(math.isfinite(topk_constant(10**9, k)) for k in (1, 8, 10**9 - 1))


def test_scale_estimates_biased_std():
    # PAPER.md §2: top-k mean / c(n, k) estimates sqrt((n-1)/n) sigma, within 0.2% for n >= 16, k in {1, 4}:
    # the bias is asserted at 0.2% plus five standard errors of this Monte Carlo mean.
    gen = torch.Generator().manual_seed(7)
    n, trials, sigma = 64, 20000, 3.0
    x = sigma * torch.randn(trials, n, generator=gen, dtype=torch.float64)
    d = (x - x.mean(dim=1, keepdim=True)).abs()
    for k in (1, 4):
        s = d.topk(k, dim=1).values.mean(dim=1) / topk_constant(n, k)
        target = sigma * math.sqrt((n - 1) / n)
        stderr = s.std().item() / math.sqrt(trials)
        assert abs(s.mean().item() - target) <= 0.002 * target + 5 * stderr


def test_cached():
    topk_constant(12345, 3)
    from normdecouple._constants import _topk_constant_cached

    hits = _topk_constant_cached.cache_info().hits
    topk_constant(12345, 3)
    assert _topk_constant_cached.cache_info().hits == hits + 1


@pytest.mark.parametrize(
    "n,k,error,match",
    [(5, 0, ValueError, "at least 1"), (5, 6, ValueError, "k=6 exceeds"), (5.0, 1, TypeError, "integers")],
)
def test_bad_arguments(n, k, error, match):
    with pytest.raises(error, match=match):
        topk_constant(n, k)
