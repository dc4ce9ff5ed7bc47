"""Taylor-mode curvature (muonkern.taylor) on CPU: attention, the custom op, the GPT forward.

References are independent of the code under test: torch.func nested forward-mode jvp of a plain
softmax attention, an explicit T×T formulation with the normalized softmax, and
muonkern.curvature (reverse-mode gradients and forward-over-reverse HVPs through the model
itself) for the GPT. Everything is compared in float64 on fresh random inputs.
"""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

from muonkern import curvature
from muonkern.models import GPT, GPTConfig, exact_attention, gpt_loss_fn
from muonkern.taylor import (taylor_attention, taylor_attention_blocked, taylor_attention_dense,
                             taylor_directional)
from interpreter import run_interpreter
from taylor_cases import F64, attention_inputs, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:.*math SDPA backend:UserWarning")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def softmax_attention(q, k, v, scale):
    """Plain causal attention, written out: softmax(q kᵀ·scale + mask) v."""
    T = q.shape[-2]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    s = (q @ k.transpose(-2, -1) * scale).masked_fill(future, -math.inf)
    return torch.softmax(s, dim=-1) @ v


def nested_jvp_attention(args, scale):
    """(o, o', o'') along x(t) = x + t·ẋ + t²/2·ẍ for each direction, by torch.func.jvp twice."""
    q, k, v, qd, kd, vd, qdd, kdd, vdd = args
    one = torch.ones((), dtype=F64)
    ods, odds = [], []
    for j in range(qd.shape[0]):
        def curve(t, j=j):
            return softmax_attention(q + t * qd[j] + 0.5 * t * t * qdd[j],
                                     k + t * kd[j] + 0.5 * t * t * kdd[j],
                                     v + t * vd[j] + 0.5 * t * t * vdd[j], scale)

        def first(t):
            return torch.func.jvp(curve, (t,), (one,))[1]

        ods.append(first(torch.zeros((), dtype=F64)))
        odds.append(torch.func.jvp(first, (torch.zeros((), dtype=F64),), (one,))[1])
    return softmax_attention(q, k, v, scale), torch.stack(ods), torch.stack(odds)


def assert_triples_close(got, want, rtol):
    for name, a, b in zip(("o", "od", "odd"), got, want):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= rtol, f"{name}: relative error {rel_err(a, b):.3e} > {rtol:.1e}"


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K,B,H,T,D", [(1, 1, 1, 1, 4), (3, 2, 2, 13, 8), (2, 1, 3, 40, 16)])
def test_dense_reference_matches_nested_jvp(gen, K, B, H, T, D):
    args = attention_inputs(gen, K, B, H, T, D)
    scale = 1 / math.sqrt(D)
    assert_triples_close(taylor_attention_dense(*args), nested_jvp_attention(args, scale), 1e-10)


@pytest.mark.parametrize("block_size", [1, 5, 16, 128])
@pytest.mark.parametrize("K,T", [(1, 37), (4, 37), (3, 64)])
def test_blocked_matches_dense_and_jvp(gen, block_size, K, T):
    args = attention_inputs(gen, K, 2, 2, T, 8)
    got = taylor_attention_blocked(*args, block_size=block_size)
    assert_triples_close(got, taylor_attention_dense(*args), 1e-10)
    if block_size == 5:
        assert_triples_close(got, nested_jvp_attention(args, 1 / math.sqrt(8)), 1e-10)


def test_blocked_custom_scale_and_large_logits(gen):
    # large logits exercise the running-max rescaling (exp would overflow without it)
    args = attention_inputs(gen, 2, 1, 2, 30, 8)
    scale = 7.5
    got = taylor_attention_blocked(*args, scale=scale, block_size=4)
    assert_triples_close(got, nested_jvp_attention(args, scale), 1e-10)


def test_causal(gen):
    """Changing anything at positions > i (values, keys and their derivatives) leaves rows ≤ i
    of all three outputs bitwise unchanged, and rows > i change."""
    args = list(attention_inputs(gen, 2, 1, 2, 24, 8))
    base = taylor_attention_blocked(*args, block_size=8)
    i = 10
    changed = [t.clone() for t in args]
    for idx in (1, 2, 4, 5, 7, 8):         # k, v and their derivatives
        changed[idx][..., i + 1:, :] += 1.0 + torch.rand(changed[idx][..., i + 1:, :].shape,
                                                         generator=gen, dtype=F64)
    out = taylor_attention_blocked(*changed, block_size=8)
    for a, b in zip(base, out):
        assert torch.equal(a[..., :i + 1, :], b[..., :i + 1, :])
        assert not torch.allclose(a[..., i + 1:, :], b[..., i + 1:, :])


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_blocked_low_precision(gen, dtype, rtol):
    """float32/bfloat16 inputs: fp32 accumulation, outputs in the input dtype, close to float64 on
    the same (rounded) inputs. The bf16 budget covers rounding the outputs to bf16 (2⁻⁸)."""
    args = attention_inputs(gen, 3, 2, 2, 33, 16, dtype=dtype)
    got = taylor_attention_blocked(*args, block_size=16)
    assert all(t.dtype == dtype for t in got)
    want = taylor_attention_dense(*(t.double() for t in args))
    assert_triples_close(got, want, rtol)


