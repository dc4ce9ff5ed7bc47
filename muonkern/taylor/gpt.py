"""Taylor-mode curvature of :class:`muonkern.models.GPT`: g·u and uᵀHu in one forward pass.

For directions u_1..u_K and φ_k(t) = L(θ + t·u_k) (L the model's mean cross-entropy on a fixed
batch), φ_k'(0) = g·u_k and φ_k''(0) = u_kᵀ H u_k. One forward pass propagates every activation
with its first and second derivatives along all K directions (:mod:`muonkern.taylor.layers`,
attention by ``torch.ops.muonkern.taylor_attention``); the primal computation is shared. No
backward pass and no T×T attention matrix, nothing kept for a backward: the memory beyond the
parameters and directions is two (1 + 2K)-tensor jets of the model's width (the residual stream,
updated in place, and a branch's normed input), the K directions of one layer's parameters
stacked, and bounded chunks: attention by groups of heads, the MLP by token rows, the output head
by directions.

    params = {k: p.detach() for k, p in model.named_parameters()}
    loss, gu, uHu = taylor_directional(model, params, x, y, [u1, u2])   # float64 (2,) each
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..curvature.validate import check_params, direction_list
from ..models.gpt import GPT, rope_cos_sin
from . import layers
from .layers import Jet

__all__ = ["check_taylor_args", "taylor_directional", "taylor_forward"]

Params = Mapping[str, torch.Tensor]

# logits derivatives of at most this many elements at a time (one direction at least): directions
# are taken through the output head and the loss in chunks (a 50k vocabulary would otherwise need
# K·B·T·V floats twice); the primal logits and softmax are computed once
_HEAD_CHUNK_ELEMENTS = 1 << 27
# the MLP runs over token rows in chunks whose hidden tensors (4x the width) hold at most this many
# elements per order, and at least _MLP_MIN_ROWS rows over the K directions' stacked products
# (smaller products lose more time than they save memory): its (1 + 2K) hidden tensors would
# otherwise set the peak. With GELU in place and the output projection accumulated into the
# residual stream they are the only temporaries of a chunk; at this size the peak is set elsewhere
# and the chunk loop's launches cost little (11M GPT on an H100: 2^22 elements ran 1.13-1.39x slower
# per direction at K = 8, at the same peak)
_MLP_CHUNK_ELEMENTS = 1 << 24
_MLP_MIN_ROWS = 1024
# with K directions, attention runs over groups of heads whose q, k, v derivatives hold about as
# many elements as all heads' at this many directions (groups of ceil(n_head / K) heads): q, k, v
# of all heads would otherwise set the peak (at K = 8, 0.9x a training step's)
_ATTENTION_GROUP_DIRECTIONS = 1
_SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _check_model(model) -> GPT:
    if not isinstance(model, GPT):
        raise TypeError("taylor_directional: model must be a muonkern.models.GPT, got "
                        f"{type(model).__name__} (pass the module itself, not a compiled or "
                        "wrapped one)")
    for i, block in enumerate(model.blocks):
        act = block.mlp.act
        if not isinstance(act, nn.GELU) or act.approximate != "none":
            raise NotImplementedError(f"taylor_directional: blocks.{i}.mlp.act must be "
                                      f"nn.GELU() (erf form), got {act!r}")
    return model


def _check_params(model: GPT, params: Params) -> Dict[str, torch.Tensor]:
    """check_params (a dict of real tensors on one device), then the model's names and shapes and
    one float32/float64 dtype; in the model's parameter order."""
    given = check_params(params)
    expected = dict(model.named_parameters())
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    if missing or extra:
        raise ValueError("params keys must be the model's named_parameters() names: "
                         f"missing {missing}, unexpected {extra}")
    dtype = given[next(iter(expected))].dtype
    for name, ref in expected.items():
        t = given[name]
        if t.shape != ref.shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(t.shape)}, the model's "
                             f"parameter has {tuple(ref.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"params[{name!r}] has dtype {t.dtype}; taylor_directional supports "
                            "float32 and float64 parameters")
        if t.dtype != dtype:
            raise ValueError(f"all params must share one dtype: params[{name!r}] is {t.dtype}, "
                             f"others {dtype}")
    return {name: given[name] for name in expected}


