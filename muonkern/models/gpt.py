"""A small GPT (pre-norm, RMSNorm, RoPE, GELU MLP) for the Muon-vs-Adam curvature study.

Module names, which :func:`muonkern.curvature.groups_by_module` and Muon's parameter split see::

    embed                                   token embedding (vocab_size, d_model)
    blocks.{i}.attn_norm / blocks.{i}.mlp_norm   RMSNorm, weight only, eps 1e-6
    blocks.{i}.attn.{q,k,v,o}               nn.Linear, no bias; RoPE on q and k
    blocks.{i}.mlp.{fc,proj}                nn.Linear, no bias; GELU (erf) between
    norm                                    final RMSNorm
    lm_head                                 nn.Linear, no bias; its weight *is* ``embed.weight``
                                            when ``tie_embeddings`` (then ``named_parameters()``
                                            lists only ``embed.weight``)

There are no position embeddings and no biases; the rotary tables are computed in the forward
pass (no buffers), in float64 for float64 activations and float32 otherwise, so the model can be
built on the meta device and cast to any dtype.

Initialization: every Linear and the embedding ~ N(0, 0.02²); the output projections
``attn.o`` and ``mlp.proj`` ~ N(0, (0.02/√(2·n_layer))²); RMSNorm weights = 1.

Exact curvature probes. ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse) and
double backward need attention that supports forward-mode AD / double backward. The fused SDPA
kernels (flash, memory-efficient, cuDNN) support neither, so the exact probes of
:mod:`muonkern.curvature` run inside :func:`exact_attention` (re-exported here), which restricts
``scaled_dot_product_attention`` to the math backend (an explicit softmax(QKᵀ/√d + mask)·V,
differentiable to any order); on GPU it is slower and uses O(T²) memory per head. Training runs
outside it (fused kernels)::

    model = GPT(GPTConfig.preset("tiny")).double()
    loss_fn = gpt_loss_fn(model, x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    Hv = muonkern.curvature.hvp(loss_fn, params, v)      # fwd_rev, exact, math attention
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

# The exact (math) attention path lives with the curvature probes, which enter it themselves.
from ..checks import check_positive_int
from ..curvature.hessian_products import exact_attention

__all__ = ["GPT", "GPTConfig", "GPTLoss", "PRESETS", "apply_rope", "exact_attention", "gpt_loss_fn",
           "rope_cos_sin"]


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    vocab_size: int
    context: int            # maximum sequence length
    n_layer: int
    n_head: int
    d_model: int
    mlp_ratio: int = 4
    tie_embeddings: bool = False
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "n_layer", "n_head", "d_model", "mlp_ratio"):
            check_positive_int(getattr(self, name), f"GPTConfig.{name}")
        for name in ("rope_base", "norm_eps"):
            value = getattr(self, name)
            # bool is an int subclass: True would pass as 1.0
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"GPTConfig.{name} must be positive and finite, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def num_params(self) -> int:
        """Analytic parameter count (tied embeddings counted once)."""
        d, f = self.d_model, self.mlp_ratio * self.d_model
        per_block = 4 * d * d + 2 * d * f + 2 * d          # q,k,v,o + fc,proj + two norms
        emb = self.vocab_size * d
        return self.n_layer * per_block + d + emb * (1 if self.tie_embeddings else 2)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named preset (see ``PRESETS``), with fields optionally overridden."""
        if name not in PRESETS:
            raise KeyError(f"unknown GPT preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "GPTConfig":
        return cls.preset("tiny", **overrides)

    @classmethod
    def small(cls, **overrides) -> "GPTConfig":
        return cls.preset("small", **overrides)

    @classmethod
    def gpt2_small(cls, **overrides) -> "GPTConfig":
        return cls.preset("gpt2_small", **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: Dict[str, GPTConfig] = {
    # 180,672 parameters: CPU tests and exact-Hessian probes.
    "tiny": GPTConfig(vocab_size=256, context=64, n_layer=3, n_head=4, d_model=64),
    # 10,818,432 parameters (byte-level vocabulary).
    "small": GPTConfig(vocab_size=256, context=256, n_layer=6, n_head=6, d_model=384),
    # 123,551,232 parameters: GPT-2 small's shape (RoPE instead of position embeddings, no
    # biases, RMSNorm), tied embeddings.
    "gpt2_small": GPTConfig(vocab_size=50257, context=1024, n_layer=12, n_head=12, d_model=768,
                            tie_embeddings=True),
}


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight; composite ops only (any-order AD), computed in at
    least float32."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dt)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_cos_sin(T: int, head_dim: int, base: float = 10000.0, *,
                 device: Union[torch.device, str, None] = None,
                 dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (T, head_dim/2): angle θ_{t,i} = t · base^(−2i/head_dim).

    Computed in float64 if ``dtype`` is float64, float32 otherwise, then cast to ``dtype``."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=cdt) / head_dim)
    angles = torch.arange(T, device=device, dtype=cdt)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + D/2]) of x (..., T, D) by the angles of row t.

    ``cos``/``sin`` are (T, D/2). Then ⟨rope(q)_m, rope(k)_n⟩ depends on m − n only."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head, self.head_dim, self.rope_base = cfg.n_head, cfg.head_dim, cfg.rope_base
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        shape = (B, T, self.n_head, self.head_dim)
        q = self.q(x).view(shape).transpose(1, 2)            # (B, H, T, hd)
        k = self.k(x).view(shape).transpose(1, 2)
        v = self.v(x).view(shape).transpose(1, 2)
        cos, sin = rope_cos_sin(T, self.head_dim, self.rope_base, device=x.device, dtype=q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.d_model
        self.fc = nn.Linear(cfg.d_model, hidden, bias=False)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------

class GPT(nn.Module):
    """Decoder-only transformer. ``forward(idx, targets=None)``: idx (B, T) int64 with
    T <= context; returns logits (B, T, vocab_size), or ``(logits, loss)`` with the mean
    cross-entropy over all positions when ``targets`` (B, T) is given."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = 0.02
        proj_std = std / math.sqrt(2 * self.config.n_layer)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                is_proj = name.endswith("attn.o") or name.endswith("mlp.proj")
                if m is self.lm_head and self.config.tie_embeddings:
                    continue                      # shares embed.weight, initialized there
                nn.init.normal_(m.weight, mean=0.0, std=proj_std if is_proj else std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def num_params(self) -> int:
        """Number of distinct parameters (tied weights once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T), got shape {tuple(idx.shape)}")
        T = idx.shape[-1]
        if T > self.config.context:
            raise ValueError(f"sequence length {T} exceeds context {self.config.context}")
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        # int64 as cross_entropy wants it (the Taylor-mode forward takes int32 targets too)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long())
        return logits, loss


@dataclass(frozen=True, eq=False)
class GPTLoss:
    """``loss(params) -> scalar``: the model's mean cross-entropy on the fixed batch (x, y) with
    parameters replaced through ``torch.func.functional_call`` (tied weights follow
    ``embed.weight``). It keeps model and batch visible, so :mod:`muonkern.curvature` can also
    run its Taylor-mode method (``method="taylor"``) on it."""

    model: GPT
    x: torch.Tensor
    y: torch.Tensor

    def __call__(self, params):
        return torch.func.functional_call(self.model, params, (self.x, self.y))[1]


def gpt_loss_fn(model: GPT, x: torch.Tensor, y: torch.Tensor) -> GPTLoss:
    """The loss function :mod:`muonkern.curvature` takes, for ``model`` on the batch (x, y)."""
    return GPTLoss(model, x, y)
