"""Holds the dumps of bench/fused_kernel_timing.cu (its DUMP argument) against a float64 NS5 (the standard iteration,
KellerJordan/Muon's coefficients, 5 steps): relative Frobenius distance per matrix, and whether
every element was written (the outputs start as NaN).

    python bench/fused_kernel_check.py BATCH M N DUMP [DUMP...]

bf16 operands through 5 steps land within about 1e-2 of the float64 iteration (tests/test_ns5_cuda.py
states the budget); the Gram iteration's restarts add a few 1e-3.
"""
import sys

import numpy as np

JORDAN = (3.4445, -4.7750, 2.0315)


def ns5_float64(G: np.ndarray, steps: int = 5) -> np.ndarray:
    X = G / (np.linalg.norm(G, axis=(-2, -1), keepdims=True) + 1e-7)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.swapaxes(-1, -2)
    a, b, c = JORDAN
    for _ in range(steps):
        A = X @ X.swapaxes(-1, -2)
        X = a * X + (b * A + c * A @ A) @ X
    return X.swapaxes(-1, -2) if tall else X


def main() -> None:
    batch, m, n = map(int, sys.argv[1:4])
    count = batch * m * n
    for path in sys.argv[4:]:
        data = np.fromfile(path, dtype=np.float32).astype(np.float64)
        G, out = data[:count].reshape(batch, m, n), data[count:2 * count].reshape(batch, m, n)
        ref = ns5_float64(G)
        err = np.linalg.norm(out - ref, axis=(-2, -1)) / np.linalg.norm(ref, axis=(-2, -1))
        print(f"{path}: all written {bool(np.isfinite(out).all())}, distance to float64 NS5: "
              f"max {err.max():.4f}, mean {err.mean():.4f}")


if __name__ == "__main__":
    main()
