"""Synthetic data for the Muon-vs-Adam study: the Zipf-PCFG language (see ``zipf_pcfg``)."""
from .zipf_pcfg import PCFGConfig, ZipfPCFG, stats, zipf_probs

__all__ = ["PCFGConfig", "ZipfPCFG", "stats", "zipf_probs"]
