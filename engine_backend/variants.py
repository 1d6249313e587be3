"""Attention variants: how a raw logit becomes the score that enters the softmax.

A variant is a compile-time property of a kernel (each distinct variant is its own JIT
specialization), so it is a frozen, hashable dataclass. Per-call data that a variant needs
(ALiBi slopes) is passed to ``run()``.

Order of operations for query position ``qp`` and key position ``kp`` (see ``format.BSR``
for positions), head ``h``:

1. ``s = sm_scale * dot(q, k)``
2. soft-cap (``logits_soft_cap > 0``): ``s = cap * tanh(s / cap)``
3. ALiBi (``alibi``): ``s += slope[h] * (kp - qp)``
4. masks: causal keeps ``kp <= qp``; a sliding window (``window_left >= 0``) keeps
   ``qp - kp <= window_left``. Masked scores are ``-inf``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    logits_soft_cap: float = 0.0  # 0 disables
    window_left: int = -1  # -1 disables
    alibi: bool = False

    def __post_init__(self):
        if self.logits_soft_cap < 0:
            raise ValueError(f"logits_soft_cap must be >= 0, got {self.logits_soft_cap}")
        if self.window_left < -1:
            raise ValueError(f"window_left must be -1 (off) or >= 0, got {self.window_left}")

    @property
    def is_default(self) -> bool:
        return self == DEFAULT

    def template_args(self) -> dict[str, str]:
        """Values substituted into the CUDA templates (see kernels/csrc/variant.cuh)."""
        return {
            "SOFT_CAP": "true" if self.logits_soft_cap > 0 else "false",
            "SLIDING_WINDOW": "true" if self.window_left >= 0 else "false",
            "ALIBI": "true" if self.alibi else "false",
        }


DEFAULT = Variant()
