"""Tests for muonkern.models.gpt (CPU, a few seconds)."""
import math
import warnings

import pytest
import torch

from muonkern import curvature
from muonkern.curvature import hessian_products as hvp_mod
from muonkern.models import (GPT, PRESETS, GPTConfig, apply_rope, exact_attention, gpt_loss_fn,
                             rope_cos_sin)

MICRO = dict(vocab_size=32, context=16, n_layer=2, n_head=2, d_model=16)


def _batch(cfg, B, T, gen):
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    return x, y


def test_shapes_and_initial_loss(gen):
    torch.manual_seed(0)
    cfg = GPTConfig.tiny()
    model = GPT(cfg)
    x, y = _batch(cfg, 4, cfg.context, gen)
    logits = model(x)
    assert logits.shape == (4, cfg.context, cfg.vocab_size)
    logits2, loss = model(x, y)
    assert torch.equal(logits, logits2)
    assert loss.dim() == 0
    # At init the logits are small (std ≈ 0.02·√d ≈ 0.16), so loss ≈ log V + var/2 ≈ log V + 0.01:
    # tolerance 0.1 nats.
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    with pytest.raises(ValueError):
        model(torch.zeros(1, cfg.context + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must be \(B, T\)"):
        model(torch.tensor(3))


def test_config_errors():
    for field, bad in (("vocab_size", 10.7), ("n_layer", 0), ("d_model", True)):
        with pytest.raises(ValueError, match=f"{field} must be an int >= 1"):
            GPTConfig(**{**MICRO, field: bad})
    for field, bad in (("norm_eps", -1.0), ("norm_eps", 0.0), ("rope_base", math.inf), ("rope_base", math.nan),
                       ("norm_eps", True)):
        with pytest.raises(ValueError, match=f"{field} must be positive and finite"):
            GPTConfig(**MICRO, **{field: bad})


def test_int32_targets_give_the_int64_loss(gen):
    """Every curvature method takes the same batch: int32 targets as well as int64 ones."""
    torch.manual_seed(0)
    cfg = GPTConfig(**MICRO)
    model = GPT(cfg).double()
    x, y = _batch(cfg, 2, 8, gen)
    params = {k: p.detach() for k, p in model.named_parameters()}
    u = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
    want = curvature.directional_quadratics(gpt_loss_fn(model, x, y), params, u, method="rev_rev", blocks=False)
    for method in ("rev_rev", "taylor"):
        got = curvature.directional_quadratics(gpt_loss_fn(model, x, y.int()), params, u, method=method, blocks=False)
        assert got.curvature.item() == pytest.approx(want.curvature.item(), rel=1e-10), method


def test_init_stds():
    torch.manual_seed(0)
    cfg = GPTConfig.small()
    model = GPT(cfg)
    proj = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert model.blocks[0].attn.q.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].attn.o.weight.std().item() == pytest.approx(proj, rel=0.02)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(proj, rel=0.02)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.equal(model.norm.weight, torch.ones(cfg.d_model))


@pytest.mark.filterwarnings("ignore:muonkern.models.exact_attention")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_causality_exact(gen, dtype):
    cfg = GPTConfig(**MICRO)
    model = GPT(cfg).to(dtype)
    x, _ = _batch(cfg, 2, cfg.context, gen)
    t = 9
    x2 = x.clone()
    x2[:, t:] = (x[:, t:] + 1 + torch.randint(0, cfg.vocab_size - 1, x[:, t:].shape,
                                                generator=gen)) % cfg.vocab_size
    assert (x2[:, t:] != x[:, t:]).all()
    for ctx in (torch.enable_grad, exact_attention):
        with ctx():
            a, b = model(x), model(x2)
        assert torch.equal(a[:, :t], b[:, :t])            # exactly
        assert not torch.allclose(a[:, t:], b[:, t:])


def test_rope_relative_position():
    hd, T = 16, 24
    cos, sin = rope_cos_sin(T, hd, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(hd, generator=g, dtype=torch.float64).expand(T, hd)
    k = torch.randn(hd, generator=g, dtype=torch.float64).expand(T, hd)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    S = qr @ kr.T                                           # S[m, n] = <rope(q)_m, rope(k)_n>
    for s in (1, 5, 11):
        torch.testing.assert_close(S[s:, s:], S[:-s, :-s], rtol=0, atol=1e-12)
    # rotation: norms preserved, position 0 is the identity, and it is not trivial
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1), rtol=1e-13, atol=0)
    assert torch.equal(qr[0], q[0])
    assert not torch.allclose(S[0, 0], S[0, 3])
    # the model's attention applies the same rope to q and k: shift-invariance of its scores
    cfg = GPTConfig(**MICRO)
    attn = GPT(cfg).double().blocks[0].attn
    z = torch.randn(1, 1, cfg.d_model, generator=g, dtype=torch.float64).expand(1, T, -1)
    H, d = cfg.n_head, cfg.head_dim
    qm = attn.q(z).view(1, T, H, d).transpose(1, 2)
    km = attn.k(z).view(1, T, H, d).transpose(1, 2)
    c, s_ = rope_cos_sin(T, d, cfg.rope_base, dtype=torch.float64)
    Sm = apply_rope(qm, c, s_) @ apply_rope(km, c, s_).transpose(-1, -2)
    torch.testing.assert_close(Sm[..., 3:, 3:], Sm[..., :-3, :-3], rtol=0, atol=1e-12)


