"""report.md: the setup, the findings table with a verdict on each finding, and one table and figure
per experiment (E1–E6), written from results.json's content."""
from __future__ import annotations

from pathlib import Path

from .analysis import (COMPARABLE, OPTIMIZERS, PAPER_IMBALANCE_WIDENING, PAPER_NDS_RATIO,
                       validation_label)
from .quadratic import METHODS
from .stats import fmt, interval

NAMES = {"muon": "Muon", "adamw": "AdamW"}


def _g(v, digits=4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def _listing(values: list) -> str:
    """1 / "1 and 2" / "rev_rev, taylor and unrecorded": what the stored runs recorded."""
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def _setup(r: dict) -> list[str]:
    c = r["config"]
    data = {"pcfg": f"the Zipf-PCFG language (muonkern.data.zipf_pcfg: {c['vocab_size']} terminal tokens in "
                    f"{c['n_classes']} classes, grammar seed {c['grammar_seed']}); training emission exponent "
                    f"alpha ∈ {list(c['alphas'])}, validation at alpha = {c['val_alpha']:g}",
            "shakespeare": "Shakespeare's works, byte-level (no imbalance axis)",
            "bin": f"the token files in {c['data_dir']} (vocabulary {c['vocab_size']}; no imbalance axis)"}[c["dataset"]]
    lrs = r["lrs"]
    lines = ["## Setup", "",
             f"- Data: {data}.",
             f"- Model: GPT (muonkern.models) with {c['n_layer']} layers, {c['n_head']} heads, d_model {c['d_model']}, "
             f"context {c['context']}: {r['model_parameters']:,} parameters.",
             f"- Training: {c['steps']} steps of batch {c['batch_size']}×{c['context']}, constant learning rates, no "
             f"weight decay, on {_listing(r['provenance']['world_sizes'])} data-parallel process(es). Muon (momentum {c['momentum']}, Nesterov, "
             f"ns5) on the hidden matrices with AdamW (betas {list(c['betas'])}) on embeddings, head and norms; AdamW "
             f"on everything. Both optimizers of a seed start from the same initialization and see the same batches; "
             f"seeds {list(c['seeds'])}.",
             f"- Learning rates: Muon {_g(lrs['muon_lr'])} (its AdamW part {_g(lrs['muon_adamw_lr'])}), AdamW "
             f"{_g(lrs['adamw_lr'])}" + (" — chosen by the sweep below." if r["lr_sweep"] else " (configured; no sweep)."),
             f"- Probes: validation every {c['eval_every']} steps on {c['val_batches']} fixed batches; at the first "
             f"checkpoint reaching each matched-loss level (multiples of {c['ladder_step']:g} nats) and every "
             f"{c['probe_every']} steps, the update Δ the optimizer applies next is probed on a fixed batch of "
             f"{c['probe_batch_size']} sequences from the training distribution with exact second derivatives "
             f"({_listing(r['provenance']['probe_methods'])}): g·Δ, ΔᵀHΔ, ‖Δ‖², NDS, predicted and actual loss change, the within/cross split by "
             f"transformer block and by parameter kind.",
             "- Statistics: 95% Student-t intervals over independent replicates (seeds; or (alpha, seed) units, pooled "
             f"over alphas, for F1–F3 and F5); 'comparable' = geometric-mean ratio within ×{COMPARABLE}. With one "
             "replicate no interval exists and the point estimate decides. Paper figures quoted below are "
             "second-hand and are for comparison only.", ""]
    if r["lr_sweep"]:
        lines += ["Learning-rate sweep (final validation loss after "
                  f"{c['sweep_steps'] or c['steps']} steps, alpha = {c['val_alpha']:g}, seed {c['sweep_seed']}):", "",
                  "| optimizer | lr | AdamW-part lr | final val loss | chosen |", "|---|---:|---:|---:|---|"]
        for s in r["lr_sweep"]:
            lr = s.get("muon_lr", s.get("adamw_lr"))
            lines.append(f"| {NAMES[s['optimizer']]} | {_g(lr)} | {_g(s.get('muon_adamw_lr'))} | "
                         f"{_g(s['final_val_loss'])} | {'yes' if s['chosen'] else ''} |")
        lines.append("")
        for o, key in (("adamw", "adamw_lr"), ("muon", "muon_lr")):
            grid = sorted({s[key] for s in r["lr_sweep"] if s["optimizer"] == o})
            if len(grid) > 1 and lrs[key] in (grid[0], grid[-1]):
                lines += [f"Note: {NAMES[o]}'s chosen lr {_g(lrs[key])} is at the edge of its sweep grid; a wider "
                          "grid might find a better one.", ""]
    return lines


def findings_table(r: dict) -> list[str]:
    lines = ["| finding | measured | reproduced |", "|---|---|---|"]
    for f in r["findings"]:
        lines.append(f"| {f['id']} {f['claim']} | {f['summary']} | {'yes' if f['reproduced'] else '**no**'} |")
    return lines


def _unit_table(r: dict, metrics: list[tuple[str, str]]) -> list[str]:
    units = r["experiments"]["units"]
    head = "| alpha | optimizer | " + " | ".join(label for _, label in metrics) + " |"
    lines = [head, "|---:|---|" + "---:|" * len(metrics)]
    for alpha in sorted({u["alpha"] for u in units}):
        for o in OPTIMIZERS:
            us = [u for u in units if u["alpha"] == alpha and u["optimizer"] == o]
            cells = [fmt(interval(u[m] for u in us)) for m, _ in metrics]
            lines.append(f"| {alpha:g} | {NAMES[o]} | " + " | ".join(cells) + " |")
    return lines


def _e4_table(e4: dict) -> list[str]:
    lines = ["| phase | layers | Muon within | Muon cross | AdamW within | AdamW cross | gap within (A−M) "
             "| gap cross (A−M) | n |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for ph, row in e4.items():
        for part, label in (("", "blocks"), ("_kind", "kinds")):
            if not row["n"]:
                continue
            lines.append(f"| {ph} | {label} | {fmt(row['muon'][f'within{part}_nds'])} | "
                         f"{fmt(row['muon'][f'cross{part}_nds'])} | "
                         f"{fmt(row['adamw'][f'within{part}_nds'])} | {fmt(row['adamw'][f'cross{part}_nds'])} | "
                         f"{fmt(row[f'gap_within{part}'])} | {fmt(row[f'gap_cross{part}'])} | {row['n']} |")
    return lines


def _e5_table(e5: list[dict], rule: str) -> list[str]:
    """One row per (alpha_sigma, alpha_w): means over instances; closed forms in parentheses."""
    by = {(r["alpha_sigma"], r["alpha_w"], r["method"]): r for r in e5 if r["rule"] == rule}

    def cell(r, key, digits):
        value = _g(r[key]["mean"], digits)
        closed = r[f"closed_{key}"]
        return value if closed is None else f"{value} ({_g(closed, digits)})"
    lines = ["| alpha_sigma | alpha_w | " + " | ".join(f"avg NDS {m}" for m in METHODS) + " | "
             + " | ".join(f"loss_T/L_0 {m}" for m in METHODS) + " |",
             "|---:|---:|" + "---:|" * (2 * len(METHODS))]
    for s, w in sorted({(k[0], k[1]) for k in by}):
        rs = [by[(s, w, m)] for m in METHODS]
        lines.append(f"| {s:g} | {w:g} | " + " | ".join(cell(r, "nds_avg", 3) for r in rs) + " | "
                     + " | ".join(cell(r, "loss_T", 2) for r in rs) + " |")
    return lines


def _e6_table(e6: dict) -> list[str]:
    if not e6:
        return ["(no matched ladder)"]
    lines = ["| partition | group | Muon M_aa/‖Δ‖² | AdamW M_aa/‖Δ‖² |", "|---|---|---:|---:|"]
    for part in ("block", "kind"):
        for i, g in enumerate(e6[part]["groups"]):
            lines.append(f"| {part} | {g} | {_g(e6[part]['muon'][i][i], 3)} | {_g(e6[part]['adamw'][i][i], 3)} |")
        for o in OPTIMIZERS:
            M = e6[part][o]
            within = sum(M[i][i] for i in range(len(M)))
            total = sum(map(sum, M))
            lines.append(f"| {part} | {NAMES[o]}: within / cross (sum) | {_g(within, 3)} / {_g(total - within, 3)} | |")
    return lines


def write_report(results: dict, out: Path, figures: list[Path]) -> Path:
    r = results
    fig = {p.stem: f"![{p.stem}](figures/{p.name})" for p in figures}
    c = r["config"]
    e3 = r["experiments"]["e3"]
    lines = ["# Muon vs AdamW: curvature along the updates", "",
             "Tests the findings of Wang, Zhang, Li, Bergemann, Yang (2026), *Why Muon Outperforms Adam: A Curvature "
             "Perspective*, with the protocol below. Every number behind this report is in `results.json` (schema in "
             "`muonkern/study/SCHEMA.md`) and the CSV files beside it.", ""]
    lines += _setup(r)
    lines += ["## Findings", ""] + findings_table(r) + [""]
    lines += [f"Learning curves (validation loss, {validation_label(r['config'])}; grey lines: the matched-loss "
              "ladder):", "",
              fig.get("curves", ""), ""]
    lines += ["## E1: one-step decrease and its Taylor terms at matched validation loss", "",
              "Per (alpha, seed), each quantity is averaged over the matched-loss ladder (levels both optimizers reach "
              "in every seed); the table gives the mean over seeds and its 95% interval. Decrease = L(θ) − L(θ+Δ), "
              "predicted decrease = −(g·Δ + ½ΔᵀHΔ), first-order gain = −g·Δ, penalty = ½ΔᵀHΔ.", ""]
    lines += _unit_table(r, [("decrease", "decrease"), ("predicted_decrease", "predicted"),
                             ("first_order", "first-order gain"), ("penalty", "penalty ½ΔᵀHΔ")])
    tay = r["experiments"]["taylor"]
    lines += ["", "Taylor check over every probe, median |predicted − actual| / |actual|: " +
              ", ".join(f"{NAMES[o]} {_g(tay[o]['median_relative_error'], 3)} (n={tay[o]['n']})" for o in OPTIMIZERS),
              "", fig.get("e1_taylor", "(no matched ladder: the optimizers share no validation-loss level)"), ""]
    lines += ["## E2: NDS and update norm at matched validation loss", ""]
    lines += _unit_table(r, [("nds", "NDS"), ("norm_sq", "‖Δ‖²")])
    lines += ["", f"The paper reports Adam's NDS ≈ {PAPER_NDS_RATIO}× Muon's on average.", "", fig.get("e2_nds_norm", ""), ""]
    lines += ["## E3: imbalance sweep", "",
              "| alpha | NDS Muon | NDS AdamW | NDS ratio AdamW/Muon | per seed |", "|---:|---:|---:|---:|---|"]
    for row in e3["rows"]:
        lines.append(f"| {row['alpha']:g} | {fmt(row['nds_muon'])} | {fmt(row['nds_adamw'])} | {fmt(row['nds_ratio'])} | "
                     + ", ".join(f"{s}: {_g(v, 3)}" for s, v in row["per_seed"].items()) + " |")
    if e3["no_ladder"]:
        lines += ["", "No matched ladder (the optimizers share no validation-loss level) at alpha = "
                  + ", ".join(f"{a:g}" for a in e3["no_ladder"]) + "."]
    lines += ["", f"Slope of log(NDS ratio) over alpha, over seeds: {fmt(e3['slope'])}; widening first → last alpha: "
              f"×{fmt(e3['widening'])}; alpha 0 → 1: ×{fmt(e3['widening_0_to_1'])} (paper ≈ {PAPER_IMBALANCE_WIDENING}).",
              "", fig.get("e3_imbalance", ""), ""]
    lines += ["## E4: within- and cross-layer curvature over training", "",
              f"Periodic probes (every {c['probe_every']} steps) grouped into thirds of training; within and cross "
              "are divided by ‖Δ‖², so they add up to the NDS. Intervals over (alpha, seed) units.", ""]
    lines += _e4_table(r["experiments"]["e4"]) + ["", fig.get("e4_within_cross", "(no periodic probes)"), ""]
    q = r["quadratic"]["settings"]
    lines += ["## E5: stylized quadratic problems", "",
              f"W is {q['m']}×{q['n']}; {q['groups']} groups of {q['group_size']} rank-one modes a_i b_iᵀ, curvature "
              f"g^(−alpha_w) on group g, initial residual σ_i = w_i^alpha_sigma; {q['steps']} steps; {q['instances']} "
              "random bases per setting. Step sizes: `line_search` = exact line search at every step (primary: no "
              "free parameter); `grid` = the best constant step of a log grid "
              f"({_g(q['lr_grid'][0], 2)} … {_g(q['lr_grid'][-1], 2)}, {len(q['lr_grid'])} points) for each optimizer "
              "(sensitivity check: GD's average NDS swings with its constant step near 2/w_max). Closed forms "
              "(muonkern/study/quadratic.py): the polar step's NDS is the mean curvature "
              "(1/r)Σw_i at every step; GD's is Σw_i³x_i²/Σw_i²x_i² with x_i(t) = (1 − ηw_i)^t σ_i. "
              "sign descent and ns5 are simulated only.", ""]
    f6 = next(f for f in r["findings"] if f["id"] == "F6")["evidence"]
    lines += [f"Means over instances, closed forms in parentheses (largest relative gap between simulation and "
              f"closed form: {_g(f6['closed_form_max_relative_gap'], 2)}); intervals in `e5_quadratic.csv`.", "",
              "Exact line search:", ""] + _e5_table(r["experiments"]["e5"], "line_search")
    lines += ["", fig.get("e5_quadratic", ""), "", "Best constant step of the grid:", ""]
    lines += _e5_table(r["experiments"]["e5"], "grid") + ["", fig.get("e5_quadratic_grid", ""), ""]
    e6 = r["experiments"]["e6"]
    lines += ["## E6: layer-pair curvature", "",
              (f"The block matrix M_ab = Δ_aᵀH_abΔ_b / ‖Δ‖², averaged over the ladder probes at alpha = {e6['alpha']:g} "
               "and the seeds; the diagonal is the within-layer part." if e6 else ""), ""]
    lines += _e6_table(e6) + ["", fig.get("e6_heatmap", ""), ""]
    path = Path(out) / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
