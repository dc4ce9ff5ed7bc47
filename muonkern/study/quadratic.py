r"""Stylized quadratic problems with heterogeneous curvature (experiment E5, finding F6).

Problem. A matrix parameter W (m × n), orthonormal vectors a_1..a_r ∈ R^m and b_1..b_r ∈ R^n
(random, from QR of Gaussian matrices; one draw per instance), and the loss

    L(W) = ½ Σ_i w_i ⟨a_i b_iᵀ, W − W*⟩²,     x_i := ⟨a_i b_iᵀ, W − W*⟩ = a_iᵀ (W − W*) b_i.

The r = groups · group_size modes come in groups; group g = 1..groups has curvature
w = g^(−α_w) (α_w = 0: homogeneous; larger α_w: more heterogeneous). The initial residual is
x_i(0) = σ_i = w_i^(α_σ), so for α_σ > 0 the gradient G = Σ_i w_i x_i a_i b_iᵀ, whose singular
values are w_i σ_i = w_i^(1+α_σ), is aligned with the high-curvature modes. W* = 0 without loss of
generality (only W − W* enters). The Hessian acts as H[D] = Σ_i w_i ⟨a_i b_iᵀ, D⟩ a_i b_iᵀ, so
for a step direction D: DᵀHD = Σ_i w_i ⟨a_i b_iᵀ, D⟩² and NDS(D) = DᵀHD / ‖D‖_F².

Optimizers, each W ← W − η D(G):
  gd          D = G
  muon_polar  D = U Vᵀ, the exact polar factor of G (SVD; singular values below 1e-12 · the largest
              count as zero): Muon without momentum, with exact orthogonalization
  muon_ns5    D = muonkern.ns5(G) (quintic Newton-Schulz, bf16 arithmetic): Muon as implemented
  sign        D = sign(G) entrywise: sign descent, the β → 0 limit of Adam, a proxy for Adam

Step sizes, two fair rules, each applied to every optimizer alike:
  line_search  (primary) exact line search on the quadratic at every step, η_t = g·d / dᵀHd, the
               step that minimizes the loss along d: no tuning, and the one-step decrease is then
               (g·d)² / (2 dᵀHd) = (g·d/‖d‖)² / (2 NDS(d)), the Taylor view of the study;
  grid         (sensitivity check) the constant η of a log grid (quad_lr_min .. quad_lr_max,
               quad_lr_per_decade points per decade) with the lowest loss after T steps, chosen per
               optimizer, heterogeneity level and instance. GD's trajectory-average NDS is very
               sensitive to its constant step near 2/w_max (η w_1 ≈ 1 removes the sharpest mode at
               once and the NDS drops; η w_1 near 2 leaves it oscillating and the NDS stays high),
               so this rule's NDS comparison moves with the grid's resolution; line search has no
               such free choice.
Reported: the loss after T steps relative to L(W_0), and the NDS of the T directions averaged over
the trajectory (steps whose direction is exactly zero have no NDS and are left out of the average).

Closed forms (GD and the polar step keep W − W* in span{a_i b_iᵀ}, so the modes decouple):

  GD:     x_i(t+1) = (1 − η w_i) x_i(t)  ⇒  x_i(t) = (1 − η w_i)^t σ_i,
          L_T = ½ Σ_i w_i (1 − η w_i)^{2T} σ_i²,
          NDS_t = Σ_i w_i (w_i x_i)² / Σ_i (w_i x_i)² = Σ_i w_i³ x_i(t)² / Σ_i w_i² x_i(t)².
  polar:  D_t = Σ_i sign(x_i(t)) a_i b_iᵀ over the modes with x_i ≠ 0, so ‖D_t‖² is their number
          and NDS_t = their mean curvature: NDS_t = (1/r) Σ_i w_i whenever no residual is exactly
          zero, at every step and for every η. (α_σ = 0 is a special case: the initial residual
          Σ_i a_i b_iᵀ is itself the polar factor of the gradient, so the polar step points straight
          at W*.) Each residual falls by η per step,
          x_i(t) = σ_i − η t for t ≤ k_i = ⌈σ_i/η⌉, then alternates between
          σ_i − k_i η ∈ (−η, 0) (t − k_i even) and σ_i − (k_i − 1) η ∈ (0, η) (t − k_i odd), or
          stays at 0 when σ_i/η is an integer (that mode then leaves the polar factor);
          L_T = ½ Σ_i w_i x_i(T)².
  line search: the same recursions with η_t = Σ_i w_i x_i d_i / Σ_i w_i d_i² (d_i = w_i x_i for GD,
          sign(x_i) for the polar step), run on the r mode coordinates.

At the start NDS_GD(0) = Σ w_i^(3+2α_σ) / Σ w_i^(2+2α_σ), a mean of w weighted by w^(2+2α_σ),
which is at least the plain mean (1/r) Σ w_i = NDS_polar (Chebyshev's sum inequality: the
weights increase with w), with equality iff w is constant. Along the trajectory GD removes the
high-curvature modes first, and NDS_t falls towards the low-curvature end, so the trajectory
average need not stay above the polar step's; both are computed from the closed forms above.
Polar-step loss: every mode reaches |x_i| ≤ η after ⌈σ_max/η⌉ steps whatever its curvature, while
GD needs η < 2/w_max for stability and then shrinks mode i only by (1 − η w_i) per step: with
w_max/w_min large against T the low-curvature modes barely move under GD, which is where the
polar step reaches the lower loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..ops import ns5
from .distributed import Context

METHODS = ("gd", "muon_polar", "muon_ns5", "sign")
POLAR_RANK_TOL = 1e-12


@dataclass
class Problem:
    w: torch.Tensor      # (r,) curvature of each mode
    sigma: torch.Tensor  # (r,) initial residual of each mode
    A: torch.Tensor      # (m, r) orthonormal columns a_i
    B: torch.Tensor      # (n, r) orthonormal columns b_i

    def coords(self, W: torch.Tensor) -> torch.Tensor:
        """x_i = a_iᵀ W b_i for W (..., m, n) -> (..., r)."""
        return torch.einsum("mi,...mn,ni->...i", self.A, W, self.B)

    def matrix(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_i x_i a_i b_iᵀ for x (..., r) -> (..., m, n)."""
        return torch.einsum("mi,...i,ni->...mn", self.A, x, self.B)

    def loss(self, W: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.w * self.coords(W) ** 2).sum(-1)

    def grad(self, W: torch.Tensor) -> torch.Tensor:
        return self.matrix(self.w * self.coords(W))

    def curvature(self, D: torch.Tensor) -> torch.Tensor:
        """DᵀHD per matrix of D (…, m, n)."""
        return (self.w * self.coords(D) ** 2).sum(-1)

    def nds(self, D: torch.Tensor) -> torch.Tensor:
        return self.curvature(D) / D.pow(2).sum((-2, -1))

    def initial(self) -> torch.Tensor:
        return self.matrix(self.sigma)


