"""muonkern.optim.Muon under torch.distributed (gloo, CPU), 2 and 4 processes against one process.

Each world size starts its processes once (torch.multiprocessing.start_processes, "spawn"), and
every process runs the three modes, saving what it ends with to a file in a tmp_path:

  * data-parallel: plain parameters, identical on every rank (same seed), gradients identical on
    every rank (same seed per step, as DDP's averaged gradients are). Muon splits every same-shape
    batch among the ranks (5 matrices of 32 x 64 split unevenly), orthogonalizes its share and
    all-gathers the results.
  * DTensor: parameters distribute_tensor(p, mesh, [Shard(0)]) on a CPU DeviceMesh, gradients
    DTensors with the same placement; Muon gathers each matrix whole, orthogonalizes it and shards
    it back. Several first dimensions are not divisible by the world size (9 rows, 3 experts, 6
    conv filters, 10 and 11 AdamW rows).
  * different parameters per rank (seeded by rank): sharing must refuse on every rank, and
    distribute=False must train each rank's parameters exactly as one process does.

Tolerances against the single-process run:
  * DTensor: exact (torch.equal). Every matrix shape occurs in one parameter only, so the single
    process calls ns5 on exactly the matrices the DTensor path gathers; elementwise work on shards
    is the same arithmetic as on whole tensors.
  * data-parallel, AdamW parameters and Muon matrices whose ns5 batch is the same in both runs
    (the single conv weight): exact.
  * data-parallel, Muon matrices of a batch that the ranks split: each rank calls ns5 on a smaller
    batch than the single process, and on CPU a batched bf16 matmul sometimes rounds differently
    with another batch size (measured: 2 of 4800 matrices differed, by at most 1.5 bf16 ulps at
    magnitude [1, 2), see tests/test_optim.py). Allowed: 2^-5 (4 such ulps) per entry of the ns5
    output per step, times lr * scale; momentum buffers do not depend on the parameters, so the
    differences only add up over steps. (Measured on the development machine: every parameter
    equal bit for bit for both world sizes, so the tolerance is headroom, not a known difference.)
A failure cannot hang: init_process_group has a 60 s timeout and the test kills its processes
and fails after SPAWN_TIMEOUT_S. A world whose process dies by a signal is started once more.
"""
from __future__ import annotations

import math
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from reference import BF16_NS5_ATOL, muon_scale

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD_SIZES = [2, 4]
STEPS = 3
SPAWN_TIMEOUT_S = 240

# name -> (shape, group index). Group options in *_GROUPS.
DP_SPECS = {
    **{f"w{i}": ((32, 64), 0) for i in range(5)},    # 5 same-shape matrices: uneven split over 2 or 4
    "experts": ((3, 16, 32), 0),                      # 3 matrices of 16 x 32
    "conv": ((8, 4, 3, 3), 0),                        # one (8, 36) matrix
    "bias64": ((64,), 0),
    "bias8": ((8,), 0),
    "fused": ((48, 32), 1),                           # split_rows=16: 3 blocks of 16 x 32 ...
    "fused_experts": ((2, 16, 32), 1),                # ... batched with these 2
    "embed": ((11, 8), 2),                            # AdamW matrix
}
DP_GROUPS = [{}, {"split_rows": 16, "adjust_lr": "match_rms_adamw", "nesterov": False}, {"use_muon": False}]

DT_SPECS = {
    "rows9": ((9, 24), 0),                            # 9 rows: not divisible by 2 or 4
    "tall": ((32, 16), 0),
    "experts": ((3, 16, 32), 0),                      # Shard(0) over 3 experts
    "conv": ((6, 3, 3, 3), 0),
    "bias": ((10,), 0),
    "fused": ((48, 32), 1),
    "embed": ((11, 8), 2),
}
DT_GROUPS = DP_GROUPS
OPTIONS = dict(lr=0.02, momentum=0.9, weight_decay=0.1, adamw_lr=1e-2, adamw_weight_decay=0.01)


