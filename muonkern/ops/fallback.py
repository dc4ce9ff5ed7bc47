"""Pure-PyTorch implementations of muonkern's ops.

`ns5_reference` is the reference iteration itself (KellerJordan/Muon's zeropower_via_newtonschulz5,
batched over leading dims, with per-step coefficients; on CPU its bf16 GEMMs run in fp32, see
`products_for`) or, with algorithm="gram", the same polynomial through the Gram matrix
(`gram_iteration`); `dirquad_reference` the per-parameter dot products of the curvature probes.
They run on any device and are what `torch.ops.muonkern.*` executes when the compiled extension is
absent. The C++ CPU kernel runs the same ATen ops in the same order; the CUDA kernels run their own.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from .dirquad_args import dirquad_sizes
from .ns5_args import check_ns5_args, gram_restart_steps, resolve_algorithm, step_coefficients


def ns5_reference(G: torch.Tensor, steps: int = 5, coefficients: Sequence[float] | None = None,
                  eps: float = 1e-7, algorithm: str = "auto") -> torch.Tensor:
    """The op's kernel; its defaults are the schema's (the dispatcher leaves out arguments equal to
    their schema default). algorithm="standard" gives KellerJordan's iteration at every shape."""
    check_ns5_args(G, steps, coefficients, eps, algorithm)
    X = G.bfloat16()
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + eps)
    triples = step_coefficients(steps, coefficients)
    if resolve_algorithm(algorithm, G, steps) == "gram":
        return gram_iteration(X, triples, gram_restart_steps(steps)).to(G.dtype).contiguous()
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    matmul = products_for(X).matmul
    for a, b, c in triples:
        A = matmul(X, X.mT)
        B = b * A + c * matmul(A, A)
        X = a * X + matmul(B, X)
    if transposed:
        X = X.mT
    return X.to(G.dtype).contiguous()


class Products(NamedTuple):
    """The GEMMs of the iterations: matmul(a, b) and baddbmm(C, A, B, beta, alpha), each accumulated
    in fp32 and rounded once to the operands' dtype."""

    matmul: Callable
    baddbmm: Callable


def _fp32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a.float(), b.float()).to(a.dtype)


