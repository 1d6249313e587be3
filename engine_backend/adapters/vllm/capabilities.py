"""What the vLLM backend supports, in the words every refusal uses."""

from __future__ import annotations

from ...support import SUPPORTED
from .kv_cache import VLLM_BLOCK_SIZES

MIN_COMPUTE_CAPABILITY = (8, 0)

CAPABILITIES = (
    "decoder self-attention with causal masking; optional sliding window, logits soft-cap and "
    f"ALiBi; {SUPPORTED.describe()}; vLLM block sizes: multiples of 16 (kernel pages "
    f"{list(VLLM_BLOCK_SIZES)}); --kv-cache-dtype auto (no FP8 or other quantized KV cache); "
    f"compute capability >= {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]}. "
    "Not supported: MLA, sparse attention, encoder, encoder-only and cross-attention, "
    "attention sinks, non-causal or multimodal-prefix attention, per-head quantization "
    "scales, batch invariance, KV connectors, prefill/decode context parallelism"
)


def refuse(what: str) -> ValueError:
    """The error for a configuration the kernels cannot run: names it, then everything supported."""
    return ValueError(f"engine_backend does not support {what}. It supports: {CAPABILITIES}.")
