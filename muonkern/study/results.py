"""The study's machine-readable outputs: `results.json` and the CSV files, in `--out DIR`.

results.json's schema ("muonkern.study/results/v1") is documented field by field in SCHEMA.md
beside this module (a test checks that it names every field).

CSV files (one header row each): probes.csv (probe scalars), curves.csv, lr_sweep.csv, matched.csv
(mean/lo/hi per metric), e3_imbalance.csv, e4_phases.csv, e5_quadratic.csv, e6_heatmap.csv,
findings.csv.

`validate(results)` checks this structure (ValueError listing what departs from it).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..models import GPTConfig
from .analysis import MATCHED_METRICS, OPTIMIZERS, PHASE_METRICS, flat_probes
from .config import StudyConfig
from .sources import vocab_size

SCHEMA = "muonkern.study/results/v1"
PROBE_SCALARS = ("optimizer", "alpha", "seed", "step", "val_loss", "train_loss", "kinds", "levels", "gain",
                 "curvature", "norm_sq", "nds", "within", "cross", "within_kind", "cross_kind", "predicted_delta",
                 "actual_delta", "probe_loss")


def _clean(obj):
    """JSON-safe: tuples to lists, tuple keys to strings, non-finite floats to None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {(",".join(map(str, k)) if isinstance(k, tuple) else str(k)): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def model_parameters(config: dict) -> int:
    cfg = StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    return GPTConfig(vocab_size=vocab_size(cfg), context=cfg.context, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     d_model=cfg.d_model).num_params()


def build(data: dict, analysis: dict) -> dict:
    units = [{"alpha": a, "seed": s, "optimizer": o, **u[o]} for (a, s), u in analysis["units"].items()
             for o in OPTIMIZERS]
    curves = [{"optimizer": o, "alpha": a, "seed": s, "evals": r["evals"], "train_loss": r["train_loss"]}
              for (o, a, s), r in data["runs"].items()]
    return _clean({
        "schema": SCHEMA, "config": data["config"], "world_size": data["world_size"],
        "provenance": data["provenance"],
        "model_parameters": model_parameters(data["config"]), "lrs": data["lrs"], "lr_sweep": data["lr_sweep"],
        "curves": curves, "probes": flat_probes(data["runs"]), "matched": analysis["matched"],
        "experiments": {"units": units, "e3": analysis["e3"], "e4": analysis["e4"], "e5": analysis["e5"],
                        "e6": analysis["e6"], "taylor": analysis["taylor"]},
        "quadratic": data["quadratic"], "findings": analysis["findings"]})


def _iv(prefix: str, iv: dict) -> dict:
    return {f"{prefix}_mean": iv["mean"], f"{prefix}_lo": iv["lo"], f"{prefix}_hi": iv["hi"]}


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r)) if rows else ["empty"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()})


def write(results: dict, out: Path) -> list[Path]:
    """results.json and the CSV files; returns their paths."""
    validate(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    ex = results["experiments"]
    tables = {
        "probes.csv": [{k: p[k] for k in PROBE_SCALARS} for p in results["probes"]],
        "curves.csv": [{"optimizer": c["optimizer"], "alpha": c["alpha"], "seed": c["seed"], "step": st, "val_loss": v}
                       for c in results["curves"] for st, v in c["evals"]],
        "lr_sweep.csv": [{k: v for k, v in r.items() if k != "evals"} for r in results["lr_sweep"]],
        "matched.csv": [{"alpha": r["alpha"], "level": r["level"], "optimizer": r["optimizer"],
                         **{k: v for m in MATCHED_METRICS for k, v in _iv(m, r[m]).items()}} for r in results["matched"]],
        "e3_imbalance.csv": [{"alpha": r["alpha"], **_iv("nds_ratio", r["nds_ratio"]), **_iv("nds_muon", r["nds_muon"]),
                              **_iv("nds_adamw", r["nds_adamw"])} for r in ex["e3"]["rows"]],
        "e4_phases.csv": [{"phase": ph, "optimizer": o,
                           **{k: v for m in PHASE_METRICS for k, v in _iv(m, row[o][m]).items()}}
                          for ph, row in ex["e4"].items() for o in OPTIMIZERS],
        "e5_quadratic.csv": [{"alpha_sigma": r["alpha_sigma"], "alpha_w": r["alpha_w"], "method": r["method"],
                              "rule": r["rule"], **_iv("loss_T", r["loss_T"]), **_iv("nds_avg", r["nds_avg"]),
                              **_iv("nds_0", r["nds_0"]), "closed_loss_T": r["closed_loss_T"],
                              "closed_nds_avg": r["closed_nds_avg"], "closed_nds_0": r["closed_nds_0"]} for r in ex["e5"]],
        "e6_heatmap.csv": [{"partition": part, "optimizer": o, "row": ex["e6"][part]["groups"][i],
                            "col": ex["e6"][part]["groups"][j], "value": v}
                           for part in ("block", "kind") if part in ex["e6"] for o in OPTIMIZERS
                           for i, row in enumerate(ex["e6"][part][o]) for j, v in enumerate(row)],
        "findings.csv": [{"id": f["id"], "reproduced": f["reproduced"], "summary": f["summary"]}
                         for f in results["findings"]],
    }
    paths = [out / "results.json"]
    for name, rows in tables.items():
        _write_csv(out / name, rows)
        paths.append(out / name)
    return paths


PROBE_FIELDS = PROBE_SCALARS + ("groups_block", "blocks_block", "group_norm_sq_block", "groups_kind", "blocks_kind",
                                "group_norm_sq_kind")
TOP_LEVEL = ("schema", "config", "world_size", "provenance", "model_parameters", "lrs", "lr_sweep", "curves", "probes", "matched",
             "experiments", "quadratic", "findings")
EXPERIMENTS = ("units", "e3", "e4", "e5", "e6", "taylor")
FINDING_IDS = ("F1", "F2", "F3", "F4", "F5", "F6")


def validate(results: dict) -> None:
    """Raises ValueError listing every way `results` departs from the schema above."""
    problems = [f"missing top-level key {k!r}" for k in TOP_LEVEL if k not in results]
    if results.get("schema") != SCHEMA:
        problems.append(f"schema is {results.get('schema')!r}, expected {SCHEMA!r}")
    for i, p in enumerate(results.get("probes", [])):
        missing = [k for k in PROBE_FIELDS if k not in p]
        if missing:
            problems.append(f"probe {i} lacks {missing}")
        for part in ("block", "kind"):
            G = len(p.get(f"groups_{part}", []))
            blocks = p.get(f"blocks_{part}", [])
            if len(blocks) != G or any(len(row) != G for row in blocks):
                problems.append(f"probe {i}: blocks_{part} is not {G}x{G}")
    problems += [f"experiments lack {k!r}" for k in EXPERIMENTS if k not in results.get("experiments", {})]
    ids = [f.get("id") for f in results.get("findings", [])]
    if tuple(ids) != FINDING_IDS:
        problems.append(f"findings are {ids}, expected {list(FINDING_IDS)}")
    for f in results.get("findings", []):
        if not isinstance(f.get("reproduced"), bool) or not isinstance(f.get("evidence"), dict):
            problems.append(f"finding {f.get('id')} needs a boolean 'reproduced' and an 'evidence' object")
    if problems:
        raise ValueError("results.json does not follow the schema: " + "; ".join(problems))
