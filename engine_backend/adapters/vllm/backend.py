"""The attention backend class vLLM selects for ``--attention-backend CUSTOM``.

What it declares, and why:

* KV cache ``(2, num_blocks, block_size, num_kv_heads, head_size)``, K at index 0 and V at
  index 1, physically in that order. ``kv_cache[0]`` / ``kv_cache[1]`` are the
  ``[pages, page_size, heads, dim]`` views the kernels read (any strides, so the layout
  vLLM re-strides for hybrid models works too).
* Block sizes: the kernels' page sizes from 16 up (16 ... 256). vLLM splits a larger manager
  block into kernel blocks of the largest listed size dividing it. Smaller pages are left out
  on purpose: vLLM gives sliding-window layers the *smallest* listed kernel block, and a
  one-token page would make a sliding-window-only model run with 1-token blocks.
* CUDA graphs: ``UNIFORM_SINGLE_TOKEN_DECODE`` (see ``builder``).
* The KV-cache write is a separate step (``forward_includes_kv_cache_update = False``):
  vLLM 0.26 calls ``impl.do_kv_cache_update`` with this layer's slot mapping first.

Configurations the kernels cannot run are refused in ``validate_configuration``, which
vLLM calls when the user selects this backend, with reasons that name what is supported.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionType

from ...support import HEAD_DIMS, PAGE_SIZES, SUPPORTED, check_supported

VLLM_BLOCK_SIZES = tuple(size for size in PAGE_SIZES if size >= 16)
BACKEND_NAME = "CUSTOM"  # vLLM maps get_name() back to AttentionBackendEnum[name]
MIN_COMPUTE_CAPABILITY = (8, 0)
# The only kv-cache-dtype strings that mean "unquantized"; float16/bfloat16 must also equal
# the model dtype, which check_supported verifies.
KV_CACHE_DTYPES = ["auto", "float16", "bfloat16"]
_CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

CAPABILITIES = (
    "decoder self-attention with causal masking; optional sliding window, logits soft-cap and "
    f"ALiBi; {SUPPORTED.describe()}; vLLM block sizes: multiples of 16 (kernel pages "
    f"{list(VLLM_BLOCK_SIZES)}); --kv-cache-dtype auto (no FP8 or other quantized KV cache); "
    f"compute capability >= {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]}. "
    "Not supported: MLA, sparse attention, encoder, encoder-only and cross-attention, "
    "attention sinks, non-causal or multimodal-prefix attention, per-head quantization "
    "scales, batch invariance, KV connectors, prefill/decode context parallelism"
)


def split_kv(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) ``[pages, page_size, kv_heads, head_size]`` views of one layer's cache."""
    return kv_cache[0], kv_cache[1]


def kv_cache_torch_dtype(kv_cache_dtype: str | None, model_dtype: torch.dtype):
    """The torch dtype of an unquantized KV cache, or the string itself if quantized."""
    if kv_cache_dtype in (None, "auto"):
        return model_dtype
    return _CACHE_DTYPES.get(kv_cache_dtype, kv_cache_dtype)


class EngineBackendAttentionBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = list(SUPPORTED.dtypes)
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KV_CACHE_DTYPES)
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        from .impl import EngineBackendAttentionImpl

        return EngineBackendAttentionImpl

    @staticmethod
    def get_builder_cls():
        from .builder import EngineBackendMetadataBuilder

        return EngineBackendMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int]:
        return list(VLLM_BLOCK_SIZES)

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        if block_size not in VLLM_BLOCK_SIZES:
            raise ValueError(f"engine_backend: block size {block_size} is not one of {list(VLLM_BLOCK_SIZES)}")
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        # Physical order = logical order. With a leading layers dimension the blocks are not
        # outermost either, so vLLM's indexes_kv_by_block_stride() is (truthfully) False.
        return tuple(range(6 if include_num_layers_dimension else 5))

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(HEAD_DIMS)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False  # not validated with any connector's layout assumptions

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return (capability.major, capability.minor) >= MIN_COMPUTE_CAPABILITY

    @classmethod
    def supports_combination(
        cls,
        head_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: str | None,
        block_size: int | None,
        use_mla: bool,
        has_sink: bool,
        use_sparse: bool,
        use_mm_prefix: bool,
        device_capability,
    ) -> str | None:
        """The kernels' own verdict on head size and dtypes, worded by ``check_supported``.
        (Block size is not checked here: vLLM picks a kernel block size from our list.)"""
        try:
            check_supported(
                num_qo_heads=1,
                num_kv_heads=1,
                head_dim=head_size,
                dtype=dtype,
                kv_dtype=kv_cache_torch_dtype(kv_cache_dtype, dtype),
            )
        except (ValueError, TypeError) as exc:
            return str(exc)
        return None

    @classmethod
    def validate_configuration(cls, *args, **kwargs) -> list[str]:
        """vLLM's checks (driven by the ``supports_*`` answers above), plus, when any fails,
        one reason that states everything this backend supports."""
        reasons = super().validate_configuration(*args, **kwargs)
        if reasons:
            reasons.append(f"engine_backend supports: {CAPABILITIES}")
        return reasons
