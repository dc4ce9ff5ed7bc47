"""The Muon-vs-AdamW curvature study: `python -m muonkern.study --preset tiny`."""
from .config import PRESETS, StudyConfig, make_config
from .report import write_report
from .run import run_study, train_and_probe

__all__ = ["PRESETS", "StudyConfig", "make_config", "run_study", "train_and_probe", "write_report"]
