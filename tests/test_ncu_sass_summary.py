"""bench/ncu_sass_summary.py reads ncu's SASS source-view CSV: opcodes without predicates or
modifiers, counts with thousands separators, several kernels per file, and runs of lines executed
equally often split where the count changes."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "bench" / "ncu_sass_summary.py"
_spec = importlib.util.spec_from_file_location("ncu_sass_summary", _PATH)
summary = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = summary   # its dataclasses look their module up while the class is built
_spec.loader.exec_module(summary)

HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
          '"stall_barrier","stall_membar","stall_barrier (Not Issued)"')


def _csv(tmp_path, kernels):
    rows = []
    for name, lines in kernels:
        rows += [f'"Kernel Name","{name}",', HEADER]
        rows += [f'"0x{i:x}","{src}","{samples}","{executed}","{barrier}","{membar}","99"'
                 for i, (src, samples, executed, barrier, membar) in enumerate(lines)]
    path = tmp_path / "sass.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_reads_kernels_lines_and_runs(tmp_path):
    path = _csv(tmp_path, [
        ("k1", [("@!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4", "3", "1,536", "1", "0"),
                ("LDSM.16.M88.4 R8, [R2]", "0", "1,536", "0", "0"),
                ("MEMBAR.ALL.GPU", "5", "96", "0", "5"),
                ("UCGABAR_WAIT", "2", "96", "2", "0")]),
        ("k2", [("EXIT", "0", "7", "0", "0")]),
    ])
    k1, k2 = summary.read_kernels(path)
    assert (k1.name, k2.name) == ("k1", "k2")
    assert [line.opcode for line in k1.lines] == ["HMMA", "LDSM", "MEMBAR", "UCGABAR_WAIT"]
    assert [line.executed for line in k1.lines] == [1536, 1536, 96, 96]
    assert k1.lines[2].stalls == {"barrier": 0, "membar": 5}   # the "(Not Issued)" column left out
    assert summary.equal_count_runs(k1.lines) == [(0, 2), (2, 4)]
    assert summary.equal_count_runs(k2.lines) == [(0, 1)]


def test_summary_shares(tmp_path, capsys):
    path = _csv(tmp_path, [("k", [("HMMA.16816.F32.BF16 R4, R8, R12, R4", "2", "300", "0", "0"),
                                  ("ERRBAR", "6", "100", "0", "6"),
                                  ("BAR.SYNC.DEFER_BLOCKING 0x0", "2", "100", "2", "0")])])
    summary.summarize(summary.read_kernels(path)[0], top=3)
    out = capsys.readouterr().out
    assert "500 warp instructions, 10 stall samples" in out
    assert "membar 60%" in out and "barrier 20%" in out
    assert "HMMA 60.0% / 20.0%" in out
    assert "samples on cluster-barrier instructions: 60.0%" in out   # ERRBAR only, not BAR.SYNC
