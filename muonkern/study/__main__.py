"""python -m muonkern.study [--preset tiny|small|paper] [--set key=value ...] [--out DIR] [--seeds 0,1] [--device cpu]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import PRESETS
from .config import make_config
from .report import write_report
from .run import run_study


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="muonkern-study", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration field (tuples: comma-separated)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/study-<preset>)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    try:
        cfg = make_config(args.preset, args.set, args.seeds, args.device)
        out = args.out or Path("runs") / f"study-{args.preset}"
        results = run_study(cfg, out)
        report = write_report(results, cfg, out)
    except ValueError as err:
        print(f"muonkern-study: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
