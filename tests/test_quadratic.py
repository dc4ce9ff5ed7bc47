"""The stylized quadratic problems (muonkern.study.quadratic): the closed forms against simulation on
matrices, the NDS facts they rest on, and the experiment's rows."""
from __future__ import annotations

import math

import pytest
import torch

from muonkern.study import quadratic as q
from muonkern.study.config import StudyConfig

STEPS = 30


@pytest.mark.parametrize("alpha_w,alpha_sigma", [(0.5, 0.5), (2.0, 1.0), (3.0, 0.0)])
@pytest.mark.parametrize("method", ["gd", "muon_polar"])
def test_closed_form_matches_simulation(method, alpha_w, alpha_sigma):
    problem = q.make_problem(12, 20, 4, 3, alpha_w, alpha_sigma, seed=3)
    lrs = torch.tensor([0.013, 0.21, 1.37])  # no σ_i/η is an integer: no residual lands exactly on 0
    sim = q.simulate(problem, method, lrs, STEPS)
    for k, lr in enumerate(lrs.tolist()):
        closed = q.CLOSED_FORMS[method](problem.w, problem.sigma, lr, STEPS)
        torch.testing.assert_close(sim["loss"][k], closed["loss"], rtol=1e-7, atol=1e-12 * float(closed["loss"][0]))
        torch.testing.assert_close(sim["nds"][k], closed["nds"], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("method", ["gd", "muon_polar"])
def test_line_search_closed_form_matches_simulation(method):
    problem = q.make_problem(10, 16, 3, 3, 1.5, 0.5, seed=0)
    sim = q.simulate(problem, method, None, STEPS)
    closed = q.line_search_modes(problem.w, problem.sigma, method, STEPS)
    torch.testing.assert_close(sim["loss"][0], closed["loss"], rtol=1e-6, atol=1e-14)
    torch.testing.assert_close(sim["nds"][0], closed["nds"], rtol=1e-6, atol=1e-12)
    assert bool((closed["loss"][1:] <= closed["loss"][:-1] * (1 + 1e-12)).all())  # exact line search never ascends


def test_nds_facts():
    for alpha_w in (0.0, 0.7, 2.5):
        for alpha_sigma in (0.0, 0.5, 1.0):
            w, sigma = q.curvatures(5, 2, alpha_w, alpha_sigma)
            gd0 = float(q.gd_closed_form(w, sigma, 0.1, 1)["nds"][0])
            # the polar step's NDS is the mean curvature at every step, simulated on the matrices
            problem = q.make_problem(12, 16, 5, 2, alpha_w, alpha_sigma, seed=0)
            polar = q.simulate(problem, "muon_polar", torch.tensor([0.037]), 20)["nds"][0]
            torch.testing.assert_close(polar, torch.full_like(polar, float(w.mean())))
            # GD starts at a mean of w weighted by w^(2+2 alpha_sigma): never below the plain mean
            assert gd0 >= float(w.mean()) * (1 - 1e-12)
            if alpha_w == 0:
                assert gd0 == pytest.approx(1.0)
            else:
                assert gd0 > float(w.mean()) * 1.01
    # NDS of a direction, from the matrix definition ΣΔ_ij (HΔ)_ij / ‖Δ‖² with H[D] = Σ w_i <a_i b_iᵀ, D> a_i b_iᵀ
    problem = q.make_problem(6, 9, 2, 2, 1.0, 0.5, seed=1)
    D = torch.randn(6, 9, dtype=torch.float64)
    HD = problem.matrix(problem.w * problem.coords(D))
    assert float(problem.nds(D)) == pytest.approx(float((D * HD).sum() / D.pow(2).sum()))
    G = problem.grad(problem.initial())
    torch.testing.assert_close(G, problem.matrix(problem.w * problem.sigma))


def test_directions():
    problem = q.make_problem(8, 12, 2, 3, 1.0, 0.5, seed=2)
    G = problem.grad(problem.initial())
    P = q.polar(G)
    # the polar factor of Σ g_i a_i b_iᵀ (g_i > 0) is Σ a_i b_iᵀ: singular values all one
    torch.testing.assert_close(P, problem.matrix(torch.ones_like(problem.w)), atol=1e-10, rtol=0)
    N = q.direction("muon_ns5", G)
    s = torch.linalg.svdvals(N)[:6]
    assert float(s.min()) > 0.5 and float(s.max()) < 1.3  # ns5 approximates it in bf16 ...
    assert float((N - P).norm() / P.norm()) > 1e-3      # ... and is not the exact (SVD) polar factor
    assert torch.equal(q.direction("sign", G), torch.sign(G)) and torch.equal(q.direction("gd", G), G)
    with pytest.raises(ValueError, match="unknown method"):
        q.direction("adam", G)
    with pytest.raises(ValueError, match="modes"):
        q.make_problem(4, 4, 3, 2, 1.0, 0.5, seed=0)


def test_run_quadratic_rows():
    cfg = StudyConfig(quad_m=8, quad_n=10, quad_groups=3, quad_group_size=2, quad_alpha_ws=(0.0, 2.0),
                      quad_alpha_sigmas=(0.5,), quad_steps=12, quad_instances=2, quad_lr_per_decade=2)
    out = q.run_quadratic(cfg)
    rows = out["rows"]
    assert len(rows) == 2 * 2 * len(q.METHODS) * 2  # alpha_w x instances x methods x rules
    assert out["settings"]["lr_grid"][0] == pytest.approx(1e-5) and out["settings"]["lr_grid"][-1] == pytest.approx(10)
    for r in rows:
        assert math.isfinite(r["loss_T"]) and r["loss_T"] >= 0 and math.isfinite(r["nds_avg"])
        if r["method"] in q.CLOSED_FORMS:
            # simulation and closed form agree wherever they chose the same step (always, for line search)
            if r["rule"] == "line_search" or r["closed_lr"] == r["lr"]:
                assert r["nds_avg"] == pytest.approx(r["closed_nds_avg"], rel=1e-6)
                assert r["loss_T"] == pytest.approx(r["closed_loss_T"], rel=1e-5, abs=1e-14)
        else:
            assert r["closed_nds_avg"] is None
        if r["alpha_w"] == 0:
            # homogeneous curvature: NDS is the share of the direction inside the modes' span, 1 for
            # GD and the exact polar step (both in the span), below it for ns5's bf16 result and
            # far below for sign descent (0.97-0.99 and 0.58-0.65: `python bench/cpu_measurements.py
            # quadratic-nds`)
            if r["method"] in ("gd", "muon_polar"):
                assert r["nds_avg"] == pytest.approx(1.0, abs=1e-9)
            else:
                assert r["nds_avg"] < {"muon_ns5": 0.999, "sign": 0.9}[r["method"]]
