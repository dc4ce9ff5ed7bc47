"""Where a kernel's instructions and warp stalls go, from ncu's SASS source view exported as CSV:

    ncu --clock-control none --kernel-name regex:ns5_fused --launch-skip 2 --launch-count 2 --set full \
        -o fused python bench/ns5_fused_calls.py --algorithm auto 48x128x128 12x64x768
    ncu -i fused.ncu-rep --page source --print-source sass --csv > fused_sass.csv
    python bench/ncu_sass_summary.py fused_sass.csv

Per profiled kernel: warp instructions executed, the stall reasons' shares of the samples, the
opcodes by instructions, the samples on the cluster barriers' instructions (MEMBAR, ERRBAR,
UCGABAR_*, CCTL), and the longest runs of consecutive SASS lines executed equally often (a loop
body or a stretch of straight code), each with its share of the instructions and samples.
"""
from __future__ import annotations

import argparse
import collections
import csv
from dataclasses import dataclass, field

CLUSTER_BARRIER_OPCODES = ("MEMBAR", "ERRBAR", "UCGABAR", "CCTL")


@dataclass
class Line:
    opcode: str       # without predicate and modifiers: "HMMA", "LDSM", ...
    executed: int     # warp instructions
    samples: int      # warp stall samples, all reasons
    stalls: dict[str, int]


@dataclass
class Kernel:
    name: str
    lines: list[Line] = field(default_factory=list)


def _count(text: str) -> int:
    try:
        return int(text.replace(",", ""))
    except ValueError:
        return 0


def read_kernels(path: str) -> list[Kernel]:
    kernels: list[Kernel] = []
    col: dict[str, int] = {}  # the current header's column indices
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                kernels.append(Kernel(row[1]))
            elif row[0] == "Address":
                col = {name: i for i, name in enumerate(row)}
            elif kernels and col:
                words = row[col["Source"]].split()
                if not words:
                    continue
                opcode = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]
                stalls = {name[len("stall_"):]: _count(row[i]) for name, i in col.items()
                          if name.startswith("stall_") and "Not Issued" not in name}
                kernels[-1].lines.append(Line(opcode, _count(row[col["Instructions Executed"]]),
                                              _count(row[col["Warp Stall Sampling (All Samples)"]]), stalls))
    return kernels


def equal_count_runs(lines: list[Line]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of consecutive lines with the same execution count."""
    runs, start = [], 0
    for i in range(1, len(lines) + 1):
        if i == len(lines) or lines[i].executed != lines[start].executed:
            runs.append((start, i))
            start = i
    return runs


def summarize(kernel: Kernel, top: int) -> None:
    lines = kernel.lines
    instructions = sum(line.executed for line in lines)
    samples = max(sum(line.samples for line in lines), 1)
    print(f"{kernel.name}\n  {instructions:,} warp instructions, {samples:,} stall samples")
    stalls = collections.Counter()
    for line in lines:
        stalls.update(line.stalls)
    print("  stalls: " + ", ".join(f"{k} {v / samples:.0%}" for k, v in stalls.most_common(9)))
    by_opcode, samples_by_opcode = collections.Counter(), collections.Counter()
    for line in lines:
        by_opcode[line.opcode] += line.executed
        samples_by_opcode[line.opcode] += line.samples
    shares = [f"{op} {n / instructions:.1%} / {samples_by_opcode[op] / samples:.1%}"
              for op, n in by_opcode.most_common(top)]
    print("  opcodes (instructions / samples): " + ", ".join(shares))
    barrier = sum(line.samples for line in lines if line.opcode.startswith(CLUSTER_BARRIER_OPCODES))
    print(f"  samples on cluster-barrier instructions: {barrier / samples:.1%}")
    print("  longest runs of equally executed lines (lines, executions per line, instructions, samples, HMMA/LDSM/STSM):")
    runs = sorted(equal_count_runs(lines), key=lambda r: -(r[1] - r[0]) * lines[r[0]].executed)
    for start, end in runs[:top]:
        run = lines[start:end]
        ops = collections.Counter(line.opcode for line in run)
        print(f"    {start}-{end}  x{run[0].executed}  {sum(l.executed for l in run) / instructions:.1%}"
              f"  {sum(l.samples for l in run) / samples:.1%}  {ops['HMMA']}/{ops['LDSM']}/{ops['STSM']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="ncu --page source --print-source sass --csv output")
    parser.add_argument("--top", type=int, default=12, help="opcodes and runs to list per kernel")
    args = parser.parse_args()
    for kernel in read_kernels(args.csv):
        summarize(kernel, args.top)


if __name__ == "__main__":
    main()
