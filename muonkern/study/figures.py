"""The study's figures (matplotlib, Agg backend), drawn from results.json's content. Error bars are
95% t-intervals over seeds (or over (alpha, seed) units); none with one. In the E5 figures they
are the range over problem instances."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
import numpy as np  # noqa: E402

from .analysis import OPTIMIZERS, PHASES, validation_label  # noqa: E402
from .quadratic import METHODS  # noqa: E402

COLORS = {"muon": "tab:blue", "adamw": "tab:orange", "gd": "tab:orange", "muon_polar": "tab:blue",
          "muon_ns5": "tab:cyan", "sign": "tab:red"}
LABELS = {"muon": "Muon", "adamw": "AdamW", "gd": "GD", "muon_polar": "Muon (exact polar)",
          "muon_ns5": "Muon (ns5)", "sign": "sign descent (Adam proxy)"}


def _err(ivs):
    """(means, yerr) for errorbar from intervals; NaN error where there is no interval."""
    mean = np.array([np.nan if iv["mean"] is None else iv["mean"] for iv in ivs], dtype=float)
    lo = np.array([np.nan if iv["lo"] is None else iv["lo"] for iv in ivs], dtype=float)
    hi = np.array([np.nan if iv["hi"] is None else iv["hi"] for iv in ivs], dtype=float)
    return mean, np.nan_to_num(np.vstack([mean - lo, hi - mean]), nan=0.0)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _alphas(results) -> list[float]:
    return sorted({r["alpha"] for r in results["matched"]}) or sorted({c["alpha"] for c in results["curves"]})


def curves(results: dict, path: Path) -> Path:
    alphas = sorted({c["alpha"] for c in results["curves"]})
    seeds = sorted({c["seed"] for c in results["curves"]})
    fig, axes = plt.subplots(1, len(alphas), figsize=(4.6 * len(alphas), 3.6), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, alpha in zip(axes[0], alphas):
        for c in results["curves"]:
            if c["alpha"] == alpha:
                steps, vals = zip(*c["evals"])
                ax.plot(steps, vals, styles[seeds.index(c["seed"]) % 4], color=COLORS[c["optimizer"]],
                        label=f"{LABELS[c['optimizer']]} seed {c['seed']}")
        for level in sorted({r["level"] for r in results["matched"] if r["alpha"] == alpha}):
            ax.axhline(level, color="0.85", lw=0.6, zorder=0)
        ax.set(title=f"training alpha = {alpha:g} (grey: matched-loss ladder)", xlabel="step",
               ylabel=f"validation loss ({validation_label(results['config'])})")
        ax.legend(fontsize=7)
    return _save(fig, path)


def _matched_panel(ax, results, alpha, metric, label, log=False, dashed=None):
    dodge = 0.08 * results["config"]["ladder_step"]  # keeps the two optimizers' error bars apart
    for i, o in enumerate(OPTIMIZERS):
        rows = sorted((r for r in results["matched"] if r["alpha"] == alpha and r["optimizer"] == o),
                      key=lambda r: -r["level"])
        if not rows:
            continue
        x = [r["level"] + (i - 0.5) * dodge for r in rows]
        m, e = _err([r[metric] for r in rows])
        ax.errorbar(x, m, yerr=e, marker="o", ms=3, capsize=2, color=COLORS[o], label=LABELS[o])
        if dashed:
            m2, _ = _err([r[dashed] for r in rows])
            ax.plot(x, m2, "--", color=COLORS[o], alpha=0.7, label=f"{LABELS[o]} (Taylor prediction)")
    ax.set(xlabel="validation loss level (training runs left to right)", ylabel=label)
    if not ax.xaxis_inverted():
        ax.invert_xaxis()
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def e1_taylor(results: dict, path: Path) -> Path:
    alphas = _alphas(results)
    fig, axes = plt.subplots(len(alphas), 4, figsize=(18, 3.6 * len(alphas)), squeeze=False)
    for row, alpha in zip(axes, alphas):
        _matched_panel(row[0], results, alpha, "decrease", "one-step decrease −ΔL", dashed="predicted_decrease")
        _matched_panel(row[1], results, alpha, "first_order", "first-order gain −g·Δ")
        _matched_panel(row[2], results, alpha, "penalty", "curvature penalty ½ΔᵀHΔ")
        row[0].set_title(f"alpha = {alpha:g}: actual (solid) and predicted (dashed)")
        row[1].set_title(f"alpha = {alpha:g}")
        row[2].set_title(f"alpha = {alpha:g}")
        ax = row[3]
        for o in OPTIMIZERS:
            ps = [p for p in results["probes"] if p["optimizer"] == o and p["alpha"] == alpha]
            ax.scatter([p["actual_delta"] for p in ps], [p["predicted_delta"] for p in ps], s=10,
                       color=COLORS[o], label=LABELS[o], alpha=0.7)
        lim = [v for p in results["probes"] if p["alpha"] == alpha for v in (p["actual_delta"], p["predicted_delta"])]
        if lim:
            ax.plot([min(lim), max(lim)], [min(lim), max(lim)], color="0.5", lw=0.8, label="predicted = actual")
        ax.set(title=f"alpha = {alpha:g}: every probe", xlabel="actual L(θ+Δ) − L(θ)",
               ylabel="predicted g·Δ + ½ΔᵀHΔ")
        ax.legend(fontsize=7)
    return _save(fig, path)


def e2_nds_norm(results: dict, path: Path) -> Path:
    alphas = _alphas(results)
    fig, axes = plt.subplots(len(alphas), 2, figsize=(10, 3.6 * len(alphas)), squeeze=False)
    for row, alpha in zip(axes, alphas):
        _matched_panel(row[0], results, alpha, "nds", "NDS = ΔᵀHΔ / ‖Δ‖²", log=True)
        _matched_panel(row[1], results, alpha, "norm_sq", "update norm ‖Δ‖²", log=True)
        row[0].set_title(f"alpha = {alpha:g}")
        row[1].set_title(f"alpha = {alpha:g}")
    return _save(fig, path)


def e3_imbalance(results: dict, path: Path) -> Path:
    e3 = results["experiments"]["e3"]
    rows = e3["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [r["alpha"] for r in rows]
    for o in OPTIMIZERS:
        m, e = _err([r[f"nds_{o}"] for r in rows])
        axes[0].errorbar(x, m, yerr=e, marker="o", capsize=3, color=COLORS[o], label=LABELS[o])
    axes[0].set(xlabel="training imbalance alpha (Zipf exponent)", ylabel="NDS, mean over the matched ladder",
                yscale="log", title="NDS at matched validation loss")
    axes[0].legend(fontsize=8)
    m, e = _err([r["nds_ratio"] for r in rows])
    axes[1].errorbar(x, m, yerr=e, marker="o", capsize=3, color="k", label="mean over seeds (95% CI)")
    for r in rows:
        axes[1].scatter([r["alpha"]] * len(r["per_seed"]), list(r["per_seed"].values()), s=12, color="0.55",
                        label="one seed" if r is rows[0] else None)
    axes[1].axhline(1.0, color="0.6", lw=0.8)
    axes[1].set(xlabel="training imbalance alpha (Zipf exponent)", ylabel="NDS ratio AdamW / Muon", yscale="log",
                title="Muon's NDS advantage vs imbalance")
    axes[1].legend(fontsize=8)
    return _save(fig, path)


def e4_within_cross(results: dict, path: Path) -> Path:
    """One panel per (grouping, optimizer), each on its own scale: Muon's NDS is often orders of
    magnitude below AdamW's, and its split would vanish on a shared axis."""
    e4 = results["experiments"]["e4"]
    phases = [p for p in PHASES if e4[p]["n"]]
    groupings = (("", "transformer blocks"), ("_kind", "parameter kinds"))
    fig, axes = plt.subplots(len(groupings), len(OPTIMIZERS), figsize=(5.5 * len(OPTIMIZERS), 7),
                             squeeze=False)
    width, xs = 0.38, np.arange(len(phases))
    for row, (part, grouping) in enumerate(groupings):
        for ax, o in zip(axes[row], OPTIMIZERS):
            for i, comp in enumerate(("within", "cross")):
                m, e = _err([e4[p][o][f"{comp}{part}_nds"] for p in phases])
                ax.bar(xs + (i - 0.5) * width, m, width, yerr=e, capsize=3, color=COLORS[o],
                       alpha=1.0 if comp == "within" else 0.45, hatch="" if comp == "within" else "//",
                       label=f"{comp}-layer")
            ax.set_xticks(xs, phases)
            ax.axhline(0, color="0.4", lw=0.6)
            ax.set(xlabel="training phase (periodic probes)", ylabel="part of NDS (÷ ‖Δ‖²)",
                   title=f"{LABELS[o]}: layers = {grouping}")
            ax.legend(fontsize=8)
    return _save(fig, path)


