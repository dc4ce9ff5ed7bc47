"""Runs the whole study: the learning-rate sweep, every (optimizer, alpha, seed) training run with its
probes, and the stylized quadratic problems; finished pieces are kept in DIR/runs/*.json and not
recomputed, and an unfinished run resumes from its snapshot (checkpoint.py); a file made under
another configuration, or a corrupt one, stops the study with a message saying so. Under torchrun every rank trains and takes a share of the quadratic problems;
rank 0 alone reads and writes files and shows progress.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from . import sweep
from .analysis import OPTIMIZERS
from .checkpoint import RunCheckpoint, write_atomically
from .config import StudyConfig
from .distributed import Context
from .quadratic import run_quadratic
from .train import train_run


def run_name(optimizer: str, alpha: float, seed: int) -> str:
    return f"{optimizer}_alpha{alpha:g}_seed{seed}"


class RunStore:
    """Finished pieces of work as DIR/NAME.json = {"identity": ..., "result": ...}; rank 0 does the
    file work and tells the other ranks whether a piece is done."""

    def __init__(self, directory: Path, ctx: Context):
        self.directory, self.ctx = Path(directory), ctx
        if ctx.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)

    def read(self, name: str, identity: dict):
        """The stored result or None, read by this process alone (no collective)."""
        path = self.directory / f"{name}.json"
        if not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
            stored, result = saved["identity"], saved["result"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is corrupt ({err}); delete it to recompute that part") from err
        if stored != json.loads(json.dumps(identity)):
            raise ValueError(f"{path} was produced with a different configuration; use another --out "
                             f"directory or delete it")
        return result

    def load(self, name: str, identity: dict):
        """The stored result (on rank 0; True on the other ranks), or None if not done yet."""
        return self.ctx.read_on_main(lambda: self.read(name, identity), share=False)

    def save(self, name: str, identity: dict, result) -> None:
        if self.ctx.is_main:
            write_atomically(self.directory / f"{name}.json",
                             lambda tmp: tmp.write_text(json.dumps({"identity": identity, "result": result})))

    def snapshot(self, name: str, identity: dict, every: int) -> RunCheckpoint:
        """The snapshot of the unfinished run NAME (DIR/NAME.partial.pt)."""
        return RunCheckpoint(self.directory / f"{name}.partial.pt", identity, self.ctx, every)


def provenance(runs: dict) -> dict:
    """How the stored runs were made: their data-parallel world sizes and probe methods, as each run
    recorded them ("unrecorded" for runs saved before they did). Runs are reused across invocations,
    so the current configuration need not be what made them."""
    made = [r.get("made", {}) for r in runs.values()]
    return {"world_sizes": sorted({m.get("world_size", "unrecorded") for m in made}, key=str),
            "probe_methods": sorted({m.get("probe_method", "unrecorded") for m in made})}


def _train_or_load(store: RunStore, name: str, identity: dict, bar, steps: int, label: str, train,
                   checkpoint_every: int):
    """The stored result, or `train(checkpoint)` resumed from the run's snapshot if it has one."""
    result = store.load(name, identity)
    if result is None:
        bar.total = (bar.total or 0) + steps
        bar.set_postfix_str(label)
        bar.refresh()
        checkpoint = store.snapshot(name, identity, checkpoint_every)
        result = train(checkpoint)
        store.save(name, identity, result)
        checkpoint.discard()
    return result


def _sweep(cfg: StudyConfig, store: RunStore, ctx: Context, bar) -> tuple[dict, list]:
    steps = cfg.effective_sweep_steps
    records, chosen = [], {}
    for optimizer in ("adamw", "muon"):
        points = sweep.adamw_points(cfg) if optimizer == "adamw" else sweep.muon_points(cfg, chosen["adamw_lr"])
        losses = []
        for point in points:
            lrs = {**sweep.configured_lrs(cfg), **point}
            identity = {**cfg.run_identity(), "steps": steps, "optimizer": optimizer, "alpha": cfg.val_alpha,
                        "seed": cfg.sweep_seed, "lrs": lrs, "probes": False}
            result = _train_or_load(store, sweep.point_name(optimizer, point), identity, bar, steps,
                                    f"sweep {optimizer} {point}",
                                    lambda checkpoint: train_run(cfg, optimizer, cfg.val_alpha, cfg.sweep_seed, lrs,
                                                                 ctx, probes=False, steps=steps, progress=bar,
                                                                 checkpoint=checkpoint),
                                    cfg.checkpoint_every)
            loss = sweep.final_loss(result["evals"]) if ctx.is_main else None
            losses.append(loss)
            records.append({"optimizer": optimizer, **point, "final_val_loss": loss,
                            "evals": result["evals"] if ctx.is_main else None})
        best = ctx.broadcast(sweep.choose(points, losses) if ctx.is_main else None)
        chosen.update(best)
        for r in records:
            if r["optimizer"] == optimizer:
                r["chosen"] = all(r[k] == v for k, v in best.items())
    return chosen, records


def run_study(cfg: StudyConfig, out: Path, ctx: Context | None = None) -> dict | None:
    """Everything the report needs (on rank 0; None on the other ranks):
    {"config", "world_size", "provenance", "lrs", "lr_sweep", "runs": {(optimizer, alpha, seed): result},
    "quadratic"}."""
    ctx = ctx or Context(device=cfg.device)
    store = RunStore(Path(out) / "runs", ctx)
    with tqdm(total=0, desc="study", unit="step", mininterval=2.0, disable=not ctx.is_main) as bar:
        lrs, sweep_records = _sweep(cfg, store, ctx, bar) if cfg.lr_sweep else (sweep.configured_lrs(cfg), [])
        runs = {}
        for alpha in cfg.alphas:
            for seed in cfg.seeds:
                for optimizer in OPTIMIZERS:
                    identity = {**cfg.run_identity(), "optimizer": optimizer, "alpha": alpha, "seed": seed,
                                "lrs": lrs, "probes": True}
                    runs[(optimizer, alpha, seed)] = _train_or_load(
                        store, run_name(optimizer, alpha, seed), identity, bar, cfg.steps,
                        f"{optimizer} alpha={alpha:g} seed={seed}",
                        lambda checkpoint: train_run(cfg, optimizer, alpha, seed, lrs, ctx, progress=bar,
                                                     checkpoint=checkpoint),
                        cfg.checkpoint_every)
    quadratic = store.load("quadratic", cfg.quadratic_identity())
    if quadratic is None:
        quadratic = run_quadratic(cfg, ctx)  # every rank takes a share of the problems
        store.save("quadratic", cfg.quadratic_identity(), quadratic)
    if not ctx.is_main:
        return None
    return {"config": cfg.to_dict(), "world_size": ctx.world, "provenance": provenance(runs), "lrs": lrs,
            "lr_sweep": sweep_records,
            "runs": runs, "quadratic": quadratic}
