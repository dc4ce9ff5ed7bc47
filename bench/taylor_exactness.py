"""Exactness of Taylor-mode curvature against the HVP path, on fresh random GPTs and directions:
the largest relative error of g·u and uᵀHu (and of the within/cross split) from
``directional_quadratics(method="taylor")`` against ``method="fwd_rev"`` (forward-over-reverse
HVPs through the model, math attention, causal mask):

* float64 on the CPU (target 1e-8);
* float32 on the GPU, with the Triton kernels, against the float64 HVP on the CPU (target 1e-4),
  where a GPU is present.

    python bench/taylor_exactness.py [--seeds 3]
"""
from __future__ import annotations

import argparse
import warnings

import torch

from muonkern import curvature
from muonkern.models import GPT, GPTConfig, exact_attention, gpt_loss_fn


def case(seed: int):
    """A random GPT (head dim 64, untied head on odd seeds), its float64 params, K = 3
    directions scaled like updates, a batch and 2 groups."""
    gen = torch.Generator().manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, context=80, n_layer=2, n_head=2, d_model=128,
                    tie_embeddings=seed % 2 == 0)
    model = GPT(cfg).double()
    params = {k: p.detach() + 0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
              for k, p in model.named_parameters()}
    dirs = [{k: 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
             for k, p in params.items()} for _ in range(3)]
    x, y = (torch.randint(0, cfg.vocab_size, (2, 80), generator=gen) for _ in range(2))
    names = list(params)
    groups = {"blocks.0": [n for n in names if n.startswith("blocks.0.")]}
    groups["rest"] = [n for n in names if n not in groups["blocks.0"]]
    return cfg, model, params, dirs, x, y, groups


def max_rel(got, want) -> float:
    return max(float(((g.double().cpu() - w) / w).abs().max())
               for g, w in zip(got, want))


def fields(q):
    return q.gain, q.curvature, q.within, q.cross


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    worst = {"float64 CPU": 0.0, "float32 GPU": None}
    for seed in range(args.seeds):
        cfg, model, params, dirs, x, y, groups = case(seed)
        with exact_attention():
            ref = curvature.directional_quadratics(gpt_loss_fn(model, x, y), params, dirs,
                                                   groups=groups, method="fwd_rev")
        got = curvature.directional_quadratics(gpt_loss_fn(model, x, y), params, dirs,
                                               groups=groups, method="taylor", batch_size=3)
        err64 = max_rel(fields(got), fields(ref))
        worst["float64 CPU"] = max(worst["float64 CPU"], err64)
        line = f"seed {seed}: float64 CPU {err64:.2e}"
        if torch.cuda.is_available():
            model32 = GPT(cfg).cuda()
            p32 = {k: v.float().cuda() for k, v in params.items()}
            d32 = [{k: v.float().cuda() for k, v in u.items()} for u in dirs]
            got32 = curvature.directional_quadratics(
                gpt_loss_fn(model32, x.cuda(), y.cuda()), p32, d32, groups=groups,
                method="taylor", batch_size=3)
            err32 = max_rel(fields(got32), fields(ref))
            worst["float32 GPU"] = max(worst["float32 GPU"] or 0.0, err32)
            line += f", float32 GPU {err32:.2e}"
        print(line, flush=True)
    print("largest relative error of g·u, uᵀHu, within, cross against the float64 HVP path: " +
          ", ".join(f"{k} {v:.2e}" if v is not None else f"{k} not run (no GPU)"
                    for k, v in worst.items()))


if __name__ == "__main__":
    main()