def _train(specs, groups, mesh=None, seed=0, distribute=True):
    """Builds the parameters (plain, or sharded on `mesh`), runs STEPS Muon steps with seeded
    gradients, returns {name: full final tensor}. `seed` draws other parameters and gradients."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from muonkern.optim import Muon

    def place(t):
        return t if mesh is None else distribute_tensor(t, mesh, [Shard(0)])

    gen = torch.Generator().manual_seed(seed)
    params = {name: nn.Parameter(place(torch.randn(shape, generator=gen))) for name, (shape, _) in specs.items()}
    opt = Muon([{"params": [params[n] for n, (_, g) in specs.items() if g == i], **options}
                for i, options in enumerate(groups)], distribute=distribute, **OPTIONS)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(1000 + step + 10000 * seed)
        for name, (shape, _) in specs.items():
            params[name].grad = place(torch.randn(shape, generator=gen))
        opt.step()
    out = {}
    for name, p in params.items():
        if mesh is not None:
            assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
            assert isinstance(opt.state[p].get("momentum_buffer", opt.state[p].get("exp_avg")), DTensor), name
            out[name] = p.detach().full_tensor()
        else:
            out[name] = p.detach().clone()
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        import muonkern.optim as optim_module
        from torch.distributed.device_mesh import init_device_mesh

        # Count the matrices this rank orthogonalizes (data-parallel mode shares them out).
        counted = []
        real_ns5 = optim_module.ns5

        def counting_ns5(G, *args, **kwargs):
            counted.append(G.numel() // (G.shape[-2] * G.shape[-1]))
            return real_ns5(G, *args, **kwargs)

        optim_module.ns5 = counting_ns5
        dp = _train(DP_SPECS, DP_GROUPS)
        dp_counted = sum(counted)
        optim_module.ns5 = real_ns5

        mesh = init_device_mesh("cpu", (world,))
        dt = _train(DT_SPECS, DT_GROUPS, mesh)

        # Different parameters on every rank (as under pipeline or tensor parallelism): sharing the
        # orthogonalization must refuse on every rank alike, and distribute=False trains each alone.
        try:
            _train(DP_SPECS, DP_GROUPS, seed=rank)
            refused = ""
        except RuntimeError as err:
            refused = str(err)
        own = _train(DP_SPECS, DP_GROUPS, seed=rank, distribute=False)
        torch.save({"dp": dp, "dp_ns5_matrices": dp_counted, "dtensor": dt, "refused": refused, "own": own},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(world: int, out_dir) -> list[dict]:
    ctx = mp.start_processes(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=5):   # raises ProcessRaisedException / ProcessExitedException on failure
            if time.monotonic() > deadline:
                pytest.fail(f"{world} processes did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for process in ctx.processes:    # only the processes started here
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def single_process():
    """The one-process runs, with one thread like the workers (tiny matrices: threads only cost time):
    the data-parallel and DTensor specs, and the data-parallel one seeded as each rank of the
    different-parameters mode (rank 0's is "dp" itself)."""
    assert not dist.is_initialized()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dp = _train(DP_SPECS, DP_GROUPS)
        per_rank = [dp] + [_train(DP_SPECS, DP_GROUPS, seed=r) for r in range(1, max(WORLD_SIZES))]
        return {"dp": dp, "dtensor": _train(DT_SPECS, DT_GROUPS), "per_rank": per_rank}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def distributed(request, tmp_path_factory):
    world = request.param
    try:
        return world, _run_world(world, tmp_path_factory.mktemp(f"world{world}"))
    except mp.ProcessExitedException as crash:
        # A process killed by a signal before it raised anything: gloo aborts now and then while the
        # processes connect (seen in a CPU CI run: SIGABRT, "terminate called without an active
        # exception"). One more start, on a fresh port; a crash that repeats fails the tests. A
        # Python exception in a worker (ProcessRaisedException) is never retried.
        if crash.signal_name is None:
            raise
        return world, _run_world(world, tmp_path_factory.mktemp(f"world{world}-again"))


def _matrix_shape(shape, split_rows):
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) >= 4 else shape[-2:]
    return (split_rows or rows), cols


def _dp_buckets():
    """{(group, matrix shape): number of matrices} as Muon batches them."""
    buckets = {}
    for shape, group in DP_SPECS.values():
        options = DP_GROUPS[group]
        if options.get("use_muon") is False or len(shape) < 2:
            continue
        split = options.get("split_rows")
        rows, cols = _matrix_shape(shape, split)
        total_rows = _matrix_shape(shape, None)[0]
        count = math.prod(shape[:-2]) if len(shape) == 3 else 1
        count *= total_rows // rows
        buckets[(group, rows, cols)] = buckets.get((group, rows, cols), 0) + count
    return buckets


def test_data_parallel_matches_single_process(distributed, single_process):
    world, results = distributed
    expected = single_process["dp"]
    buckets = _dp_buckets()
    assert buckets == {(0, 32, 64): 5, (0, 16, 32): 3, (0, 8, 36): 1, (1, 16, 32): 5}
    for rank, result in enumerate(results):
        # every rank ends with the same parameters, bit for bit
        for name in expected:
            assert torch.equal(result["dp"][name], results[0]["dp"][name]), (rank, name)
        # each rank orthogonalized its share of every batch, not the whole batch
        share = sum(-(-n // world) for n in buckets.values())
        assert result["dp_ns5_matrices"] == STEPS * share, rank
    got = results[0]["dp"]
    for name, (shape, group) in DP_SPECS.items():
        options = DP_GROUPS[group]
        muon = options.get("use_muon", len(shape) >= 2)
        if not muon:
            assert torch.equal(got[name], expected[name]), name
            continue
        rows, cols = _matrix_shape(shape, options.get("split_rows"))
        if buckets[(group, rows, cols)] == 1:
            assert torch.equal(got[name], expected[name]), name   # the same one-matrix batch
            continue
        scale = muon_scale(rows, cols, options.get("adjust_lr", "original"))
        atol = STEPS * OPTIONS["lr"] * scale * BF16_NS5_ATOL
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol, msg=name)


def test_dtensor_matches_single_process(distributed, single_process):
    world, results = distributed
    expected = single_process["dtensor"]
    assert any(shape[0] % world for shape, _ in DT_SPECS.values())
    for rank, result in enumerate(results):
        for name in expected:
            assert torch.equal(result["dtensor"][name], expected[name]), (world, rank, name)


def test_different_parameters_per_rank(distributed, single_process):
    """Ranks that hold different matrices: sharing the orthogonalization refuses on every rank (it
    would hand each rank another's updates), and distribute=False trains each rank's own parameters
    as one process would (exact: the same ns5 calls)."""
    world, results = distributed
    for rank, result in enumerate(results):
        assert "hold different matrices" in result["refused"], (world, rank, result["refused"])
        alone = single_process["per_rank"][rank]
        for name in alone:
            assert torch.equal(result["own"][name], alone[name]), (world, rank, name)


def test_single_process_run_moves_every_parameter(single_process):
    """Guards the comparisons above against a vacuous pass (nothing trained)."""
    for mode, specs in (("dp", DP_SPECS), ("dtensor", DT_SPECS)):
        gen = torch.Generator().manual_seed(0)
        for name, (shape, _) in specs.items():
            start = torch.randn(shape, generator=gen)
            assert (single_process[mode][name] - start).abs().max() > 1e-3, (mode, name)
