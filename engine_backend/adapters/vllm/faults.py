"""Deliberate faults, for proving that an end-to-end check can fail.

``ENGINE_BACKEND_VLLM_FAULT=drop_last_kv_token`` makes every row attend to one KV token less
(its newest, which also shifts the causal alignment by one). Off unless the variable is set;
a loud warning is logged when it is on. Used by ``e2e/vllm_attention_check.py`` only.
"""

from __future__ import annotations

import logging
import os

FAULT_ENV = "ENGINE_BACKEND_VLLM_FAULT"
DROP_LAST_KV_TOKEN = "drop_last_kv_token"
KNOWN_FAULTS = (DROP_LAST_KV_TOKEN,)

logger = logging.getLogger(__name__)


def dropped_kv_tokens() -> int:
    """KV tokens each row loses under the active fault (0 when no fault is set)."""
    fault = os.environ.get(FAULT_ENV, "")
    if not fault:
        return 0
    if fault not in KNOWN_FAULTS:
        raise ValueError(f"{FAULT_ENV}={fault!r} is not a known fault; known: {list(KNOWN_FAULTS)}")
    logger.warning("engine_backend: fault %r is ON: attention results are deliberately wrong", fault)
    return 1
