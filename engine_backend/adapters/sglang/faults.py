"""Deliberate, opt-in attention faults for end-to-end checks.

An end-to-end comparison that never fails proves nothing, so e2e/sglang_attention_check.py
also runs the backend with ``ENGINE_BACKEND_SGLANG_FAULT=drop_last_kv`` and requires that run
to FAIL. ``drop_last_kv`` makes every request attend to one KV token fewer than it has (its
newest token is left out), the off-by-one an index-translation bug would cause.

The variable is read once, when the backend is built, and a fault is logged loudly: it can
never switch on silently.
"""

from __future__ import annotations

import logging
import os

FAULT_ENV = "ENGINE_BACKEND_SGLANG_FAULT"
DROP_LAST_KV = "drop_last_kv"
FAULTS = (DROP_LAST_KV,)

logger = logging.getLogger(__name__)


def fault_from_env() -> str | None:
    """The requested fault, or None; an unknown name is an error, not a silent no-op."""
    value = os.environ.get(FAULT_ENV, "").strip()
    if not value:
        return None
    if value not in FAULTS:
        raise ValueError(f"{FAULT_ENV}={value!r} is not a known fault; known: {list(FAULTS)}")
    logger.warning(
        "engine_backend: FAULT INJECTION %s=%s is active; attention output is wrong on purpose", FAULT_ENV, value
    )
    return value
