"""Small models for the Muon-vs-Adam curvature study."""
from .gpt import (
    GPT,
    PRESETS,
    GPTConfig,
    GPTLoss,
    apply_rope,
    exact_attention,
    gpt_loss_fn,
    rope_cos_sin,
)

__all__ = ["GPT", "GPTConfig", "GPTLoss", "PRESETS", "apply_rope", "exact_attention", "gpt_loss_fn",
           "rope_cos_sin"]
