"""python -m muonkern.study [--preset tiny|small|paper] [--set key=value ...] [--out DIR] [--seeds 0,1] [--device cpu]

Data-parallel: torchrun --nproc_per_node N -m muonkern.study ... (gloo on CPU, nccl on CUDA)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import distributed
from .analysis import analyze
from .config import PRESETS, make_config
from .figures import draw_all
from .report import findings_table, write_report
from .results import build, write
from .run import run_study


def finish(data: dict, out: Path) -> tuple[Path, dict]:
    """Analysis, results.json and CSVs, figures, report.md; returns the report's path and the results."""
    results = build(data, analyze(data))
    write(results, out)
    figures = draw_all(results, out / "figures")
    return write_report(results, out, figures), results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="muonkern-study", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration field (tuples: comma-separated)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/study-<preset>)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    ctx = None
    try:
        cfg = make_config(args.preset, args.set, args.seeds, args.device)
        ctx = distributed.init(cfg.device)
        out = args.out or Path("runs") / f"study-{args.preset}"
        data = run_study(cfg, out, ctx)
        if ctx.is_main:
            report, results = finish(data, out)
            print(f"report: {report}")
            print("\n".join(findings_table(results)))
    except (ValueError, FileNotFoundError) as err:
        print(f"muonkern-study: error: {err}", file=sys.stderr)
        return 2
    finally:
        if ctx is not None:
            distributed.shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
