"""Study configuration: presets and `--set key=value` overrides."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class StudyConfig:
    # data: "pcfg" (Zipf-PCFG language; training emission exponents in `alphas`, validation at
    # val_alpha) or "shakespeare" (real text, byte-level; no imbalance axis, alphas is (0,))
    dataset: str = "pcfg"
    vocab_size: int = 64
    n_classes: int = 8
    grammar_seed: int = 0
    alphas: tuple = (0.0, 1.0)
    val_alpha: float = 0.0
    # model (muonkern.models.GPT)
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    context: int = 64
    # training
    steps: int = 150
    batch_size: int = 16
    # tiny preset, alpha 0, seed 0, final validation loss of a sweep (150 steps):
    #   Muon lr x AdamW-part lr: 0.01: 3.515/3.487/3.463, 0.02: 3.451/3.438/3.382, 0.05: 3.454/3.428/3.411
    #   (AdamW part 0.003/0.01/0.03); AdamW lr 1e-3: 3.619, 3e-3: 3.545, 1e-2: 3.627, 3e-2: 3.791
    muon_lr: float = 0.02
    muon_adamw_lr: float = 0.03
    adamw_lr: float = 3e-3
    betas: tuple = (0.9, 0.95)
    # probes: every probe_every steps, the update of that step on a held-out training-distribution batch
    probe_every: int = 25
    probe_batch_size: int = 16
    val_batches: int = 4
    seeds: tuple = (0,)
    device: str = "cpu"

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


PRESETS = {
    # CPU, a couple of minutes on 2 cores (CI runs it)
    "tiny": StudyConfig(),
    # one GPU, a few minutes
    "small": StudyConfig(vocab_size=256, n_classes=16, n_layer=6, n_head=6, d_model=384, context=256,
                         steps=2000, batch_size=64, probe_every=250, probe_batch_size=32, val_batches=8,
                         muon_lr=0.02, muon_adamw_lr=3e-3, adamw_lr=1e-3, alphas=(0.0, 0.5, 1.0),
                         seeds=(0, 1), device="cuda"),
    # GPT-2-small scale for users with GPUs (documented, not run in CI)
    "paper": StudyConfig(vocab_size=1024, n_classes=32, n_layer=12, n_head=12, d_model=768, context=1024,
                         steps=20000, batch_size=64, probe_every=500, probe_batch_size=16, val_batches=16,
                         muon_lr=0.02, muon_adamw_lr=6e-4, adamw_lr=6e-4, alphas=(0.0, 0.5, 1.0),
                         seeds=(0, 1, 2), device="cuda"),
}


def make_config(preset: str, overrides: list[str] = (), seeds: str | None = None,
                device: str | None = None) -> StudyConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = dataclasses.replace(PRESETS[preset])
    fields = {f.name: f for f in dataclasses.fields(StudyConfig)}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set expects key=value with key one of {sorted(fields)}, got {item!r}")
        current = getattr(cfg, key)
        if isinstance(current, tuple):
            parsed = tuple(type(current[0] if current else 0.0)(v) for v in value.split(",") if v)
        elif isinstance(current, bool):
            parsed = value.lower() in ("1", "true", "yes")
        else:
            parsed = type(current)(value)
        setattr(cfg, key, parsed)
    if seeds is not None:
        cfg.seeds = tuple(int(s) for s in seeds.split(","))
    if device is not None:
        cfg.device = device
    if cfg.steps < 1 or cfg.probe_every < 1:
        raise ValueError("steps and probe_every must be >= 1")
    if cfg.dataset not in ("pcfg", "shakespeare"):
        raise ValueError(f"dataset must be 'pcfg' or 'shakespeare', got {cfg.dataset!r}")
    if cfg.dataset == "shakespeare":
        cfg.alphas = (0.0,)  # the imbalance exponent belongs to the synthetic language
    return cfg
