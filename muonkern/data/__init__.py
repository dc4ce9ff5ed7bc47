"""Data for the Muon-vs-Adam study: the synthetic Zipf-PCFG language (``zipf_pcfg``) and real
English text, byte-level (``text``)."""
from .text import ByteCorpus, load_shakespeare
from .zipf_pcfg import PCFGConfig, ZipfPCFG, stats, zipf_probs

__all__ = ["ByteCorpus", "PCFGConfig", "ZipfPCFG", "load_shakespeare", "stats", "zipf_probs"]
