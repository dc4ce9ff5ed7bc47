"""Compile-only checks of Triton kernels for sm_90 (Hopper) on a machine without a GPU: Triton
ships ptxas. A check is a script that calls `compile_sm90` and prints one JSON line
{"results": [...]} last; `run_compile_script` runs it in a subprocess (TRITON_INTERPRET=0 whatever
the caller's environment, the tests folder importable) and returns the results."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from interpreter import last_json_line, run_script


def compile_sm90(kernel, signature: dict, constexprs: dict, divisible, num_warps: int, num_stages: int):
    """triton.compile of `kernel` for sm_90, with the arguments named in `divisible` specialized
    as divisible by 16 (as the launcher specializes aligned pointers, sizes and strides on a GPU).
    Uses ASTSource(fn, signature, constexprs=, attrs=) as triton 3.8 spells it; a triton that takes
    other arguments makes the script print {"api": ...} and exit (the check then skips)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    try:
        src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    except TypeError as e:
        print(json.dumps({"api": str(e)}))
        sys.exit(0)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(kernel) -> dict:
    """{"registers": n, "spill_bytes": stack + local bytes} of a compiled kernel's sm_90 cubin, read
    with the cuobjdump Triton ships; {} where it ships none."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+).*?LOCAL:(\d+)", text)
    if not found:
        return {}
    return {"registers": int(found[1]), "spill_bytes": int(found[2]) + int(found[3])}


# an sm_90 SM's shared memory available to one block
SHARED_LIMIT_BYTES = 227 * 1024


def sm90_summary(kernel) -> dict:
    """What the compile checks assert on, from a compiled kernel: wgmma (and its m·n·k shapes) or
    mma.sync in the PTX, shared bytes, registers and spilled bytes (resource_usage)."""
    ptx = kernel.asm["ptx"]
    return {"wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync" in ptx,
            "wgmma_shapes": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
            "shared_bytes": kernel.metadata.shared, **resource_usage(kernel)}


def run_compile_script(script: str) -> list[dict]:
    report = last_json_line(run_script(script, timeout=600, TRITON_INTERPRET="0"))
    if "api" in report:
        pytest.skip(f"this triton's ASTSource takes other arguments: {report['api']}")
    return report["results"]
