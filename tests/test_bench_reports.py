"""The benchmark tables (bench/measure.py, bench/conftest.py) are written after every benchmark, so a
run killed midway keeps the rows it had measured; empty tables write nothing."""
from __future__ import annotations

import shutil
from pathlib import Path

pytest_plugins = ["pytester"]

BENCH = Path(__file__).resolve().parents[1] / "bench"

# Two benchmarks: the first records a row, the second kills the process before pytest can print or
# write anything at the end of the run.
KILLED_RUN = '''
import os
from measure import register_report

ROWS = []

def built():
    return ("| row |\\n" * len(ROWS), {"results": ROWS}) if ROWS else None

def empty():  # a table that has no rows yet
    return None

def test_records_a_row():
    register_report("demo_bench", built)
    register_report("empty_bench", empty)
    ROWS.append({"impl": "x", "median_ms": 1.5})

def test_killed():
    os._exit(3)
'''


def test_tables_survive_a_killed_run(pytester, monkeypatch, tmp_path):
    for name in ("conftest.py", "measure.py"):
        shutil.copy(BENCH / name, pytester.path / name)
    pytester.makepyfile(test_killed_bench=KILLED_RUN)
    out = tmp_path / "results"
    monkeypatch.setenv("MUONKERN_BENCH_OUT", str(out))
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "test_killed_bench.py")
    assert result.ret == 3  # the os._exit: pytest's end-of-run hooks never ran
    assert (out / "demo_bench.md").read_text() == "| row |\n"
    assert '"median_ms": 1.5' in (out / "demo_bench.json").read_text()
    assert not (out / "empty_bench.md").exists()
