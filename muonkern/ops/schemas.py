"""Schemas of the muonkern ops. csrc/ops.cpp defines the same strings in C++; a test checks they agree."""

NS5_SCHEMA = "ns5(Tensor G, int steps=5, float[]? coefficients=None, float eps=1e-07) -> Tensor"

SCHEMAS = {"ns5": NS5_SCHEMA}
