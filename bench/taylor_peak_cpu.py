"""Peak memory torch allocates on the CPU during one Taylor probe of the 11M GPT, beside a
training gradient's (torch.profiler memory events; parameters and directions exist before the
call and are not counted). No GPU needed:

    python bench/taylor_peak_cpu.py --batch 8 --context 256 --directions 4
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from muonkern.models import GPT, GPTConfig
from muonkern.taylor import taylor_directional


def peak_mb(fn) -> float:
    """Largest running sum of the allocations and frees recorded while fn runs, in MB."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--directions", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small", context=args.context))
    params = {k: p.detach() for k, p in model.named_parameters()}
    x, y = (torch.randint(0, model.config.vocab_size, (args.batch, args.context)) for _ in range(2))
    dirs = [{k: 1e-3 * torch.randn_like(p) for k, p in params.items()} for _ in range(args.directions)]

    def gradient():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    taylor = peak_mb(lambda: taylor_directional(model, params, x, y, dirs))
    print(f"{args.batch}x{args.context}, K={args.directions}: Taylor probe peak {taylor:.0f} MB, "
          f"training gradient peak {peak_mb(gradient):.0f} MB")


if __name__ == "__main__":
    main()
