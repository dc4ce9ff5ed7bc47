"""CPU measurements behind numbers that tests and README.md cite (no GPU needed).

    python bench/cpu_measurements.py muon-vs-torch   # muonkern.optim.Muon against torch.optim.Muon
    python bench/cpu_measurements.py partitions      # study probe: two partitions shared or apart
    python bench/cpu_measurements.py grouped-tall    # ns5_grouped vs ns5 on tall CPU matrices
    python bench/cpu_measurements.py eps-drop        # ns5 at norm eps with eps dropped from the norm
    python bench/cpu_measurements.py quadratic-nds   # NDS at homogeneous curvature, ns5 and sign
    python bench/cpu_measurements.py dispatch        # the ops' Autograd kernel, per call
    python bench/cpu_measurements.py product-bound   # the bf16 product test's bound, right and wrong arithmetic
    python bench/cpu_measurements.py tiny-tail       # ns5's error on tiny matrices, 20000 draws a shape
    python bench/cpu_measurements.py bf16-gemm       # ATen's bf16 GEMM against fp32 GEMMs; ns5 calls

Each prints what it measured; one thread, as the tests run (bf16-gemm: every thread, as a caller's).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

import muonkern

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from reference import TORCH_MUON_SHAPES as MUON_SHAPES  # noqa: E402
from reference import TORCH_MUON_STEPS as MUON_STEPS  # noqa: E402
from reference import BF16_RTOL_TINY, bf16_product_excess, ns5_float64, rel_err, torch_muon_distance  # noqa: E402
from reference_ns5 import reference_ns5  # noqa: E402  (bench/, this file's folder)


def muon_vs_torch() -> None:
    same, wrong = [], []
    for shape in MUON_SHAPES:
        for adjust_lr in ("original", "match_rms_adamw"):
            for seed in range(5):
                same.append(torch_muon_distance(torch.Generator().manual_seed(seed), shape, adjust_lr))
                wrong.append(torch_muon_distance(torch.Generator().manual_seed(seed), shape, adjust_lr, momentum=0.9))
    print(f"{len(same)} runs of {MUON_STEPS} steps ({len(MUON_SHAPES)} shapes x 2 scale rules x 5 seeds), "
          f"max |ours - torch.optim.Muon| / (lr * scale): worst {max(same):.4f}; with momentum 0.9 "
          f"instead of 0.95 the least {min(wrong):.4f}")


def partitions() -> None:
    from muonkern.models import GPT, GPTConfig, exact_attention, gpt_loss_fn
    from muonkern.study.probe import partitions as study_partitions

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, context=64, n_layer=2, n_head=4, d_model=64))
    x, y = torch.randint(0, 65, (8, 64)), torch.randint(0, 65, (8, 64))
    loss_fn = gpt_loss_fn(model, x, y)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    delta = {k: 1e-3 * torch.randn_like(v) for k, v in theta.items()}
    groups = study_partitions(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exact_attention's notice
        with exact_attention():
            ratios = [_shared_over_apart(loss_fn, theta, delta, groups) for _ in range(5)]
    print(f"2-layer GPT probe, two partitions, shared / apart time over {len(ratios)} pairs: "
          f"{min(ratios):.2f} to {max(ratios):.2f}, mean {sum(ratios) / len(ratios):.2f}")


def _shared_over_apart(loss_fn, theta, delta, groups) -> float:
    """Time of one directional_quadratics_for_partitions call over that of one call per partition."""
    from muonkern.curvature import directional_quadratics, directional_quadratics_for_partitions
    start = time.perf_counter()
    for g in groups.values():
        directional_quadratics(loss_fn, theta, delta, groups=g, method="rev_rev")
    apart = time.perf_counter() - start
    start = time.perf_counter()
    directional_quadratics_for_partitions(loss_fn, theta, delta, groups, method="rev_rev")
    return (time.perf_counter() - start) / apart


def grouped_tall() -> None:
    torch.manual_seed(0)
    for shape in [(1024, 512), (512, 1024), (1536, 512), (640, 512), (300, 200)]:
        G = torch.randn(shape)
        diff = (muonkern.ns5(G) - muonkern.ns5_grouped([G, torch.randn(shape)])[0]).abs().max().item()
        print(f"{shape[0]}x{shape[1]}: max |ns5 - ns5_grouped| = {diff:.4g}")


def eps_drop() -> None:
    """tests/test_ns5_grouped.py::test_coefficients_steps_eps: matrices of norm eps (its shapes of
    short side >= 8), the float64 replica with eps against one that drops eps from the norm."""
    from test_ns5_grouped import SHAPES
    eps, errors = 1e-3, []
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        for shape in (s for s in SHAPES if min(s[-2:]) >= 8):
            G = torch.randn(shape, generator=gen, dtype=torch.float64)
            G = G / torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True) * eps
            errors.append(float(rel_err(ns5_float64(G, eps=0.0), ns5_float64(G, eps=eps)).max()))
    print(f"{len(errors)} matrices of norm {eps}: eps dropped from the norm misses the float64 replica "
          f"by {min(errors):.2f} to {max(errors):.2f}")


def quadratic_nds() -> None:
    """tests/test_quadratic.py::test_run_quadratic_rows: average NDS at alpha_w = 0 per method."""
    from muonkern.study import quadratic as q
    from muonkern.study.config import StudyConfig
    cfg = StudyConfig(quad_m=8, quad_n=10, quad_groups=3, quad_group_size=2, quad_alpha_ws=(0.0, 2.0),
                      quad_alpha_sigmas=(0.5,), quad_steps=12, quad_instances=2, quad_lr_per_decade=2)
    rows = [r for r in q.run_quadratic(cfg)["rows"] if r["alpha_w"] == 0]
    for method in q.METHODS:
        nds = [r["nds_avg"] for r in rows if r["method"] == method]
        print(f"{method}: average NDS at alpha_w = 0, {min(nds):.4f} to {max(nds):.4f} over {len(nds)} rows")


def dispatch() -> None:
    """README (*Not differentiable*): ns5 of a 1x2x2 input at steps=0, 20000 calls, best of 5 rounds,
    through the Autograd kernel and below it (the kernel skipped)."""
    G, op = torch.randn(1, 2, 2), torch.ops.muonkern.ns5

    def per_call_us() -> float:
        for _ in range(2000):
            op(G, 0)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(20000):
                op(G, 0)
            best = min(best, (time.perf_counter() - start) / 20000)
        return best * 1e6

    through = per_call_us()
    with torch._C._AutoDispatchBelowAutograd():
        below = per_call_us()
    print(f"ns5 per call ({muonkern.backend()} backend): {through:.2f} us through the Autograd kernel, "
          f"{below:.2f} us below it")


def product_bound() -> None:
    """tests/test_ns5.py::test_cpu_bf16_products_accumulate_in_fp32_and_round_once: the worst entry over
    reference.bf16_product_excess's bound, 10 seeds, for the package's CPU products and three wrong
    arithmetics."""
    from muonkern.ops.fallback import products_for

    def bf16_accumulation(a, b):  # sums rounded to bf16 every 8 terms
        out = torch.zeros(*a.shape[:-1], b.size(-1)).bfloat16()
        for j in range(0, a.size(-1), 8):
            out = (out.float() + a[..., j:j + 8].float() @ b[..., j:j + 8, :].float()).bfloat16()
        return out

    worst: dict[str, list[float]] = {}
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        a, b, C = (torch.randn(*shape, generator=gen).bfloat16() for shape in ((3, 48, 200), (3, 200, 40), (3, 48, 40)))
        matmul, baddbmm = products_for(a)
        for name, out, beta, alpha in [
                ("matmul", matmul(a, b), 0.0, 1.0), ("baddbmm", baddbmm(C, a, b, 0.5, -1.5), 0.5, -1.5),
                ("bf16 accumulation", bf16_accumulation(a, b), 0.0, 1.0),
                ("second rounding through fp16", (a.float() @ b.float()).half().bfloat16(), 0.0, 1.0),
                ("product rounded before beta C", (0.5 * C.float() + (-1.5 * (a @ b)).float()).bfloat16(), 0.5, -1.5)]:
            worst.setdefault(name, []).append(bf16_product_excess(out, C, a, b, beta, alpha))
    for name, ratios in worst.items():
        print(f"{name}: worst entry / bound {min(ratios):.2f} to {max(ratios):.2f} over 10 seeds")


def tiny_tail() -> None:
    """tests/reference.py (BF16_RTOL_TINY): ns5's relative error against float64 on 20000 Gaussian
    tiny matrices per shape, Jordan's coefficients."""
    gen = torch.Generator().manual_seed(7)
    for shape in [(3, 5), (4, 4), (5, 3), (2, 7), (7, 9)]:
        G = torch.randn(20000, *shape, generator=gen)
        err = rel_err(muonkern.ns5(G, algorithm="standard"), ns5_float64(G))
        q = torch.quantile(err, torch.tensor([0.5, 0.99, 0.999], dtype=err.dtype)).tolist()
        print(f"{shape[0]}x{shape[1]}: median {q[0]:.3f}, 99th percentile {q[1]:.3f}, 99.9th {q[2]:.3f}, "
              f"worst {err.max().item():.3f}; above BF16_RTOL_TINY: {(err > BF16_RTOL_TINY).double().mean().item():.1e}")


