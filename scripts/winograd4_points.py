"""Which interpolation points give Winograd F(4x4, 3x3) in float32 the smallest error: builds the
Toom-Cook matrices (A^T, G, B^T, exact fractions) for every set of four points drawn from a
candidate list (plus 0 and infinity), runs random 6x6 tiles of C channels through the transform
in float32 (matrices rounded to float32 too), and prints the mean and worst error relative to
the largest output of a float64 direct convolution, best sets first, with the usual points
0, +-1, +-2 and F(2x2, 3x3) for comparison. attend's `kernels/winograd4.rs` uses the best set.

Usage: python3 scripts/winograd4_points.py [channels] [trials]   (needs numpy)
"""

import itertools
import sys
from fractions import Fraction as F

import numpy as np


def polynomial_product(a, b):
    result = [F(0)] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            result[i + j] += x * y
    return result


def toom_cook(points, outputs=4, taps=3):
    """A^T (outputs x n), G (n x taps), B^T (n x n) for the finite points and infinity."""
    n = outputs + taps - 1
    points = [F(p) for p in points]
    assert len(points) == n - 1
    a_t = [[p**i for p in points] + [F(int(i == outputs - 1))] for i in range(outputs)]
    g = []
    for j, p in enumerate(points):
        scale = F(1)
        for k, q in enumerate(points):
            if k != j:
                scale *= p - q
        g.append([p**k / scale for k in range(taps)])
    g.append([F(0)] * (taps - 1) + [F(1)])
    b_t = []
    for j in range(n - 1):
        row = [F(1)]
        for k, q in enumerate(points):
            if k != j:
                row = polynomial_product(row, [-q, F(1)])
        b_t.append(row + [F(0)] * (n - len(row)))
    row = [F(1)]
    for q in points:
        row = polynomial_product(row, [-q, F(1)])
    b_t.append(row)
    return a_t, g, b_t


def relative_error(a_t, g, b_t, channels, trials, outputs):
    size = len(b_t)
    a_t, g, b_t = (np.array(m, dtype=np.float64).astype(np.float32) for m in (a_t, g, b_t))
    rng = np.random.default_rng(1)
    errors = []
    for _ in range(trials):
        tile = rng.standard_normal((channels, size, size))
        weight = rng.standard_normal((channels, 3, 3)) * 0.1
        direct = np.zeros((outputs, outputs))
        for i in range(outputs):
            for j in range(outputs):
                direct[i, j] = (tile[:, i : i + 3, j : j + 3] * weight).sum()
        u = np.einsum("ij,cjk,lk->cil", g, weight.astype(np.float32), g).astype(np.float32)
        v = np.einsum("ij,cjk,lk->cil", b_t, tile.astype(np.float32), b_t).astype(np.float32)
        m = (u * v).sum(0, dtype=np.float32)
        y = (a_t @ m @ a_t.T).astype(np.float32)
        errors.append(np.abs(y - direct).max() / np.abs(direct).max())
    return float(np.mean(errors)), float(np.max(errors))


def main():
    channels = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    trials = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    f2 = (
        [[1, 1, 1, 0], [0, 1, -1, -1]],
        [[1, 0, 0], [F(1, 2), F(1, 2), F(1, 2)], [F(1, 2), F(-1, 2), F(1, 2)], [0, 0, 1]],
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    )
    print("F(2x2, 3x3): mean %.2e, worst %.2e" % relative_error(*f2, channels, trials, 2))
    usual = relative_error(*toom_cook([0, 1, -1, 2, -2]), channels, trials, 4)
    print("F(4x4, 3x3), points 0, 1, -1, 2, -2: mean %.2e, worst %.2e" % usual)
    candidates = [1, 2, 3, 4, F(1, 2), F(1, 3), F(1, 4), F(2, 3), F(3, 2)]
    candidates += [-c for c in candidates]
    results = []
    for chosen in itertools.combinations(candidates, 4):
        points = [0, *chosen]
        mean, worst = relative_error(*toom_cook(points), channels, trials, 4)
        results.append((mean, worst, ", ".join(str(p) for p in points)))
    results.sort()
    for mean, worst, points in results[:10]:
        print(f"F(4x4, 3x3), points {points}: mean {mean:.2e}, worst {worst:.2e}")


if __name__ == "__main__":
    main()
