"""The KV cache this backend asks vLLM for, and how the kernels read it.

* Layout ``(2, num_blocks, block_size, num_kv_heads, head_size)``, K at index 0 and V at index 1,
  physically in that order. ``kv_cache[0]`` / ``kv_cache[1]`` are the
  ``[pages, page_size, heads, dim]`` views the kernels read (any strides, so the layout vLLM
  re-strides for hybrid models works too).
* Block sizes: the kernels' page sizes from 16 up. vLLM splits a larger manager block into kernel
  blocks of the largest listed size dividing it. Smaller pages are left out on purpose: vLLM gives
  sliding-window layers the *smallest* listed kernel block, and a one-token page would make a
  sliding-window-only model run with 1-token blocks.
* Dtype: unquantized, the model's own (``--kv-cache-dtype auto``, or float16 / bfloat16 equal to
  the model dtype, which ``check_supported`` verifies).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ...support import PAGE_SIZES

VLLM_BLOCK_SIZES = tuple(size for size in PAGE_SIZES if size >= 16)
# The only kv-cache-dtype strings that mean "unquantized"; float16/bfloat16 must also equal the
# model dtype, which check_supported verifies.
KV_CACHE_DTYPES = ["auto", "float16", "bfloat16"]
_CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
    if block_size not in VLLM_BLOCK_SIZES:
        raise ValueError(f"engine_backend: block size {block_size} is not one of {list(VLLM_BLOCK_SIZES)}")
    return (2, num_blocks, block_size, num_kv_heads, head_size)


def split_kv(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) ``[pages, page_size, kv_heads, head_size]`` views of one layer's cache."""
    return kv_cache[0], kv_cache[1]


def kv_cache_torch_dtype(kv_cache_dtype: str | None, model_dtype: torch.dtype):
    """The torch dtype of an unquantized KV cache, or the string itself if quantized."""
    if kv_cache_dtype in (None, "auto"):
        return model_dtype
    return _CACHE_DTYPES.get(kv_cache_dtype, kv_cache_dtype)


def bound_pages(layers: Iterable) -> int | None:
    """KV pages of the cache vLLM bound to ``layers`` (``layer.kv_cache``, one tensor of the layout
    above per layer, every layer of a KV-cache group with the same block count), or None while
    none is bound: vLLM binds the caches after it has built the metadata builders."""
    for layer in layers:
        cache = getattr(layer, "kv_cache", None)
        if isinstance(cache, torch.Tensor) and cache.dim() == 5:
            return cache.shape[1]
    return None