LOSS_FLOOR = 1e-20  # relative losses below this are solved to rounding; drawn at the floor


def e5_quadratic(results: dict, path: Path, rule: str) -> Path:
    """Markers: the mean over problem instances, bars: their range; lines: the closed forms."""
    rows = [r for r in results["quadratic"]["rows"] if r["rule"] == rule]
    e5 = {(r["alpha_sigma"], r["alpha_w"], r["method"]): r for r in results["experiments"]["e5"] if r["rule"] == rule}
    sigmas = sorted({r["alpha_sigma"] for r in rows})
    fig, axes = plt.subplots(len(sigmas), 2, figsize=(11, 3.6 * len(sigmas)), squeeze=False)
    for row, s in zip(axes, sigmas):
        for method in METHODS:
            ws = sorted({r["alpha_w"] for r in rows if r["alpha_sigma"] == s and r["method"] == method})
            for ax, key in ((row[0], "nds_avg"), (row[1], "loss_T")):
                floor = LOSS_FLOOR if key == "loss_T" else -np.inf
                vals = [np.maximum([r[key] for r in rows if (r["alpha_sigma"], r["alpha_w"], r["method"]) == (s, w, method)],
                                   floor) for w in ws]
                mean = np.array([v.mean() for v in vals])
                err = np.vstack([mean - [v.min() for v in vals], [v.max() for v in vals] - mean])
                ax.errorbar(ws, mean, yerr=err, marker="o", ls="none", ms=4, capsize=2, color=COLORS[method],
                            label=f"{LABELS[method]} (simulated)")
                closed = [e5[(s, w, method)][f"closed_{key}"] for w in ws]
                if all(c is not None for c in closed):
                    ax.plot(ws, np.maximum(closed, floor), "-", color=COLORS[method], alpha=0.7,
                            label=f"{LABELS[method]} (closed form)")
        row[0].set(xlabel="curvature heterogeneity alpha_w", ylabel="NDS averaged over the trajectory",
                   title=f"alpha_sigma = {s:g}, step size: {rule}")
        row[1].set(xlabel="curvature heterogeneity alpha_w", ylabel="loss after T steps / initial loss",
                   yscale="log", ylim=(LOSS_FLOOR / 3, None),
                   title=f"alpha_sigma = {s:g}, step size: {rule} (floor {LOSS_FLOOR:g})")
        for ax in row:
            ax.legend(fontsize=6)
    return _save(fig, path)


