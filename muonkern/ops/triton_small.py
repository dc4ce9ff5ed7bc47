"""ns5 of small matrices (short side <= 128) in one Triton launch: one program per matrix, all steps.

The CUDA fused kernel (csrc/kernels/ns5_fused_kernel.cuh) runs these shapes on Ampere's mma.sync, about
1.4 TFLOP/s per SM; on Hopper Triton emits wgmma, which this kernel is here to measure against it.

One program holds the m×m Gram matrix of its (wide-oriented) iterate X (m <= n, padded to at least
64 rows, a wgmma warp group's) in registers and streams X through in chunks of CHUNK columns, kept
in a bf16 scratch buffer that stays in L2:

    normalize:  sum of squares of G (pass 1); X = G / (‖G‖_F + eps) to scratch, A = Σ X_c X_cᵀ (pass 2;
                the reference's roundings: bf16 G, bf16 norm, bf16 quotient, correctly rounded)
    each step:  B = b·A + c·A·A (registers); per chunk Y_c = a·X_c + B·X_c, stored in place of X_c,
                and A' = Σ Y_c Y_cᵀ for the next step, so every step reads and writes X once.

The last step writes the output (G's dtype, transposed back for a tall G) instead of the scratch.
The arithmetic is the standard iteration's (muonkern.ops.fallback.ns5_reference with
algorithm="standard"): operands rounded to bf16 where the reference rounds them (X, A, B), fp32
accumulation, the polynomial in fp32 epilogues. A chunk is written by the program that reads it and
a barrier ends each step, so no other program and no other step sees a partial update.

CPU tensors run under Triton's interpreter (TRITON_INTERPRET=1), which the tests use with float32
operands (``dtype=torch.float32``: exact-input products).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .ns5_args import step_coefficients
from .triton_symmetric import _interpreting, check_triton_ns5_args, dot_precision, triton

if triton is not None:
    import triton.language as tl

__all__ = ["CONFIGS", "MAX_SHORT_SIDE", "ns5_small"]

MAX_SHORT_SIDE = 128   # csrc/ns5_cuda.cpp's kSmallMaxShortSide routes up to this
# the scratch's columns are padded to a multiple of this, so every chunk size dividing it stays inside
SCRATCH_PAD = 128


if triton is not None:

    @triton.jit
    def _ns5_small_kernel(G, OUT, SCRATCH, COEF, M, N, steps, eps,
                          s_gb, s_gm, s_gn, s_ob, s_om, s_on, s_sb, s_sm,
                          BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """ns5 of matrix program_id(0): G and OUT read and written through strides that present the
        wide orientation (M <= N rows × columns); SCRATCH (batch, BLOCK_M, ≥ N) in the operand
        dtype; COEF (steps, 3) fp32."""
        b = tl.program_id(0).to(tl.int64)
        G += b * s_gb
        OUT += b * s_ob
        SCRATCH += b * s_sb
        rows = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, CHUNK)
        in_rows = rows < M
        dtype = SCRATCH.dtype.element_ty

        # normalize, pass 1: ‖G‖_F of the operand-rounded G (as the reference: bf16 G, bf16 norm)
        sumsq = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
        for c0 in range(0, N, CHUNK):
            mask = in_rows[:, None] & ((c0 + cols) < N)[None, :]
            g = tl.load(G + rows[:, None] * s_gm + (c0 + cols)[None, :] * s_gn, mask=mask, other=0.0)
            g = g.to(dtype).to(tl.float32)
            sumsq += g * g
        # correctly rounded sqrt and division, as torch's (Triton's defaults are approximate)
        norm = tl.sqrt_rn(tl.sum(tl.sum(sumsq, axis=1), axis=0)).to(dtype).to(tl.float32)
        denom = (norm + eps).to(dtype).to(tl.float32)

        # pass 2: X to scratch (padding rows and columns hold zeros), A = X Xᵀ of the stored X;
        # with no steps, X is the output
        A = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for c0 in range(0, N, CHUNK):
            mask = in_rows[:, None] & ((c0 + cols) < N)[None, :]
            g = tl.load(G + rows[:, None] * s_gm + (c0 + cols)[None, :] * s_gn, mask=mask, other=0.0)
            x = tl.div_rn(g.to(dtype).to(tl.float32), denom).to(dtype)
            if steps == 0:
                tl.store(OUT + rows[:, None] * s_om + (c0 + cols)[None, :] * s_on, x.to(OUT.dtype.element_ty),
                         mask=mask)
            else:
                tl.store(SCRATCH + rows[:, None] * s_sm + (c0 + cols)[None, :], x)
                A = tl.dot(x, tl.trans(x), A, input_precision=DOT_PRECISION)
        tl.debug_barrier()   # the scratch complete before any thread reads another's chunk

        for s in range(steps):
            a = tl.load(COEF + 3 * s)
            bb = tl.load(COEF + 3 * s + 1)
            cc = tl.load(COEF + 3 * s + 2)
            A_op = A.to(dtype)
            # A·A = A·Aᵀ (A symmetric); B = b·A + c·A·A in fp32, rounded once
            B = (bb * A_op.to(tl.float32) + cc * tl.dot(A_op, A_op, input_precision=DOT_PRECISION)).to(dtype)
            A = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
            last = s == steps - 1
            for c0 in range(0, N, CHUNK):
                x_ptrs = SCRATCH + rows[:, None] * s_sm + (c0 + cols)[None, :]
                x = tl.load(x_ptrs)
                y = tl.dot(B, x, a * x.to(tl.float32), input_precision=DOT_PRECISION)
                if last:
                    mask = in_rows[:, None] & ((c0 + cols) < N)[None, :]
                    tl.store(OUT + rows[:, None] * s_om + (c0 + cols)[None, :] * s_on,
                             y.to(OUT.dtype.element_ty), mask=mask)
                else:
                    y_op = y.to(dtype)
                    tl.store(x_ptrs, y_op)
                    A = tl.dot(y_op, tl.trans(y_op), A, input_precision=DOT_PRECISION)
            tl.debug_barrier()   # this step's chunks stored before the next step reads them


_coefficient_tensors: dict = {}


def _coefficients(steps: int, coefficients: Optional[Sequence[float]], device: torch.device) -> torch.Tensor:
    """The (steps, 3) fp32 triples on `device`, cached: one host-to-device copy per schedule."""
    triples = tuple(step_coefficients(steps, coefficients))
    key = (triples, device)
    if key not in _coefficient_tensors:
        _coefficient_tensors[key] = torch.tensor(triples, dtype=torch.float32, device=device).reshape(-1, 3)
    return _coefficient_tensors[key]


# (CHUNK, num_warps) candidates, autotuned per (M, N) on CUDA. sm_90 compiles without pipelining
# (tests/test_ns5_triton_small.py): BLOCK_M = 128 needs 8 warps (two wgmma groups of 64 rows) and
# chunks of at most 64 columns to stay within 255 registers (CHUNK 64: 255 registers, no spills; 16
# warps spill heavily); BLOCK_M = 64 fits one warp group (CHUNK 64: 168; 128: 255). CHUNK 32 with
# 8 warps is left out: compiled by triton 3.6 it faults (illegal address) on an H100.
CONFIGS = ((64, 8), (64, 4), (128, 4))
# No software pipelining (num_stages=1): triton 3.6's pipeliner fails on this kernel's loops
# (TritonGPUPipeline, sm_90); the chunks come from L2 anyway.
NUM_STAGES = 1
INTERPRETER_CHUNK = 16   # several chunks per row block on the tests' small shapes


def _fits(config: tuple[int, int], block_m: int) -> bool:
    chunk, warps = config
    return (warps == 8 and chunk <= 64) if block_m == 128 else warps == 4


if triton is not None:
    def _prune(configs, named_args, **kwargs):
        block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))
        return [c for c in configs if _fits((c.kwargs["CHUNK"], c.num_warps), block_m)]

    _ns5_small_autotuned = triton.autotune(
        configs=[triton.Config({"CHUNK": chunk}, num_warps=warps, num_stages=NUM_STAGES) for chunk, warps in CONFIGS],
        key=["M", "N"], prune_configs_by={"early_config_prune": _prune})(_ns5_small_kernel)


def _block_m(m: int) -> int:
    """The short side rounded up to a power of two, at least 64: a wgmma warp group's rows (with
    16 rows, tl.dot's least, sm_90 code falls back to mma.sync)."""
    return max(64, 1 << (m - 1).bit_length())   # plain ints: triton's helpers cost µs per call