def _check_batch(model: GPT, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 ignore_index: int) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must hold token ids (int64 or int32), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the parameters on {device}")
    if x.dim() != 2:
        raise ValueError(f"x must be (B, T), got shape {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    T, V = x.shape[1], model.config.vocab_size
    if T > model.config.context:
        raise ValueError(f"sequence length {T} exceeds the model's context {model.config.context}")
    if x.numel() == 0:
        raise ValueError("x is empty")
    if bool(((x < 0) | (x >= V)).any()):
        raise ValueError(f"x holds token ids outside [0, {V})")
    if bool((((y < 0) | (y >= V)) & (y != ignore_index)).any()):
        raise ValueError(f"y holds targets outside [0, {V}) other than ignore_index={ignore_index}")


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    *lead, H, T, D = t.shape
    return t.transpose(-3, -2).reshape(*lead, T, H * D)


class _Directions:
    """``U[name]``: the K directions of one parameter stacked as (K, *shape), built when a layer
    asks for it, so only the stacks of the layer at work are alive (a view for K = 1)."""

    def __init__(self, dirs: List[Dict[str, torch.Tensor]]):
        self.dirs = dirs

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.stack(name, slice(None))

    def stack(self, name: str, part: slice) -> torch.Tensor:
        chosen = self.dirs[part]
        if len(chosen) == 1:
            return chosen[0][name].unsqueeze(0)
        return torch.stack([u[name] for u in chosen])


def _head_groups(n_head: int, K: int) -> range:
    """Start heads of near-equal groups of about n_head·_ATTENTION_GROUP_DIRECTIONS/K heads."""
    per_group = min(n_head, -(-n_head * _ATTENTION_GROUP_DIRECTIONS // K))
    groups = -(-n_head // per_group)
    return range(0, n_head, -(-n_head // groups))


def _add_attention(h: Jet, P, U: _Directions, pre: str, n_head: int, eps: float, cos, sin) -> None:
    """h += the attention branch of block ``pre`` (its RMSNorm included), in place. Heads run in
    groups (they are independent up to the output projection, which is summed over its input
    columns): only one group's q, k, v and output jets are alive, beside h and the normed input."""
    a = layers.rmsnorm(h, P[pre + "attn_norm.weight"], U[pre + "attn_norm.weight"], eps)
    K, C = a.d.shape[0], a.x.shape[-1]
    D = C // n_head
    W = {name: P[f"{pre}attn.{name}.weight"] for name in ("q", "k", "v", "o")}
    Us = {name: U[f"{pre}attn.{name}.weight"] for name in W}
    starts = _head_groups(n_head, K)
    for h0 in starts:
        cols = slice(h0 * D, min(n_head, h0 + starts.step) * D)
        heads = (cols.stop - cols.start) // D
        def project(name):
            return layers.linear(a, W[name][cols], Us[name][:, cols])
        # one projection at a time, each freed once the kernel's contiguous (…, H, T, D) input is
        # made from it
        q = layers.rope_heads(project("q"), heads, cos, sin)
        k = layers.rope_heads(project("k"), heads, cos, sin)
        v = layers.split_heads(project("v"), heads)
        o = torch.ops.muonkern.taylor_attention(q.x, k.x, v.x, q.d, k.d, v.d, q.dd, k.dd, v.dd,
                                                None)
        del q, k, v
        merged = Jet(*(_merge_heads(t) for t in o))
        del o
        layers.add_linear_(h, merged, W["o"][:, cols], Us["o"][:, :, cols])


def _add_mlp(h: Jet, P, U: _Directions, pre: str, eps: float) -> None:
    """h += the MLP branch of block ``pre`` (RMSNorm -> fc -> GELU -> proj), in place, token rows
    in chunks (rows are independent) so that the wide hidden activations of only one chunk are
    alive."""
    m = layers.rmsnorm(h, P[pre + "mlp_norm.weight"], U[pre + "mlp_norm.weight"], eps)
    fc, proj = P[pre + "mlp.fc.weight"], P[pre + "mlp.proj.weight"]
    Ufc, Uproj = U[pre + "mlp.fc.weight"], U[pre + "mlp.proj.weight"]
    K, C = m.d.shape[0], m.x.shape[-1]
    x, d, dd = m.x.reshape(-1, C), m.d.reshape(K, -1, C), m.dd.reshape(K, -1, C)
    hx, hd, hdd = h.x.view(-1, C), h.d.view(K, -1, C), h.dd.view(K, -1, C)
    rows = max(-(-_MLP_MIN_ROWS // K), _MLP_CHUNK_ELEMENTS // (K * fc.shape[0]))
    for r0 in range(0, x.shape[0], rows):
        part = slice(r0, r0 + rows)
        hidden = layers.gelu_(layers.linear(Jet(x[part], d[:, part], dd[:, part]), fc, Ufc))
        layers.add_linear_(Jet(hx[part], hd[:, part], hdd[:, part]), hidden, proj, Uproj)
        del hidden


def taylor_directional(model: GPT, params: Params, x: torch.Tensor, y: torch.Tensor,
                       directions: Union[Params, Sequence[Params]], ignore_index: int = -100
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, g·u_k, u_kᵀHu_k) of ``model``'s mean cross-entropy on (x, y) at ``params``.

    ``model``: a :class:`muonkern.models.GPT` (only its structure and norm eps are used; the
    weights come from ``params``). ``params``: dict name -> tensor with exactly the names of
    ``model.named_parameters()`` (a tied head appears as ``embed.weight`` only), float32 or
    float64, one device. ``directions``: a list of K dicts with params' keys and shapes (one dict
    counts as K = 1); cast to the parameters' dtype. ``x``, ``y``: (B, T) token ids on the
    parameters' device; targets equal to ``ignore_index`` are left out of the mean, as in
    ``F.cross_entropy``.

    Returns float64 tensors: the loss (0-dim) and the first and second directional derivatives
    (K,). Reductions of the loss run in float32 (float64 for float64 parameters) per row and in
    float64 across rows.
    """
    P = check_taylor_args(model, params, x, y, ignore_index)
    return taylor_forward(model, P, x, y, direction_list(P, directions)[0], ignore_index)


def check_taylor_args(model: GPT, params: Params, x: torch.Tensor, y: torch.Tensor,
                      ignore_index: int = -100) -> Dict[str, torch.Tensor]:
    """Checks of :func:`taylor_directional` but the directions'; returns params in the model's
    order, for :func:`taylor_forward`."""
    P = _check_params(_check_model(model), params)
    _check_batch(model, x, y, next(iter(P.values())).device, ignore_index)
    return P


def taylor_forward(model: GPT, P: Dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   dirs: List[Dict[str, torch.Tensor]], ignore_index: int = -100
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`taylor_directional` on arguments it has already checked (P in the model's order,
    dirs in P's dtypes): callers that run many passes on one batch validate once."""
    cfg = model.config
    B, T = x.shape
    K = len(dirs)
    first_param = next(iter(P.values()))
    head_name = "lm_head.weight" if "lm_head.weight" in P else "embed.weight"  # tied: embed
    with torch.no_grad():
        U = _Directions(dirs)
        cos, sin = rope_cos_sin(T, cfg.head_dim, cfg.rope_base, device=first_param.device,
                                dtype=first_param.dtype)
        h = layers.embedding(x, P["embed.weight"], U["embed.weight"])
        for i, block in enumerate(model.blocks):
            pre = f"blocks.{i}."
            # h is the embedding's or an earlier block's fresh output: updated in place
            _add_attention(h, P, U, pre, cfg.n_head, block.attn_norm.eps, cos, sin)
            _add_mlp(h, P, U, pre, block.mlp_norm.eps)
        n = layers.rmsnorm(h, P["norm.weight"], U["norm.weight"], model.norm.eps)
        del h
        nx, nd, ndd = n.x.reshape(B * T, -1), n.d.reshape(K, B * T, -1), n.dd.reshape(K, B * T, -1)
        W = P[head_name]
        loss_terms = layers.CrossEntropy(nx @ W.T, y.reshape(-1).long(), ignore_index)
        chunk = max(1, _HEAD_CHUNK_ELEMENTS // (B * T * cfg.vocab_size))
        firsts, seconds = [], []
        for k0 in range(0, K, chunk):
            part = slice(k0, k0 + chunk)
            zd, zdd = layers.linear_derivatives(nx, nd[part], ndd[part], W,
                                               U.stack(head_name, part))
            first, second = loss_terms.derivatives(zd, zdd)
            firsts.append(first)
            seconds.append(second)
    return loss_terms.loss, torch.cat(firsts), torch.cat(seconds)
