"""Schemas of the muonkern ops. csrc/ops.cpp defines the same strings in C++; a test checks they agree."""

NS5_SCHEMA = ('ns5(Tensor G, int steps=5, float[]? coefficients=None, float eps=1e-07, '
              'str algorithm="auto") -> Tensor')

# Per-parameter dot products of directional_quadratics: out[k, 0, p] = <g_p, u_kp>,
# out[k, 1, p] = <u_kp, u_kp>, out[k, 2 + r, p] = <u_kp, h_krp>, float64 (muonkern/ops/dirquad_args.py).
DIRQUAD_SCHEMA = "dirquad(Tensor[] grads, Tensor[] directions, Tensor[] products) -> Tensor"

SCHEMAS = {"ns5": NS5_SCHEMA, "dirquad": DIRQUAD_SCHEMA}