def e6_heatmap(results: dict, path: Path) -> Path:
    e6 = results["experiments"]["e6"]
    parts = [p for p in ("block", "kind") if p in e6]
    fig, axes = plt.subplots(len(parts), 2, figsize=(11, 4.6 * len(parts)), squeeze=False)
    for row, part in zip(axes, parts):
        groups = e6[part]["groups"]
        for ax, o in zip(row, OPTIMIZERS):
            M = np.array([[np.nan if v is None else v for v in r] for r in e6[part][o]])
            # a colour scale per optimizer: their NDS differ by orders of magnitude, and one shared
            # scale left the smaller one white (the cell labels carry the values)
            scale = float(np.nanmax(np.abs(M))) if np.isfinite(M).any() else 1.0
            scale = scale or 1.0
            im = ax.imshow(M, cmap="RdBu_r", vmin=-scale, vmax=scale)
            ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(groups)), groups, fontsize=7)
            ax.set(title=f"{LABELS[o]}: Δ_aᵀH_abΔ_b / ‖Δ‖² (alpha = {e6['alpha']:g}; colours ±{scale:.2g})",
                   xlabel="group b", ylabel="group a")
            for i in range(len(groups)):
                for j in range(len(groups)):
                    if np.isfinite(M[i, j]):
                        ax.text(j, i, f"{M[i, j]:.2g}", ha="center", va="center", fontsize=6,
                                color="white" if abs(M[i, j]) > 0.6 * scale else "black")
            fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def draw_all(results: dict, fig_dir: Path) -> list[Path]:
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = [curves(results, fig_dir / "curves.png")]
    if results["matched"]:
        paths += [e1_taylor(results, fig_dir / "e1_taylor.png"), e2_nds_norm(results, fig_dir / "e2_nds_norm.png"),
                  e3_imbalance(results, fig_dir / "e3_imbalance.png")]
    if any(results["experiments"]["e4"][p]["n"] for p in PHASES):
        paths.append(e4_within_cross(results, fig_dir / "e4_within_cross.png"))
    paths += [e5_quadratic(results, fig_dir / "e5_quadratic.png", "line_search"),
              e5_quadratic(results, fig_dir / "e5_quadratic_grid.png", "grid")]
    if results["experiments"]["e6"]:
        paths.append(e6_heatmap(results, fig_dir / "e6_heatmap.png"))
    return paths
