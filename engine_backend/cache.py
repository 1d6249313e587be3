"""Checks of the KV cache tensors the kernels read in place.

Kernels see K and V as ``[num_pages, page_size, num_kv_heads, head_dim]`` with any strides
except a contiguous head dim, so every engine's layout is a view, never a copy:

* vLLM ``[2, num_blocks, block_size, H, D]``: ``kv_cache[0]``, ``kv_cache[1]``;
* FlashInfer-style ``[num_blocks, 2, block_size, H, D]``: ``kv_cache[:, 0]``, ``kv_cache[:, 1]``;
* SGLang per-layer ``[num_slots, H, D]``: ``buf.unsqueeze(1)`` (page size 1) or
  ``buf.view(-1, P, H, D)`` (page size P);
* ragged new K/V ``[tokens, H, D]``: ``k.unsqueeze(1)`` with ``BSR.from_ragged``.
"""

from __future__ import annotations

import torch


def check_paged(name: str, cache: torch.Tensor, page_size: int, num_kv_heads: int, head_dim: int, dtype) -> None:
    if cache.dim() != 4:
        raise ValueError(f"{name} must be [num_pages, page_size, num_kv_heads, head_dim], got shape {tuple(cache.shape)}")
    _, p, h, d = cache.shape
    if (p, h, d) != (page_size, num_kv_heads, head_dim):
        raise ValueError(
            f"{name} has (page_size, kv heads, head dim) = {(p, h, d)}, expected {(page_size, num_kv_heads, head_dim)}"
        )
    if cache.dtype != dtype:
        raise ValueError(f"{name} has dtype {cache.dtype}, expected {dtype}")
    if not cache.is_cuda:
        raise ValueError(f"{name} must be on a CUDA device")
    if cache.stride(3) != 1 or cache.data_ptr() % 16 or any(s % 8 for s in cache.stride()[:3]):
        raise ValueError(f"{name} must have a contiguous head dim and 16-byte aligned rows")


def check_rows(name: str, t: torch.Tensor, rows: int, heads: int, head_dim: int, dtype) -> None:
    """A packed [rows, heads, head_dim] query/output tensor."""
    if t.dim() != 3 or t.shape[1:] != (heads, head_dim) or t.shape[0] < rows:
        raise ValueError(f"{name} must be [>= {rows}, {heads}, {head_dim}], got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if not t.is_cuda or not rows_readable_in_place(t):
        raise ValueError(f"{name} must be a CUDA tensor with a contiguous, 16-byte aligned head dim")


def rows_readable_in_place(t: torch.Tensor) -> bool:
    """Whether the kernels can read a ``[rows, heads, head_dim]`` tensor as it is: head dim
    contiguous, rows and heads on 16-byte boundaries (16-byte loads). Other strides are free, so
    a column slice of a fused QKV projection needs no copy."""
    return t.stride(2) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0


def check_plan_input(kv, *, max_batch_size: int, page_size: int, device) -> None:
    """A BSR a wrapper can plan: within its batch capacity, page size and device."""
    if kv.num_rows > max_batch_size:
        raise ValueError(f"batch of {kv.num_rows} requests exceeds max_batch_size={max_batch_size}")
    if kv.page_size != page_size:
        raise ValueError(f"BSR page size {kv.page_size} differs from this wrapper's {page_size}")
    if kv.device != device:
        raise ValueError(f"BSR is on {kv.device}, the wrapper on {device}")


def check_run_inputs(q, k_cache, v_cache, out, *, rows: int, heads: int, kv_heads: int, head_dim: int,
                     page_size: int, dtype, alibi: bool, alibi_slopes):
    """Validate a run() call before any launch; returns ``out`` (allocated if None) and the
    ALiBi slopes the kernel should see (None unless the variant has ALiBi)."""
    check_rows("q", q, rows, heads, head_dim, dtype)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_paged(name, cache, page_size, kv_heads, head_dim, dtype)
    out = torch.empty_like(q) if out is None else out
    check_rows("out", out, max(rows, q.shape[0]), heads, head_dim, dtype)
    if not alibi:
        return out, None
    if alibi_slopes is None or alibi_slopes.shape != (heads,) or alibi_slopes.dtype != torch.float32:
        raise ValueError(f"this ALiBi variant needs alibi_slopes: float32 [{heads}]")
    return out, alibi_slopes