def curvatures(groups: int, group_size: int, alpha_w: float, alpha_sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, σ) per mode, float64: w = g^(−α_w) for the modes of group g, σ = w^(α_σ)."""
    g = torch.arange(1, groups + 1, dtype=torch.float64).repeat_interleave(group_size)
    w = g ** (-alpha_w)
    return w, w ** alpha_sigma


def make_problem(m: int, n: int, groups: int, group_size: int, alpha_w: float, alpha_sigma: float,
                 seed: int) -> Problem:
    r = groups * group_size
    if r > min(m, n):
        raise ValueError(f"{r} modes do not fit a {m} x {n} matrix")
    gen = torch.Generator().manual_seed(seed)
    A = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))[0]
    B = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
    w, sigma = curvatures(groups, group_size, alpha_w, alpha_sigma)
    return Problem(w, sigma, A, B)


def _polar_svd(G: torch.Tensor) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    keep = (S > POLAR_RANK_TOL * S.amax(-1, keepdim=True)).to(G.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh


def polar(G: torch.Tensor) -> torch.Tensor:
    """U Vᵀ over the singular values above POLAR_RANK_TOL times the largest (batched)."""
    try:
        return _polar_svd(G)
    except torch.linalg.LinAlgError:
        pass
    # LAPACK's divide-and-conquer SVD can fail to converge on exactly repeated singular values (equal
    # residuals within a group); polar(QG) = Q polar(G) for orthogonal Q, so retry on rotated copies.
    flat = G.reshape(-1, *G.shape[-2:])
    out = torch.empty_like(flat)
    gen = torch.Generator().manual_seed(0)
    for i, g in enumerate(flat):
        for _ in range(10):
            try:
                out[i] = _polar_svd(g)
                break
            except torch.linalg.LinAlgError:
                Q = torch.linalg.qr(torch.randn(g.shape[0], g.shape[0], generator=gen, dtype=g.dtype))[0]
                try:
                    out[i] = Q.mT @ _polar_svd(Q @ g)
                    break
                except torch.linalg.LinAlgError:
                    continue
        else:
            raise torch.linalg.LinAlgError("polar: SVD failed on 10 rotations of the same matrix")
    return out.reshape(G.shape)


def direction(method: str, G: torch.Tensor) -> torch.Tensor:
    if method == "gd":
        return G
    if method == "muon_polar":
        return polar(G)
    if method == "muon_ns5":
        return ns5(G.float()).double()
    if method == "sign":
        return torch.sign(G)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def simulate(problem: Problem, method: str, lrs: torch.Tensor | None, steps: int) -> dict:
    """Runs every constant step size of `lrs` (K,) at once, or with lrs=None one run with exact line
    search (η_t = g·d / dᵀHd): {"loss": (K, steps+1), "nds": (K, steps)}."""
    K = 1 if lrs is None else len(lrs)
    W = problem.initial().expand(K, -1, -1).clone()
    losses, nds = [problem.loss(W)], []
    lr = None if lrs is None else torch.as_tensor(lrs, dtype=torch.float64)
    for _ in range(steps):
        G = problem.grad(W)
        D = direction(method, G)
        curvature = problem.curvature(D)
        nds.append(curvature / D.pow(2).sum((-2, -1)))
        if lrs is None:
            gain = (G * D).sum((-2, -1))
            lr = torch.where(curvature > 0, gain / curvature, torch.zeros_like(gain))
        W = W - lr[:, None, None] * D
        losses.append(problem.loss(W))
    return {"loss": torch.stack(losses, 1), "nds": torch.stack(nds, 1)}


# ---- closed forms ------------------------------------------------------------------------------

def gd_closed_form(w: torch.Tensor, sigma: torch.Tensor, lr: float, steps: int) -> dict:
    """GD's loss after t = 0..steps steps and NDS of its steps t = 0..steps-1."""
    t = torch.arange(steps + 1, dtype=torch.float64)[:, None]
    x = (1 - lr * w) ** t * sigma                      # (steps+1, r)
    loss = 0.5 * (w * x ** 2).sum(-1)
    g2 = (w * x[:-1]) ** 2
    return {"loss": loss, "nds": (w * g2).sum(-1) / g2.sum(-1)}


