"""A study probe equals the curvature library's value, recomputed independently: the checkpoint and the
update are rebuilt by replaying the run step by step, and the quadratics come from
muonkern.curvature with the other exact HVP method (forward-over-reverse; the study's default is double
backward)."""
from __future__ import annotations

import pytest
import torch

from muonkern.curvature import directional_quadratics
from muonkern.models import GPT, GPTConfig, exact_attention, gpt_loss_fn
from muonkern.study import make_config
from muonkern.study.distributed import Context
from muonkern.study.probe import measure, partitions
from muonkern.study.sources import make_streams
from muonkern.study.sweep import configured_lrs
from muonkern.study.train import make_optimizer, train_run

CFG = ["steps=9", "eval_every=2", "probe_every=4", "d_model=32", "n_layer=2", "context=16", "batch_size=4",
       "probe_batch_size=4", "val_batches=1", "ladder_step=0.02", "lr_sweep=false"]


def _replay(cfg, optimizer, alpha, seed, checkpoint):
    """(model, θ at the checkpoint, the next update Δ, probe batch), by training again from scratch."""
    streams = make_streams(cfg, alpha, seed, Context())
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=streams.vocab_size, context=cfg.context, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, d_model=cfg.d_model))
    opt = make_optimizer(optimizer, model, cfg, configured_lrs(cfg))
    theta = None
    for step in range(checkpoint + 1):
        if step == checkpoint:
            theta = {k: p.detach().clone() for k, p in model.named_parameters()}
        x, y = next(streams.train)
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    delta = {k: p.detach() - theta[k] for k, p in model.named_parameters()}
    return model, theta, delta, streams.probe


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_probe_equals_library(optimizer):
    cfg = make_config("tiny", CFG)
    run = train_run(cfg, optimizer, 1.0, 0, configured_lrs(cfg), Context())
    kinds = {k for p in run["probes"] for k in p["kinds"]}
    assert kinds == {"ladder", "periodic"}
    for record in (run["probes"][0], run["probes"][-1]):
        model, theta, delta, (x, y) = _replay(cfg, optimizer, 1.0, 0, record["step"])
        loss_fn = gpt_loss_fn(model, x, y)
        groups = partitions(model)
        with exact_attention():
            q = directional_quadratics(loss_fn, theta, delta, groups=groups["block"], method="fwd_rev")
            qk = directional_quadratics(loss_fn, theta, delta, groups=groups["kind"], method="fwd_rev")
            with torch.no_grad():
                actual = float(loss_fn({k: theta[k] + delta[k] for k in theta}) - loss_fn(theta))
        scale = abs(float(q.curvature)) + 1e-8
        assert record["gain"] == pytest.approx(float(q.gain), rel=1e-5)
        assert record["norm_sq"] == pytest.approx(float(q.norm_sq), rel=1e-6)
        assert record["curvature"] == pytest.approx(float(q.curvature), rel=1e-4, abs=1e-5 * scale)
        assert record["nds"] == pytest.approx(float(q.nds), rel=1e-4, abs=1e-5 * scale)
        assert record["within"] == pytest.approx(float(q.within), rel=1e-4, abs=1e-4 * scale)
        assert record["cross"] == pytest.approx(float(q.cross), rel=1e-4, abs=1e-4 * scale)
        assert record["within_kind"] == pytest.approx(float(qk.within), rel=1e-4, abs=1e-4 * scale)
        assert record["actual_delta"] == pytest.approx(actual, rel=1e-4, abs=1e-7)
        torch.testing.assert_close(torch.tensor(record["blocks_block"], dtype=torch.float64), q.blocks,
                                   rtol=1e-4, atol=1e-4 * scale)
        assert record["groups_block"] == q.group_names


def test_probe_taylor_method_matches_hvp_probe():
    """probe_method=taylor (Taylor-mode forward passes, blocks by polarization) gives the HVP probe's
    record; float64, so every field agrees to rounding."""
    cfg = make_config("tiny", CFG + ["probe_method=taylor"])
    assert cfg.probe_method == "taylor"
    gen = torch.Generator().manual_seed(3)
    model = GPT(GPTConfig(vocab_size=31, context=16, n_layer=2, n_head=2, d_model=32)).double()
    theta = {k: p.detach().clone() for k, p in model.named_parameters()}
    delta = {k: 1e-2 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in theta.items()}
    batch = tuple(torch.randint(0, 31, (3, 16), generator=gen) for _ in range(2))
    groups = partitions(model)
    got = measure(model, theta, delta, batch, groups, Context(), hvp_batch=4, method="taylor")
    want = measure(model, theta, delta, batch, groups, Context(), hvp_batch=4, method="rev_rev")
    scale = abs(want["curvature"])
    for key in ("gain", "norm_sq", "curvature", "within", "cross", "nds", "within_kind", "cross_kind",
                "predicted_delta"):
        assert got[key] == pytest.approx(want[key], rel=1e-8, abs=1e-10 * scale), key
    torch.testing.assert_close(torch.tensor(got["blocks_block"]), torch.tensor(want["blocks_block"]),
                               rtol=1e-7, atol=1e-10 * scale)