def test_noncontiguous_inputs(gen):
    # non-contiguous head-split views (B, T, H, D).transpose(1, 2), as a caller may pass
    K, B, H, T, D = 2, 2, 3, 12, 8
    prim = [torch.randn(B, T, H, D, generator=gen, dtype=F64).transpose(1, 2) for _ in range(3)]
    tan = [torch.randn(K, B, T, H, D, generator=gen, dtype=F64).transpose(2, 3) for _ in range(6)]
    args = (*prim, *tan)
    got = taylor_attention(*args)
    assert all(t.is_contiguous() for t in got)
    assert_triples_close(got, taylor_attention_dense(*(t.contiguous() for t in args)), 1e-12)


def test_op_matches_blocked(gen):
    args = attention_inputs(gen, 3, 1, 2, 50, 16)
    got = torch.ops.muonkern.taylor_attention(*args, None)
    for a, b in zip(got, taylor_attention_blocked(*args)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,scale", [(F64, None), (torch.float32, 0.3)])
def test_opcheck(gen, dtype, scale):
    args = attention_inputs(gen, 2, 1, 2, 9, 8, dtype=dtype)
    torch.library.opcheck(torch.ops.muonkern.taylor_attention.default, (*args, scale))


def test_empty_sequence():
    args = attention_inputs(torch.Generator().manual_seed(0), 2, 1, 2, 0, 8)
    o, od, odd = taylor_attention(*args)
    assert o.shape == (1, 2, 0, 8) and od.shape == odd.shape == (2, 1, 2, 0, 8)


def _bad(args, i, t):
    args = list(args)
    args[i] = t
    return args


@pytest.mark.parametrize("case", ["rank", "kv_shape", "tangent_shape", "dtype_mix", "int", "scale"])
def test_attention_errors(gen, case):
    args = attention_inputs(gen, 2, 1, 2, 6, 8)
    q, qd = args[0], args[3]
    bad, scale, err, match = {
        "rank": (_bad(args, 0, q[0]), None, ValueError, "q must be"),
        "kv_shape": (_bad(args, 1, args[1][..., :5, :]), None, ValueError, "k has shape"),
        "tangent_shape": (_bad(args, 8, qd[:1]), None, ValueError, "vdd has shape"),
        "dtype_mix": (_bad(args, 4, args[4].float()), None, TypeError, "kd has dtype"),
        "int": (_bad(args, 2, args[2].long()), None, TypeError, "v has dtype"),
        "scale": (args, math.inf, ValueError, "scale"),
    }[case]
    for fn in (taylor_attention_blocked, taylor_attention):
        with pytest.raises(err, match=match):
            fn(*bad, scale=scale)


def test_dispatch_switch(monkeypatch, gen):
    """triton_applies: never for CPU tensors; an unknown MUONKERN_TAYLOR_ATTENTION value raises."""
    from muonkern.taylor.registration import triton_applies
    q = torch.randn(1, 1, 4, 64, generator=gen)
    assert not triton_applies(q)
    monkeypatch.setenv("MUONKERN_TAYLOR_ATTENTION", "fast")
    with pytest.raises(ValueError, match="MUONKERN_TAYLOR_ATTENTION"):
        triton_applies(q)


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from muonkern.taylor.attention import taylor_attention_dense
    from muonkern.taylor.triton_attention import TileConfig, taylor_attention_triton
    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    errors = []
    # (K, B, H, T, D, dtype, tile): T not a multiple of the blocks, BLOCK_M ≠ BLOCK_N
    for K, B, H, T, D, dtype, tile in [
            (3, 1, 2, 37, 16, torch.float64, TileConfig(16, 16)),
            (3, 1, 1, 40, 16, torch.float64, TileConfig(32, 16)),
            (1, 2, 1, 21, 32, torch.float64, TileConfig(16, 32)),
            (4, 1, 1, 24, 64, torch.float32, TileConfig(16, 16))]:
        args = [torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(3)]
        args += [torch.randn(K, B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(6)]
        want = taylor_attention_dense(*args)
        got = taylor_attention_triton(*(t.to(dtype) for t in args), config=tile)
        errors.append([str(dtype), [float((a.double() - b).abs().max() / b.abs().max())
                                    for a, b in zip(got, want)]])
    print(json.dumps(errors))
""")


def test_triton_kernel_under_interpreter(gen):
    """The Triton kernel, run by Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before
    triton is imported, hence a subprocess), against the dense reference. A few seconds."""
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    for dtype, errs in run_interpreter(_INTERPRETER_SCRIPT, str(seed)):
        budget = 1e-12 if dtype == "torch.float64" else 1e-5
        assert max(errs) <= budget, (dtype, errs)


# --------------------------------------------------------------------------------------------
# GPT
# --------------------------------------------------------------------------------------------

def random_gpt(gen, dtype=F64, **cfg_kw):
    """A fresh GPT with every parameter (norm weights included) redrawn at random, so no
    parameter sits at a special value, and its params dict."""
    cfg = GPTConfig(**{**dict(vocab_size=29, context=16, n_layer=2, n_head=2, d_model=16),
                       **cfg_kw})
    model = GPT(cfg).to(dtype)
    params = {}
    for name, p in model.named_parameters():
        scale = 1.0 if p.dim() == 1 else 0.3
        base = 1.0 if p.dim() == 1 else 0.0
        params[name] = (base + scale * torch.randn(p.shape, generator=gen, dtype=F64)).to(dtype)
    return model, params


def random_directions(gen, params, K):
    return [{k: torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype)
             for k, p in params.items()} for _ in range(K)]


def batch(gen, cfg, B, T):
    return (torch.randint(0, cfg.vocab_size, (B, T), generator=gen),
            torch.randint(0, cfg.vocab_size, (B, T), generator=gen))


def assert_rel(got: torch.Tensor, want: torch.Tensor, rtol: float):
    got, want = got.double().cpu(), want.double().cpu()
    err = ((got - want).abs() / want.abs().clamp_min(1e-300)).max().item()
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}: got {got}, want {want}"


@pytest.mark.parametrize("tie", [False, True])
def test_gpt_matches_directional_quadratics(gen, tie):
    model, params = random_gpt(gen, tie_embeddings=tie)
    x, y = batch(gen, model.config, 2, 11)
    dirs = random_directions(gen, params, 2)
    loss, first, second = taylor_directional(model, params, x, y, dirs)
    assert first.dtype == second.dtype == loss.dtype == F64 and first.shape == (2,)
    loss_fn = gpt_loss_fn(model, x, y)
    with exact_attention():
        q = curvature.directional_quadratics(loss_fn, params, dirs, groups={"all": list(params)})
    assert_rel(loss, loss_fn(params), 1e-12)
    assert_rel(first, q.gain, 1e-8)
    assert_rel(second, q.curvature, 1e-8)


def test_gpt_matches_hvp_full_context_ignored_targets(gen):
    """T = context, 3 heads of dim 8, 3 layers, untied, some targets ignored (-100)."""
    model, params = random_gpt(gen, vocab_size=23, context=12, n_layer=3, n_head=3, d_model=24)
    x, y = batch(gen, model.config, 3, 12)
    y[0, :5] = -100
    y[2, 7] = -100
    dirs = random_directions(gen, params, 2)
    loss, first, second = taylor_directional(model, params, x, y, dirs)
    loss_fn = gpt_loss_fn(model, x, y)
    with exact_attention():
        g = torch.func.grad(loss_fn)(params)
        hvs = [curvature.hvp(loss_fn, params, u) for u in dirs]
    dot = lambda a, b: sum((a[k].double() * b[k].double()).sum() for k in a)  # noqa: E731
    assert_rel(loss, loss_fn(params), 1e-12)
    assert_rel(first, torch.stack([dot(g, u) for u in dirs]), 1e-8)
    assert_rel(second, torch.stack([dot(h, u) for h, u in zip(hvs, dirs)]), 1e-8)


def assert_split_exact(split, whole, model, params, x, y, dirs):
    """A forward split into chunks gives the unsplit (loss, g·u, uᵀHu) to rounding, and the HVP
    path's gain and curvature."""
    for a, b in zip(split, whole):
        assert_rel(a, b, 1e-12)
    with exact_attention():
        q = curvature.directional_quadratics(gpt_loss_fn(model, x, y), params, dirs, blocks=False)
    assert_rel(split[1], q.gain, 1e-8)
    assert_rel(split[2], q.curvature, 1e-8)


def test_gpt_mlp_in_row_chunks(gen, monkeypatch):
    """The MLP runs over token rows in chunks: 3 rows per chunk over 2x11 = 22 rows (a ragged last
    chunk) gives the unchunked values, which match the HVP path."""
    import muonkern.taylor.gpt as taylor_gpt
    model, params = random_gpt(gen)
    x, y = batch(gen, model.config, 2, 11)
    dirs = random_directions(gen, params, 2)
    whole = taylor_directional(model, params, x, y, dirs)
    monkeypatch.setattr(taylor_gpt, "_MLP_CHUNK_ELEMENTS", 3 * 2 * 4 * model.config.d_model)
    monkeypatch.setattr(taylor_gpt, "_MLP_MIN_ROWS", 1)
    assert_split_exact(taylor_directional(model, params, x, y, dirs), whole, model, params, x, y, dirs)


@pytest.mark.parametrize("heads_per_group", [1, 2])
def test_gpt_attention_in_head_groups(gen, monkeypatch, heads_per_group):
    """Attention runs over groups of heads, each adding its share of the output projection to the
    residual stream: 3 heads one at a time, or as 2 + 1, give the all-heads values, which match
    the HVP path."""
    import muonkern.taylor.gpt as taylor_gpt
    model, params = random_gpt(gen, vocab_size=23, context=12, n_layer=2, n_head=3, d_model=24)
    K = 3
    x, y = batch(gen, model.config, 2, 11)
    dirs = random_directions(gen, params, K)
    # groups of ceil(n_head * _ATTENTION_GROUP_DIRECTIONS / K) heads
    monkeypatch.setattr(taylor_gpt, "_ATTENTION_GROUP_DIRECTIONS", K)
    assert list(taylor_gpt._head_groups(3, K)) == [0]
    whole = taylor_directional(model, params, x, y, dirs)
    monkeypatch.setattr(taylor_gpt, "_ATTENTION_GROUP_DIRECTIONS", heads_per_group)
    assert list(taylor_gpt._head_groups(3, K)) == [0, 1, 2][::heads_per_group]
    assert_split_exact(taylor_directional(model, params, x, y, dirs), whole, model, params, x, y, dirs)


def test_gpt_head_in_direction_chunks(gen, monkeypatch):
    """Directions go through the output head and the loss one chunk at a time (here one per
    chunk), against one shared primal softmax: the same values as all at once."""
    import muonkern.taylor.gpt as taylor_gpt
    model, params = random_gpt(gen)
    x, y = batch(gen, model.config, 2, 11)
    y[1, 3] = -100
    dirs = random_directions(gen, params, 3)
    whole = taylor_directional(model, params, x, y, dirs)
    monkeypatch.setattr(taylor_gpt, "_HEAD_CHUNK_ELEMENTS", 1)
    chunked = taylor_directional(model, params, x, y, dirs)
    for a, b in zip(chunked, whole):
        assert_rel(a, b, 1e-12)


# attention_group 3 at K = 3: all heads at once; 1: one head per group (see _head_groups)
@pytest.mark.parametrize("tie,K,head_chunk,attention_group", [(False, 1, None, None), (True, 3, None, 3),
                                                               (True, 3, 1, 1)])
def test_gpt_leaves_params_and_directions_unchanged(gen, monkeypatch, tie, K, head_chunk,
                                                     attention_group):
    """The forward writes into its own buffers only (residual adds run in place; one direction is a
    view of the caller's tensor): params and directions are bitwise as they were, and a second
    call gives the same values."""
    import muonkern.taylor.gpt as taylor_gpt
    if head_chunk is not None:
        monkeypatch.setattr(taylor_gpt, "_HEAD_CHUNK_ELEMENTS", head_chunk)
    if attention_group is not None:
        monkeypatch.setattr(taylor_gpt, "_ATTENTION_GROUP_DIRECTIONS", attention_group)
    model, params = random_gpt(gen, tie_embeddings=tie)
    x, y = batch(gen, model.config, 2, 11)
    dirs = random_directions(gen, params, K)
    before = ({k: v.clone() for k, v in params.items()}, [{k: v.clone() for k, v in u.items()} for u in dirs])
    first = taylor_directional(model, params, x, y, dirs if K > 1 else dirs[0])
    for k in params:
        assert torch.equal(params[k], before[0][k]), k
        for u, u0 in zip(dirs, before[1]):
            assert torch.equal(u[k], u0[k]), k
    second = taylor_directional(model, params, x, y, dirs if K > 1 else dirs[0])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_gpt_derivatives_by_finite_differences_of_the_loss(gen):
    """Independent of every derivative code: φ(t) = L(θ + t·u) by the model's own forward,
    central differences at steps h and h/2 combined by Richardson extrapolation (error O(h⁴))."""
    model, params = random_gpt(gen, tie_embeddings=True)
    x, y = batch(gen, model.config, 2, 9)
    (u,) = random_directions(gen, params, 1)
    _, first, second = taylor_directional(model, params, x, y, u)
    loss_fn = gpt_loss_fn(model, x, y)
    phi = lambda t: float(loss_fn({k: params[k] + t * u[k] for k in params}))  # noqa: E731
    d1 = lambda h: (phi(h) - phi(-h)) / (2 * h)  # noqa: E731
    d2 = lambda h: (phi(h) - 2 * phi(0.0) + phi(-h)) / h ** 2  # noqa: E731
    h = 1e-4  # random weights and directions make φ strongly curved: small steps
    assert_rel(first, torch.tensor([(4 * d1(h / 2) - d1(h)) / 3]), 1e-6)
    assert_rel(second, torch.tensor([(4 * d2(h / 2) - d2(h)) / 3]), 1e-6)


def test_gpt_float32_close_to_float64(gen):
    model, params = random_gpt(gen, n_head=2, d_model=32)
    x, y = batch(gen, model.config, 2, 16)
    dirs = random_directions(gen, params, 2)
    want = taylor_directional(model, params, x, y, dirs)
    p32 = {k: v.float() for k, v in params.items()}
    got = taylor_directional(model.float(), p32, x, y, [{k: v.float() for k, v in u.items()}
                                                        for u in dirs])
    for a, b in zip(got, want):
        assert_rel(a, b, 1e-4)


def test_gpt_uses_params_not_module_weights(gen):
    model, params = random_gpt(gen)
    x, y = batch(gen, model.config, 1, 7)
    (u,) = random_directions(gen, params, 1)
    a = taylor_directional(model, params, x, y, [u])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    b = taylor_directional(model, params, x, y, [u])
    for s, t in zip(a, b):
        assert torch.equal(s, t)


def test_gpt_directions_are_independent(gen):
    """Direction k's values do not depend on the other directions in the batch."""
    model, params = random_gpt(gen)
    x, y = batch(gen, model.config, 2, 8)
    dirs = random_directions(gen, params, 3)
    _, f_all, s_all = taylor_directional(model, params, x, y, dirs)
    _, f_one, s_one = taylor_directional(model, params, x, y, [dirs[1]])
    assert_rel(f_all[1:2], f_one, 1e-12)
    assert_rel(s_all[1:2], s_one, 1e-12)


def test_gpt_errors(gen):
    model, params = random_gpt(gen)
    x, y = batch(gen, model.config, 2, 8)
    (u,) = random_directions(gen, params, 1)
    name = "blocks.0.attn.q.weight"
    with pytest.raises(TypeError, match="muonkern.models.GPT"):
        taylor_directional(torch.nn.Linear(2, 2), params, x, y, [u])
    with pytest.raises(ValueError, match="missing"):
        taylor_directional(model, {k: v for k, v in params.items() if k != name}, x, y, [u])
    with pytest.raises(ValueError, match="unexpected"):
        taylor_directional(model, {**params, "extra": params[name]}, x, y, [u])
    with pytest.raises(ValueError, match="has shape"):
        taylor_directional(model, {**params, name: params[name].T[:3]}, x, y, [u])
    with pytest.raises(TypeError, match="float32 and float64"):
        taylor_directional(model, {k: v.half() for k, v in params.items()}, x, y, [u])
    with pytest.raises(ValueError, match=r"directions\[1\]\['blocks.0.attn.q.weight'\] has shape"):
        taylor_directional(model, params, x, y, [u, {**u, name: u[name][:2]}])
    with pytest.raises(ValueError, match=r"directions\[0\] keys"):
        taylor_directional(model, params, x, y, [{k: v for k, v in u.items() if k != name}])
    with pytest.raises(ValueError, match="empty"):
        taylor_directional(model, params, x, y, [])
    with pytest.raises(TypeError, match="list of such dicts"):
        taylor_directional(model, params, x, y, u[name])
    with pytest.raises(ValueError, match="y must have"):
        taylor_directional(model, params, x, y[:, :3], [u])
    with pytest.raises(ValueError, match="outside"):
        taylor_directional(model, params, x + model.config.vocab_size, y, [u])
    with pytest.raises(ValueError, match="outside"):
        taylor_directional(model, params, x, y - model.config.vocab_size, [u])
    with pytest.raises(TypeError, match="token ids"):
        taylor_directional(model, params, x.double(), y, [u])
    long_x = torch.zeros(1, model.config.context + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds"):
        taylor_directional(model, params, long_x, long_x, [u])