def bf16_gemm() -> None:
    """README (*CPU*): GFLOP/s of ATen's bf16 GEMM and of fp32 GEMMs of the same bf16 values (a batch
    of two, best of 3), then whole ns5 calls: the benchmarks' reference (ATen's bf16 GEMMs) against
    the op (the CPU's pick, muonkern.ops.fallback.products_for)."""
    from muonkern.ops.fallback import cpu_has_avx512_bf16

    def best_s(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    print(f"{torch.get_num_threads()} threads; AVX512-BF16: {cpu_has_avx512_bf16()}")
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2, 512, 1024, generator=gen).bfloat16()
    A = (X.float() @ X.float().mT).bfloat16()
    for name, a, b in [("X Xt, 512x1024", X, X.mT), ("A A, 512^2", A, A), ("A X", A, X)]:
        flops = 2 * a.size(0) * a.size(1) * a.size(2) * b.size(2)
        aten = best_s(lambda: a @ b)
        fp32 = best_s(lambda: (a.float() @ b.float()).bfloat16())
        print(f"{name}: ATen bf16 {flops / aten / 1e9:.1f} GFLOP/s, fp32 GEMMs of the bf16 values {flops / fp32 / 1e9:.1f}")
    for shape in [(4, 64, 256), (256, 256), (2, 512, 1024), (512, 2048)]:
        G = torch.randn(*shape, generator=gen)
        cells = [f"reference {best_s(lambda: reference_ns5(G)) * 1e3:.2f}"]
        cells += [f"op {algorithm} {best_s(lambda: muonkern.ns5(G, algorithm=algorithm)) * 1e3:.2f}"
                  for algorithm in ("standard", "gram")]
        print(f"ns5 {'x'.join(map(str, shape))}, ms: " + ", ".join(cells))


def main() -> None:
    jobs = {"muon-vs-torch": muon_vs_torch, "partitions": partitions, "grouped-tall": grouped_tall,
            "eps-drop": eps_drop, "quadratic-nds": quadratic_nds, "dispatch": dispatch,
            "product-bound": product_bound, "tiny-tail": tiny_tail, "bf16-gemm": bf16_gemm}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=list(jobs))
    job = parser.parse_args().job
    if job != "bf16-gemm":
        torch.set_num_threads(1)
    jobs[job]()


if __name__ == "__main__":
    main()
