"""bench/ns5_coefficients.py, the coefficient-schedule accuracy table: its error measures are right
(zero for the exact polar factor, the known value for a scaled one) and its rows cover every
schedule, algorithm and step count; on a Gaussian 1:4 matrix Polar Express's 5 steps land closer to
the polar factor than Jordan's 5 (what the schedule was designed for), with either algorithm."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from muonkern.orthogonality import polar_distance, polar_factor, singular_value_error

_PATH = Path(__file__).resolve().parents[1] / "bench" / "ns5_coefficients.py"
_spec = importlib.util.spec_from_file_location("ns5_coefficients", _PATH)
coef = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coef)


def test_error_measures(gen):
    # G = Q diag(s) W with Q orthogonal and W's rows orthonormal: its polar factor is Q W by
    # construction, independent of the SVD the code under test runs
    Q = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))[0]
    W = torch.linalg.qr(torch.randn(20, 12, generator=gen, dtype=torch.float64))[0].mT
    s = torch.rand(12, generator=gen, dtype=torch.float64) + 0.1
    G = Q @ torch.diag(s) @ W
    polar = polar_factor(G)
    for scale, want in ((1.0, 0.0), (0.5, 0.5)):
        X = scale * Q @ W
        assert abs(float(singular_value_error(X)) - want) < 1e-12 and abs(float(polar_distance(X, polar)) - want) < 1e-12


def test_error_measures_per_matrix(gen):
    """muonkern.orthogonality's measures give one value per matrix of a batch."""
    G = torch.randn(3, 12, 20, generator=gen, dtype=torch.float64)
    polar = polar_factor(G)
    X = polar * torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)[:, None, None]
    assert torch.allclose(polar_distance(X, polar), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(singular_value_error(X), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), atol=1e-12)


def test_ill_conditioned_input_spectrum(gen):
    G = coef.test_matrix("ill-conditioned", (16, 48), gen)
    s = torch.linalg.svdvals(G)
    assert abs(s.max() - 1) < 1e-12 and abs(s.min() - 1e-4) < 1e-14


def test_rows_and_polar_express_beats_jordan_at_five_steps():
    rows = coef.measure("cpu", shapes=((64, 256),))
    assert len(rows) == 2 * len(coef.ALGORITHMS) * (len(coef.STEPS["jordan"]) + len(coef.STEPS["polar_express"]))
    assert all(0 <= r["polar_rel_err"] < 1.5 and 0 <= r["max_sigma_err"] for r in rows)
    for algorithm in coef.ALGORITHMS:
        at5 = {r["schedule"]: r["polar_rel_err"] for r in rows
               if r["input"] == "gaussian" and r["steps"] == 5 and r["algorithm"] == algorithm}
        assert at5["polar_express"] < at5["jordan"], (algorithm, at5)
    assert "| gaussian | 64×256 | jordan | gram | 1 |" in coef.table(rows)