def polar_closed_form(w: torch.Tensor, sigma: torch.Tensor, lr: float, steps: int) -> dict:
    """The exact polar step's loss after t = 0..steps steps and NDS of its steps (σ_i > 0). A residual
    that lands on zero (σ_i/η an integer, to 1e-9) stays there: its mode leaves the polar factor."""
    t = torch.arange(steps + 1, dtype=torch.float64)[:, None]
    ratio = sigma / lr
    k = torch.ceil(ratio - 1e-9 * ratio.clamp(min=1))
    lands = (ratio - k).abs() <= 1e-9 * ratio.clamp(min=1)
    settled = torch.where((t - k) % 2 == 0, sigma - k * lr, sigma - (k - 1) * lr)
    settled = torch.where(lands, torch.zeros_like(settled), settled)
    x = torch.where(t <= k, sigma - lr * t, settled)
    x = torch.where(lands & (t >= k), torch.zeros_like(x), x)
    loss = 0.5 * (w * x ** 2).sum(-1)
    active = (x[:-1] != 0).to(torch.float64)
    return {"loss": loss, "nds": (w * active).sum(-1) / active.sum(-1)}


CLOSED_FORMS = {"gd": gd_closed_form, "muon_polar": polar_closed_form}


def line_search_modes(w: torch.Tensor, sigma: torch.Tensor, method: str, steps: int) -> dict:
    """GD or the polar step with exact line search, run on the r mode coordinates (the matrices
    never enter): d_i = w_i x_i (GD) or sign(x_i) (polar), η_t = Σ_i w_i x_i d_i / Σ_i w_i d_i²."""
    x = sigma.clone()
    losses, nds = [0.5 * (w * x ** 2).sum()], []
    for _ in range(steps):
        d = w * x if method == "gd" else torch.sign(x)
        curvature, norm_sq = (w * d ** 2).sum(), (d ** 2).sum()
        nds.append(curvature / norm_sq if norm_sq > 0 else torch.tensor(math.nan, dtype=torch.float64))
        x = x - ((w * x * d).sum() / curvature if curvature > 0 else 0.0) * d
        losses.append(0.5 * (w * x ** 2).sum())
    return {"loss": torch.stack(losses), "nds": torch.stack(nds)}


def lr_grid(lo: float, hi: float, per_decade: int) -> torch.Tensor:
    n = int(round(math.log10(hi / lo) * per_decade)) + 1
    return torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)


