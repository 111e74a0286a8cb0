"""``reference``: the float64 NumPy oracle as a backend, so tests and users can call it by name.

Exact but O(N^2) in memory and slow; ``auto`` takes it only as the last resort, when no other backend
can run a call (a numpy-only install), and warns once (``dispatch.LAST_RESORT``).
"""

from __future__ import annotations

import numpy as np

from .. import reference
from ..devices import probe
from ..spec import FEATURES
from .base import Backend, Capabilities, register


@register
class ReferenceBackend(Backend):
    name = "reference"
    summary = "any CPU: float64 NumPy with the full score matrix; the test oracle; auto takes it only when nothing else can run a call, with a warning"
    extra = None
    compute_kind = "numpy"
    capabilities = Capabilities(
        device_kinds=frozenset({"cpu"}),
        dtypes=frozenset({"float64", "float32", "float16", "bfloat16"}),
        max_head_dim=4096,
        features=frozenset(FEATURES),
        feature_notes={"dropout": "numpy's default_rng(seed) draws the (B, H, Nq, Nk) mask in one piece"},
        notes=("computes in float64 and materializes the N x N scores: memory grows as N^2",),
    )

    def device(self, spec):
        return probe.probe_cpu()

    def forward(self, q, k, v, spec, plan, extras):
        return reference.attention_forward(q, k, v, scale=spec.softmax_scale, spec=spec, extras=extras,
                                           keep=self._keep(spec, extras))

    def backward(self, grad_out, q, k, v, out, lse, spec, plan, extras):
        return reference.attention_backward(grad_out, q, k, v, scale=spec.softmax_scale, spec=spec, extras=extras,
                                            keep=self._keep(spec, extras))

    def _keep(self, spec, extras):
        return self.dropout_keep(spec, extras) if spec.dropout_p > 0 else None

    def dropout_keep(self, spec, extras):
        shape = (spec.batch, spec.heads, spec.seqlen_q, spec.seqlen_k)
        return np.random.default_rng(extras.dropout_seed).random(shape) >= spec.dropout_p
