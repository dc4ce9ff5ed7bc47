"""Curvature probes on the GPU: the 11M GPT of DESIGN.md (GPTConfig "small": 6 layers, d=384,
byte vocabulary) at batch 32x256, fp32, side by side with torch.func and with a gradient.

    python -m pytest bench/test_bench_curvature.py -q

Rows (one table, written to $MUONKERN_BENCH_OUT/curvature_bench.md):
  gradient (math) / (efficient)     loss + backward with that SDPA backend
  torch.func hvp / vmap             jvp of grad (one direction, or vmapped over K tangents); no dots
  muonkern <method>, K dirs         directional_quadratics(blocks=False, batch_size=K): gain,
                                    curvature, ‖u‖², NDS (taylor: Taylor-mode forward, against the
                                    efficient-attention gradient)
  ... blocks, 8 groups              the 8x8 block matrix (embed, six blocks, norm+head) of one
                                    direction; torch.func: vmap over the 8 restricted tangents plus
                                    a loop of dot products
  dirquad rows                      the dot products alone, for the GPT's 51 parameter tensors: a
                                    loop of torch.dot (float64), torch._foreach_mul + sums, the op
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import muonkern
from muonkern import curvature
from muonkern.models import GPT, GPTConfig, gpt_loss_fn

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: no CUDA GPU"),
              pytest.mark.filterwarnings("ignore:muonkern exact curvature")]

BATCH, T = 32, 256
CASE = "GPT small 32x256 fp32"
GRAD = "gradient (math)"


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small")).cuda()
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randint(0, 256, (BATCH, T), device="cuda", generator=gen)
    y = torch.randint(0, 256, (BATCH, T), device="cuda", generator=gen)
    params = {k: p.detach() for k, p in model.named_parameters()}
    dirs = [{k: 1e-3 * torch.randn(p.shape, device="cuda", generator=gen) for k, p in params.items()}
            for _ in range(8)]
    groups = {"embed": ["embed.weight"]}
    for i in range(6):
        groups[f"blocks.{i}"] = [k for k in params if k.startswith(f"blocks.{i}.")]
    groups["head"] = ["norm.weight", "lm_head.weight"]
    assert sum(map(len, groups.values())) == len(params)
    return model, gpt_loss_fn(model, x, y), params, dirs, groups


def _gradient(loss_fn, params, backend):
    def run():
        leaves = {k: t.requires_grad_(True) for k, t in ((k, t.detach()) for k, t in params.items())}
        with sdpa_kernel(backend):
            torch.autograd.grad(loss_fn(leaves), list(leaves.values()))
    return run


def _torch_func_vmap(loss_fn, params, tangents):
    grad_fn = torch.func.grad(loss_fn)
    stacked = {k: torch.stack([t[k] for t in tangents]) for k in params}

    def run():
        with sdpa_kernel(SDPBackend.MATH):
            if len(tangents) == 1:
                return torch.func.jvp(grad_fn, (params,), (tangents[0],))
            return torch.func.vmap(lambda t: torch.func.jvp(grad_fn, (params,), (t,)))(stacked)
    return run


def _restricted(u, groups):
    return [{k: (t if k in members else torch.zeros_like(t)) for k, t in u.items()} for members in groups.values()]


def _torch_func_blocks(loss_fn, params, u, groups):
    hvps = _torch_func_vmap(loss_fn, params, _restricted(u, groups))

    def run():
        _, hv = hvps()
        # M[a, b] = u_a · (H u_b)_a: the straightforward loop of float64 dot products
        return torch.stack([torch.stack([sum(torch.dot(u[k].flatten().double(), hv[k][b].flatten().double())
                                             for k in members) for b in range(len(groups))])
                            for members in groups.values()])
    return run


def _muonkern(loss_fn, params, dirs, method, blocks=False, groups=None):
    directions = dirs[0] if len(dirs) == 1 else dirs
    batch = len(groups) if blocks else len(dirs)
    return lambda: curvature.directional_quadratics(loss_fn, params, directions, groups=groups,
                                                    method=method, blocks=blocks, batch_size=batch)


# (impl, per, reference, builder)
PROBES = [
    (GRAD, 1, None, lambda m, f, p, d, g: _gradient(f, p, SDPBackend.MATH)),
    ("gradient (efficient)", 1, GRAD, lambda m, f, p, d, g: _gradient(f, p, SDPBackend.EFFICIENT_ATTENTION)),
    ("torch.func hvp, 1 dir", 1, GRAD, lambda m, f, p, d, g: _torch_func_vmap(f, p, d[:1])),
    ("muonkern fwd_rev, 1 dir", 1, GRAD, lambda m, f, p, d, g: _muonkern(f, p, d[:1], "fwd_rev")),
    ("muonkern rev_rev, 1 dir", 1, GRAD, lambda m, f, p, d, g: _muonkern(f, p, d[:1], "rev_rev")),
    ("muonkern finite_diff (efficient), 1 dir", 1, "gradient (efficient)",
     lambda m, f, p, d, g: _muonkern(f, p, d[:1], "finite_diff")),
    ("torch.func vmap, 2 dirs", 2, GRAD, lambda m, f, p, d, g: _torch_func_vmap(f, p, d[:2])),
    ("muonkern fwd_rev, 2 dirs", 2, GRAD, lambda m, f, p, d, g: _muonkern(f, p, d[:2], "fwd_rev")),
    ("torch.func vmap, 8 dirs", 8, GRAD, lambda m, f, p, d, g: _torch_func_vmap(f, p, d[:8])),
    ("muonkern fwd_rev, 8 dirs", 8, GRAD, lambda m, f, p, d, g: _muonkern(f, p, d[:8], "fwd_rev")),
    ("muonkern rev_rev, 8 dirs", 8, GRAD, lambda m, f, p, d, g: _muonkern(f, p, d[:8], "rev_rev")),
    # Taylor mode (the package's GPT only): one forward pass with second-order jets, no HVP; its
    # own exact attention kernel, so it is set against the fused-attention gradient
    ("muonkern taylor, 1 dir", 1, "gradient (efficient)", lambda m, f, p, d, g: _muonkern(f, p, d[:1], "taylor")),
    ("muonkern taylor, 8 dirs", 8, "gradient (efficient)", lambda m, f, p, d, g: _muonkern(f, p, d[:8], "taylor")),
    ("torch.func blocks, 8 groups", 1, "muonkern fwd_rev, 1 dir",
     lambda m, f, p, d, g: _torch_func_blocks(f, p, d[0], g)),
    ("muonkern blocks, 8 groups", 1, "muonkern fwd_rev, 1 dir",
     lambda m, f, p, d, g: _muonkern(f, p, d[:1], "fwd_rev", blocks=True, groups=g)),
]


@pytest.mark.parametrize("impl,per,reference,build", PROBES, ids=[p[0] for p in PROBES])
def test_probe(problem, time_probe, impl, per, reference, build):
    model, loss_fn, params, dirs, groups = problem
    time_probe(build(model, loss_fn, params, dirs, groups), CASE, impl, reference=reference, per=per)


# ---- the dot products alone --------------------------------------------------------------------

def _dot_lists(params, K, R, seed=2):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda t: torch.randn(t.shape, device="cuda", generator=gen)  # noqa: E731
    grads = [rand(t) for t in params.values()]
    dirs = [rand(t) for _ in range(K) for t in params.values()]
    prods = [rand(t) for _ in range(K * R) for t in params.values()]
    return grads, dirs, prods


def _columns(grads, dirs, prods):
    """Per direction k: (u_k's tensors, [g, u_k, products of k...]) in the dirquad layout."""
    P = len(grads)
    K, R = len(dirs) // P, len(prods) // len(dirs)
    for k in range(K):
        us = dirs[k * P:(k + 1) * P]
        yield us, [grads, us] + [prods[(k * R + r) * P:(k * R + r + 1) * P] for r in range(R)]


def _loop(grads, dirs, prods):
    return lambda: [[[torch.dot(u.flatten().double(), o.flatten().double()) for u, o in zip(us, col)]
                     for col in cols] for us, cols in _columns(grads, dirs, prods)]


def _foreach(grads, dirs, prods):
    return lambda: [[torch.stack([t.sum(dtype=torch.float64) for t in torch._foreach_mul(us, col)])
                     for col in cols] for us, cols in _columns(grads, dirs, prods)]


DOTS = [("loop of torch.dot", None, _loop), ("torch._foreach_mul + sums", "loop of torch.dot", _foreach),
        ("muonkern.dirquad", "loop of torch.dot", lambda g, d, p: (lambda: muonkern.dirquad(g, d, p)))]


@pytest.mark.parametrize("K,R", [(8, 1), (1, 8)], ids=["8 dirs x 1 hvp", "1 dir x 8 hvps"])
@pytest.mark.parametrize("impl,reference,build", DOTS, ids=[d[0] for d in DOTS])
def test_dot_products(problem, time_probe, K, R, impl, reference, build):
    _, _, params, _, _ = problem
    lists = _dot_lists(params, K, R)
    ours = muonkern.dirquad(*lists)
    loop = _loop(*lists)()
    expected = torch.tensor([[[float(v) for v in col] for col in k] for k in loop], dtype=torch.float64)
    torch.testing.assert_close(ours.cpu(), expected, rtol=1e-9, atol=1e-9)
    time_probe(build(*lists), f"dot products, {K} dirs x {R} products, {len(params)} tensors", impl,
               reference=reference)