def _best(losses_T: torch.Tensor) -> int:
    """Index of the lowest finite final loss (diverged runs count as infinite)."""
    finite = torch.where(torch.isfinite(losses_T), losses_T, torch.full_like(losses_T, math.inf))
    return int(torch.argmin(finite))


def _row(method: str, rule: str, sim_loss: torch.Tensor, sim_nds: torch.Tensor, lr, loss0: float,
         closed: dict | None) -> dict:
    row = dict(method=method, rule=rule, lr=lr, loss_T=float(sim_loss[-1]) / loss0,
               nds_avg=float(sim_nds.nanmean()), nds_0=float(sim_nds[0]),
               closed_lr=None, closed_loss_T=None, closed_nds_avg=None, closed_nds_0=None)
    if closed is not None:
        row.update(closed_lr=closed["lr"], closed_loss_T=float(closed["loss"][-1]) / loss0,
                   closed_nds_avg=float(closed["nds"].nanmean()), closed_nds_0=float(closed["nds"][0]))
    return row


def _setting_rows(cfg, grid: torch.Tensor, alpha_sigma: float, alpha_w: float, bar) -> list[dict]:
    """The rows of one (alpha_sigma, alpha_w): every instance, method and step-size rule."""
    T = cfg.quad_steps
    w, sigma = curvatures(cfg.quad_groups, cfg.quad_group_size, alpha_w, alpha_sigma)
    loss0 = float(0.5 * (w * sigma ** 2).sum())
    closed = {}
    for method, form in CLOSED_FORMS.items():
        runs = [form(w, sigma, float(lr), T) for lr in grid]
        i = _best(torch.stack([r["loss"][-1] for r in runs]))
        closed[(method, "grid")] = dict(runs[i], lr=float(grid[i]))
        closed[(method, "line_search")] = dict(line_search_modes(w, sigma, method, T), lr=None)
    rows = []
    for instance in range(cfg.quad_instances):
        problem = make_problem(cfg.quad_m, cfg.quad_n, cfg.quad_groups, cfg.quad_group_size, alpha_w,
                               alpha_sigma, seed=instance)
        for method in METHODS:
            sim = simulate(problem, method, grid, T)
            i = _best(sim["loss"][:, -1])
            line = simulate(problem, method, None, T)
            for rule, loss, nds, lr in (("grid", sim["loss"][i], sim["nds"][i], float(grid[i])),
                                        ("line_search", line["loss"][0], line["nds"][0], None)):
                row = _row(method, rule, loss, nds, lr, loss0, closed.get((method, rule)))
                rows.append(dict(alpha_sigma=alpha_sigma, alpha_w=alpha_w, instance=instance, **row))
            bar.update(1)
    return rows


def run_quadratic(cfg, ctx: Context | None = None) -> dict:
    """E5: for every alignment alpha_sigma, heterogeneity level alpha_w, instance, method and
    step-size rule ("line_search": exact line search; "grid": the best constant step of the grid),
    the loss after T steps and the average NDS, simulated on matrices, with the closed forms (mode
    coordinates) for gd and muon_polar. Returns {"settings": ..., "rows": [...]}; the fields are
    documented in muonkern/study/SCHEMA.md.

    Under torchrun (`ctx` active) every rank simulates its share of the (alpha_sigma, alpha_w)
    settings and all ranks end with every row, in the same order as one process: at the paper's
    sizes this part takes hours of CPU time, longer than a collective may wait on idle ranks."""
    ctx = ctx or Context()
    grid = lr_grid(cfg.quad_lr_min, cfg.quad_lr_max, cfg.quad_lr_per_decade)
    settings = [(s, a) for s in cfg.quad_alpha_sigmas for a in cfg.quad_alpha_ws]
    mine = list(range(ctx.rank, len(settings), ctx.world))
    with tqdm(total=len(mine) * cfg.quad_instances * len(METHODS), desc="quadratic problems", unit="run",
              mininterval=2.0, disable=not ctx.is_main) as bar:
        done = {i: _setting_rows(cfg, grid, *settings[i], bar) for i in mine}
    for part in ctx.gather(done):
        done.update(part)
    rows = [row for i in range(len(settings)) for row in done[i]]
    settings_out = dict(m=cfg.quad_m, n=cfg.quad_n, groups=cfg.quad_groups, group_size=cfg.quad_group_size,
                        alpha_sigmas=list(cfg.quad_alpha_sigmas), alpha_ws=list(cfg.quad_alpha_ws),
                        steps=cfg.quad_steps, instances=cfg.quad_instances, lr_grid=[float(v) for v in grid])
    return {"settings": settings_out, "rows": rows}
