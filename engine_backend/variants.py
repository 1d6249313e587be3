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

from .checks import as_finite, as_int


@dataclass(frozen=True)
class Variant:
    logits_soft_cap: float = 0.0  # 0 disables
    window_left: int = -1  # -1 disables
    alibi: bool = False

    def __post_init__(self):
        # Normalised to float / int / bool so equal variants hash equal (one JIT specialization each).
        cap = as_finite("logits_soft_cap", self.logits_soft_cap, minimum=0.0)
        window = as_int("window_left", self.window_left)
        if window < -1:
            raise ValueError(f"window_left must be -1 (off) or >= 0, got {window}")
        if isinstance(self.alibi, (float, str)) or self.alibi not in (True, False):
            raise ValueError(f"alibi must be a bool, got {self.alibi!r} ({type(self.alibi).__name__})")
        object.__setattr__(self, "logits_soft_cap", cap)
        object.__setattr__(self, "window_left", window)
        object.__setattr__(self, "alibi", bool(self.alibi))

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
