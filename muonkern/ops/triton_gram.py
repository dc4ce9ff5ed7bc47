"""The Gram Newton-Schulz iteration on symmetric Triton products balanced across the SMs.

Every product of the Gram iteration (muonkern.ops.fallback.gram_iteration) but the two that touch
X again is symmetric:

    R = X Xᵀ,   P = c·R·R + b·R + a·I,   Q = P·Q,   T = P·R,   R = T·P,

since P, Q, R and T are polynomials in one matrix and commute. ``symmetric_product`` computes
C = alpha·A·B + beta·D + gamma·I for such a pair on the tiles on and above the diagonal only and
stores each tile twice (as it is and mirrored), which halves the FLOPs.

Why stream-K. A triangle of tiles fills the GPU badly when it is small: a 2048² output is 136
tiles of 128² (two waves on 132 SMs, the second nearly empty), where cuBLAS covers the dense square
with 128 tiles of 128×256 in one wave, so the triangle saves nothing (muonkern.ops.triton_symmetric
ties or loses below a short side of 4096). Here the grid is one program per SM; the iterations of
all tiles (tile by tile, BLOCK_K columns of the inner dimension each) are cut into one contiguous,
equal range per program. A program whose range ends inside a tile publishes its partial sum for
that tile in a workspace slot of its own and raises a flag; the program that owns the tile's last
iteration adds the partial sums of the programs before it, in program order (deterministic), and
runs the epilogue. Each program computes its published part first, then its finished tiles, the
one that needs other programs' parts last, so it only waits on programs with smaller ids, which
publish before they wait on anything, and only once its own work is done. Progress rests
on the GPU dispatching programs in id order, as it does for a 1-D grid. Triton's interpreter runs programs one after another, in order, so it
never waits: it checks the arithmetic and the split, not the waiting or the memory ordering (the GPU
tests and the sm_90 compile check cover those). The consumer resets each flag, so the workspace is
ready for the next launch (and for CUDA graph replays) without a memset; one workspace is cached
per device and stream (``_workspace`` says what that means for graphs).

Operands bf16 (fp16 works) with fp32 accumulation and fp32 epilogues; float32 operands run
exact-input ("ieee") products, which the interpreter runs and the tests use. Any strides: X Xᵀ
and Xᵀ X read X in place.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from .fallback import GramProducts, dense_gram_products, gram_iteration
from .ns5_args import gram_restart_steps, step_coefficients
from .triton_graphs import graph_pays, graphed_factors
from .triton_symmetric import (_DTYPES, SyrkConfig, _interpreting, _require_triton, batched, check_triton_ns5_args,
                               dense_product, dot_precision, last_product, normalize, symmetric_output, triton)

if triton is not None:
    import triton.language as tl
    from .triton_symmetric import _store_symmetric, _tile_partial, _upper_tile, autotuned

__all__ = ["CONFIGS", "ns5_gram_symmetric", "symmetric_gram_products", "symmetric_product"]

# H100 candidates (autotuned per problem size): 128² tiles for wgmma throughput, 64² tiles for short
# sides of 1024 and below, where 128² tiles split a tile's few iterations across many programs.
# Shared memory per stage 2·BLOCK·BLOCK_K·2 bytes: at most 128 KB here.
# (128×32 tiles with 4 warps need more than 255 registers and spill: left out.)
CONFIGS = (
    SyrkConfig(128, 64, num_warps=8, num_stages=4, group=16),
    SyrkConfig(128, 64, num_warps=8, num_stages=3, group=16),
    SyrkConfig(64, 64, num_warps=4, num_stages=4, group=8),
)
_MAX_BLOCK = max(c.block for c in CONFIGS)

# Small tiles and few programs for the interpreter, so that the shapes the tests use split tiles
# across programs in every way (a tile over 2..4 programs, a program over several tiles).
INTERPRETER_CONFIG = SyrkConfig(16, 16, num_warps=1, num_stages=1, group=2)
INTERPRETER_PROGRAMS = 5


if triton is not None:

    @triton.jit
    def _range_start(program, programs, total):
        """First iteration of a program's range (int64): the ranges split `total` evenly."""
        return total * program // programs   # total is int64, so is the product

    # BATCH is read only by the autotuner key: not specialized, no recompilation per batch size
    @triton.jit(do_not_specialize=["BATCH"])
    def _streamk_kernel(A, B, D, C, WS, FLAGS, M, K, BATCH,
                        s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_db, s_dm, s_dn, s_cb, s_cm, s_cn,
                        alpha, beta, gamma,
                        HAS_LINEAR: tl.constexpr, HAS_DIAGONAL: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """C = alpha·A·B (+ beta·D) (+ gamma·I) per matrix of a batch, on the upper triangle of
        tiles, mirrored: A (batch, M, K), B (batch, K, M), D and C (batch, M, M). One program per
        SM; WS holds one BLOCK×BLOCK fp32 slot per program, FLAGS one int32 per program (zero
        between launches)."""
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        tiles = tl.cdiv(M, BLOCK)
        per_matrix = tiles * (tiles + 1) // 2
        per_tile = tl.cdiv(K, BLOCK_K)   # iterations per tile
        # int64 from the program id (BATCH may be a plain int, in the interpreter)
        total = (pid.to(tl.int64) * 0 + BATCH) * per_matrix * per_tile
        start = _range_start(pid, programs, total)
        end = _range_start(pid + 1, programs, total)
        offs = tl.arange(0, BLOCK)
        slot = offs[:, None] * BLOCK + offs[None, :]

        # 1. A range that ends inside a tile: that tile's part first, published to slot `pid`.
        finished_end = end
        if (end % per_tile != 0) & (start < end):
            t = end // per_tile
            seg_start = tl.maximum(start, t * per_tile)
            batch = t // per_matrix
            tile_m, tile_n = _upper_tile((t % per_matrix).to(tl.int32), tiles, GROUP)
            acc = _tile_partial(A + batch * s_ab, B + batch * s_bb, s_am, s_ak, s_bk, s_bn, M, K,
                                tile_m, tile_n, (seg_start - t * per_tile).to(tl.int32),
                                (end - t * per_tile).to(tl.int32), BLOCK, BLOCK, BLOCK_K, DOT_PRECISION)
            tl.store(WS + pid * BLOCK * BLOCK + slot, acc)
            tl.debug_barrier()   # every thread's stores before the flag (release, GPU scope)
            tl.atomic_xchg(FLAGS + pid, 1, sem="release")
            finished_end = seg_start

        # 2. The tiles whose last iteration lies in the range: finish each one. A first tile that
        # began before the range comes last: its earlier iterations are other programs' published
        # parts, and taking it first made a program wait for them with a whole tile still to do
        # (at 2048², every 33rd program waited 15 µs, doubling the launch).
        t_first = start // per_tile
        count = tl.where(start < finished_end, finished_end // per_tile - t_first, 0).to(tl.int32)
        shift = (start % per_tile != 0).to(tl.int32)
        for j in range(0, count):
            t = t_first + (j + shift) % count
            k_first = tl.where(t == t_first, start - t_first * per_tile, 0).to(tl.int32)
            batch = t // per_matrix
            tile_m, tile_n = _upper_tile((t % per_matrix).to(tl.int32), tiles, GROUP)
            acc = _tile_partial(A + batch * s_ab, B + batch * s_bb, s_am, s_ak, s_bk, s_bn, M, K,
                                tile_m, tile_n, k_first, per_tile, BLOCK, BLOCK, BLOCK_K, DOT_PRECISION)
            if k_first > 0:
                # programs from the owner of the tile's first iteration up to this one published
                # the earlier iterations (each its range's last part); empty ranges published nothing
                first_iteration = t * per_tile
                owner = ((first_iteration + 1) * programs + total - 1) // total - 1
                for q in range(owner.to(tl.int32), pid):
                    if _range_start(q, programs, total) < _range_start(q + 1, programs, total):
                        flag = tl.atomic_add(FLAGS + q, 0, sem="acquire")
                        while flag == 0:
                            flag = tl.atomic_add(FLAGS + q, 0, sem="acquire")
                        tl.debug_barrier()   # the flag seen before any thread reads the slot
                        acc += tl.load(WS + q * BLOCK * BLOCK + slot, cache_modifier=".cg")
                        tl.atomic_xchg(FLAGS + q, 0, sem="relaxed")   # consumed: zero for the next launch
            offs_m = tile_m * BLOCK + offs
            offs_n = tile_n * BLOCK + offs
            in_m = offs_m < M
            in_n = offs_n < M
            acc = alpha * acc
            if HAS_LINEAR:
                lin = tl.load(D + batch * s_db + offs_m[:, None] * s_dm + offs_n[None, :] * s_dn,
                              mask=in_m[:, None] & in_n[None, :], other=0.0)
                acc += beta * lin.to(tl.float32)
            if HAS_DIAGONAL:
                acc += tl.where(offs_m[:, None] == offs_n[None, :], gamma, 0.0)
            _store_symmetric(C + batch * s_cb, acc.to(C.dtype.element_ty), tile_m, tile_n, M, s_cm, s_cn, BLOCK)

    _streamk_autotuned = autotuned(_streamk_kernel, CONFIGS)


_workspaces: dict = {}
_retired: list = []   # workspaces replaced by larger ones: a captured CUDA graph may still use them


def _workspace(device: torch.device, programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial-sum slots, flags) for `programs` programs on the current stream of `device`.

    Launches on one stream never overlap, so they can share one. A graph captured on a stream keeps
    using that stream's workspace wherever it is replayed: replays of graphs captured on the same
    stream must not run concurrently. Created during a capture, the flags' zeroing is part of the
    graph (it runs at every replay, before the products)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    ws = _workspaces.get(key)
    if ws is None or ws[1].numel() < programs:
        if ws is not None:
            _retired.append(ws)
        ws = (torch.empty(programs * _MAX_BLOCK * _MAX_BLOCK, dtype=torch.float32, device=device),
              torch.zeros(programs, dtype=torch.int32, device=device))
        _workspaces[key] = ws
    return ws


def _programs(device: torch.device) -> int:
    if device.type == "cuda" and not _interpreting():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_PROGRAMS


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    """SMs of a GPU: asked once per device, not on every product (~14 per ns5 call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, alpha: float, D: Optional[torch.Tensor],
            beta: float, gamma: float, config: Optional[SyrkConfig], programs: Optional[int]):
    """The kernel on A (batch, M, K), B (batch, K, M) into C (batch, M, M), D like C or None;
    returns what the launch returns (the compiled kernel on a GPU)."""
    batch, M, K = A.shape
    if batch == 0 or M == 0:
        return None
    if M == 1 or K == 0:
        # nothing to tile (and Triton cannot compile a kernel with M = 1 specialized to a constant)
        C.copy_(dense_product(A, B, alpha, D, beta, gamma))
        return None
    programs = programs or _programs(A.device)
    WS, FLAGS = _workspace(A.device, programs)
    Dt = C if D is None else D   # an unread stand-in when there is no linear term
    args = (A, B, Dt, C, WS, FLAGS, M, K, batch, *A.stride(), *B.stride(), *Dt.stride(), *C.stride(),
            float(alpha), float(beta), float(gamma))
    meta = dict(HAS_LINEAR=D is not None, HAS_DIAGONAL=gamma != 0, DOT_PRECISION=dot_precision(A.dtype))
    if config is None and (_interpreting() or A.device.type != "cuda"):
        config = INTERPRETER_CONFIG
    if config is None:
        return _streamk_autotuned[(programs,)](*args, **meta)
    return _streamk_kernel[(programs,)](*args, BLOCK=config.block, BLOCK_K=config.block_k,
                                        GROUP=config.group, num_warps=config.num_warps,
                                        num_stages=config.num_stages, **meta)


def _check_launch_options(name: str, config: Optional[SyrkConfig], programs: Optional[int]) -> None:
    if programs is not None and programs < 1:
        raise ValueError(f"{name}: programs must be >= 1, got {programs}")
    if config is not None and config.block > _MAX_BLOCK:
        raise ValueError(f"{name}: config.block must be at most {_MAX_BLOCK} (the workspace's slots), got {config.block}")


def symmetric_product(A: torch.Tensor, B: torch.Tensor, alpha: float = 1.0, D: Optional[torch.Tensor] = None,
                      beta: float = 0.0, gamma: float = 0.0, out: Optional[torch.Tensor] = None,
                      config: Optional[SyrkConfig] = None, programs: Optional[int] = None) -> torch.Tensor:
    """C = alpha·A·B + beta·D + gamma·I for A (…, m, k), B (…, k, m) whose product is symmetric
    (X·Xᵀ, or two commuting symmetric matrices), D (…, m, m) symmetric or None: (…, m, m), exactly
    symmetric, in A's dtype (or out's). Only the tiles on and above the diagonal are computed.
    ``programs`` (default: one per SM) sets how many programs share the work."""
    _require_triton("symmetric_product", A, B)
    if A.dim() not in (2, 3) or B.dim() != A.dim():
        raise ValueError(f"symmetric_product: expected two 2-D or two 3-D tensors, got shapes "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    m, k = A.shape[-2:]
    if B.shape[-2:] != (k, m) or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(f"symmetric_product: B must have shape {(*A.shape[:-2], k, m)} for A of shape "
                         f"{tuple(A.shape)}, got {tuple(B.shape)}")
    for t in (A, B) if D is None else (A, B, D):
        if t.dtype not in _DTYPES or t.dtype != A.dtype or t.device != A.device:
            raise TypeError(f"symmetric_product: operands must share one dtype (bfloat16, float16 or float32) "
                            f"and device, got {A.dtype} on {A.device} and {t.dtype} on {t.device}")
    shape = (*A.shape[:-1], m)
    if D is not None and tuple(D.shape) != shape:
        raise ValueError(f"symmetric_product: D must have shape {shape}, got {tuple(D.shape)}")
    out = symmetric_output("symmetric_product", shape, A, out, [t for t in (A, B, D) if t is not None])
    _check_launch_options("symmetric_product", config, programs)
    _launch(batched(A), batched(B), batched(out), alpha, batched(D), beta, gamma, config, programs)
    return out


def ns5_gram_symmetric(G: torch.Tensor, steps: int = 5, coefficients: Optional[Sequence[float]] = None,
                       eps: float = 1e-7, config: Optional[SyrkConfig] = None, programs: Optional[int] = None,
                       dtype: torch.dtype = torch.bfloat16, graph: Optional[bool] = None) -> torch.Tensor:
    """ns5 with algorithm="gram" (muonkern.ops.fallback.gram_iteration: the same steps, restarts and
    products) with the symmetric products above; the products that touch X (X = Q·X0 at a restart,
    the output Q·X0) run on cuBLAS. G (…, m, n), any batch dims; a tall G uses Xᵀ·X and products
    from the right, read in place. Operands in ``dtype`` (bf16 as the op; float32 serves exactness
    tests under the interpreter). P = c·R·R + b·R + a·I rounds once, in the kernel's epilogue.
    ``graph``: replay the products from a CUDA graph where one can be used (muonkern.ops.triton_graphs:
    a GPU, outside a capture of the caller's, from a layout's second call on); default where the
    call is launch-bound (`graph_pays`). Returns G's dtype and shape, contiguous."""
    _check_launch_options("ns5_gram_symmetric", config, programs)
    check_triton_ns5_args("ns5_gram_symmetric", G, steps, coefficients, eps, dtype)
    if G.numel() == 0 or steps == 0:
        return normalize(G, dtype, eps).to(G.dtype).contiguous()
    m, n = G.shape[-2:]
    batch = G.numel() // (m * n)
    triples, restarts = step_coefficients(steps, coefficients), gram_restart_steps(steps)
    products = symmetric_gram_products(m <= n, config, programs, G.dtype)
    can_graph = G.device.type == "cuda" and not _interpreting() and not torch.cuda.is_current_stream_capturing()
    if can_graph and (graph if graph is not None else graph_pays(batch, m, n, steps)):
        with torch.cuda.device(G.device), torch.no_grad():
            stream = torch.cuda.current_stream()
            factors = graphed_factors((batch, m, n), dtype, G.device, stream, (tuple(triples), config, programs))
            if factors is not None:
                normalize(G, dtype, eps, out=factors.X0.view(G.shape))   # into the graph's input
                replayed = factors.replay(triples, restarts, products, stream)
                if replayed is not None:
                    return products.output(*replayed).reshape(G.shape).to(G.dtype).contiguous()
    return gram_iteration(normalize(G, dtype, eps), triples, restarts, products).to(G.dtype).contiguous()


def symmetric_gram_products(wide: bool, config: Optional[SyrkConfig] = None, programs: Optional[int] = None,
                            out_dtype: Optional[torch.dtype] = None) -> GramProducts:
    """The Gram iteration's products with every symmetric one on the stream-K kernel: X Xᵀ (or
    Xᵀ X), c·R·R + b·R + a·I in one epilogue, P·Q and P·R·P as upper triangles (the factors are
    polynomials in one matrix, so they commute); Q·X (or X·Q) stays dense, and the last one comes
    out in ``out_dtype`` (default: the operands'), float32 straight from its accumulator where
    cuBLAS can (``triton_symmetric.last_product``): no bf16 result to convert. Operands valid by construction:
    straight to the launch, without symmetric_product's checks."""

    def product(A, B, alpha=1.0, D=None, beta=0.0, gamma=0.0):
        C = torch.empty((A.size(0), A.size(1), A.size(1)), dtype=A.dtype, device=A.device)
        _launch(A, B, C, alpha, D, beta, gamma, config, programs)
        return C

    def polynomial(R, a, b, c):   # c = 0: no product, as the reference computes it
        return product(R, R, c, R, b, a) if c != 0 else dense.polynomial(R, a, b, c)

    def output(Q, Y):   # Q·Y, or Y·Q for a tall Y (= (Yᵀ)ᵀ·Q, Q symmetric), in out_dtype
        return last_product(Q, Y if wide else Y.mT, not wide, out_dtype or Q.dtype)

    dense = dense_gram_products(wide)
    return GramProducts(gram=(lambda Y: product(Y, Y.mT)) if wide else (lambda Y: product(Y.mT, Y)),
                        polynomial=polynomial, accumulate=product,
                        conjugate=lambda P, R: product(product(P, R), P), apply=dense.apply, output=output)
