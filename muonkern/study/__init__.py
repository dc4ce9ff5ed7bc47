"""The Muon-vs-AdamW curvature study: `python -m muonkern.study --preset tiny`."""
from .config import PRESETS, StudyConfig, make_config
from .run import run_study
from .train import train_run

__all__ = ["PRESETS", "StudyConfig", "make_config", "run_study", "train_run"]
