"""Triton kernels of causal Taylor attention (flash-attention style, forward only).

Same math as :mod:`muonkern.taylor.attention`, in two kernels, each one program per
(query block, batch·head[, direction]) that walks the key blocks up to the causal limit:

1. ``_attn_fwd_primal``: flash attention with online softmax; writes o (float32) and the row
   log-sum-exp ℓ = m + log Z.
2. ``_attn_fwd_taylor``: one direction per program. With ℓ known, the softmax weights are exact
   at once, π_j = exp(s_j − ℓ), so the derivative sums need no running-max rescaling:

       ṡ_j = (q̇·k_j + q·k̇_j)·scale,   s̈_j = (q̈·k_j + 2 q̇·k̇_j + q·k̈_j)·scale
       Ż = Σ π_j ṡ_j,   Z̈ = Σ π_j (s̈_j + ṡ_j²)                  (Z = 1)
       Ȧ = Σ π_j ṡ_j v_j + π_j v̇_j,   Ä = Σ π_j (s̈_j + ṡ_j²) v_j + 2 π_j ṡ_j v̇_j + π_j v̈_j
       ȯ = Ȧ − o Ż,   ö = Ä − 2 ȯ Ż − o Z̈

   Its accumulators are two (BLOCK_M, D) tiles and two row vectors. The primal scores q·kᵀ are
   recomputed per direction (one product of the eleven per key block). Why not one program for
   all directions sharing the primal tiles: that needs 1 + 2·DIRS accumulator tiles and 3-D
   operands, which on sm_90 spill registers heavily and exceed the shared memory already at two
   directions and BLOCK_M = 64.

Products accumulate in float32 (float64 for float64 inputs). float32 inputs use
``input_precision="tf32x3"`` on the GPU by default: float32 accuracy on the tensor cores (tf32
alone loses three decimal digits; plain FMA products spill registers). bfloat16 inputs run on
the tensor cores with the weights π, ṗ, p̈ rounded to bfloat16 for the value products, as flash
attention does.

The kernels run on CUDA tensors and, with ``TRITON_INTERPRET=1`` set before triton is imported
(Triton's interpreter), on CPU tensors (slow; for tests). The op ``muonkern::taylor_attention``
uses them on CUDA for head dim 64 in float32 and bfloat16 and head dim 128 in bfloat16; float32
at head dim 128 needs 288 KB of shared memory at the smallest wgmma tiles (the tf32x3 operand
splits), more than an H100 has, and runs the PyTorch fallback.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention import accumulation_dtype, check_taylor_attention_args, softmax_scale

__all__ = ["TileConfig", "default_tile_config", "taylor_attention_triton"]


@triton.jit
def _attn_fwd_primal(
        Q, K, V, O, LSE,                          # q, k, v (BH, T, D); o (BH, T, D); lse (BH, T)
        sm_scale, seq_len,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # the longest (causal: last) query blocks first, so that a launch ends on short programs
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_bh = tl.program_id(1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    head = off_bh.to(tl.int64) * seq_len * HEAD_DIM

    q_offs = head + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_offs, mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    z = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], ACC_DTYPE)

    hi = tl.minimum((start_m + 1) * BLOCK_M, seq_len)           # causal limit of this block
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_len
        kv_offs = head + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(K + kv_offs, mask=col_ok[:, None], other=0.0)
        v = tl.load(V + kv_offs, mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * sm_scale
        # key 0 is in every row's first block, so m_new is finite from there on
        keep = (offs_m[:, None] >= offs_n[None, :]) & col_ok[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        z = z * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)
        m_i = m_new

    tl.store(O + q_offs, (acc / z[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + off_bh.to(tl.int64) * seq_len + offs_m, m_i + tl.log(z), mask=row_ok)


@triton.jit
def _attn_fwd_taylor(
        Q, K, V, QD, KD, VD, QDD, KDD, VDD,     # primal (BH, T, D); derivatives (N_DIRS, BH, T, D)
        O, LSE,                                  # from _attn_fwd_primal: o (BH, T, D), lse (BH, T)
        OD, ODD,                                 # outputs (N_DIRS, BH, T, D)
        sm_scale, seq_len, n_bh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)      # longest blocks first, as above
    off_bh = tl.program_id(1)
    off_dir = tl.program_id(2)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    # int64 offsets: K·B·H·T·D can exceed 2³¹
    head = off_bh.to(tl.int64) * seq_len * HEAD_DIM
    dir_head = (off_dir.to(tl.int64) * n_bh + off_bh) * seq_len * HEAD_DIM

    q_offs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + head + q_offs, mask=row_ok[:, None], other=0.0)
    qd = tl.load(QD + dir_head + q_offs, mask=row_ok[:, None], other=0.0)
    qdd = tl.load(QDD + dir_head + q_offs, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)

    zd = tl.zeros([BLOCK_M], ACC_DTYPE)                          # Σ π ṡ
    zdd = tl.zeros([BLOCK_M], ACC_DTYPE)                         # Σ π (s̈ + ṡ²)
    accd = tl.zeros([BLOCK_M, HEAD_DIM], ACC_DTYPE)              # Σ π ṡ v + π v̇
    accdd = tl.zeros([BLOCK_M, HEAD_DIM], ACC_DTYPE)             # Σ π (s̈ + ṡ²) v + 2 π ṡ v̇ + π v̈

    hi = tl.minimum((start_m + 1) * BLOCK_M, seq_len)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_len
        kv_offs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        k_t = tl.trans(tl.load(K + head + kv_offs, mask=col_ok[:, None], other=0.0))
        kd_t = tl.trans(tl.load(KD + dir_head + kv_offs, mask=col_ok[:, None], other=0.0))
        kdd_t = tl.trans(tl.load(KDD + dir_head + kv_offs, mask=col_ok[:, None], other=0.0))

        s = tl.dot(q, k_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * sm_scale
        sd = tl.dot(qd, k_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        sd = tl.dot(q, kd_t, sd, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * sm_scale
        sdd = tl.dot(qdd, k_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        sdd = tl.dot(qd * 2, kd_t, sdd, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        sdd = tl.dot(q, kdd_t, sdd, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * sm_scale

        keep = (offs_m[:, None] >= offs_n[None, :]) & col_ok[None, :]
        pi = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)         # exact softmax weights
        v = tl.load(V + head + kv_offs, mask=col_ok[:, None], other=0.0)
        vd = tl.load(VD + dir_head + kv_offs, mask=col_ok[:, None], other=0.0)
        vdd = tl.load(VDD + dir_head + kv_offs, mask=col_ok[:, None], other=0.0)
        # Weights in the value dtype for the tensor cores (as flash attention does). The row sums
        # take the same rounded weights, so that Ȧ − o Ż and Ä − 2ȯŻ − oZ̈ cancel consistently
        # (with bf16 the rounding would otherwise not cancel: a single key gives ȯ = v̇ exactly).
        pi_v = pi.to(v.dtype)
        pd_v = (pi * sd).to(v.dtype)
        pdd_v = (pi * (sdd + sd * sd)).to(v.dtype)
        zd += tl.sum(pd_v.to(ACC_DTYPE), 1)
        zdd += tl.sum(pdd_v.to(ACC_DTYPE), 1)
        accd = tl.dot(pd_v, v, accd, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        accd = tl.dot(pi_v, vd, accd, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        accdd = tl.dot(pdd_v, v, accdd, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        accdd = tl.dot(pd_v * 2, vd, accdd, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        accdd = tl.dot(pi_v, vdd, accdd, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    o = tl.load(O + head + q_offs, mask=row_ok[:, None], other=0.0).to(ACC_DTYPE)
    od = accd - o * zd[:, None]
    odd = accdd - 2.0 * od * zd[:, None] - o * zdd[:, None]
    tl.store(OD + dir_head + q_offs, od.to(OD.dtype.element_ty), mask=row_ok[:, None])
    tl.store(ODD + dir_head + q_offs, odd.to(ODD.dtype.element_ty), mask=row_ok[:, None])


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters of both kernels: query/key block sizes, warps, pipeline stages, and the
    tl.dot input precision for float32 inputs ("ieee", "tf32", "tf32x3"; None: "ieee")."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 1
    precision: Optional[str] = None


def default_tile_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """Tiles that fit the taylor kernel's working set (q, q̇, q̈, two accumulators, six score
    tiles) on an H100 and were fastest among those tried there (triton 3.6); on CPU
    (interpreter) small tiles. float32 runs its products as tf32x3 (three tf32 products, float32
    accuracy): plain fp32 FMA products spill registers heavily and ran 30× slower."""
    if device.type != "cuda":
        return TileConfig(block_m=16, block_n=16)
    if dtype == torch.float32:
        return TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=1, precision="tf32x3")
    return TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=3 if head_dim <= 64 else 2)


def _interpreting() -> bool:
    return not isinstance(_attn_fwd_taylor, triton.runtime.JITFunction)


def _precision(cfg: TileConfig, dtype: torch.dtype) -> str:
    if dtype == torch.float32 and cfg.precision is not None:
        return cfg.precision
    return "ieee"   # only float32 operands read it; bf16/fp64 products are exact-input anyway


def taylor_attention_triton(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale: Optional[float] = None,
                            config: Optional[TileConfig] = None):
    """(o, ȯ, ö) of causal attention by the Triton kernels; shapes as in
    :func:`muonkern.taylor.attention.taylor_attention`. The head dim must be a power of two
    ≥ 16. Inputs are made contiguous; outputs are contiguous in the inputs' dtype."""
    check_taylor_attention_args(q, k, v, qd, kd, vd, qdd, kdd, vdd, scale)
    B, H, T, D = q.shape
    n_dirs = qd.shape[0]
    if D < 16 or D & (D - 1):
        raise ValueError(f"taylor_attention_triton: head dim must be a power of two >= 16, got {D}")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("taylor_attention_triton: tensors on CPU run only under Triton's "
                           "interpreter: set TRITON_INTERPRET=1 before triton is imported")
    cfg = config or default_tile_config(D, q.dtype, q.device)
    for name in ("block_m", "block_n"):
        val = getattr(cfg, name)
        if val < 16 or val & (val - 1):
            raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {val}")
    q, k, v, qd, kd, vd, qdd, kdd, vdd = (t.contiguous()
                                          for t in (q, k, v, qd, kd, vd, qdd, kdd, vdd))
    acc = accumulation_dtype(q.dtype)
    # o in the accumulation dtype: the derivative outputs combine it with their sums
    o = torch.empty(q.shape, dtype=acc, device=q.device)
    lse = torch.empty((B * H, T), dtype=acc, device=q.device)
    od = torch.empty_like(qd)
    odd = torch.empty_like(qdd)
    if q.numel() == 0:
        return o.to(q.dtype), od, odd
    sm_scale = softmax_scale(q, scale)
    meta = dict(HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
                DOT_PRECISION=_precision(cfg, q.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    n_blocks = triton.cdiv(T, cfg.block_m)
    _attn_fwd_primal[(n_blocks, B * H)](q, k, v, o, lse, sm_scale, T, **meta)
    if n_dirs:
        _attn_fwd_taylor[(n_blocks, B * H, n_dirs)](
            q, k, v, qd, kd, vd, qdd, kdd, vdd, o, lse, od, odd, sm_scale, T, B * H, **meta)
    return o.to(q.dtype), od, odd
