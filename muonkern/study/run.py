"""Trains the same GPT with Muon and with AdamW on the Zipf-PCFG language and probes the curvature
of every probe_every-th update: gain g·u, curvature uᵀHu, ‖u‖², NDS, the within-/cross-layer split,
and the actual one-step loss change, on a fixed batch from the training distribution."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..curvature import directional_quadratics, groups_by_module
from ..data import PCFGConfig, ZipfPCFG, load_shakespeare
from ..models import GPT, GPTConfig, exact_attention, gpt_loss_fn
from ..optim import Muon, muon_param_groups
from .config import StudyConfig

OPTIMIZERS = ("muon", "adamw")


def _make_optimizer(name: str, model: torch.nn.Module, cfg: StudyConfig):
    if name == "muon":
        return Muon(muon_param_groups(model), lr=cfg.muon_lr, adamw_lr=cfg.muon_adamw_lr, adamw_betas=cfg.betas)
    return torch.optim.AdamW(model.parameters(), lr=cfg.adamw_lr, betas=cfg.betas, weight_decay=0.0)


def _take(iterator, n: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(t.to(device) for t in next(iterator)) for _ in range(n)]


@torch.no_grad()
def _evaluate(model: GPT, batches) -> float:
    model.eval()
    loss = sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    model.train()
    return loss


def _data(cfg: StudyConfig, alpha: float, seed: int):
    """(vocab size, train batch iterator, validation batches, probe batch) of one run."""
    if cfg.dataset == "shakespeare":
        corpus = load_shakespeare()
        batches = lambda size, split, stream: corpus.batches(size, cfg.context, split, seed=1000 * seed + stream)
        train, val_source, probe_source = batches(cfg.batch_size, "train", 1), batches(cfg.batch_size, "val", 2), \
            batches(cfg.probe_batch_size, "train", 3)
        vocab = corpus.vocab_size
    else:
        grammar = ZipfPCFG(PCFGConfig(vocab_size=cfg.vocab_size, n_classes=cfg.n_classes, seed=cfg.grammar_seed))
        batches = lambda size, a, stream: grammar.batches(size, cfg.context, emission_alpha=a, seed=1000 * seed + stream)
        train, val_source, probe_source = batches(cfg.batch_size, alpha, 1), \
            batches(cfg.batch_size, cfg.val_alpha, 2), batches(cfg.probe_batch_size, alpha, 3)
        vocab = grammar.n_tokens
    return vocab, train, _take(val_source, cfg.val_batches, cfg.device), _take(probe_source, 1, cfg.device)[0]


def train_and_probe(cfg: StudyConfig, optimizer: str, alpha: float, seed: int, progress=None) -> list[dict]:
    """One training run; returns one record per probe."""
    vocab, train, val, (xp, yp) = _data(cfg, alpha, seed)
    torch.manual_seed(seed)  # same initialization for both optimizers
    model = GPT(GPTConfig(vocab_size=vocab, context=cfg.context, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, d_model=cfg.d_model)).to(cfg.device)
    opt = _make_optimizer(optimizer, model, cfg)
    groups = groups_by_module(model, 2)  # embed, blocks.i, norm, lm_head
    probe_loss = gpt_loss_fn(model, xp, yp)
    records = []
    for step in range(1, cfg.steps + 1):
        x, y = (t.to(cfg.device) for t in next(train))
        probing = step % cfg.probe_every == 0
        if probing:
            theta = {k: p.detach().clone() for k, p in model.named_parameters()}
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if probing:
            u = {k: p.detach() - theta[k] for k, p in model.named_parameters()}
            with exact_attention():
                q = directional_quadratics(probe_loss, theta, u, groups=groups)
                with torch.no_grad():
                    actual = (probe_loss({k: theta[k] + u[k] for k in theta}) - probe_loss(theta)).item()
            records.append(dict(step=step, train_loss=loss.item(), val_loss=_evaluate(model, val),
                                gain=q.gain.item(), curvature=q.curvature.item(), norm_sq=q.norm_sq.item(),
                                nds=q.nds.item(), within=q.within.item(), cross=q.cross.item(),
                                predicted_change=(q.gain + 0.5 * q.curvature).item(), actual_change=actual,
                                group_names=q.group_names, block_diagonal=q.blocks.diagonal().tolist()))
        if progress is not None:
            progress.update(1)
    return records


def _load(path: Path, cfg: StudyConfig):
    try:
        saved = json.loads(path.read_text())
        config, records = saved["config"], saved["records"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is corrupt ({err}); delete it to recompute that run") from err
    if config != cfg.to_dict():
        raise ValueError(f"{path} was produced with a different configuration; use another --out directory "
                         f"or delete it")
    return records


def run_study(cfg: StudyConfig, out: Path) -> dict:
    """Every (optimizer, alpha, seed) run, reusing finished runs found in out/runs."""
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan = [(o, a, s) for a in cfg.alphas for s in cfg.seeds for o in OPTIMIZERS]
    results, todo = {}, []
    for key in plan:
        path = runs_dir / f"{key[0]}_alpha{key[1]:g}_seed{key[2]}.json"
        if path.exists():
            results[key] = _load(path, cfg)
        else:
            todo.append((key, path))
    with tqdm(total=len(todo) * cfg.steps, desc="study", unit="step", disable=not todo) as progress:
        for (optimizer, alpha, seed), path in todo:
            progress.set_postfix(run=f"{optimizer} alpha={alpha:g} seed={seed}")
            records = train_and_probe(cfg, optimizer, alpha, seed, progress)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"config": cfg.to_dict(), "records": records}))
            tmp.replace(path)  # a run interrupted mid-write leaves no half file
            results[(optimizer, alpha, seed)] = records
    return results
