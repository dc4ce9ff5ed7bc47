"""Holds the dumps of bench/fused_kernel_timing.cu (its DUMP argument) against the tests' float64
NS5 (tests/reference.py: the standard iteration, KellerJordan/Muon's coefficients, 5 steps), with
the tests' bf16 budget: relative Frobenius distance per matrix, and whether every element was
written (the outputs start as NaN).

    python bench/fused_kernel_check.py BATCH M N DUMP [DUMP...]
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from reference import budget_for, ns5_float64, rel_err  # noqa: E402


def main() -> None:
    batch, m, n = map(int, sys.argv[1:4])
    count = batch * m * n
    budget = budget_for((m, n))
    for path in sys.argv[4:]:
        data = torch.from_numpy(np.fromfile(path, dtype=np.float32))
        G, out = data[:count].view(batch, m, n), data[count:2 * count].view(batch, m, n)
        err = rel_err(out, ns5_float64(G))
        print(f"{path}: all written {bool(torch.isfinite(out).all())}, distance to float64 NS5: "
              f"max {err.max():.4f}, mean {err.mean():.4f} (budget {budget:.4f})")


if __name__ == "__main__":
    main()
