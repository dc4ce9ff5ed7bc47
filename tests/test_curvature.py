"""Tests of muonkern.curvature against explicit Hessians of tiny float64 problems (CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F

from muonkern import curvature as C

DT = torch.float64


# ---------------------------------------------------------------------------- problems

def _flatten(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def _unflatten(flat, like):
    out, i = {}, 0
    for k, t in like.items():
        out[k] = flat[i:i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


def _slices(params):
    out, i = {}, 0
    for k, t in params.items():
        out[k] = torch.arange(i, i + t.numel())
        i += t.numel()
    return out


def _full_hessian(loss_fn, params):
    flat = _flatten(params)
    return torch.autograd.functional.hessian(lambda f: loss_fn(_unflatten(f, params)), flat)


def _full_grad(loss_fn, params):
    flat = _flatten(params).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(_unflatten(flat, params)), flat)
    return g


def _mlp_problem(gen):
    """2-layer tanh MLP, 4 tensors (37 parameters), MSE on a fixed batch of 8."""
    params = {
        "w1": torch.randn(5, 4, generator=gen, dtype=DT),
        "b1": 0.1 * torch.randn(5, generator=gen, dtype=DT),
        "w2": torch.randn(2, 5, generator=gen, dtype=DT),
        "b2": 0.1 * torch.randn(2, generator=gen, dtype=DT),
    }
    x = torch.randn(8, 4, generator=gen, dtype=DT)
    y = torch.randn(8, 2, generator=gen, dtype=DT)

    def loss_fn(p):
        h = torch.tanh(x @ p["w1"].T + p["b1"])
        # explicit mean of squares: F.mse_loss trips pytorch/pytorch#123996 under fwd_rev
        # (covered by test_fwd_rev_falls_back_on_mse_loss_bug)
        return ((h @ p["w2"].T + p["b2"] - y) ** 2).mean()

    loss_fn.x, loss_fn.y = x, y

    return params, loss_fn


def _rand_like(params, gen):
    return {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in params.items()}


def _exact_blocks(H, u_flat, index_sets):
    G = len(index_sets)
    M = torch.zeros(G, G, dtype=DT)
    for a, Ia in enumerate(index_sets):
        for b, Ib in enumerate(index_sets):
            M[a, b] = u_flat[Ia] @ H[Ia][:, Ib] @ u_flat[Ib]
    return M


def _group_index_sets(params, groups):
    sl = _slices(params)
    return [torch.cat([sl[m] for m in members]) for members in groups.values()]


# ---------------------------------------------------------------------------- hvp

@pytest.mark.parametrize("method", ["fwd_rev", "rev_rev"])
def test_hvp_exact_methods_match_full_hessian(gen, method):
    params, loss_fn = _mlp_problem(gen)
    H = _full_hessian(loss_fn, params)
    for _ in range(3):
        v = _rand_like(params, gen)
        hv = C.hvp(loss_fn, params, v, method=method)
        assert list(hv) == list(params)
        expected = H @ _flatten(v)
        torch.testing.assert_close(_flatten(hv), expected, rtol=1e-10,
                                   atol=1e-12 * expected.abs().max().item())


def test_hvp_finite_diff_accuracy_from_step(gen):
    # h·‖v‖ = cbrt(eps)·max(1, ‖θ‖) ≈ 6e-6·‖θ‖ in float64: truncation and rounding errors are
    # both O(eps^(2/3)) ≈ 4e-11 relative up to problem constants (measured: 1e-10 to 3e-10 on
    # this problem); we allow 1e-8 relative.
    params, loss_fn = _mlp_problem(gen)
    H = _full_hessian(loss_fn, params)
    v = _rand_like(params, gen)
    h = C.finite_diff_step(params, v)
    eps = torch.finfo(DT).eps
    assert math.isclose(h * _flatten(v).norm().item(),
                        eps ** (1 / 3) * max(1.0, _flatten(params).norm().item()), rel_tol=1e-12)
    expected = H @ _flatten(v)
    got = _flatten(C.hvp(loss_fn, params, v, method="finite_diff"))
    assert (got - expected).norm() <= 1e-8 * expected.norm()


def test_hvp_finite_diff_float32(gen):
    # float32: cbrt(eps) ≈ 4.9e-3, expected relative error ~ eps^(2/3) ≈ 2.5e-5; allow 1e-3.
    params, loss_fn = _mlp_problem(gen)
    H = _full_hessian(loss_fn, params)
    v = _rand_like(params, gen)
    p32 = {k: t.float() for k, t in params.items()}
    got = C.hvp(lambda p: loss_fn({k: t.double() for k, t in p.items()}).float(), p32, v,
                method="finite_diff")
    assert all(t.dtype == torch.float32 for t in got.values())
    expected = H @ _flatten(v)
    assert (_flatten(got).double() - expected).norm() <= 1e-3 * expected.norm()


def test_fwd_rev_falls_back_on_mse_loss_bug(gen):
    params, loss_fn = _mlp_problem(gen)
    x, y = loss_fn.x, loss_fn.y

    def mse(p):
        return F.mse_loss(torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"], y)

    H = _full_hessian(mse, params)
    v = _rand_like(params, gen)
    with pytest.warns(RuntimeWarning, match="123996"):
        hv = C.hvp(mse, params, v, method="fwd_rev")
    expected = H @ _flatten(v)
    torch.testing.assert_close(_flatten(hv), expected, rtol=1e-10,
                               atol=1e-12 * expected.abs().max().item())


def test_hvp_zero_direction_and_unused_parameter(gen):
    params, loss_fn = _mlp_problem(gen)
    params = dict(params, unused=torch.ones(3, dtype=DT))
    zero = {k: torch.zeros_like(t) for k, t in params.items()}
    for method in C.HVP_METHODS:
        hv = C.hvp(loss_fn, params, zero, method=method)
        assert all(bool((t == 0).all()) for t in hv.values())
        v = _rand_like(params, gen)
        assert bool((C.hvp(loss_fn, params, v, method=method)["unused"] == 0).all())


# ---------------------------------------------------------------------------- quadratics

def _check_against_hessian(q, params, dirs, groups, H, g, rtol=1e-10):
    """Every field against the dense Hessian, each from its own formula (within and cross from the
    exact blocks, curvature from uᵀHu): `rtol` for the Hessian's terms, with an absolute floor of
    rtol times the largest block (the exact methods 1e-10; finite differences 1e-6 on the MLP, 1e-5 on
    the GPT)."""
    index_sets = _group_index_sets(params, groups)
    for i, u in enumerate(dirs):
        uf = _flatten(u)
        M = _exact_blocks(H, uf, index_sets)
        atol = max(1e-12, rtol * M.abs().max().item())
        sel = (lambda t: t) if len(dirs) == 1 and q.blocks.dim() == 2 else (lambda t: t[i])
        torch.testing.assert_close(sel(q.blocks), M, rtol=rtol, atol=atol)
        curv = uf @ H @ uf
        torch.testing.assert_close(sel(q.curvature), curv, rtol=rtol, atol=atol)
        torch.testing.assert_close(sel(q.gain), g @ uf, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(sel(q.norm_sq), uf @ uf, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(sel(q.nds), curv / (uf @ uf), rtol=rtol, atol=atol / (uf @ uf).item())
        torch.testing.assert_close(sel(q.within), torch.diagonal(M).sum(), rtol=rtol, atol=atol)
        torch.testing.assert_close(sel(q.cross), M.sum() - torch.diagonal(M).sum(), rtol=10 * rtol,
                                   atol=10 * atol)
    # blocks are symmetric because H is
    torch.testing.assert_close(q.blocks, q.blocks.transpose(-2, -1), rtol=rtol,
                               atol=max(1e-12, rtol * q.blocks.abs().max().item()))
    assert q.group_names == list(groups)
    for t in (q.gain, q.curvature, q.norm_sq, q.nds, q.blocks, q.within, q.cross):
        assert t.dtype == torch.float64


def test_directional_quadratics_single_direction_per_tensor(gen):
    params, loss_fn = _mlp_problem(gen)
    H, g = _full_hessian(loss_fn, params), _full_grad(loss_fn, params)
    u = _rand_like(params, gen)
    q = C.directional_quadratics(loss_fn, params, u)
    assert q.blocks.shape == (4, 4) and q.gain.shape == ()
    _check_against_hessian(q, params, [u], {k: [k] for k in params}, H, g)
    # the direct HVP gives the same uᵀHu as the sum of blocks
    direct = _flatten(u) @ _flatten(C.hvp(loss_fn, params, u))
    torch.testing.assert_close(q.curvature, direct, rtol=1e-12, atol=1e-14)


def test_directional_quadratics_list_custom_groups(gen):
    params, loss_fn = _mlp_problem(gen)
    H, g = _full_hessian(loss_fn, params), _full_grad(loss_fn, params)
    dirs = [_rand_like(params, gen) for _ in range(3)]
    groups = {"layer2": ["w2", "b2"], "layer1": ["b1", "w1"]}  # order differs from params
    q = C.directional_quadratics(loss_fn, params, dirs, groups=groups)
    assert q.blocks.shape == (3, 2, 2)
    assert all(t.shape == (3,) for t in (q.gain, q.curvature, q.norm_sq, q.nds, q.within,
                                          q.cross))
    _check_against_hessian(q, params, dirs, groups, H, g)


@pytest.mark.parametrize("method,rtol", [("rev_rev", 1e-10), ("finite_diff", 1e-6)])
def test_directional_quadratics_methods_agree(gen, method, rtol):
    params, loss_fn = _mlp_problem(gen)
    dirs = [_rand_like(params, gen) for _ in range(2)]
    ref = C.directional_quadratics(loss_fn, params, dirs)
    got = C.directional_quadratics(loss_fn, params, dirs, method=method)
    scale = ref.blocks.abs().max().item()
    torch.testing.assert_close(got.blocks, ref.blocks, rtol=rtol, atol=rtol * scale)


def test_predicted_change_is_second_order(gen):
    params, loss_fn = _mlp_problem(gen)
    u = _rand_like(params, gen)
    errs = []
    for eps in (1e-2, 5e-3):
        ue = {k: eps * t for k, t in u.items()}
        q = C.directional_quadratics(loss_fn, params, ue)
        actual = loss_fn({k: params[k] + ue[k] for k in params}) - loss_fn(params)
        errs.append(abs((q.predicted_change - actual).item()))
    # the Taylor remainder is O(eps^3): halving eps divides it by about 8
    assert 5.0 < errs[0] / errs[1] < 11.0


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4, 6)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)])

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = torch.tanh(self.layers[0](h))
        return self.layers[1](h)


def test_groups_by_module_with_functional_call(gen):
    torch.manual_seed(0)
    model = _Net().to(DT)
    assert C.groups_by_module(model, 1) == {
        "embed": ["embed.weight", "embed.bias"],
        "layers": ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]}
    groups = C.groups_by_module(model, 2)
    assert groups == {
        "embed.weight": ["embed.weight"], "embed.bias": ["embed.bias"],
        "layers.0": ["layers.0.weight", "layers.0.bias"],
        "layers.1": ["layers.1.weight", "layers.1.bias"]}
    assert C.groups_by_module(dict(model.named_parameters()), 2) == groups

    x = torch.randn(10, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (10,), generator=gen)

    def loss_fn(p):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    # the module's own parameters (requires_grad=True) are accepted as they are
    params = dict(model.named_parameters())
    assert sum(t.numel() for t in params.values()) < 100
    H = _full_hessian(loss_fn, {k: t.detach() for k, t in params.items()})
    g = _full_grad(loss_fn, {k: t.detach() for k, t in params.items()})
    u = _rand_like(params, gen)
    q = C.directional_quadratics(loss_fn, params, u, groups=C.groups_by_module(model, 1))
    _check_against_hessian(q, params, [u], C.groups_by_module(model, 1), H, g)
    q2 = C.directional_quadratics(loss_fn, params, [u, u], groups=groups, method="rev_rev")
    _check_against_hessian(q2, params, [u, u], groups, H, g)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------- estimators

def test_within_estimate_mlp(gen):
    params, loss_fn = _mlp_problem(gen)
    H = _full_hessian(loss_fn, params)
    u = _rand_like(params, gen)
    groups = {k: [k] for k in params}
    exact = torch.diagonal(_exact_blocks(H, _flatten(u), _group_index_sets(params, groups))).sum()
    g1 = torch.Generator().manual_seed(1234)
    est, se = C.within_estimate(loss_fn, params, u, None, samples=400, generator=g1)
    assert est.dtype == torch.float64 and se > 0
    assert abs(est - exact) <= 4 * se
    g2 = torch.Generator().manual_seed(99)
    _, se_small = C.within_estimate(loss_fn, params, u, groups, samples=25, generator=g2)
    assert se < se_small / 2  # ~1/sqrt(K): expected ratio 4


def test_within_estimate_unbiased_with_large_cross_terms():
    # quadratic loss ½θᵀAθ with three groups whose cross blocks dominate: within ≈ 3, cross ≈ 180
    gen = torch.Generator().manual_seed(7)
    n = 3
    A = 0.1 * torch.eye(3 * n, dtype=DT)
    A[:n, n:] = A[n:, :n] = 10.0
    params = {"a": torch.zeros(n, dtype=DT), "b": torch.zeros(n, dtype=DT),
              "c": torch.zeros(n, dtype=DT)}

    def loss_fn(p):
        th = _flatten(p)
        return 0.5 * th @ A @ th

    u = {k: torch.ones(n, dtype=DT) for k in params}
    q = C.directional_quadratics(loss_fn, params, u)
    assert q.cross > 50 * q.within
    est, se = C.within_estimate(loss_fn, params, u, None, samples=1000, generator=gen)
    assert abs(est - q.within) <= 4 * se
    assert abs(est - q.curvature) > 20 * se  # not biased toward uᵀHu
    # exhaustive average over all 2^G sign patterns equals within exactly
    vals = []
    for bits in range(8):
        s = [1.0 if bits >> i & 1 else -1.0 for i in range(3)]
        w = {k: s[i] * u[k] for i, k in enumerate(params)}
        vals.append(_flatten(w) @ _flatten(C.hvp(loss_fn, params, w)))
    torch.testing.assert_close(torch.stack(vals).mean(), q.within, rtol=1e-12, atol=1e-12)


def test_hessian_trace(gen):
    params, loss_fn = _mlp_problem(gen)
    H = _full_hessian(loss_fn, params)
    est, se = C.hessian_trace(loss_fn, params, samples=300,
                              generator=torch.Generator().manual_seed(5))
    assert se > 0 and abs(est - torch.trace(H)) <= 4 * se


# ---------------------------------------------------------------------------- eigenvalues

def test_top_eigenvalues_largest_algebraic_and_magnitude(gen):
    params, loss_fn = _mlp_problem(gen)
    H = _full_hessian(loss_fn, params)
    ev = torch.linalg.eigvalsh(H)
    # which="LA": largest algebraic, descending
    got, vecs = C.top_eigenvalues(loss_fn, params, k=3, generator=gen, tol=1e-10,
                                  return_eigenvectors=True)
    torch.testing.assert_close(got, ev.flip(0)[:3], rtol=1e-8, atol=1e-10)
    for lam, x in zip(got, vecs):
        xf = _flatten(x)
        assert abs(xf.norm() - 1) < 1e-10
        assert (H @ xf - lam * xf).norm() <= 1e-6 * ev.abs().max()
    # which="LM": largest magnitude, descending |λ|
    got_lm = C.top_eigenvalues(loss_fn, params, k=2, which="LM", generator=gen, tol=1e-10)
    lm = ev[torch.argsort(ev.abs(), descending=True)[:2]]
    torch.testing.assert_close(got_lm, lm, rtol=1e-8, atol=1e-10)


def test_top_eigenvalues_repeated_eigenvalues_restart():
    # a single Krylov space holds one copy of a repeated eigenvalue; the restart finds the rest
    gen = torch.Generator().manual_seed(3)
    d = torch.tensor([5.0, 5.0, 5.0, 2.0, 1.0, -1.0], dtype=DT)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=DT))
    A = Q @ torch.diag(d) @ Q.T
    params = {"x": torch.zeros(6, dtype=DT)}
    got = C.top_eigenvalues(lambda p: 0.5 * p["x"] @ A @ p["x"], params, k=4, generator=gen)
    torch.testing.assert_close(got, torch.tensor([5.0, 5.0, 5.0, 2.0], dtype=DT), rtol=1e-10,
                               atol=1e-10)


def _small_gpt_problem(gen, seed: int):
    """(model, loss_fn, params): a float64 2-layer GPT of 460 parameters on a fixed batch."""
    from muonkern.models import GPT, GPTConfig, gpt_loss_fn

    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=7, context=6, n_layer=2, n_head=2, d_model=4)).double()
    x, y = (torch.randint(0, 7, (2, 6), generator=gen) for _ in range(2))
    return model, gpt_loss_fn(model, x, y), {k: p.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("method,rtol", [("fwd_rev", 1e-10), ("rev_rev", 1e-10), ("finite_diff", 1e-5)])
def test_two_layer_transformer_against_dense_hessian(gen, method, rtol):
    model, loss_fn, params = _small_gpt_problem(gen, 1)
    with C.exact_attention():      # the dense reference needs double backward through attention
        H = torch.autograd.functional.hessian(lambda f: loss_fn(_unflatten(f, params)),
                                              _flatten(params), vectorize=True)
    g = _full_grad(loss_fn, params)
    dirs = [_rand_like(params, gen) for _ in range(2)]
    groups = C.groups_by_module(model, 2)        # embed, blocks.0, blocks.1, norm, lm_head
    q = C.directional_quadratics(loss_fn, params, dirs, groups=groups, batch_size=4, method=method)
    _check_against_hessian(q, params, dirs, groups, H, g, rtol)


# method, and the method whose separate calls give the reference with its tolerance (Taylor mode
# runs each partition on its own, so it is checked against the HVP route at float64 rounding)
@pytest.mark.parametrize("method,reference,rtol", [("fwd_rev", "fwd_rev", 1e-12), ("rev_rev", "rev_rev", 1e-12),
                                                   ("finite_diff", "finite_diff", 1e-12), ("taylor", "rev_rev", 1e-8)])
def test_partitions_share_one_pass(gen, method, reference, rtol):
    """directional_quadratics_for_partitions: each partition's fields as its own call gives them,
    for one direction and a list. rev_rev and finite_diff evaluate the loss's primal once for all
    partitions (one evaluation fewer per extra partition than separate calls); fwd_rev, which runs
    the forward in each of its HVP passes, packs all partitions' HVPs into shared passes of
    batch_size (ceil(K·ΣG / 3) evaluations against Σ ceil(K·G / 3))."""
    model, loss_fn, params = _small_gpt_problem(gen, 3)
    partitions = {"module": C.groups_by_module(model, 2), "top": C.groups_by_module(model, 1)}
    calls = []

    def counted(p):
        calls.append(1)
        return loss_fn(p)

    sizes = [len(groups) for groups in partitions.values()]
    for k, dirs in ((1, _rand_like(params, gen)), (2, [_rand_like(params, gen) for _ in range(2)])):
        shared_fn = loss_fn if method == "taylor" else counted   # Taylor mode needs the GPT's loss itself
        calls.clear()
        got = C.directional_quadratics_for_partitions(shared_fn, params, dirs, partitions, method=method, batch_size=3)
        shared = len(calls)
        assert list(got) == ["module", "top"]
        calls.clear()
        for name, groups in partitions.items():
            want = C.directional_quadratics(counted, params, dirs, groups=groups, method=reference, batch_size=3)
            assert got[name].group_names == want.group_names
            scale = want.blocks.abs().max().item()
            for field in ("gain", "curvature", "norm_sq", "nds", "blocks", "within", "cross"):
                torch.testing.assert_close(getattr(got[name], field), getattr(want, field), rtol=rtol,
                                           atol=rtol * scale)
        if method == "fwd_rev":
            assert (shared, len(calls)) == (math.ceil(k * sum(sizes) / 3), sum(math.ceil(k * g / 3) for g in sizes))
        elif method != "taylor":
            assert len(calls) - shared == len(partitions) - 1, (len(calls), shared)
    with pytest.raises(ValueError, match="partitions must be a non-empty dict"):
        C.directional_quadratics_for_partitions(loss_fn, params, dirs, {}, method=method)


@pytest.mark.parametrize("blocks", [False, True])
def test_taylor_method_matches_hvp_on_gpt(gen, blocks):
    from muonkern.models import GPT, GPTConfig, gpt_loss_fn

    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=11, context=8, n_layer=2, n_head=2, d_model=8)).double()
    x = torch.randint(0, 11, (2, 8), generator=gen)
    y = torch.randint(0, 11, (2, 8), generator=gen)
    loss_fn = gpt_loss_fn(model, x, y)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    dirs = [_rand_like(params, gen) for _ in range(2)]
    groups = C.groups_by_module(model, 2)
    ref = C.directional_quadratics(loss_fn, params, dirs, groups=groups, blocks=blocks, batch_size=4)
    got = C.directional_quadratics(loss_fn, params, dirs, groups=groups, blocks=blocks,
                                   method="taylor", batch_size=5)
    for field in ("gain", "curvature", "norm_sq", "nds") + (("blocks", "within", "cross") if blocks else ()):
        want = getattr(ref, field)
        torch.testing.assert_close(getattr(got, field), want, rtol=1e-8,
                                   atol=1e-10 * want.abs().max().item())
    assert got.group_names == (list(groups) if blocks else [])


def test_taylor_method_needs_a_gpt_loss(gen):
    params, loss_fn = _mlp_problem(gen)
    with pytest.raises(ValueError, match="gpt_loss_fn"):
        C.directional_quadratics(loss_fn, params, _rand_like(params, gen), method="taylor")


# ---------------------------------------------------------------------------- batching, attention

@pytest.mark.parametrize("method", ["fwd_rev", "rev_rev"])
@pytest.mark.parametrize("batch_size", [2, 5, 64])
def test_batched_products_match_full_hessian(gen, method, batch_size):
    # 3 directions x 2 groups = 6 HVPs: passes of 2, of 5 then 1, and one pass of all 6
    params, loss_fn = _mlp_problem(gen)
    H, g = _full_hessian(loss_fn, params), _full_grad(loss_fn, params)
    dirs = [_rand_like(params, gen) for _ in range(3)]
    groups = {"layer1": ["w1", "b1"], "layer2": ["w2", "b2"]}
    q = C.directional_quadratics(loss_fn, params, dirs, groups=groups, method=method,
                                 batch_size=batch_size)
    _check_against_hessian(q, params, dirs, groups, H, g)


@pytest.mark.parametrize("method", ["fwd_rev", "rev_rev", "finite_diff"])
def test_without_blocks_one_product_per_direction(gen, method):
    params, loss_fn = _mlp_problem(gen)
    H, g = _full_hessian(loss_fn, params), _full_grad(loss_fn, params)
    dirs = [_rand_like(params, gen) for _ in range(3)]
    q = C.directional_quadratics(loss_fn, params, dirs, blocks=False, method=method, batch_size=2)
    assert q.blocks is None and q.within is None and q.cross is None and q.group_names == []
    rtol = 1e-6 if method == "finite_diff" else 1e-10
    for i, u in enumerate(dirs):
        uf = _flatten(u)
        torch.testing.assert_close(q.curvature[i], uf @ H @ uf, rtol=rtol, atol=0.0)
        # every method's gain comes from an exact gradient (finite_diff computes its own)
        torch.testing.assert_close(q.gain[i], g @ uf, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(q.nds[i], (uf @ H @ uf) / (uf @ uf), rtol=rtol, atol=0.0)
    single = C.directional_quadratics(loss_fn, params, dirs[0], blocks=False, method=method)
    assert single.curvature.shape == () and single.blocks is None


def test_estimators_independent_of_batch_size(gen):
    params, loss_fn = _mlp_problem(gen)
    u = _rand_like(params, gen)
    got = []
    for batch_size in (1, 3):
        g1 = torch.Generator().manual_seed(7)
        g2 = torch.Generator().manual_seed(8)
        got.append((C.within_estimate(loss_fn, params, u, None, samples=5, generator=g1,
                                      batch_size=batch_size),
                    C.hessian_trace(loss_fn, params, samples=5, generator=g2,
                                    batch_size=batch_size)))
    for a, b in zip(got[0], got[1]):
        torch.testing.assert_close(torch.stack(a), torch.stack(b), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method,math_only", [("fwd_rev", True), ("rev_rev", True),
                                              ("finite_diff", False)])
def test_exact_methods_enter_math_attention(gen, method, math_only):
    params, loss_fn = _mlp_problem(gen)
    seen = []

    def recording_loss(p):
        seen.append(not torch.backends.cuda.flash_sdp_enabled()
                    and not torch.backends.cuda.mem_efficient_sdp_enabled()
                    and torch.backends.cuda.math_sdp_enabled())
        return loss_fn(p)

    C.directional_quadratics(recording_loss, params, _rand_like(params, gen), method=method,
                             blocks=False)
    assert seen and all(s == math_only for s in seen)
    assert torch.backends.cuda.flash_sdp_enabled()      # restored afterwards


# ---------------------------------------------------------------------------- errors

def test_errors(gen):
    params, loss_fn = _mlp_problem(gen)
    u = _rand_like(params, gen)
    with pytest.raises(ValueError, match="unknown hvp method"):
        C.hvp(loss_fn, params, u, method="gauss_newton")
    with pytest.raises(ValueError, match="unknown method"):
        C.directional_quadratics(loss_fn, params, u, method="nope")
    bad = dict(u)
    del bad["b2"]
    bad["extra"] = torch.zeros(2, dtype=DT)
    with pytest.raises(ValueError, match=r"missing \['b2'\].*unexpected \['extra'\]"):
        C.hvp(loss_fn, params, bad)
    with pytest.raises(ValueError, match="keys must match"):
        C.directional_quadratics(loss_fn, params, [u, bad])
    with pytest.raises(ValueError, match="shape"):
        C.hvp(loss_fn, params, dict(u, w1=torch.zeros(4, 5, dtype=DT)))
    with pytest.raises(TypeError, match="floating"):
        C.hvp(loss_fn, dict(params, b2=torch.zeros(2, dtype=torch.int64)), u)
    with pytest.raises(ValueError, match="more than one group"):
        C.directional_quadratics(loss_fn, params, u,
                                 groups={"a": ["w1", "b1"], "b": ["b1", "w2", "b2"]})
    with pytest.raises(ValueError, match=r"in no group: \['b2'\]"):
        C.directional_quadratics(loss_fn, params, u, groups={"a": ["w1", "b1", "w2"]})
    with pytest.raises(ValueError, match="is empty"):
        C.directional_quadratics(loss_fn, params, u,
                                 groups={"a": ["w1", "b1", "w2", "b2"], "b": []})
    with pytest.raises(ValueError, match="not in params"):
        C.within_estimate(loss_fn, params, u, {"a": ["w1", "b1", "w2", "b2", "w3"]}, samples=4)
    with pytest.raises(ValueError, match="empty list"):
        C.directional_quadratics(loss_fn, params, [])
    for bad in (1, 2.0, True):
        with pytest.raises(ValueError, match=r"samples must be an int >= 2 \(for a standard error\)"):
            C.hessian_trace(loss_fn, params, samples=bad)
    with pytest.raises(ValueError, match="k must be"):
        C.top_eigenvalues(loss_fn, params, k=100)
    with pytest.raises(ValueError, match="depth"):
        C.groups_by_module(params, 0)
    for bad_batch in (0, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            C.directional_quadratics(loss_fn, params, u, batch_size=bad_batch)
    with pytest.raises(ValueError, match="scalar"):
        C.hvp(lambda p: p["b2"] * 2, params, u, method="rev_rev")
    for bad_value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"directions\[1\]\['w2'\] has non-finite"):
            C.directional_quadratics(loss_fn, params, [u, dict(u, w2=u["w2"].clone().fill_(bad_value))])
        with pytest.raises(ValueError, match=r"params\['b1'\] has non-finite"):
            C.hvp(loss_fn, dict(params, b1=params["b1"].clone().fill_(bad_value)), u)
    low = {k: v.to(torch.bfloat16) for k, v in params.items()}
    with pytest.raises(ValueError, match="finite_diff.*bfloat16"):
        C.hvp(loss_fn, low, u, method="finite_diff")
    with pytest.raises(ValueError, match="finite_diff.*float16"):
        C.finite_diff_step(dict(params, b2=params["b2"].half()), u)


def test_finite_diff_gain_is_the_exact_gradients_in_float32():
    """finite_diff takes g·u from a gradient of its own, not from the mean of a shifted pair
    (off by O(‖hv‖²), percent-level in fp32): it equals the exact methods' gain to fp32 rounding."""
    from muonkern.models import GPT, GPTConfig, gpt_loss_fn
    gen = torch.Generator().manual_seed(5)
    model = GPT(GPTConfig(vocab_size=64, context=16, n_layer=2, n_head=2, d_model=32))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    x, y = (torch.randint(0, 64, (4, 16), generator=gen) for _ in range(2))
    loss_fn = gpt_loss_fn(model, x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    u = {k: 1e-2 * torch.randn(p.shape, generator=gen) for k, p in params.items()}
    groups = C.groups_by_module(params, 2)
    fd = C.directional_quadratics(loss_fn, params, u, groups=groups, method="finite_diff")
    exact = C.directional_quadratics(loss_fn, params, u, groups=groups, method="rev_rev")
    assert abs(fd.gain.item() - exact.gain.item()) <= 1e-5 * abs(exact.gain.item())
