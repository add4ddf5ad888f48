"""How much error Winograd convolutions of several tile sizes make when their transformed inputs and
filters are rounded to bf16 (as attend's bf16 products round their operands), against a direct
convolution, on random 64-channel tiles. Prints, per tile size and interpolation points, the
largest and mean error relative to the output's largest value, and the float64 error (which
checks the matrices). The matrices are built by Cook-Toom from the points (plus the point at
infinity). Needs numpy.

Usage: python scripts/winograd_bf16_error.py [trials]
"""

import sys

import numpy as np
from numpy.polynomial import polynomial as poly


def to_bf16(values):
    """float64 -> nearest bf16 (ties to even), returned as float64."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def cook_toom(outputs, taps, points):
    """A^T (outputs x n), G (n x taps), B^T (n x n) for F(outputs, taps), n = len(points) + 1."""
    n = len(points) + 1
    a_t, g, b_t = np.zeros((outputs, n)), np.zeros((n, taps)), np.zeros((n, n))
    for j, p in enumerate(points):
        a_t[:, j] = [p**i for i in range(outputs)]
        others = [q for q in points if q != p]
        g[j] = [p**k / np.prod([p - q for q in others]) for k in range(taps)]
        product = np.array([1.0])
        for q in others:
            product = poly.polymul(product, [-q, 1])
        b_t[j, : len(product)] = product
    a_t[outputs - 1, n - 1] = 1
    g[n - 1, taps - 1] = 1
    full = np.array([1.0])
    for q in points:
        full = poly.polymul(full, [-q, 1])
    b_t[n - 1, : len(full)] = full
    return a_t, g, b_t


def winograd(tile, weights, matrices, rounded):
    """tile [C, n, n], weights [O, C, 3, 3] -> [O, m, m]."""
    a_t, g, b_t = matrices
    transformed = np.einsum("ij,cjk,lk->cil", b_t, tile, b_t)
    filters = np.einsum("ij,ocjk,lk->ocil", g, weights, g)
    if rounded:
        transformed, filters = to_bf16(transformed), to_bf16(filters)
    products = np.einsum("ocil,cil->oil", filters, transformed)
    return np.einsum("ij,ojk,lk->oil", a_t, products, a_t)


def direct(tile, weights, m):
    out = np.zeros((weights.shape[0], m, m))
    for y in range(m):
        for x in range(m):
            out[:, y, x] = np.einsum("ocab,cab->o", weights, tile[:, y : y + 3, x : x + 3])
    return out


def main():
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    rng = np.random.default_rng(1)
    channels = 64
    cases = [
        (2, [0, 1, -1]),
        (3, [0, 1, -1, 2]),
        (3, [0, 1, -1, 0.5]),
        (4, [0, 1, -1, 2, -2]),
        (4, [0, 1, -1, 0.5, -0.5]),
    ]
    for m, points in cases:
        matrices = cook_toom(m, 3, points)
        relative, exact = [], []
        for _ in range(trials):
            tile = rng.standard_normal((channels, m + 2, m + 2))
            weights = rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(channels * 9)
            reference = direct(tile, weights, m)
            exact.append(np.abs(winograd(tile, weights, matrices, False) - reference).max())
            error = np.abs(winograd(tile, weights, matrices, True) - reference).max()
            relative.append(error / np.abs(reference).max())
        print(
            f"F({m}x{m}, 3x3) points {points}: bf16 max {max(relative):.2%} "
            f"mean {np.mean(relative):.2%}; float64 error {max(exact):.1e}"
        )
    relative = []
    for _ in range(trials):
        tile = rng.standard_normal((channels, 4, 4))
        weights = rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(channels * 9)
        reference = direct(tile, weights, 2)
        rounded = direct(to_bf16(tile), to_bf16(weights), 2)
        relative.append(np.abs(rounded - reference).max() / np.abs(reference).max())
    print(f"direct, bf16 operands: max {max(relative):.2%} mean {np.mean(relative):.2%}")


if __name__ == "__main__":
    main()
