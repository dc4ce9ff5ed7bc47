"""One training run (optimizer, training alpha, seed) with validation and curvature probes.

Checkpoint t is the model after t optimizer steps. Validation runs at checkpoint 0, every
`eval_every` steps, at every periodic probe checkpoint and at the end. Two kinds of checkpoints are
probed, on the update Δ_t = θ_{t+1} − θ_t that the optimizer really applies next (the training
batch t+1, the optimizer's state at t):

* ladder: the matched-loss levels are the multiples of `ladder_step`; a checkpoint is probed when
  its validation loss is the first to reach one or more levels below the best loss so far
  (`levels` lists them); a level crossed at the last checkpoint is probed with one extra step;
* periodic: every `probe_every` steps (for the early / middle / late analysis).

A checkpoint can be both (`kinds` lists which).
"""
from __future__ import annotations

import math

import torch

from ..models import GPT, GPTConfig
from ..optim import Muon, muon_param_groups
from .analysis import OPTIMIZERS
from .checkpoint import RunCheckpoint
from .config import StudyConfig
from .distributed import Context
from .probe import measure, partitions
from .sources import make_streams


def make_optimizer(name: str, model: torch.nn.Module, cfg: StudyConfig, lrs: dict):
    """Muon on hidden matrices with AdamW on embeddings, head and norms; or AdamW on everything."""
    if name == "muon":
        return Muon(muon_param_groups(model), lr=lrs["muon_lr"], momentum=cfg.momentum,
                    adamw_lr=lrs["muon_adamw_lr"], adamw_betas=cfg.betas)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lrs["adamw_lr"], betas=cfg.betas, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


@torch.no_grad()
def _evaluate(model: GPT, batches, ctx: Context) -> float:
    model.eval()
    loss = torch.stack([model(x, y)[1].double() for x, y in batches]).mean()
    model.train()
    return float(ctx.mean_(loss.reshape(1)))


def level_indices(val: float, best: float, step: float) -> list[int]:
    """Indices k of the levels k·step that val reaches (val <= k·step) and best did not."""
    if not math.isfinite(val):
        return []
    lo = math.ceil(val / step - 1e-9)
    hi = math.ceil(best / step - 1e-9) - 1
    return list(range(hi, lo - 1, -1))


def train_run(cfg: StudyConfig, optimizer: str, alpha: float, seed: int, lrs: dict, ctx: Context,
              probes: bool = True, steps: int | None = None, progress=None,
              checkpoint: RunCheckpoint | None = None) -> dict:
    """{"evals": [[step, val_loss], ...], "train_loss": [...], "probes": [record, ...], "made": ...}.
    With `checkpoint`, resumes from its snapshot if there is one and saves one when it is due."""
    steps = cfg.steps if steps is None else steps
    resumed = checkpoint.load() if checkpoint is not None else None
    streams = make_streams(cfg, alpha, seed, ctx, skip=resumed["step"] if resumed else 0)
    torch.manual_seed(seed)  # the same initialization for both optimizers
    model = GPT(GPTConfig(vocab_size=streams.vocab_size, context=cfg.context, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, d_model=cfg.d_model)).to(ctx.device)
    opt = make_optimizer(optimizer, model, cfg, lrs)
    groups = partitions(model)
    params = list(model.parameters())
    if resumed:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        step, evals, records, levels = resumed["step"], resumed["evals"], resumed["records"], resumed["levels"]
        val, best = resumed["val"], resumed["best"]
        restored = resumed["train_losses"].to(ctx.device)  # float64, rank means already
        if progress is not None:
            progress.update(step)
    else:
        evals, records, restored = [], [], None
        val = best = _evaluate(model, streams.val, ctx)
        evals.append([0, val])
        levels: list[int] = []
        step = 0
    train_losses = []   # this invocation's, this rank's
    while True:
        kinds = []
        if probes and levels:
            kinds.append("ladder")
        if probes and step > 0 and step % cfg.probe_every == 0:
            kinds.append("periodic")
        if step >= steps and not kinds:
            break
        x, y = next(streams.train)
        if kinds:
            theta = {k: p.detach().clone() for k, p in model.named_parameters()}
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ctx.average_gradients(params)
        opt.step()
        if kinds:
            delta = {k: p.detach() - theta[k] for k, p in model.named_parameters()}
            record = measure(model, theta, delta, streams.probe, groups, ctx, cfg.probe_hvp_batch, cfg.probe_method)
            records.append(dict(step=step, val_loss=val, train_loss=float(ctx.mean_(loss.detach().double().reshape(1))),
                                kinds=kinds, levels=[round(k * cfg.ladder_step, 10) for k in levels], **record))
            del theta, delta
        if step >= steps:
            break  # the extra step only served a probe of the last checkpoint
        train_losses.append(loss.detach())  # no host sync per step: the next batch is drawn meanwhile
        step += 1
        levels = []
        if step % cfg.eval_every == 0 or step % cfg.probe_every == 0 or step == steps:
            val = _evaluate(model, streams.val, ctx)
            evals.append([step, val])
            if val < best:
                levels = level_indices(val, best, cfg.ladder_step)
                best = val
        if progress is not None:
            progress.update(1)
        if checkpoint is not None and checkpoint.due(step) and step < steps:
            # the losses as the run reports them, means over the ranks (every rank takes part)
            losses = _reported_losses(restored, train_losses, ctx)
            checkpoint.save(lambda: dict(step=step, evals=evals, records=records, levels=levels, val=val,
                                         best=best, train_losses=losses.cpu(), model=model.state_dict(),
                                         optimizer=opt.state_dict()))
    train_loss = _reported_losses(restored, train_losses, ctx).tolist()
    # how this run was made, for a report over runs that may come from earlier invocations
    made = {"world_size": ctx.world, "probe_method": cfg.probe_method if probes else None}
    return {"evals": evals, "train_loss": train_loss, "probes": records, "made": made}


def _reported_losses(restored: torch.Tensor | None, losses: list, ctx: Context) -> torch.Tensor:
    """The per-step training losses as the run reports them, float64 means over the ranks: those
    restored from a snapshot (means already, not averaged again) and then this invocation's."""
    new = ctx.mean_(torch.stack(losses).double()) if losses else torch.zeros(0, dtype=torch.float64, device=ctx.device)
    return new if restored is None else torch.cat([restored, new])
