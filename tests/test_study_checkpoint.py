"""An interrupted training run resumes from its last snapshot and ends exactly as the run that was
never interrupted (CPU: the same arithmetic, the same batches); snapshots of another configuration
or unreadable ones stop with a message naming the file."""
from __future__ import annotations

import pytest
import torch

from muonkern.study import make_config
from muonkern.study.__main__ import main
from muonkern.study.checkpoint import RunCheckpoint
from muonkern.study.distributed import Context
from muonkern.study.sweep import configured_lrs
from muonkern.study.train import train_run

CFG = ["steps=9", "eval_every=2", "probe_every=4", "d_model=32", "n_layer=1", "context=16", "batch_size=4",
       "probe_batch_size=4", "val_batches=1", "ladder_step=0.02", "lr_sweep=false", "checkpoint_every=3"]


class Interrupted(Exception):
    pass


class StopAfter:
    """A progress bar that interrupts the run once it has counted `steps` steps."""

    def __init__(self, steps: int):
        self.steps, self.n, self.calls = steps, 0, []

    def update(self, k: int) -> None:
        self.calls.append(k)
        self.n += k
        if self.n >= self.steps:
            raise Interrupted


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_interrupted_run_resumes_exactly(tmp_path, optimizer):
    cfg = make_config("tiny", CFG)
    lrs, ctx = configured_lrs(cfg), Context()
    whole = train_run(cfg, optimizer, 1.0, 0, lrs, ctx)
    checkpoint = RunCheckpoint(tmp_path / "run.partial.pt", {"run": optimizer}, ctx, cfg.checkpoint_every)
    with pytest.raises(Interrupted):
        train_run(cfg, optimizer, 1.0, 0, lrs, ctx, progress=StopAfter(8), checkpoint=checkpoint)
    assert checkpoint.load()["step"] == 6  # the last snapshot before step 8
    bar = StopAfter(10 ** 9)
    resumed = train_run(cfg, optimizer, 1.0, 0, lrs, ctx, progress=bar, checkpoint=checkpoint)
    assert bar.calls == [6, 1, 1, 1]  # the 6 restored steps at once, then only the 3 left are trained
    assert resumed == whole
    assert [r["step"] for r in whole["probes"] if "periodic" in r["kinds"]] == [4, 8]  # probes on both sides


def test_snapshot_of_another_run_or_unreadable_stops(tmp_path):
    cfg, ctx = make_config("tiny", CFG), Context()
    path = tmp_path / "run.partial.pt"
    RunCheckpoint(path, {"momentum": 0.95}, ctx, 3).save(lambda: {"step": 3})
    with pytest.raises(ValueError, match="different configuration"):
        RunCheckpoint(path, {"momentum": 0.9}, ctx, 3).load()
    path.write_bytes(b"not a snapshot")
    with pytest.raises(ValueError, match="corrupt"):
        train_run(cfg, "muon", 0.0, 0, configured_lrs(cfg), ctx, checkpoint=RunCheckpoint(path, {}, ctx, 3))
    assert RunCheckpoint(tmp_path / "none.partial.pt", {}, ctx, 3).load() is None


def test_study_deletes_snapshots_of_finished_runs(tmp_path):
    out = tmp_path / "study"
    args = ["--out", str(out), "--set", "alphas=0", "--set", "seeds=0", "--set", "quad_alpha_ws=0",
            "--set", "quad_alpha_sigmas=0.5", "--set", "quad_steps=2", "--set", "quad_instances=1",
            "--set", "quad_m=4", "--set", "quad_n=4", "--set", "quad_groups=2", "--set", "quad_group_size=2"]
    for item in CFG:
        args += ["--set", item]
    # a snapshot left by an interrupted muon run, taken up by the study and deleted when it finishes
    cfg = make_config("tiny", CFG + ["alphas=0", "seeds=0"])
    (out / "runs").mkdir(parents=True)
    from muonkern.study.run import RunStore, run_name  # the run's identity as the study builds it
    identity = {**cfg.run_identity(), "optimizer": "muon", "alpha": 0.0, "seed": 0,
                "lrs": configured_lrs(cfg), "probes": True}
    snapshot = RunCheckpoint(out / "runs" / f"{run_name('muon', 0.0, 0)}.partial.pt", identity, Context(), 3)
    with pytest.raises(Interrupted):
        train_run(cfg, "muon", 0.0, 0, configured_lrs(cfg), Context(), progress=StopAfter(5), checkpoint=snapshot)
    # a marked snapshot: the study's result must come from it, not from training again
    saved = torch.load(snapshot.path, weights_only=True)
    assert saved["state"]["step"] == 3
    first = next(iter(saved["state"]["model"]))
    saved["state"]["model"][first] += 0.01
    torch.save(saved, snapshot.path)
    marked = RunCheckpoint(tmp_path / "marked.partial.pt", identity, Context(), 3)
    torch.save(saved, marked.path)
    assert main(args) == 0
    assert not list((out / "runs").glob("*.partial.pt"))
    stored = RunStore(out / "runs", Context()).read(run_name("muon", 0.0, 0), identity)
    assert stored == train_run(cfg, "muon", 0.0, 0, configured_lrs(cfg), Context(), checkpoint=marked)
    assert stored != train_run(cfg, "muon", 0.0, 0, configured_lrs(cfg), Context())
