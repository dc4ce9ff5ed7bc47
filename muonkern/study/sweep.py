"""The learning-rate sweep before the main runs.

AdamW: each lr of `sweep_adamw_lrs`. Muon: each pair (matrix lr from `sweep_muon_lrs`, lr of its
AdamW part from `sweep_muon_adamw_lrs`, or AdamW's chosen lr when that list is empty, so the two
optimizers then treat embeddings, head and norms alike). Every sweep run trains `sweep_steps`
steps at alpha = val_alpha with seed `sweep_seed` (a seed the main runs do not use, so the choice
is not fitted to their data) and no probes; the choice is the lowest final validation loss
(a run that diverges counts as infinitely bad).
"""
from __future__ import annotations

import math

from .config import StudyConfig



def configured_lrs(cfg: StudyConfig) -> dict:
    return {"muon_lr": cfg.muon_lr, "muon_adamw_lr": cfg.muon_adamw_lr, "adamw_lr": cfg.adamw_lr}


def adamw_points(cfg: StudyConfig) -> list[dict]:
    return [{"adamw_lr": lr} for lr in cfg.sweep_adamw_lrs]


def muon_points(cfg: StudyConfig, adamw_lr: float) -> list[dict]:
    part = cfg.sweep_muon_adamw_lrs or (adamw_lr,)
    return [{"muon_lr": lr, "muon_adamw_lr": a} for lr in cfg.sweep_muon_lrs for a in part]


def final_loss(evals: list) -> float:
    loss = evals[-1][1]
    return loss if math.isfinite(loss) else math.inf


def choose(points: list[dict], losses: list[float]) -> dict:
    best = min(range(len(points)), key=lambda i: (losses[i], i))
    return points[best]


def point_name(optimizer: str, point: dict) -> str:
    return f"sweep_{optimizer}_" + "_".join(f"{k}{v:g}" for k, v in sorted(point.items()))
