"""CPU measurements behind numbers that tests and README.md cite (no GPU needed).

    python bench/cpu_measurements.py muon-vs-torch   # muonkern.optim.Muon against torch.optim.Muon
    python bench/cpu_measurements.py partitions      # study probe: two partitions shared or apart
    python bench/cpu_measurements.py grouped-tall    # ns5_grouped vs ns5 on tall CPU matrices

Each prints what it measured; one thread, as the tests run.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import muonkern

# the configuration of tests/test_optim.py::test_matches_torch_optim_muon
MUON_SHAPES = [(32, 64), (64, 32), (17, 40)]
MUON_OPTIONS = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
MUON_STEPS = 10


def _muon_scale(rows: int, cols: int, adjust_lr: str) -> float:
    return max(1.0, rows / cols) ** 0.5 if adjust_lr == "original" else 0.2 * max(rows, cols) ** 0.5


def _final_distance(shape, adjust_lr: str, seed: int, momentum: float) -> float:
    """max |ours - torch's| after MUON_STEPS steps, in units of lr * scale (ours at `momentum`)."""
    from muonkern.optim import Muon
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(MUON_STEPS)]
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    opt_ours = Muon([ours], adjust_lr=adjust_lr, **{**MUON_OPTIONS, "momentum": momentum})
    opt_theirs = torch.optim.Muon([theirs], adjust_lr_fn=adjust_lr, **MUON_OPTIONS)
    for g in grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    return float((ours - theirs).detach().abs().max()) / (MUON_OPTIONS["lr"] * _muon_scale(*shape, adjust_lr))


def muon_vs_torch() -> None:
    same, wrong = [], []
    for shape in MUON_SHAPES:
        for adjust_lr in ("original", "match_rms_adamw"):
            for seed in range(5):
                same.append(_final_distance(shape, adjust_lr, seed, MUON_OPTIONS["momentum"]))
                wrong.append(_final_distance(shape, adjust_lr, seed, 0.9))
    print(f"{len(same)} runs of {MUON_STEPS} steps ({len(MUON_SHAPES)} shapes x 2 scale rules x 5 seeds), "
          f"max |ours - torch.optim.Muon| / (lr * scale): worst {max(same):.4f}; with momentum 0.9 "
          f"instead of 0.95 the least {min(wrong):.4f}")


def partitions() -> None:
    from muonkern.models import GPT, GPTConfig, exact_attention, gpt_loss_fn
    from muonkern.study.probe import partitions as study_partitions

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, context=64, n_layer=2, n_head=4, d_model=64))
    x, y = torch.randint(0, 65, (8, 64)), torch.randint(0, 65, (8, 64))
    loss_fn = gpt_loss_fn(model, x, y)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    delta = {k: 1e-3 * torch.randn_like(v) for k, v in theta.items()}
    groups = study_partitions(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exact_attention's notice
        with exact_attention():
            ratios = [_shared_over_apart(loss_fn, theta, delta, groups) for _ in range(5)]
    print(f"2-layer GPT probe, two partitions, shared / apart time over {len(ratios)} pairs: "
          f"{min(ratios):.2f} to {max(ratios):.2f}, mean {sum(ratios) / len(ratios):.2f}")


def _shared_over_apart(loss_fn, theta, delta, groups) -> float:
    """Time of one directional_quadratics_for_partitions call over that of one call per partition."""
    from muonkern.curvature import directional_quadratics, directional_quadratics_for_partitions
    start = time.perf_counter()
    for g in groups.values():
        directional_quadratics(loss_fn, theta, delta, groups=g, method="rev_rev")
    apart = time.perf_counter() - start
    start = time.perf_counter()
    directional_quadratics_for_partitions(loss_fn, theta, delta, groups, method="rev_rev")
    return (time.perf_counter() - start) / apart


def grouped_tall() -> None:
    torch.manual_seed(0)
    for shape in [(1024, 512), (512, 1024), (1536, 512), (640, 512), (300, 200)]:
        G = torch.randn(shape)
        diff = (muonkern.ns5(G) - muonkern.ns5_grouped([G, torch.randn(shape)])[0]).abs().max().item()
        print(f"{shape[0]}x{shape[1]}: max |ns5 - ns5_grouped| = {diff:.4g}")


def main() -> None:
    jobs = {"muon-vs-torch": muon_vs_torch, "partitions": partitions, "grouped-tall": grouped_tall}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=list(jobs))
    torch.set_num_threads(1)
    jobs[parser.parse_args().job]()


if __name__ == "__main__":
    main()
