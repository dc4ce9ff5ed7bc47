"""CUDA graph replay of the Gram iteration's products (muonkern.ops.triton_gram.ns5_gram_symmetric)
for calls whose launches cost the host more time than the GPU takes (`graph_pays`).

Run like the op's own graph cache (csrc/ns5_graphs.cpp):
- a layout is captured the second time it is seen, so a one-off call never pays for a capture;
- at most GRAPH_CACHE_SIZE layouts are kept and later ones run eagerly, with no eviction (a Muon
  step cycling through more layouts would otherwise recapture on every call); layouts seen once
  are remembered up to MAX_SEEN_LAYOUTS, so a process meeting ever new shapes holds bounded memory;
- a layout whose capture fails runs eagerly from then on.

Keys hold the device and the replay stream. Each (device, replay stream) pair has a capture stream
of its own, so it also has its own stream-K workspace and buffers: calls on different streams never
share them, and one stream orders the replays of each key. The normalization runs before the
replay, into the graph's input buffer; the output product runs after it, into a fresh tensor. So a
replayed call does the eager call's work and nothing more.
"""
from __future__ import annotations

from typing import Optional

import torch

from .fallback import GramProducts, gram_factors
from .ns5_args import gram_restart_steps, ns5_flops

__all__ = ["GRAPH_CACHE_SIZE", "MAX_SEEN_LAYOUTS", "GraphedFactors", "graph_pays", "graphed_factors"]

# Host time per launch (Python and Triton's launcher) and the GPU's rate on the Gram iteration's
# dense-equivalent FLOPs, fitted to an H100 (torch 2.11, triton 3.6; `python bench/ns5_diagnostics.py
# streamk`): at 2048x8192 the 21 launches of an eager call took 1397 us against 820 replayed, ~66 us
# each (a faster host: 840 against 813); the replayed call ran its 515 GFLOP (ns5_flops' gram count)
# at ~630 TFLOP/s.
GRAPH_HOST_SECONDS = 60e-6
GRAPH_FLOPS = 600e12
# A graph holds its input buffer and intermediates (about 4·batch·m·n + 8·batch·r² bytes in bf16).
GRAPH_CACHE_SIZE = 16
MAX_SEEN_LAYOUTS = 4096

_graphs: dict = {}
_seen: set = set()
_failed: set = set()
_capture_streams: dict = {}


def graph_pays(batch: int, m: int, n: int, steps: int) -> bool:
    """Whether a call's launches take the host longer than the GPU takes for its FLOPs."""
    restarts = len(gram_restart_steps(steps))
    # the normalization (fp32 norm, + eps, quotient in the operand dtype); the Gram products
    # (1 + restarts); the polynomial per step; P·Q and P·R·P (4·steps - 3·(restarts + 1) - steps of
    # them); X = Q·X0 per restart; the output
    launches = 3 + (1 + restarts) + steps + (3 * steps - 3 * (restarts + 1)) \
        + restarts + 1
    return launches * GRAPH_HOST_SECONDS > batch * ns5_flops(m, n, steps, "gram") / GRAPH_FLOPS


def graphed_factors(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                    stream: "torch.cuda.Stream", variant: tuple) -> Optional["GraphedFactors"]:
    """The cached graph of a layout (input shape, operand dtype, device, replay stream and the
    caller's `variant`: whatever else changes the captured work), a new one to capture (second
    sighting, room in the cache), or None: this call runs eagerly."""
    key = (shape, dtype, device, stream.cuda_stream, variant)
    if key in _graphs:
        return _graphs[key]
    if key in _failed or len(_graphs) >= GRAPH_CACHE_SIZE:
        return None
    if key not in _seen:
        if len(_seen) < MAX_SEEN_LAYOUTS:
            _seen.add(key)
        return None
    _graphs[key] = GraphedFactors(key, shape, dtype, device)
    return _graphs[key]


def _capture_stream(device: torch.device, replay: "torch.cuda.Stream") -> "torch.cuda.Stream":
    key = (device, replay.cuda_stream)
    if key not in _capture_streams:
        _capture_streams[key] = torch.cuda.Stream(device)
    return _capture_streams[key]


class GraphedFactors:
    """gram_factors for one key, captured on first use. The caller writes the normalized input into
    X0; `replay` returns the graph's (Q, X), which the next replay overwrites."""

    def __init__(self, key: tuple, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device):
        self.key = key
        self.X0 = torch.empty(shape, dtype=dtype, device=device)
        self.graph = None
        self.factors = None

    def replay(self, triples, restarts, products: GramProducts, stream: "torch.cuda.Stream"):
        """(Q, X) after a replay on `stream` (the current one), or None where the capture failed (the
        key then runs eagerly)."""
        if self.graph is None:
            capture = _capture_stream(self.X0.device, stream)
            capture.wait_stream(stream)
            try:
                # a warm-up on the capture stream compiles and autotunes every kernel and creates
                # (and zeroes) that stream's stream-K workspace, all outside the capture
                with torch.cuda.stream(capture):
                    gram_factors(self.X0, triples, restarts, products)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=capture, capture_error_mode="thread_local"):
                    factors = gram_factors(self.X0, triples, restarts, products)
            except RuntimeError:
                _graphs.pop(self.key, None)
                _failed.add(self.key)
                stream.wait_stream(capture)
                return None
            stream.wait_stream(capture)   # the warm-up and the replays share the workspace
            self.graph, self.factors = graph, factors
        self.graph.replay()
        return self.factors