def test_tied_weights_share_storage(gen):
    cfg = GPTConfig(**MICRO, tie_embeddings=True)
    model = GPT(cfg)
    assert model.lm_head.weight is model.embed.weight
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    names = [n for n, _ in model.named_parameters()]
    assert "embed.weight" in names and "lm_head.weight" not in names
    assert model.num_params() == cfg.num_params()
    x, y = _batch(cfg, 2, 8, gen)
    model(x, y)[1].backward()
    g1 = model.embed.weight.grad.clone()
    # the gradient of the shared weight includes the head's contribution
    untied = GPT(GPTConfig(**MICRO))
    untied.load_state_dict({**model.state_dict(), "lm_head.weight": model.embed.weight.detach()})
    untied(x, y)[1].backward()
    torch.testing.assert_close(g1, untied.embed.weight.grad + untied.lm_head.weight.grad)


def _count_meta(cfg):
    with torch.device("meta"):
        model = GPT(cfg)
    return sum(p.numel() for p in model.parameters())


def test_preset_param_counts():
    def expected(V, L, d, tied, r=4):
        return L * (4 * d * d + 2 * r * d * d + 2 * d) + d + V * d * (1 if tied else 2)

    assert expected(256, 3, 64, False) == 180_672
    assert expected(256, 6, 384, False) == 10_818_432
    assert expected(50257, 12, 768, True) == 123_551_232
    for name, n in [("tiny", 180_672), ("small", 10_818_432), ("gpt2_small", 123_551_232)]:
        cfg = PRESETS[name]
        assert cfg.num_params() == n
        assert _count_meta(cfg) == n, name
    assert 0.15e6 < PRESETS["tiny"].num_params() < 0.25e6
    assert 10.5e6 < PRESETS["small"].num_params() < 11.5e6
    assert round(PRESETS["gpt2_small"].num_params() / 1e6) == 124
    g2 = GPTConfig.gpt2_small()
    assert (g2.n_layer, g2.d_model, g2.n_head, g2.context, g2.vocab_size, g2.tie_embeddings) == \
        (12, 768, 12, 1024, 50257, True)
    s = GPTConfig.small()
    assert (s.n_layer, s.d_model, s.n_head, s.context) == (6, 384, 6, 256)
    assert GPTConfig.preset("tiny", n_layer=1).n_layer == 1
    assert PRESETS["tiny"].n_layer == 3                   # presets are not mutated
    with pytest.raises(KeyError):
        GPTConfig.preset("nope")
    with pytest.raises(ValueError):
        GPTConfig(vocab_size=8, context=8, n_layer=1, n_head=3, d_model=16)


def test_module_names():
    model = GPT(GPTConfig(**MICRO))
    names = {n for n, _ in model.named_parameters()}
    for i in range(2):
        for leaf in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.proj",
                     "attn_norm", "mlp_norm"):
            assert f"blocks.{i}.{leaf}.weight" in names
    assert {"embed.weight", "norm.weight", "lm_head.weight"} <= names
    assert all(not n.endswith("bias") for n in names)


@pytest.mark.parametrize("tie", [False, True])
def test_gradient_reaches_every_parameter(gen, tie):
    cfg = GPTConfig(**MICRO, tie_embeddings=tie)
    model = GPT(cfg)
    x, y = _batch(cfg, 2, 12, gen)
    model(x, y)[1].backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("tie", [False, True])
def test_functional_call_loss_matches(gen, tie):
    cfg = GPTConfig(**MICRO, tie_embeddings=tie)
    model = GPT(cfg)
    x, y = _batch(cfg, 2, 12, gen)
    params = {k: p.detach() for k, p in model.named_parameters()}
    loss_fn = gpt_loss_fn(model, x, y)
    assert torch.equal(loss_fn(params), model(x, y)[1].detach())
    # substituted parameters are used (also through the tied head)
    p2 = {k: v * 1.5 for k, v in params.items()}
    ref = GPT(cfg)
    ref.load_state_dict({k: v * 1.5 for k, v in model.state_dict().items()})
    torch.testing.assert_close(loss_fn(p2), ref(x, y)[1].detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_hvp_fwd_rev_matches_double_backward(gen, tie):
    cfg = GPTConfig(**MICRO, tie_embeddings=tie)
    model = GPT(cfg).double()
    x, y = _batch(cfg, 2, 12, gen)
    loss_fn = gpt_loss_fn(model, x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with exact_attention():
            _, hv_fr = torch.func.jvp(torch.func.grad(loss_fn), (params,), (v,))
            # double backward by hand
            leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
            g = torch.autograd.grad(loss_fn(leaves), list(leaves.values()), create_graph=True)
            dot = sum((gi * v[k]).sum() for gi, k in zip(g, leaves))
            hv_rr = dict(zip(leaves, torch.autograd.grad(dot, list(leaves.values()))))
            hv_lib = curvature.hvp(loss_fn, params, v, method="rev_rev")
    for k in params:
        torch.testing.assert_close(hv_fr[k], hv_rr[k], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(hv_lib[k], hv_rr[k], rtol=1e-8, atol=1e-12)
    assert sum(h.abs().sum() for h in hv_fr.values()) > 0


def test_exact_attention_warns_once(monkeypatch):
    from torch.nn.attention import SDPBackend

    monkeypatch.setattr(hvp_mod, "_EXACT_ATTENTION_WARNED", False)
    with pytest.warns(UserWarning, match="math"):
        with exact_attention():
            if hasattr(torch.backends.cuda, "flash_sdp_enabled"):
                assert not torch.backends.cuda.flash_sdp_enabled()
                assert torch.backends.cuda.math_sdp_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with exact_attention():
            with exact_attention():                        # nesting is fine, no second warning
                pass
    assert torch.backends.cuda.flash_sdp_enabled() or not hasattr(SDPBackend, "FLASH_ATTENTION")
