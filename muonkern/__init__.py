"""muonkern: kernels for Muon-style optimizers.

`torch.ops.muonkern.ns5` (or `muonkern.ns5`) orthogonalizes batches of matrices with the quintic
Newton-Schulz iteration: our CUDA kernels on NVIDIA GPUs, C++ on CPU, pure PyTorch elsewhere.
"""
from .ops import backend, dirquad, ns5, ns5_grouped

__version__ = "0.1.0"
__all__ = ["backend", "dirquad", "ns5", "ns5_grouped", "__version__"]
