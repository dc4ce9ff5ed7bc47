"""Data for the Muon-vs-Adam study: the synthetic Zipf-PCFG language (``zipf_pcfg``), real English
text, byte-level (``text``), and the user's own token files in nanoGPT's format (``tokens``)."""
from .text import ByteCorpus, load_shakespeare
from .tokens import TokenFiles, write_tokens
from .zipf_pcfg import PCFGConfig, ZipfPCFG, stats, zipf_probs

__all__ = ["ByteCorpus", "PCFGConfig", "TokenFiles", "ZipfPCFG", "load_shakespeare", "stats", "write_tokens",
           "zipf_probs"]
