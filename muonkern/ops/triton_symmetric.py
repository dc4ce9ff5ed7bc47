"""Triton kernels for the symmetric products of the Newton-Schulz iteration.

Each step of ns5 (wide orientation, X is m×n with m <= n) is

    A = X Xᵀ,   P = a·I + b·A + c·A·A,   X = P·X   (the reference's a·X + (b·A + c·A·A)·X).

A and P are symmetric, and so is A·A = A·Aᵀ. One kernel computes C = X Xᵀ (and, with the
linear and diagonal terms folded into its epilogue, C = c·A·Aᵀ + b·A + a·I) on the tiles on and
above the diagonal only, and stores every tile twice: as it is and mirrored across the diagonal.
That halves the FLOPs of two of the three products (4m²n + 2m³ per step become 3m²n + m³). The
third product, P·X, has no symmetry to use; it runs as ``torch.bmm`` (cuBLAS). With a·I inside P
it reads no third operand: ``torch.baddbmm(X, B, X, out=Y)`` first copies X into Y (cuBLAS
accumulates in place), 22 µs a step at 4096² on an H100.

Tile mapping. The output is cut into square BLOCK×BLOCK tiles, T = ceil(m / BLOCK) per side,
and the grid has one program per tile of the upper triangle, T(T+1)/2 per matrix, so no program
is launched only to exit. ``_upper_tile`` turns the 1-D program id into a (row, col) tile pair:
bands of GROUP tile rows, column by column within a band (the grouped ordering of Triton's
matmul tutorial, restricted to the triangle), so programs that run at the same time read the
same row blocks of X and find them in L2. A diagonal tile replaces its lower half with the mirror
of its upper half, so C is exactly symmetric and no element is written twice. A wide
configuration (``SyrkConfig.wide``) maps the triangle of 2·BLOCK-square tiles instead, two
programs per tile, each BLOCK × 2·BLOCK (the wgmma instruction's widest N at BLOCK = 128); there
the second program of the last diagonal tile may lie wholly past M and store nothing.

Operands bf16 (fp16 works too) with fp32 accumulation; float32 operands run exact-input
("ieee") products, which Triton's CPU interpreter runs and the tests use (slow on a GPU). Any
strides work, so a transposed view ``X.mT`` needs no copy. Tile shapes: autotuned on CUDA over a
few H100 configurations (``TUNED_CONFIGS``, keyed on the problem size) below ``LARGE_M`` output
rows, fixed from there on (``LARGE_M_CONFIG``), or given as ``config=``.

CPU tensors run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported). Without triton this module still imports; its functions then raise RuntimeError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .ns5_args import check_ns5_args, step_coefficients

try:
    import triton
    import triton.language as tl
except ImportError:  # the package must work without triton; the kernels below then do not exist
    triton = None

__all__ = ["CONFIGS", "LARGE_M", "LARGE_M_CONFIG", "TUNED_CONFIGS", "WIDE_CONFIGS", "SyrkConfig", "available",
           "default_config", "ns5_symmetric", "symmetric_polynomial", "wgmma_in_ptx", "xxt"]


@dataclass(frozen=True)
class SyrkConfig:
    """Launch parameters: square output tiles of BLOCK×BLOCK, BLOCK_K columns of X per loop step,
    and GROUP tile rows per band of the program order (L2 reuse). ``wide``: each program computes
    BLOCK×2·BLOCK, one row half of a 2·BLOCK-square tile of the triangle (see ``_syrk_kernel``)."""

    block: int
    block_k: int
    num_warps: int
    num_stages: int
    group: int = 8
    wide: bool = False


# H100 (sm_90, 228 KB of shared memory per SM): 128×128 tiles keep a wgmma pipeline busy on
# large matrices (the fastest of python bench/xxt_tiles.py's sweep: BLOCK_K 64 with 4-5 stages at
# 4096² and 8192², 32 with 4 stages at 2048×8192); 64×64 tiles give a small matrix enough programs
# (m = 512: 10 tiles of 128, 36 of 64). Shared memory: 2·BLOCK·BLOCK_K·2 bytes per stage, at most
# 160 KB here.
CONFIGS = (
    SyrkConfig(128, 64, num_warps=8, num_stages=4, group=16),
    SyrkConfig(128, 64, num_warps=8, num_stages=5, group=16),
    SyrkConfig(128, 64, num_warps=4, num_stages=3, group=16),
    SyrkConfig(128, 32, num_warps=4, num_stages=4),
    SyrkConfig(64, 128, num_warps=4, num_stages=4),
    SyrkConfig(64, 64, num_warps=4, num_stages=5),
)

# Wide tiles, 128×256 (wgmma's widest N): fewer operand loads per output on large matrices (X·Xᵀ
# at 8192² bf16 on an H100: 0.796 ms, against 0.902 for the best square configuration; at 4096² they
# lose, 0.152 against 0.116: `python bench/xxt_tiles.py --table`). Shared memory: (128 + 256)·BLOCK_K·2
# bytes per stage, 192 KB at 4 stages of BLOCK_K 64.
WIDE_CONFIGS = (
    SyrkConfig(128, 64, num_warps=8, num_stages=3, group=8, wide=True),
    SyrkConfig(128, 64, num_warps=8, num_stages=4, group=8, wide=True),
)

# what the autotuner times per (M, K, batch, kind)
TUNED_CONFIGS = CONFIGS + WIDE_CONFIGS

# Outputs of LARGE_M rows or more skip the autotuner and take the wide 3-stage tiles: the fastest
# configuration for both products at 8192² in two sweeps on two H100s (X·Xᵀ 0.796 and 0.746 ms,
# a·I + b·A + c·A·A 0.794 and 0.769) and the autotuner's own pick in the second, where its timings
# of one launch spread by 15% (power-bound products). Fixing it saves the first call's timing of
# every configuration and keeps the choice from moving between processes (bench/NOTES.md, *Fixed
# tiles from 8192 rows*: `python bench/xxt_tiles.py --fixed`). There the triangle holds over 1000
# wide programs, 8 waves of an H100's SMs.
LARGE_M = 8192
LARGE_M_CONFIG = WIDE_CONFIGS[0]

# Small tiles for the interpreter (it runs every tile in numpy); group 2 so that the shapes the
# tests use have several bands, a partial last one included.
INTERPRETER_CONFIG = SyrkConfig(16, 16, num_warps=1, num_stages=1, group=2)
INTERPRETER_WIDE_CONFIG = SyrkConfig(16, 16, num_warps=1, num_stages=1, group=2, wide=True)


def available() -> bool:
    """Whether triton is importable (the kernels exist)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _upper_tile(t, T, GROUP: tl.constexpr):
        """(row, col), row <= col, of the t-th tile in the upper triangle of a T×T tile grid.

        A band of R = min(GROUP, T - r0) tile rows starting at row r0 holds a triangular head
        (columns r0 .. r0+R-1 with 1 .. R tiles each) and then a rectangle (columns r0+R .. T-1
        with R tiles each); rows vary fastest, so neighbouring programs share a column block."""
        r0 = t * 0
        rows = tl.minimum(T, GROUP)
        size = rows * (rows + 1) // 2 + rows * (T - rows)
        while t >= size:  # at most T / GROUP bands: a few scalar steps per program
            t -= size
            r0 += GROUP
            rows = tl.minimum(T - r0, GROUP)
            size = rows * (rows + 1) // 2 + rows * (T - r0 - rows)
        head = rows * (rows + 1) // 2
        # head: column c holds rows 0..c and starts at c (c + 1) / 2; the float root can be off by
        # one after rounding, the two integer checks put it right
        c = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
        c = tl.where(c * (c + 1) // 2 > t, c - 1, c)
        c = tl.where((c + 1) * (c + 2) // 2 <= t, c + 1, c)
        rect = t - head
        in_head = t < head
        row = r0 + tl.where(in_head, t - c * (c + 1) // 2, rect % rows)
        col = r0 + tl.where(in_head, c, rows + rect // rows)
        return row, col

    # BATCH is read only by the autotuner (its key): not specialized, so it costs no recompilation
    @triton.jit(do_not_specialize=["BATCH"])
    def _syrk_kernel(X, C, M, K, BATCH,
                     stride_xb, stride_xm, stride_xk,
                     stride_cb, stride_cm, stride_cn,
                     alpha, beta, gamma,
                     HAS_LINEAR: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr):
        """C = X Xᵀ, or C = alpha·X Xᵀ + beta·X + gamma·I for a square X (HAS_LINEAR), per matrix
        of a batch: X (batch, M, K), C (batch, M, M); one program per upper-triangle tile.

        WIDE: the triangle is of 2·BLOCK-square tiles, and two programs share each one, a row half
        (BLOCK × 2·BLOCK) apiece, stored as two BLOCK-square tiles. On the diagonal the lower half's
        left tile lies below the diagonal (the upper half stores its mirror) and is computed but
        not stored: BLOCK/M of the work, 1.6% at M = 8192 (more where M is no multiple of 2·BLOCK:
        the halves past M are computed too, and a row half wholly past M stores nothing)."""
        pid = tl.program_id(0)
        if WIDE:
            tiles = tl.cdiv(M, 2 * BLOCK)
            per_matrix = tiles * (tiles + 1)
        else:
            tiles = tl.cdiv(M, BLOCK)
            per_matrix = tiles * (tiles + 1) // 2
        batch = pid // per_matrix
        X += batch.to(tl.int64) * stride_xb
        C += batch.to(tl.int64) * stride_cb
        if WIDE:
            local = pid % per_matrix
            tile_m, tile_n = _upper_tile(local // 2, tiles, GROUP)
            _syrk_tile(X, C, M, K, 2 * tile_m + local % 2, tile_n, stride_xm, stride_xk, stride_cm, stride_cn,
                       alpha, beta, gamma, HAS_LINEAR, BLOCK, 2 * BLOCK, BLOCK_K, DOT_PRECISION)
        else:
            tile_m, tile_n = _upper_tile(pid % per_matrix, tiles, GROUP)
            _syrk_tile(X, C, M, K, tile_m, tile_n, stride_xm, stride_xk, stride_cm, stride_cn,
                       alpha, beta, gamma, HAS_LINEAR, BLOCK, BLOCK, BLOCK_K, DOT_PRECISION)

    @triton.jit
    def _syrk_tile(X, C, M, K, tile_m, tile_n, stride_xm, stride_xk, stride_cm, stride_cn, alpha, beta, gamma,
                   HAS_LINEAR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Rows tile_m·BLOCK_M.. and columns tile_n·BLOCK_N.. of C (the kernel above), stored with
        their mirror; BLOCK_N is BLOCK_M, or 2·BLOCK_M for a wide tile."""
        # X[m-block, k] · X[n-block, k]ᵀ over all of K
        acc = _tile_partial(X, X, stride_xm, stride_xk, stride_xk, stride_xm, M, K, tile_m, tile_n,
                            0, tl.cdiv(K, BLOCK_K), BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m = offs_m < M
        in_n = offs_n < M
        if HAS_LINEAR:  # the polynomial's linear and constant terms, in fp32 before the one rounding to C
            lin_ptrs = X + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xk
            lin = tl.load(lin_ptrs, mask=in_m[:, None] & in_n[None, :], other=0.0)
            diagonal = offs_m[:, None] == offs_n[None, :]
            acc = alpha * acc + beta * lin.to(tl.float32) + tl.where(diagonal, gamma, 0.0)
        out = acc.to(C.dtype.element_ty)
        if BLOCK_N == BLOCK_M:
            _store_symmetric(C, out, tile_m, tile_n, M, stride_cm, stride_cn, BLOCK_M)
        else:
            # the two BLOCK_M-square halves: out[:, :BLOCK_M] and out[:, BLOCK_M:]
            left, right = tl.split(tl.permute(tl.reshape(out, (BLOCK_M, 2, BLOCK_M)), (0, 2, 1)))
            if tile_m <= 2 * tile_n:
                _store_symmetric(C, left, tile_m, 2 * tile_n, M, stride_cm, stride_cn, BLOCK_M)
            _store_symmetric(C, right, tile_m, 2 * tile_n + 1, M, stride_cm, stride_cn, BLOCK_M)

    @triton.jit
    def _tile_partial(A, B, s_am, s_ak, s_bk, s_bn, M, K, tile_m, tile_n, k_first, k_stop,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
        """Σ over inner-dimension blocks k_first .. k_stop-1 of A[tile_m rows, k] · B[k, tile_n cols],
        fp32 (BLOCK_M, BLOCK_N), tile_m counted in BLOCK_M rows and tile_n in BLOCK_N columns. Rows
        and columns past M wrap to valid ones (never stored), so loads need only the K mask."""
        offs_k = tl.arange(0, BLOCK_K)
        rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)) % M
        k0 = k_first * BLOCK_K
        a_ptrs = A + rows[:, None] * s_am + (k0 + offs_k)[None, :] * s_ak
        b_ptrs = B + (k0 + offs_k)[:, None] * s_bk + cols[None, :] * s_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_first, k_stop):
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * s_ak
            b_ptrs += BLOCK_K * s_bk
        return acc

    @triton.jit
    def _store_symmetric(C, out, tile_m, tile_n, M, stride_cm, stride_cn, BLOCK: tl.constexpr):
        """Stores tile (tile_m, tile_n), tile_m <= tile_n, of a symmetric C and its mirror. A
        diagonal tile keeps its upper half (row <= col) and takes its mirror below, so C is exactly
        symmetric; it is stored once. Any other tile is stored as it is and mirrored. Only boundary
        masks: a triangle mask on the stores splits them into 2-byte writes."""
        offs_m = tile_m * BLOCK + tl.arange(0, BLOCK)
        offs_n = tile_n * BLOCK + tl.arange(0, BLOCK)
        in_m = offs_m < M
        in_n = offs_n < M
        if tile_m == tile_n:
            out = tl.where(offs_m[:, None] <= offs_n[None, :], out, tl.trans(out))
        tl.store(C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, out,
                 mask=in_m[:, None] & in_n[None, :])
        if tile_m != tile_n:
            tl.store(C + offs_n[:, None] * stride_cm + offs_m[None, :] * stride_cn, tl.trans(out),
                     mask=in_n[:, None] & in_m[None, :])

    def autotuned(kernel, configs: Sequence[SyrkConfig]):
        """`kernel` autotuned over `configs`, once per (M, K, batch, kind) and dtype: a first call
        pays for timing each config (a few hundred ms); later calls with the same key reuse the
        choice. The batch is part of the key because many small matrices want other tiles than
        one large one. A kernel with a WIDE parameter takes it from each config."""
        def params(c: SyrkConfig) -> dict:
            p = {"BLOCK": c.block, "BLOCK_K": c.block_k, "GROUP": c.group}
            return {**p, "WIDE": c.wide} if "WIDE" in kernel.arg_names else p
        return triton.autotune(
            configs=[triton.Config(params(c), num_warps=c.num_warps, num_stages=c.num_stages) for c in configs],
            key=["M", "K", "BATCH", "HAS_LINEAR"])(kernel)

    _syrk_autotuned = autotuned(_syrk_kernel, TUNED_CONFIGS)


def _interpreting() -> bool:
    return not isinstance(_syrk_kernel, triton.runtime.JITFunction)


def _require_triton(name: str, *tensors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError(f"{name}: triton is not installed")
    for t in tensors:
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"{name}: CPU tensors run only under Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before triton is imported")


_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# torch.bmm(..., out_dtype=) (aten::bmm.dtype: bf16/fp16 operands, fp32 result from the accumulator)
BMM_HAS_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")


def symmetric_output(name: str, shape: tuple, like: torch.Tensor, out: Optional[torch.Tensor],
                     inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The output of a symmetric product: a new (shape, like's dtype and device) tensor, or `out`
    checked to have that shape and device, a floating dtype and no memory shared with `inputs`."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape or out.device != like.device or out.dtype not in _DTYPES:
        raise ValueError(f"{name}: out must have shape {shape} on {like.device} and a floating dtype, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs):
        raise ValueError(f"{name}: out must not share memory with an input (tiles read what others write)")
    return out


def batched(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A 2-D tensor as a batch of one (a view); 3-D as is."""
    return None if t is None else (t if t.dim() == 3 else t.unsqueeze(0))


def dense_product(A, B, alpha=1.0, D=None, beta=0.0, gamma=0.0) -> torch.Tensor:
    """alpha·A·B + beta·D + gamma·I in float32, by torch: the sizes with nothing to tile."""
    C = alpha * (A.float() @ B.float())
    if D is not None:
        C = C + beta * D.float()
    return C + gamma * torch.eye(C.size(-1), device=C.device) if gamma != 0 else C


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: exact-input products for float32 operands (the interpreter tests)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _batched(name: str, X: torch.Tensor, out: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """X as (batch, m, k) and the output (given or new) as (batch, m, m), both views."""
    if X.dim() not in (2, 3):
        raise ValueError(f"{name}: expected a 2-D or 3-D tensor, got shape {tuple(X.shape)}")
    if X.dtype not in _DTYPES:
        raise TypeError(f"{name}: expected bfloat16, float16 or float32, got {X.dtype}")
    out = symmetric_output(name, (*X.shape[:-1], X.size(-2)), X, out, (X,))
    return batched(X), batched(out)


def _programs(batch: int, M: int, block: int, wide: bool) -> int:
    """Programs of a launch: one per upper-triangle BLOCK tile, or two per 2·BLOCK tile when wide."""
    if wide:
        tiles = triton.cdiv(M, 2 * block)
        return batch * tiles * (tiles + 1)
    tiles = triton.cdiv(M, block)
    return batch * tiles * (tiles + 1) // 2


def default_config(M: int, interpreted: bool = False) -> Optional[SyrkConfig]:
    """The configuration of a launch with M output rows that names none: the interpreter's small
    tiles, LARGE_M_CONFIG from LARGE_M rows on, else None (the autotuner picks)."""
    if interpreted:
        return INTERPRETER_CONFIG
    return LARGE_M_CONFIG if M >= LARGE_M else None


def _launch(X: torch.Tensor, C: torch.Tensor, alpha: float, beta: float, has_linear: bool,
            config: Optional[SyrkConfig], gamma: float = 0.0):
    """Runs the kernel on X (batch, M, K) into C (batch, M, M); returns what the launch returns
    (the compiled kernel on a GPU, with its ``.asm``). gamma·I is added only with has_linear."""
    batch, M, K = X.shape
    if batch == 0 or M == 0:
        return None
    if M == 1:
        # 1×1 outputs: Triton 3.6 fails to compile the kernel when M = 1 is specialized to a
        # constant (its coalescing pass, on the mirrored store); there is nothing to tile anyway
        C.copy_(dense_product(X, X.mT, alpha, X if has_linear else None, beta, gamma if has_linear else 0.0))
        return None
    args = (X, C, M, K, batch, *X.stride(), *C.stride(), float(alpha), float(beta), float(gamma))
    meta = dict(HAS_LINEAR=has_linear, DOT_PRECISION=dot_precision(X.dtype))
    if config is None:
        config = default_config(M, interpreted=_interpreting() or X.device.type != "cuda")
    if config is None:
        return _syrk_autotuned[lambda meta_: (_programs(batch, M, meta_["BLOCK"], meta_["WIDE"]),)](*args, **meta)
    return _syrk_kernel[(_programs(batch, M, config.block, config.wide),)](
        *args, BLOCK=config.block, BLOCK_K=config.block_k, GROUP=config.group, WIDE=config.wide,
        num_warps=config.num_warps, num_stages=config.num_stages, **meta)


def xxt(X: torch.Tensor, out: Optional[torch.Tensor] = None,
        config: Optional[SyrkConfig] = None) -> torch.Tensor:
    """C = X Xᵀ for X of shape (m, n) or (batch, m, n): (…, m, m), symmetric, in X's dtype (or
    out's). Only the upper triangle of tiles is computed; each tile is also stored mirrored."""
    _require_triton("xxt", X)
    X3, C3 = _batched("xxt", X, out)
    _launch(X3, C3, 1.0, 0.0, False, config)
    return C3 if X.dim() == 3 else C3[0]


def symmetric_polynomial(A: torch.Tensor, b: float, c: float, out: Optional[torch.Tensor] = None,
                         config: Optional[SyrkConfig] = None, a: float = 0.0) -> torch.Tensor:
    """C = a·I + b·A + c·A·A for a symmetric A (…, m, m): A·A = A·Aᵀ, so the X Xᵀ kernel with the
    linear and constant terms added in fp32 in its epilogue. Reads the whole of A; the result is
    exactly symmetric (computed from the upper triangle of tiles)."""
    _require_triton("symmetric_polynomial", A)
    if A.size(-1) != A.size(-2):
        raise ValueError(f"symmetric_polynomial: expected square matrices, got shape {tuple(A.shape)}")
    A3, C3 = _batched("symmetric_polynomial", A, out)
    _launch(A3, C3, c, b, True, config, a)
    return C3 if A.dim() == 3 else C3[0]


def check_triton_ns5_args(name: str, G: torch.Tensor, steps: int, coefficients: Optional[Sequence[float]],
                          eps: float, dtype: torch.dtype) -> None:
    """The checks of the op's arguments, plus: triton present, G on a GPU (or interpreted), and an
    operand dtype the kernels take."""
    check_ns5_args(G, steps, coefficients, eps)
    _require_triton(name, G)
    if dtype not in _DTYPES:
        raise TypeError(f"{name}: dtype must be bfloat16, float16 or float32, got {dtype}")


def normalize(G: torch.Tensor, dtype: torch.dtype, eps: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """X0 = G / (‖G‖_F + eps) per matrix in ``dtype`` (into ``out`` if given), the norm summed
    and the quotient taken in float32 (float64 for a float64 G), one rounding to ``dtype``: two passes over G (the norm, then
    the quotient written straight in ``dtype``), where converting G first takes four."""
    # promote_types: vector_norm's dtype= may not narrow a float64 G
    norm = torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True, dtype=torch.promote_types(G.dtype, torch.float32))
    if out is None:
        out = torch.empty(G.shape, dtype=dtype, device=G.device)
    return torch.div(G, norm + eps, out=out)


def ns5_symmetric(G: torch.Tensor, steps: int = 5, coefficients: Optional[Sequence[float]] = None,
                  eps: float = 1e-7, config: Optional[SyrkConfig] = None,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """ns5 (the standard iteration, as ``muonkern.ops.fallback.ns5_reference`` with
    algorithm="standard") of G (m, n) or (batch, m, n), with A = X Xᵀ and P = a·I + b·A + c·A·A by
    the symmetric kernels and X = P·X by cuBLAS (bmm). Operands in ``dtype``: bfloat16 as in the
    reference (float32 serves exactness tests under the interpreter). Each product rounds once, in
    its epilogue, where the reference rounds after every elementwise op as well; the last one
    writes a float32 G's result from its fp32 accumulator (no bf16 result to convert). Returns G's
    dtype and shape, contiguous."""
    check_triton_ns5_args("ns5_symmetric", G, steps, coefficients, eps, dtype)
    if G.dim() not in (2, 3):
        raise ValueError(f"ns5_symmetric: expected a 2-D or 3-D tensor, got shape {tuple(G.shape)}")
    X = normalize(G, dtype, eps)
    if X.numel() == 0 or steps == 0:
        return X.to(G.dtype).contiguous()
    X = X.unsqueeze(0) if G.dim() == 2 else X
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT  # a strided view: the first X Xᵀ reads it in place, bmm writes wide
    batch, m, n = X.shape
    A = torch.empty((batch, m, m), dtype=dtype, device=X.device)
    P = torch.empty_like(A)
    # two buffers in turn: bmm must not write the X it reads
    buffers = [torch.empty((batch, m, n), dtype=dtype, device=X.device) for _ in range(2)]
    # the buffers are this function's own: the products launch without xxt's per-call checks
    for i, (a, b, c) in enumerate(step_coefficients(steps, coefficients)):
        if i > 0:   # the previous step's product; the last one is last_product's
            X = torch.bmm(P, X, out=buffers[i % 2])
        _launch(X, A, 1.0, 0.0, False, config)
        _launch(A, P, c, b, True, config, a)
    out = last_product(P, X, transposed, G.dtype)
    return out if G.dim() == 3 else out[0]


def last_product(P: torch.Tensor, X: torch.Tensor, transposed: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """The last step's P·X (wide) in G's orientation and dtype, contiguous. A tall G's result is
    Xᵀ·P (P is symmetric): cuBLAS writes the tall matrix itself, with no transposing copy. A
    float32 result comes from cuBLAS's fp32 accumulator where it can (``torch.bmm(out_dtype=)``,
    CUDA), with no bf16 result to convert."""
    lhs, rhs = (X.mT, P) if transposed else (P, X)
    if out_dtype == torch.float32 and P.dtype != out_dtype and P.is_cuda and BMM_HAS_OUT_DTYPE:
        return torch.bmm(lhs, rhs, out_dtype=out_dtype)
    return torch.bmm(lhs, rhs).to(out_dtype)


def wgmma_in_ptx(compiled) -> bool:
    """Whether a compiled Triton kernel (what ``kernel[grid](...)`` returns on a GPU) issues
    Hopper's warp-group MMA: its PTX holds ``wgmma.mma_async`` rather than ``mma.sync``."""
    return "wgmma.mma_async" in compiled.asm["ptx"]
