"""The attention backend class vLLM selects for ``--attention-backend CUSTOM``.

What it declares, and why:

* KV cache ``(2, num_blocks, block_size, num_kv_heads, head_size)`` in block sizes from 16 up
  (see ``kv_cache``).
* CUDA graphs: ``UNIFORM_SINGLE_TOKEN_DECODE`` (see ``builder``).
* The KV-cache write is a separate step (``forward_includes_kv_cache_update = False``):
  vLLM 0.26 calls ``impl.do_kv_cache_update`` with this layer's slot mapping first.

Configurations the kernels cannot run are refused in ``validate_configuration``, which
vLLM calls when the user selects this backend, with reasons that name what is supported
(``capabilities``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionType

from ...support import HEAD_DIMS, SUPPORTED, check_supported
from .builder import EngineBackendMetadataBuilder
from .capabilities import CAPABILITIES, MIN_COMPUTE_CAPABILITY
from .impl import EngineBackendAttentionImpl
from .kv_cache import KV_CACHE_DTYPES, VLLM_BLOCK_SIZES, kv_cache_shape, kv_cache_torch_dtype

BACKEND_NAME = "CUSTOM"  # vLLM maps get_name() back to AttentionBackendEnum[name]


class EngineBackendAttentionBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = list(SUPPORTED.dtypes)
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KV_CACHE_DTYPES)
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        return EngineBackendAttentionImpl

    @staticmethod
    def get_builder_cls():
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
        return kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)

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
