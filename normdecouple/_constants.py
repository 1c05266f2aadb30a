"""The constants that make the L1 and L∞ scales estimate a standard deviation.

``L1_SCALE`` turns the mean absolute deviation into σ for Gaussian data; :func:`topk_constant` is c(n, k), the
expected mean of the k largest absolute values of n independent standard normal samples, which does the same
for the top-k mean of the L∞ scale.

References: arXiv:1803.01814 (Norm matters, §2)
"""

from __future__ import annotations

import functools
import math
import statistics

import numpy as np

__all__ = ["L1_SCALE", "topk_constant"]

#: sqrt(pi / 2): E|Z| = sqrt(2/pi) for Z ~ N(0, 1), so ``L1_SCALE * mean|d|`` estimates sigma.
L1_SCALE: float = math.sqrt(math.pi / 2.0)

# Quadrature settings for topk_constant: the integrand is smooth and log-concave in the logit variable, so a
# uniform Simpson grid over +-_HALF_WIDTH standard deviations of its peak is enough. Against the direct
# order-statistics integral (n <= 100) the relative difference is at most ~4e-14 (tests/test_constants.py
# asserts 1e-13); for large n (up to 1e9) the tests check closed forms, Monte Carlo and the Gumbel location.
_GRID_POINTS = 8001
_HALF_WIDTH = 40.0


def _validate(n: int, k: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"topk_constant expects integers n and k, got n={n!r} and k={k!r}")
    if k < 1:
        raise ValueError(f"topk_constant: k must be at least 1, got k={k}")
    if k > n:
        raise ValueError(
            f"topk_constant: k={k} exceeds the number of values n={n}; the top-k mean needs k <= n"
        )


@functools.lru_cache(maxsize=4096)
def _topk_constant_cached(n: int, k: int) -> float:
    if k == n:
        # The mean of all |Z_i| has expectation E|Z| = sqrt(2/pi) exactly.
        return 1.0 / L1_SCALE
    # E[sum of the k largest of n] = n * E[X 1{X among the k largest}]. With q(x) = P(|Z| > x) and the
    # half-normal density f(x) = 2 phi(x), this is n * int x f(x) P(Bin(n-1, q(x)) <= k-1) dx. Since
    # P(Bin(n-1, q) <= k-1) = int_q^1 Beta(t; k, n-k) dt, swapping the two integrals gives
    #     c(n, k) = (n / k) * E_{T ~ Beta(k, n-k)} [ 2 phi(x_T) ],   x_T = q^{-1}(T) = -ndtri(T / 2),
    # because int_{x_T}^inf x f(x) dx = 2 phi(x_T). T is integrated in the logit variable s = log(T/(1-T)),
    # where its density exp(k s - n softplus(s)) / B(k, n-k) is log-concave with mode log(k/(n-k)) and
    # standard deviation about sqrt(n / (k (n-k))).
    # numpy (single-threaded, so every call gives the same bits) and the standard library's normal quantile.
    mode = math.log(k / (n - k))
    width_left = _HALF_WIDTH * math.sqrt(1.0 / k + 1.0 / (n - k)) + _HALF_WIDTH / k
    width_right = _HALF_WIDTH * math.sqrt(1.0 / k + 1.0 / (n - k))
    s = np.linspace(mode - width_left, mode + width_right, _GRID_POINTS)
    log_norm = math.lgamma(n) - math.lgamma(k) - math.lgamma(n - k)
    log_density = log_norm + k * s - n * np.logaddexp(0.0, s)
    half_t = np.exp(-np.logaddexp(0.0, -s)) / 2.0
    quantile = statistics.NormalDist().inv_cdf
    x = -np.array([quantile(p) for p in half_t])
    two_phi = math.sqrt(2.0 / math.pi) * np.exp(-0.5 * x * x)
    weights = np.ones(_GRID_POINTS)
    weights[1:-1:2] = 4.0
    weights[2:-1:2] = 2.0
    density = np.exp(log_density)
    # Dividing by the integrated density removes the quadrature's normalisation error to first order.
    mass = np.sum(weights * density)
    expectation = np.sum(weights * density * two_phi) / mass
    return float(n / k * expectation)


def topk_constant(n: int, k: int = 1) -> float:
    r"""Expected mean of the k largest of n absolute values of independent standard normal samples.

    .. math::

        c(n, k) = \mathrm{E}\Big[\tfrac{1}{k} \sum_{j=1}^{k} |Z|_{(n-j+1)}\Big]
                = \frac{n}{k}\,\mathrm{E}_{T \sim \mathrm{Beta}(k,\, n-k)}\big[2\varphi(x_T)\big],
        \qquad P(|Z| > x_T) = T

    The second form follows from writing the sum of the k largest values as ``n`` times the mean of one value
    times the probability that at most ``k - 1`` of the others exceed it, and swapping the two integrals; it
    is a single smooth integral, evaluated by Simpson's rule in the logit of ``T`` on a grid centred on the
    peak of the Beta density. It agrees with the direct order-statistics integral to about 4e-14 (relative;
    the tests assert 1e-13) where that can be evaluated (n <= 100), with closed forms and with Monte Carlo; ``c(n, n) = sqrt(2/pi)``
    exactly.
    Values are cached per ``(n, k)``; each new pair costs about two milliseconds.

    Dividing the top-k mean of ``|x - mean|`` by ``c(n, k)`` estimates the batch's biased standard deviation
    for Gaussian data: within 0.2% for n >= 16 at k = 1 and 4, exactly when k = n; below n = 16 a small k runs
    low (about 6% at n = 4, k = 1) because deviations from the batch mean are correlated.

    Args:
        n: number of samples (values per channel). Must be ``>= k``.
        k: how many of the largest absolute values are averaged. Default: ``1`` (the maximum).

    Returns:
        ``c(n, k)`` as a Python float.

    Raises:
        TypeError: if ``n`` or ``k`` is not an integer.
        ValueError: if ``k < 1`` or ``k > n``.

    Example::

        >>> from normdecouple.functional import topk_constant
        >>> round(topk_constant(2, 1), 6)  # E max(|Z1|, |Z2|) = 2 / sqrt(pi)
        1.128379

    References: arXiv:1803.01814
    """
    _validate(n, k)
    return _topk_constant_cached(n, k)
