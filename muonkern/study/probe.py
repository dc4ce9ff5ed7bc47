"""One curvature probe: the second-order Taylor terms of the update Δ an optimizer applies at a
checkpoint θ, on a fixed probe batch, with exact second derivatives (Hessian-vector products on
math attention, or Taylor mode).

Measured: gain g·Δ, curvature ΔᵀHΔ, ‖Δ‖², NDS = ΔᵀHΔ/‖Δ‖², predicted change g·Δ + ½ΔᵀHΔ, actual
change L(θ+Δ) − L(θ) (two float64 forward passes), and the block matrix M_ab = Δ_aᵀ H_ab Δ_b over
two partitions of the parameters: by transformer block (`embed`, `blocks.i`, `norm`, `lm_head`) and
by parameter kind (`attn_qk`: query and key matrices, `attn_vo`: value and output matrices, `mlp`,
`embed_head`: embedding and output head, `norms`). within = Σ_a M_aa, cross = Σ_{a≠b} M_ab.
"""
from __future__ import annotations

import warnings

import torch

from ..curvature import directional_quadratics_for_partitions
from ..models import exact_attention, gpt_loss_fn
from .distributed import Context

KINDS = ("attn_qk", "attn_vo", "mlp", "embed_head", "norms")


def kind_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("embed", "lm_head"):
        return "embed_head"
    if "attn" in parts and parts[-2] in ("q", "k"):
        return "attn_qk"
    if "attn" in parts and parts[-2] in ("v", "o"):
        return "attn_vo"
    if "mlp" in parts:
        return "mlp"
    if "norm" in parts[-2]:
        return "norms"
    raise ValueError(f"parameter {name!r} fits no parameter kind of the study's GPT")


def block_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]


def partitions(model: torch.nn.Module) -> dict[str, dict[str, list[str]]]:
    """{"block": groups by transformer block, "kind": groups by parameter kind}, in parameter order."""
    by_block: dict[str, list[str]] = {}
    by_kind: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        by_block.setdefault(block_of(name), []).append(name)
        by_kind.setdefault(kind_of(name), []).append(name)
    return {"block": by_block, "kind": {k: by_kind[k] for k in KINDS if k in by_kind}}


def measure(model: torch.nn.Module, theta: dict, delta: dict, batch, groups: dict, ctx: Context,
            hvp_batch: int = 1, method: str = "rev_rev") -> dict:
    """Probe record (floats and lists) for the update `delta` at parameters `theta` (dicts name ->
    tensor), with `hvp_batch` exact HVPs (`method`; or Taylor-mode vectors for "taylor") per pass. Under data parallelism each rank probes its slice of the
    batch and the batch means are averaged over the ranks."""
    x, y = batch
    loss_fn = gpt_loss_fn(model, x, y)
    with warnings.catch_warnings():
        # exact_attention's once-per-process notice: the study always probes on the math backend
        warnings.filterwarnings("ignore", message=r"(?i).*(exact_attention|math sdpa)", category=UserWarning)
        with exact_attention():
            # both partitions from one primal pass and one gradient
            quads = directional_quadratics_for_partitions(loss_fn, theta, delta, groups, method=method,
                                                          batch_size=hvp_batch)
            with torch.no_grad():
                # The actual change in float64: late in training a step moves the loss by ~1e-6, while
                # a float32 loss near 5.6 has an ulp of 4.8e-7 (np.spacing(np.float32(5.6))) and each
                # forward pass rounds by several of them.
                theta64 = {k: v.double() for k, v in theta.items()}
                before = loss_fn(theta64)
                after = loss_fn({k: theta64[k] + delta[k].double() for k in theta})
    # Batch means: average the per-rank means (equal slices) in one all-reduce.
    parts = list(quads)
    flat = torch.cat([quads[parts[0]].gain.reshape(1), before.reshape(1), after.reshape(1)]
                     + [quads[p].blocks.reshape(-1) for p in parts])
    ctx.mean_(flat)
    gain, before, after = (float(v) for v in flat[:3])
    offset, blocks = 3, {}
    for p in parts:
        n = len(quads[p].group_names)
        blocks[p] = flat[offset:offset + n * n].view(n, n)
        offset += n * n
    norm_sq = float(quads[parts[0]].norm_sq)
    record = dict(gain=gain, norm_sq=norm_sq, probe_loss=before, actual_delta=after - before)
    for p in parts:
        M = blocks[p]
        names = quads[p].group_names
        curvature, within = float(M.sum()), float(M.diagonal().sum())
        suffix = "" if p == "block" else f"_{p}"
        record.update({f"curvature{suffix}": curvature, f"within{suffix}": within,
                       f"cross{suffix}": curvature - within, f"groups_{p}": names,
                       f"blocks_{p}": M.tolist(),
                       f"group_norm_sq_{p}": [float(sum(delta[k].double().pow(2).sum() for k in groups[p][g]))
                                              for g in names]})
    record["nds"] = record["curvature"] / norm_sq if norm_sq > 0 else float("nan")
    record["predicted_delta"] = gain + 0.5 * record["curvature"]
    return record