def _fp32_baddbmm(C: torch.Tensor, A: torch.Tensor, B: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    return torch.baddbmm(C.float(), A.float(), B.float(), beta=beta, alpha=alpha).to(C.dtype)


NATIVE_PRODUCTS = Products(torch.matmul, lambda C, A, B, beta, alpha: torch.baddbmm(C, A, B, beta=beta, alpha=alpha))


@functools.cache
def cpu_has_avx512_bf16() -> bool:
    """Whether ATen's CPU bf16 GEMM runs on bf16 instructions here (AVX512-BF16; AMX too where
    present); the C++ CPU kernel's rule is the same (csrc/ns5_gram.h, cpu_has_avx512_bf16)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def products_for(X: torch.Tensor) -> Products:
    """The GEMMs for X's dtype and device, chosen once per call. bf16 on a CPU without AVX512-BF16
    runs as fp32 GEMMs of the bf16 values: their products are exact in fp32, so it is the same
    arithmetic, and ATen's bf16 GEMM ran 4-90x slower there, by layout; with it (and AMX), ATen's
    ran 7-13x faster than fp32 (README, *CPU*). The C++ CPU kernel does the same (csrc/ns5_gram.cpp,
    ns5_matmul)."""
    if X.dtype == torch.bfloat16 and X.device.type == "cpu" and not cpu_has_avx512_bf16():
        return Products(_fp32_matmul, _fp32_baddbmm)
    return NATIVE_PRODUCTS


class GramProducts(NamedTuple):
    """The products of the Gram iteration, on (batch, ·, ·) tensors: `dense_gram_products` are
    dense GEMMs (`matmul`, `baddbmm`); muonkern.ops.triton_gram computes the symmetric ones on one triangle."""

    gram: Callable         # Y -> Y Yᵀ (wide) or Yᵀ Y (tall)
    polynomial: Callable   # (R, a, b, c) -> a I + b R + c R R
    accumulate: Callable   # (P, Q) -> P Q (wide) or Q P (tall): the new Q
    conjugate: Callable    # (P, R) -> P R P
    apply: Callable        # (Q, Y) -> Q Y (wide) or Y Q (tall)
    output: Callable       # (Q, X) -> the result, apply's product (in the result's dtype where it can)


def dense_gram_products(wide: bool, dense: Products = NATIVE_PRODUCTS) -> GramProducts:
    matmul, baddbmm = dense

    def gram(Y):
        return matmul(Y, Y.mT) if wide else matmul(Y.mT, Y)

    def polynomial(R, a, b, c):
        # baddbmm with alpha = 0 ignores beta for bf16 on CPU (torch 2.14): c = 0 takes b R alone
        P = baddbmm(R, R, R, beta=b, alpha=c) if c != 0 else R * b
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        return P

    def apply(Q, Y):
        return matmul(Q, Y) if wide else matmul(Y, Q)

    return GramProducts(gram, polynomial, apply, lambda P, R: matmul(matmul(P, R), P), apply, apply)


def gram_iteration(X0: torch.Tensor, triples: Sequence[tuple[float, float, float]],
                   restarts: Sequence[int], products: Optional[GramProducts] = None) -> torch.Tensor:
    """The Newton-Schulz polynomial of the normalized X0 (..., m, n) computed on its Gram matrix, in
    X0's dtype: R = X0 X0ᵀ, Q = I; per step P = a I + b R + c R², R = P R P, Q = P Q; returns Q X0.

    P and R are polynomials in the same matrix, so they commute and Q X0 equals the standard
    iteration's X up to rounding; P R P keeps R symmetric better than P² R. After each step listed
    in `restarts` (1-based) the iteration starts over from X0 = Q X0. A tall X0 (m > n) uses the
    n×n Gram matrix X0ᵀ X0 and multiplies from the right (X0 Q) instead of transposing. The C++
    CPU kernel runs the same ops (csrc/ns5_gram.cpp); the CUDA kernel the same products on cuBLASLt.
    `products` (default: `dense_gram_products`) computes them."""
    wide = X0.size(-2) <= X0.size(-1)
    products = products or dense_gram_products(wide, products_for(X0))
    Q, X = gram_factors(X0.reshape(math.prod(X0.shape[:-2]), X0.size(-2), X0.size(-1)), triples, restarts, products)
    out = X if Q is None else products.output(Q, X)
    return out.reshape(X0.shape)


def gram_factors(X: torch.Tensor, triples: Sequence[tuple[float, float, float]], restarts: Sequence[int],
                 products: GramProducts) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """gram_iteration up to its last product: (Q, X) with Q the accumulated polynomial (None: the
    identity) and X the iterate it applies to (X0, or Q·X0 of the last restart); X (batch, m, n)."""
    R, Q = products.gram(X), None
    for s, (a, b, c) in enumerate(triples, start=1):
        P = products.polynomial(R, a, b, c)
        Q = P if Q is None else products.accumulate(P, Q)
        if s == len(triples):
            break
        if s in restarts:
            X, Q = products.apply(Q, X), None
            R = products.gram(X)
        else:
            R = products.conjugate(P, R)
    return Q, X


def dirquad_reference(grads: List[torch.Tensor], directions: List[torch.Tensor],
                      products: List[torch.Tensor]) -> torch.Tensor:
    K, R, P = dirquad_sizes(grads, directions, products)
    out = torch.empty((K, 2 + R, P), dtype=torch.float64, device=grads[0].device)
    for k in range(K):
        for p in range(P):
            u = directions[k * P + p].reshape(-1).double()
            others = [grads[p], directions[k * P + p]]
            others += [products[(k * R + r) * P + p] for r in range(R)]
            for c, other in enumerate(others):
                out[k, c, p] = torch.dot(u, other.reshape(-1).double())
    return out