def ns5_small(G: torch.Tensor, steps: int = 5, coefficients: Optional[Sequence[float]] = None,
              eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16,
              config: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """ns5 (standard iteration) of every matrix of G (…, m, n) with min(m, n) <= 128 in one launch.
    Operands in ``dtype`` (bf16 as the reference; float32 for exactness tests under the
    interpreter). ``config``: (CHUNK, num_warps), default autotuned over CONFIGS on a GPU, where
    only CONFIGS are accepted. Returns G's dtype and shape, contiguous. Raises ValueError for a
    short side over MAX_SHORT_SIDE."""
    check_triton_ns5_args("ns5_small", G, steps, coefficients, eps, dtype)
    m, n = G.shape[-2:]
    if min(m, n) > MAX_SHORT_SIDE:
        raise ValueError(f"ns5_small: the short side must be at most {MAX_SHORT_SIDE}, got shape {tuple(G.shape)}")
    if config is not None and (config[0] < 16 or SCRATCH_PAD % config[0] != 0):
        raise ValueError(f"ns5_small: config's chunk must be 16, 32, 64 or 128 (a divisor of the scratch's "
                         f"{SCRATCH_PAD}-column padding), got {config[0]}")
    if config is not None and G.device.type == "cuda" and tuple(config) not in CONFIGS:
        raise ValueError(f"ns5_small: on a GPU config must be one of {CONFIGS} (the ones tested there), "
                         f"got {tuple(config)}")
    out = torch.empty(G.shape, dtype=G.dtype, device=G.device)
    if G.numel() == 0:
        return out
    G3 = G.reshape(-1, m, n)
    O3 = out.view(-1, m, n)
    tall = m > n
    if tall:   # the wide orientation through strides: no copy
        G3, O3 = G3.mT, O3.mT
    batch, M, N = G3.shape
    block_m = _block_m(M)
    scratch = torch.empty((batch, block_m, -(-N // SCRATCH_PAD) * SCRATCH_PAD), dtype=dtype, device=G.device)
    args = (G3, O3, scratch, _coefficients(steps, coefficients, G.device), M, N, steps, float(eps),
            *G3.stride(), *O3.stride(), scratch.stride(0), scratch.stride(1))
    precision = dot_precision(dtype)
    if config is None and G.device.type == "cuda" and not _interpreting():
        _ns5_small_autotuned[(batch,)](*args, BLOCK_M=block_m, DOT_PRECISION=precision)
    else:
        chunk, warps = config or (INTERPRETER_CHUNK, 4)
        _ns5_small_kernel[(batch,)](*args, BLOCK_M=block_m, CHUNK=chunk, DOT_PRECISION=precision,
                                    num_warps=warps, num_stages=NUM_STAGES)
    return out
