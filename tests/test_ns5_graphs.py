"""The ns5 op's CUDA-graph cache (csrc/ns5_graphs.cpp).

Calls on the general path and the Gram iteration run directly the first time and are
captured on the second, then replayed. A replay must return bitwise what the direct launches
(MUONKERN_NS5_GRAPH=0) return, on a fresh input every call, into a fresh tensor that no later call
overwrites. Each test uses shapes of its own: the cache is per process, and a graph captured by
another test would leave the capture count unchanged.
"""
from __future__ import annotations

import pytest
import torch

import muonkern
from ns5_cases import ns5, shape_id
from reference import assert_ns5_output, randn

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if muonkern.backend() != "cuda":
    pytest.skip("CUDA tensors run the fallback in this build: no graphs", allow_module_level=True)


def cached_graphs() -> int:
    return muonkern._C.ns5_cached_graphs()


def direct(monkeypatch, inputs, algorithm):
    with monkeypatch.context() as env:
        env.setenv("MUONKERN_NS5_GRAPH", "0")
        before = cached_graphs()
        outs = [ns5(G, algorithm=algorithm) for G in inputs]
        assert cached_graphs() == before, "MUONKERN_NS5_GRAPH=0 still captured a graph"
    return outs


# (shape, algorithm, transposed view): all launch-bound and too large for the fused kernel.
CASES = [((392, 648), "standard", False),
         ((3, 264, 200), "standard", False),   # batch, m > n
         ((648, 392), "standard", True),       # a transposed view: copied into the graph's input
         ((520, 2056), "gram", False),
         ((2056, 520), "gram", True)]


@pytest.mark.parametrize("shape,algorithm,transposed", CASES,
                         ids=[f"{shape_id(s)}-{a}{'-view' if t else ''}" for s, a, t in CASES])
def test_replays_match_direct_launches(gen, monkeypatch, shape, algorithm, transposed):
    monkeypatch.delenv("MUONKERN_NS5_PATH", raising=False)
    monkeypatch.delenv("MUONKERN_NS5_GRAPH", raising=False)
    make = (lambda: randn(gen, *shape[:-2], shape[-1], shape[-2], device="cuda").mT) if transposed \
        else (lambda: randn(gen, *shape, device="cuda"))
    inputs = [make() for _ in range(4)]
    before = cached_graphs()
    outs = [ns5(G, algorithm=algorithm) for G in inputs]  # direct, capture + replay, replay, replay
    assert cached_graphs() == before + 1
    assert len({out.data_ptr() for out in outs}) == len(outs), "a replay returned the graph's own buffer"
    for out, expected in zip(outs, direct(monkeypatch, inputs, algorithm)):
        assert torch.equal(out, expected)
    assert_ns5_output(outs[-1], inputs[-1])  # and right, not merely equal


# X X^T and B = c R R + b R in blocks (MUONKERN_NS5_SPLIT_GRAM and MUONKERN_NS5_BLOCK_SQUARE=256: 4 x 4
# blocks of 64 here): the pointer arrays are written by a kernel inside the call, so a replay points the
# batched GEMMs at its own workspace.
def test_replays_of_the_blocked_gram_product(gen, monkeypatch):
    monkeypatch.delenv("MUONKERN_NS5_PATH", raising=False)
    monkeypatch.delenv("MUONKERN_NS5_GRAPH", raising=False)
    monkeypatch.setenv("MUONKERN_NS5_SPLIT_GRAM", "256")
    monkeypatch.setenv("MUONKERN_NS5_BLOCK_SQUARE", "256")
    inputs = [randn(gen, 256, 1032, device="cuda") for _ in range(4)]
    before = cached_graphs()
    outs = [ns5(G, algorithm="gram") for G in inputs]  # direct, capture + replay, replay, replay
    assert cached_graphs() == before + 1
    for out, expected in zip(outs, direct(monkeypatch, inputs, "gram")):
        assert torch.equal(out, expected)
    assert_ns5_output(outs[-1], inputs[-1])


@pytest.mark.parametrize("algorithm,defer", [("standard", False), ("gram", False), ("gram", True)],
                         ids=["standard", "gram", "gram-deferred-scale"])
def test_replays_read_aligned_inputs_in_place_and_copy_the_rest(gen, monkeypatch, algorithm, defer):
    """The graph reads a 16-byte aligned G where it lies and copies one that starts 4 bytes off
    into its own input. Alternating the two (same shape and strides), every replay still equals the
    direct launches, and an input overwritten after its call does not change that call's result.
    With MUONKERN_NS5_DEFER_SCALE=1 the re-pointed normalize launch keeps its deferred-scale argument."""
    monkeypatch.delenv("MUONKERN_NS5_PATH", raising=False)
    monkeypatch.delenv("MUONKERN_NS5_GRAPH", raising=False)
    monkeypatch.setenv("MUONKERN_NS5_DEFER_SCALE", "1" if defer else "0")
    shape = (456, 712) if algorithm == "standard" else (552, 2184) if defer else (536, 2168)

    def make(offset):
        flat = randn(gen, shape[0] * shape[1] + offset, device="cuda")
        return flat[offset:].view(shape)

    inputs = [make(call % 2) for call in range(6)]
    originals = [G.clone() for G in inputs]
    before = cached_graphs()
    outs = []
    for G in inputs:
        outs.append(ns5(G, algorithm=algorithm))
        G.add_(1.0)  # stream-ordered after the call: must not reach its result
    assert cached_graphs() == before + 1
    for out, expected in zip(outs, direct(monkeypatch, originals, algorithm)):
        assert torch.equal(out, expected)
    assert_ns5_output(outs[-1], originals[-1])


