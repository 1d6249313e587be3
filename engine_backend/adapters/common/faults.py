"""The deliberate fault end-to-end checks switch on to prove they can fail.

A comparison that never fails proves nothing, so the engines' end-to-end checks
(``e2e/vllm_attention_check.py``, ``e2e/sglang_attention_check.py``) also run the backend with
``ENGINE_BACKEND_FAULT=drop_last_kv`` and require that run to FAIL. ``drop_last_kv`` makes every
request attend to one KV token fewer than it has (its newest token is left out, which also shifts
the causal alignment by one): the off-by-one an index-translation bug would cause.

Off unless the variable is set. Each adapter reads it once, when its backend is built; an unknown
name is an error and an active fault is logged as a warning, so it never switches on silently.
"""

from __future__ import annotations

import os

import torch

from ...log import logger

FAULT_ENV = "ENGINE_BACKEND_FAULT"
DROP_LAST_KV = "drop_last_kv"
KNOWN_FAULTS = (DROP_LAST_KV,)


def dropped_kv_tokens() -> int:
    """KV tokens every request loses under the fault ``FAULT_ENV`` names (0 when none is set)."""
    fault = os.environ.get(FAULT_ENV, "").strip()
    if not fault:
        return 0
    if fault not in KNOWN_FAULTS:
        raise ValueError(f"{FAULT_ENV}={fault!r} is not a known fault; known: {list(KNOWN_FAULTS)}")
    logger().warning(
        "engine_backend: FAULT INJECTION %s=%s is active: attention output is wrong on purpose", FAULT_ENV, fault
    )
    return 1


def drop_kv(lens: torch.Tensor, dropped: int) -> torch.Tensor:
    """Per-request KV lengths ``lens`` shortened by ``dropped`` tokens, never below 0 (``lens`` itself
    when nothing is dropped). Host or device tensors alike; no device sync."""
    return (lens - dropped).clamp_(min=0) if dropped else lens
