"""Study configuration: presets and `--set key=value` overrides.

Fields are grouped as data, model, training, learning-rate sweep, probes, stylized quadratic
problem (E5) and execution. `run_identity()` is the part that determines one training run; finished
run files are reused only when it matches (seeds, alphas and the device may change between calls).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from ..data import PCFGConfig

DATASETS = ("pcfg", "shakespeare", "bin")


@dataclass
class StudyConfig:
    # ---- data
    # "pcfg": the Zipf-PCFG language (training emission exponents `alphas`, validation at
    # `val_alpha`); "shakespeare": real text, byte-level; "bin": the user's nanoGPT-style token files
    # data_dir/train.bin and data_dir/val.bin (uint16), token ids < vocab_size. The last two have
    # no imbalance axis (alphas becomes (0,)).
    dataset: str = "pcfg"
    data_dir: str = ""
    vocab_size: int = 64          # pcfg: terminal tokens (the separator adds one); bin: model vocabulary
    n_classes: int = 8
    grammar_seed: int = 0
    alphas: tuple = (0.0, 1.0)
    val_alpha: float = 0.0
    # ---- model (muonkern.models.GPT)
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    context: int = 64
    # ---- training: constant learning rates, no weight decay, same initialization and data order
    # for both optimizers of a seed
    steps: int = 150
    batch_size: int = 16
    muon_lr: float = 0.02         # Muon's hidden matrices
    muon_adamw_lr: float = 3e-3   # Muon's AdamW part (embeddings, head, norms)
    adamw_lr: float = 3e-3        # AdamW on every parameter
    momentum: float = 0.95
    betas: tuple = (0.9, 0.95)
    # ---- learning-rate sweep (before the main runs; chosen by final validation loss after
    # sweep_steps at alpha = val_alpha and seed sweep_seed, which is kept apart from the seeds)
    lr_sweep: bool = True
    sweep_steps: int = 100        # 0: the same as steps
    sweep_seed: int = 100
    sweep_adamw_lrs: tuple = (1e-3, 3e-3, 1e-2)
    sweep_muon_lrs: tuple = (0.01, 0.02, 0.05, 0.1)
    sweep_muon_adamw_lrs: tuple = ()  # empty: Muon's AdamW part takes the chosen AdamW lr
    # ---- validation and probes
    eval_every: int = 5
    val_batches: int = 4
    ladder_step: float = 0.1      # matched-loss levels are the multiples of ladder_step (nats)
    probe_every: int = 50         # periodic probes for the early/middle/late analysis
    probe_batch_size: int = 8
    probe_hvp_batch: int = 1      # HVPs per pass in a probe (muonkern.curvature batch_size; GPUs: 4-9)
    # exact probes: "rev_rev" (double backward HVPs), "fwd_rev" (forward-over-reverse HVPs) or "taylor"
    # (Taylor-mode forward passes, no HVP; the block matrices take G(G+1)/2 vectors per partition of
    # G groups against G HVPs, so for the study's two partitions the HVP methods are cheaper)
    probe_method: str = "rev_rev"
    # ---- stylized quadratic problem (E5): W of size quad_m x quad_n, quad_groups groups of
    # quad_group_size rank-one modes, curvature g^(-alpha_w) on group g, initial residual w^alpha_sigma
    # (alpha_sigma > 0 aligns the gradient further with the high-curvature modes)
    quad_m: int = 32
    quad_n: int = 48
    quad_groups: int = 8
    quad_group_size: int = 4
    quad_alpha_ws: tuple = (0.0, 0.5, 1.0, 2.0, 3.0)
    quad_alpha_sigmas: tuple = (0.0, 0.5, 1.0)
    quad_steps: int = 30
    quad_instances: int = 2
    quad_lr_min: float = 1e-5     # step sizes: log grid from quad_lr_min to quad_lr_max ...
    quad_lr_max: float = 10.0
    quad_lr_per_decade: int = 6   # ... with this many points per decade
    # ---- execution
    seeds: tuple = (0, 1)
    device: str = "cpu"
    checkpoint_every: int = 500   # snapshot of an unfinished run every so many steps (0: none)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def effective_sweep_steps(self) -> int:
        return self.sweep_steps or self.steps

    def run_identity(self) -> dict:
        """The fields that determine one training run (optimizer, alpha and seed aside)."""
        # the learning rates enter as the run's "lrs" (configured or chosen by the sweep); the HVP
        # method and batching change results only by rounding
        skip = {"alphas", "seeds", "device", "checkpoint_every", "probe_hvp_batch", "probe_method", "lr_sweep", "sweep_steps",
                "sweep_seed", "sweep_adamw_lrs", "sweep_muon_lrs", "sweep_muon_adamw_lrs", "muon_lr",
                "muon_adamw_lr", "adamw_lr"}
        return {"run_format": RUN_FORMAT,
                **{k: v for k, v in self.to_dict().items() if k not in skip and not k.startswith("quad_")}}

    def quadratic_identity(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k.startswith("quad_")}


PROBE_METHODS = ("rev_rev", "fwd_rev", "taylor")

# Part of every run's identity: raised where a run's data stream or its saved record changes for the
# same configuration, so that results and snapshots of earlier versions are not reused (2: window
# starts over [0, n - context), snapshots holding the ranks' mean losses).
RUN_FORMAT = 2

PRESETS = {
    # CPU, under 3 minutes on 2 cores end to end (CI runs it): a 2-layer GPT, two imbalance levels,
    # two seeds. The learning rates come from the sweep each time it runs.
    "tiny": StudyConfig(),
    # one H100, about 7.5 minutes: a 6-layer, d=384 GPT (11.0M parameters with vocabulary 513), all
    # four imbalance levels, two seeds, exact (math attention) probes. Sized from measurements on an
    # H100 (torch 2.11, pure-PyTorch ns5): ~48 ms per training step at batch 32x256 (fp32, evaluation
    # and data included), ~0.66 s per probe (14 exact HVPs at batch 16x256, 9 per pass).
    "small": StudyConfig(vocab_size=512, n_classes=16, n_layer=6, n_head=6, d_model=384, context=256,
                         steps=320, batch_size=32, alphas=(0.0, 0.5, 1.0, 1.5), seeds=(0, 1),
                         sweep_steps=150, sweep_adamw_lrs=(1e-4, 3e-4, 1e-3, 3e-3), sweep_muon_lrs=(0.01, 0.02, 0.04),
                         eval_every=20, val_batches=4, ladder_step=0.25, probe_every=100,
                         probe_batch_size=16, probe_hvp_batch=9, quad_m=48, quad_n=64, quad_groups=12,
                         quad_group_size=4, quad_alpha_ws=(0.0, 0.5, 1.0, 2.0, 3.0, 4.0), quad_steps=60,
                         quad_instances=2, device="cuda"),
    # GPT-2-small shape (12 layers, 12 heads, d=768; 91.7M parameters at vocabulary 4401, 124M
    # with GPT-2's 50257 tokens and tied embeddings) on the Zipf-PCFG language near the size
    # reported for the paper's generator (4412 tokens, 20 classes; 4400 here, which the 20 equal
    # classes divide), probes every 500 steps; for users with GPUs, not run here. `--set dataset=bin --set data_dir=...
    # --set vocab_size=50304` trains on tokenized real text instead (e.g. FineWeb in nanoGPT's format).
    "paper": StudyConfig(vocab_size=4400, n_classes=20, n_layer=12, n_head=12, d_model=768, context=1024,
                         steps=20000, batch_size=64, alphas=(0.0, 0.5, 1.0, 1.5), seeds=(0, 1, 2),
                         sweep_steps=2000, sweep_adamw_lrs=(3e-4, 6e-4, 1.2e-3),
                         sweep_muon_lrs=(0.01, 0.02, 0.04), eval_every=100, val_batches=16,
                         ladder_step=0.1, probe_every=500, probe_batch_size=16, probe_hvp_batch=4,
                         quad_m=128, quad_n=192,
                         quad_groups=32, quad_group_size=4, quad_alpha_ws=(0.0, 0.5, 1.0, 2.0, 3.0, 4.0),
                         quad_steps=200, quad_instances=8, quad_lr_per_decade=8, device="cuda"),
}


def _parse(current, value: str):
    if isinstance(current, bool):
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.lower() in ("1", "true", "yes")
    if isinstance(current, tuple):
        kind = type(current[0]) if current else float
        return tuple(kind(v) for v in value.split(",") if v)
    return type(current)(value)


def make_config(preset: str, overrides: list[str] = (), seeds: str | None = None,
                device: str | None = None) -> StudyConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = dataclasses.replace(PRESETS[preset])
    fields = {f.name for f in dataclasses.fields(StudyConfig)}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set expects key=value with key one of {sorted(fields)}, got {item!r}")
        try:
            setattr(cfg, key, _parse(getattr(cfg, key), value))
        except ValueError as err:
            raise ValueError(f"--set {item!r}: {err}") from err
    if seeds is not None:
        cfg.seeds = tuple(int(s) for s in seeds.split(",") if s)
    if device is not None:
        cfg.device = device
    check_config(cfg)
    return cfg


def check_config(cfg: StudyConfig) -> None:
    """Raises ValueError on settings the study cannot run; fixes alphas for datasets without them."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {cfg.dataset!r}")
    if cfg.dataset == "bin" and not cfg.data_dir:
        raise ValueError("dataset=bin needs --set data_dir=DIR (holding train.bin and val.bin)")
    if cfg.dataset != "pcfg":
        cfg.alphas = (0.0,)  # the imbalance exponent belongs to the synthetic language
    for name in ("steps", "batch_size", "eval_every", "val_batches", "probe_every", "probe_batch_size", "probe_hvp_batch",
                 "quad_steps", "quad_instances", "quad_groups", "quad_group_size", "quad_lr_per_decade"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.seeds:
        raise ValueError("at least one seed is needed")
    if not cfg.alphas or not all(0 <= a < math.inf for a in cfg.alphas) or len(set(cfg.alphas)) != len(cfg.alphas):
        raise ValueError(f"alphas must be distinct, finite and >= 0, got {cfg.alphas}")
    if not 0 <= cfg.val_alpha < math.inf:
        raise ValueError(f"val_alpha must be finite and >= 0, got {cfg.val_alpha}")
    if cfg.dataset == "pcfg":
        # the language's own checks, before any run builds it (vocab_size a multiple of n_classes)
        PCFGConfig(vocab_size=cfg.vocab_size, n_classes=cfg.n_classes, seed=cfg.grammar_seed)
    if cfg.probe_method not in PROBE_METHODS:
        raise ValueError(f"probe_method must be one of {PROBE_METHODS} (exact probes), got {cfg.probe_method!r}")
    if cfg.ladder_step <= 0:
        raise ValueError("ladder_step must be > 0")
    if cfg.lr_sweep and not (cfg.sweep_adamw_lrs and cfg.sweep_muon_lrs):
        raise ValueError("lr_sweep needs sweep_adamw_lrs and sweep_muon_lrs (or --set lr_sweep=false)")
    if cfg.quad_groups * cfg.quad_group_size > min(cfg.quad_m, cfg.quad_n):
        raise ValueError("quad_groups * quad_group_size must be <= min(quad_m, quad_n)")
    if not 0 < cfg.quad_lr_min < cfg.quad_lr_max:
        raise ValueError("need 0 < quad_lr_min < quad_lr_max")
