"""Runs a script under Triton's CPU interpreter: TRITON_INTERPRET=1 must be set before triton is
imported, hence a subprocess, with no GPU visible (the interpreter then runs on CPU tensors as on
a machine without one). The script prints one JSON line last; it is returned parsed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def run_script(script: str, *args: str, timeout: int, **env: str) -> subprocess.CompletedProcess:
    """The script in a fresh Python, ``sys.argv[1:]`` = ``args``, the tests folder importable and
    ``env`` added to the environment."""
    env = dict(os.environ, **env,
               PYTHONPATH=os.pathsep.join(filter(None, (str(TESTS), os.environ.get("PYTHONPATH")))))
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def last_json_line(proc: subprocess.CompletedProcess):
    """The last stdout line of a script that succeeded, parsed as JSON."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_interpreter(script: str, *args: str):
    """The script's last stdout line as JSON; ``sys.argv[1:]`` are ``args``, and the tests folder
    is importable. Skips where the installed triton's interpreter cannot run."""
    pytest.importorskip("triton")
    proc = run_script(script, *args, timeout=300, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    if proc.returncode != 0 and "only 0-dimensional arrays can be converted" in proc.stderr:
        # triton 3.6's interpreter keeps program ids as 1-element arrays, which newer numpy no
        # longer converts to an int for range(); the compiled kernels are unaffected
        import numpy
        import triton
        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run with numpy "
                    f"{numpy.__version__} (program ids as 1-element arrays)")
    return last_json_line(proc)
