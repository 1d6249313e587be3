"""An engine's per-layer attention options as a ``Variant``."""

from __future__ import annotations

from ...variants import Variant


def variant_for(
    *,
    window_left: int | None = None,
    logits_soft_cap: float | None = None,
    alibi: bool = False,
) -> Variant:
    """A ``Variant`` from engine options where None / 0 / negative mean "off" (both engines spell
    "no soft-cap" as 0 or None and "no window" as -1 or None). ``window_left`` means what
    ``Variant.window_left`` means; each adapter converts its engine's window to it."""
    return Variant(
        logits_soft_cap=float(logits_soft_cap) if logits_soft_cap and logits_soft_cap > 0 else 0.0,
        window_left=int(window_left) if window_left is not None and window_left >= 0 else -1,
        alibi=bool(alibi),
    )