def test_each_stream_gets_its_own_graph(gen, monkeypatch):
    """Replays on two streams, interleaved without synchronizing, do not share buffers."""
    monkeypatch.delenv("MUONKERN_NS5_GRAPH", raising=False)
    shape = (2, 328, 456)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    inputs = [[randn(gen, *shape, device="cuda") for _ in range(3)] for _ in streams]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    before = cached_graphs()
    outs = [[], []]
    for call in range(3):
        for s, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                outs[s].append(ns5(inputs[s][call]))
    torch.cuda.synchronize()
    assert cached_graphs() == before + 2
    for s in range(2):
        for out, expected in zip(outs[s], direct(monkeypatch, inputs[s], "standard")):
            assert torch.equal(out, expected)


def test_inside_a_callers_capture_the_op_launches_directly(gen, monkeypatch):
    """With a graph of ours cached for the signature, a caller's own capture still records the
    launches (a graph is never captured inside another) and its replays compute fresh inputs."""
    monkeypatch.delenv("MUONKERN_NS5_GRAPH", raising=False)
    shape = (296, 712)
    static_in = randn(gen, *shape, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            ns5(static_in)
    torch.cuda.current_stream().wait_stream(side)
    before = cached_graphs()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ns5(static_in)
    assert cached_graphs() == before
    fresh = randn(gen, *shape, device="cuda")
    static_in.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, direct(monkeypatch, [fresh], "standard")[0])


def test_shapes_seen_once_leave_room_for_graphs(gen, monkeypatch):
    """A signature seen once holds no graph, so many of them (more than the 64 graphs the cache
    keeps) do not use up its room: a shape called twice afterwards is still captured. Run after
    the other ns5 test files in one process, this is the state their many shapes leave."""
    monkeypatch.delenv("MUONKERN_NS5_PATH", raising=False)
    monkeypatch.delenv("MUONKERN_NS5_GRAPH", raising=False)
    monkeypatch.setenv("MUONKERN_NS5_GEMM_TUNE", "0")  # no algorithm timing for each new shape
    before = cached_graphs()
    for i in range(70):
        ns5(randn(gen, 200, 301 + 8 * i, device="cuda"), algorithm="standard")
    assert cached_graphs() == before
    G = randn(gen, 200, 297, device="cuda")
    outs = [ns5(G, algorithm="standard") for _ in range(2)]
    assert cached_graphs() == before + 1
    assert torch.equal(outs[1], direct(monkeypatch, [G], "standard")[0])


def test_large_calls_replay_within_the_memory_budget(gen, monkeypatch):
    """A call that is not launch-bound (2040x2056 standard, ~260 GFLOP against 17 launches) replays
    from a graph too, while graphs of such calls hold at most MUONKERN_NS5_GRAPH_MB; with a budget
    of 0 it runs directly, and asks again once there is room."""
    monkeypatch.delenv("MUONKERN_NS5_PATH", raising=False)
    monkeypatch.delenv("MUONKERN_NS5_GRAPH", raising=False)
    shape = (2040, 2056)
    inputs = [randn(gen, *shape, device="cuda") for _ in range(3)]
    before = cached_graphs()
    monkeypatch.setenv("MUONKERN_NS5_GRAPH_MB", "0")
    for G in inputs:
        ns5(G, algorithm="standard")
    assert cached_graphs() == before, "a graph past the memory budget was captured"
    # room whatever earlier tests' graphs hold (this one holds about 33 MB: python
    # bench/ns5_diagnostics.py graph-bytes)
    monkeypatch.setenv("MUONKERN_NS5_GRAPH_MB", str(1 << 20))
    outs = [ns5(G, algorithm="standard") for G in inputs]
    assert cached_graphs() == before + 1
    for out, expected in zip(outs, direct(monkeypatch, inputs, "standard")):
        assert torch.equal(out, expected)
    assert_ns5_output(outs[-1], inputs[-1])


def test_memory_budget_boundary(gen, monkeypatch):
    """A graph is captured only where the budget holds it on top of the graphs held already: a budget
    (whole MiB) short of that by up to a MiB refuses it, the next MiB up takes it. Two signatures of
    one size: the same 2040x2056 call with two values of eps."""
    monkeypatch.delenv("MUONKERN_NS5_PATH", raising=False)
    monkeypatch.delenv("MUONKERN_NS5_GRAPH", raising=False)
    mib = 1 << 20
    G = randn(gen, 2040, 2056, device="cuda")
    graphs, held = cached_graphs(), muonkern._C.ns5_graph_bytes()
    monkeypatch.setenv("MUONKERN_NS5_GRAPH_MB", str(1 << 20))
    for _ in range(2):  # a signature's second call captures
        ns5(G, eps=3e-7)
    size = muonkern._C.ns5_graph_bytes() - held
    assert cached_graphs() == graphs + 1 and size > 0, f"no graph counted ({size} bytes)"
    held += size
    monkeypatch.setenv("MUONKERN_NS5_GRAPH_MB", str((held + size - 1) // mib))
    for _ in range(2):
        ns5(G, eps=4e-7)
    assert cached_graphs() == graphs + 1, "a graph past the budget was captured"
    assert muonkern._C.ns5_graph_bytes() == held, "a refused graph's bytes stayed counted"
    monkeypatch.setenv("MUONKERN_NS5_GRAPH_MB", str(-(-(held + size) // mib)))
    out = ns5(G, eps=4e-7)  # the signature asks again
    assert cached_graphs() == graphs + 2 and muonkern._C.ns5_graph_bytes() == held + size
    with monkeypatch.context() as env:
        env.setenv("MUONKERN_NS5_GRAPH", "0")
        assert torch.equal(out, ns5(G, eps=4e-7)), "the replay differs from the direct call"
