"""Taylor-mode curvature (muonkern.taylor) against a training step and exact HVPs, on the GPU.

Model: the study's ``small`` GPT (6 layers, d_model 384, 6 heads of dim 64, byte vocabulary;
10.8M parameters), float32. Configurations (B × T): 32 × 256 (the study's probe batch), and the
same model with a longer context at 8 × 2048 and 2 × 8192. For each:

  grad          one training gradient, forward + backward, fused SDPA (flash/efficient/cuDNN)
  taylor K      muonkern.taylor.taylor_directional: g·u and uᵀHu for K = 1, 4, 8 directions
                (Triton Taylor-attention kernel), one forward pass, no backward
  hvp           muonkern.curvature.hvp, fwd_rev (torch.func.jvp of grad) under exact_attention()
                (math SDPA, T×T per head), one direction; g·u and uᵀHu need the gradient as well
                (that is what directional_quadratics runs), not counted here

At long contexts the math-attention HVP is expected to run out of memory: the case is caught and
reported as OOM, as is any other failure; one failure never stops the table.

    python -m pytest bench/test_bench_taylor.py -q

prints one table (median ms, ms per direction, per-direction time relative to a gradient and to
the HVP, peak memory and its ratio to the gradient step's) and writes it as markdown and JSON to
$MUONKERN_BENCH_OUT (default bench_results/) as taylor_bench.md / .json.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Optional

import pytest
import torch
from measure import environment as bench_environment
from measure import built_table, measure_call, register_report

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: no CUDA GPU"),
    pytest.mark.filterwarnings("ignore:.*math SDPA backend:UserWarning")]

CONFIGS = {            # name: (batch, context)
    "32x256": (32, 256),
    "8x2048": (8, 2048),
    "2x8192": (2, 8192),
}
TAYLOR_K = (1, 4, 8)
TIME_PER_CASE_S = 1.5
_ROWS: List[dict] = []
_STATE: Dict[str, object] = {}


# --------------------------------------------------------------------------------------------
# helpers (this file's own; bench/measure.py has the shared timing and table writing)
# --------------------------------------------------------------------------------------------

def _setup(config: str):
    """(model, params, x, y, directions) for a configuration, cached; fresh Gaussian directions
    scaled like an optimizer update (never zeros)."""
    if _STATE.get("config") == config:
        return _STATE["setup"]
    _STATE.clear()
    torch.cuda.empty_cache()
    from muonkern.models import GPT, GPTConfig
    B, T = CONFIGS[config]
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small", context=T)).cuda()
    gen = torch.Generator(device="cuda").manual_seed(1)
    V = model.config.vocab_size
    x = torch.randint(0, V, (B, T), device="cuda", generator=gen)
    y = torch.randint(0, V, (B, T), device="cuda", generator=gen)
    params = {k: p.detach() for k, p in model.named_parameters()}
    dirs = [{k: 1e-3 * torch.randn(p.shape, device="cuda", generator=gen)
             for k, p in params.items()} for _ in range(max(TAYLOR_K))]
    _STATE.update(config=config, setup=(model, params, x, y, dirs))
    return _STATE["setup"]


def _record(config: str, method: str, directions: int, benchmark, make: Callable[[], Callable]):
    row = {"config": config, "method": method, "directions": directions}
    benchmark.group = f"taylor {config}"
    benchmark.extra_info.update(config=config, method=method, directions=directions)
    try:
        row.update(measure_call(make(), benchmark, TIME_PER_CASE_S), status="ok")
    except torch.cuda.OutOfMemoryError:
        row.update(status="OOM")
    except Exception as e:  # noqa: BLE001  (a failed case is a row of the table, not a crash)
        # an OOM inside a scripted/compiled function arrives wrapped in another RuntimeError
        if "out of memory" in str(e).lower():
            row.update(status="OOM")
        else:
            row.update(status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    finally:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    _ROWS.append(row)
    return row


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------

def _grad_step(model, x, y):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.CUDNN_ATTENTION]

    def step():
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(backends):
            _, loss = model(x, y)
        loss.backward()
    return step


def _taylor(model, params, x, y, dirs):
    from muonkern.taylor import taylor_directional
    return lambda: taylor_directional(model, params, x, y, dirs)


def _hvp(model, params, x, y, u):
    from muonkern import curvature
    from muonkern.models import exact_attention, gpt_loss_fn
    loss_fn = gpt_loss_fn(model, x, y)

    def run():
        with exact_attention():
            return curvature.hvp(loss_fn, params, u, method="fwd_rev")
    return run


CASES = [(c, "grad", 1) for c in CONFIGS] + \
        [(c, "taylor", k) for c in CONFIGS for k in TAYLOR_K] + \
        [(c, "hvp", 1) for c in CONFIGS]


@pytest.mark.parametrize("config,method,directions", CASES,
                         ids=[f"{c}-{m}-{k}" for c, m, k in CASES])
def test_taylor_bench(benchmark, report, config, method, directions):
    def make():
        model, params, x, y, dirs = _setup(config)
        if method == "grad":
            return _grad_step(model, x, y)
        if method == "taylor":
            return _taylor(model, params, x, y, dirs[:directions])
        return _hvp(model, params, x, y, dirs[0])

    row = _record(config, method, directions, benchmark, make)
    if row["status"] not in ("ok", "OOM"):
        pytest.fail(row["status"])  # reported, after the table is still complete


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------

def _fmt(v: Optional[float], spec: str, suffix: str = "") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{suffix}"


def _table(rows: List[dict]) -> str:
    ok = {(r["config"], r["method"]): r for r in rows
          if r["status"] == "ok" and r["method"] != "taylor"}
    lines = ["| config (B×T) | method | K | median ms | ms / direction | per-direction vs grad | "
             "HVP time / this per direction | peak MB | peak vs grad step | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        grad, hvp = ok.get((r["config"], "grad")), ok.get((r["config"], "hvp"))
        per_dir = r["median_ms"] / r["directions"] if r["status"] == "ok" else None
        vs_grad = per_dir / grad["median_ms"] if per_dir is not None and grad else None
        vs_hvp = hvp["median_ms"] / per_dir if per_dir is not None and hvp else None
        peak = r.get("peak_mb")
        peak_ratio = peak / grad["peak_mb"] if peak is not None and grad else None
        lines.append(f"| {r['config']} | {r['method']} | {r['directions']} | "
                     f"{_fmt(r.get('median_ms'), '.2f')} | {_fmt(per_dir, '.2f')} | "
                     f"{_fmt(vs_grad, '.2f', '×')} | {_fmt(vs_hvp, '.2f', '×')} | "
                     f"{_fmt(peak, '.0f')} | {_fmt(peak_ratio, '.2f', '×')} | {r['status']} |")
    return "\n".join(lines)


def _environment() -> dict:
    env = bench_environment()
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "absent"
    env["taylor_attention"] = os.environ.get("MUONKERN_TAYLOR_ATTENTION", "auto")
    return env


def _report_text(rows: list[dict], env: dict) -> str:
    note = ("GPT `small` (6×384, 6 heads of 64, vocab 256), fp32. grad: forward+backward with "
            "fused SDPA; taylor: g·u and uᵀHu for K directions in one forward; hvp: fwd_rev HVP "
            "under exact_attention (math SDPA), one direction. per-direction vs grad = (ms / K) / "
            "grad ms; HVP time / this per direction = hvp ms / (ms / K) (> 1: faster than an HVP); "
            "peak = max allocated during one call, parameters and batch included.")
    return "\n".join(["# muonkern Taylor-curvature benchmark", "",
                      ", ".join(f"{k}: {v}" for k, v in env.items()), "", note, "",
                      _table(rows), ""])


@pytest.fixture(scope="module")
def report():
    """Adds this file's table to the run's reports (written after every case, printed at the end)."""
    register_report("taylor_bench", lambda: built_table(_ROWS, _report_text, _environment))
