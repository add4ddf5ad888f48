#!/usr/bin/env python3
"""Fits the rational approximation of erf used by the GELU kernel (src/kernels/simd.rs, fast_erf):
erf(x) ~ x P(x^2) / Q(x^2) on [0, 3.93], P of degree 5 and Q of degree 5 in x^2 with Q(0) = 1.
Linearised least squares (f Q - x P = 0), reweighted by 1/Q and towards equal ripple; prints the
best fit's own error, its error evaluated in f32 with f32 coefficients, and the coefficients.
Needs numpy and mpmath.  Usage: python3 scripts/fit_erf.py
"""
import math

import mpmath
import numpy as np

LIMIT = 3.93
NUMERATOR, DENOMINATOR = 6, 5


def fit(xs, f, iterations=60):
    z = xs * xs
    weights = np.ones_like(xs)
    best = None
    for _ in range(iterations):
        a = np.zeros((len(xs), NUMERATOR + DENOMINATOR))
        for k in range(NUMERATOR):
            a[:, k] = xs * z**k
        for k in range(1, DENOMINATOR + 1):
            a[:, NUMERATOR + k - 1] = -f * z**k
        coefficients, *_ = np.linalg.lstsq(a * weights[:, None], f * weights, rcond=None)
        p = coefficients[:NUMERATOR]
        q = np.concatenate([[1.0], coefficients[NUMERATOR:]])
        q_values = np.polyval(q[::-1], z)
        error = xs * np.polyval(p[::-1], z) / q_values - f
        worst = np.abs(error).max()
        if best is None or worst < best[0]:
            best = (worst, p, q)
        weights = weights * np.sqrt(np.abs(error) / worst + 1e-3) / np.abs(q_values)
        weights /= weights.max()
    return best


def in_f32(p, q, x):
    x = np.minimum(np.float32(x), np.float32(LIMIT))
    z = np.float32(x * x)
    numerator = np.float32(p[-1])
    for c in p[-2::-1]:
        numerator = np.float32(numerator * z + np.float32(c))
    denominator = np.float32(q[-1])
    for c in q[-2::-1]:
        denominator = np.float32(denominator * z + np.float32(c))
    return np.minimum(np.float32(np.float32(x * numerator) / denominator), np.float32(1))


def main():
    xs = np.concatenate(
        [np.cos(np.linspace(0, np.pi, 3000)) * LIMIT / 2 + LIMIT / 2, np.linspace(0, LIMIT, 3000)]
    )
    f = np.array([float(mpmath.erf(x)) for x in xs])
    worst, p, q = fit(xs, f)
    t = np.linspace(0, 6, 300001).astype(np.float32)
    exact = np.array([math.erf(float(x)) for x in t])
    print(f"fit error {worst:.3g}, in f32 {np.abs(in_f32(p, q, t) - exact).max():.3g}")
    print("P:", [float(np.float32(v)) for v in p])
    print("Q:", [float(np.float32(v)) for v in q])


if __name__ == "__main__":
    main()
