"""The GPU wrappers one metadata builder owns: a decode and a prefill wrapper per kernel key.

A kernel key is what a wrapper is specialised on besides the KV cache shape: query heads,
softmax scale and variant. Layers of one KV-cache group normally share one key; a group
whose layers differ (say, per-layer soft-cap) gets one wrapper pair per distinct key, all
planned on the same step layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...format import BSR, INDEX_DTYPE
from ...variants import Variant
from ..common import load_kernels
from .layout import StepLayout


@dataclass(frozen=True)
class KernelKey:
    num_qo_heads: int
    sm_scale: float
    variant: Variant


@dataclass(frozen=True)
class KernelLimits:
    """Sizes the wrappers are allocated for, from vLLM's scheduler and CUDA-graph settings."""

    max_decode_rows: int  # max_num_seqs, or the largest CUDA-graph batch if larger (padding)
    max_prefill_rows: int  # max_num_seqs
    max_prefill_tokens: int  # max_num_batched_tokens


@dataclass(frozen=True)
class CacheGeometry:
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype


class KernelSet:
    """One ``BatchDecode`` and one ``BatchPrefill``, created once and planned every step."""

    def __init__(self, key: KernelKey, cache: CacheGeometry, limits: KernelLimits, device: torch.device):
        BatchDecode, BatchPrefill = load_kernels()
        common = dict(dtype=cache.dtype, variant=key.variant, sm_scale=key.sm_scale, device=device)
        shape = (key.num_qo_heads, cache.num_kv_heads, cache.head_dim, cache.page_size)
        self.key = key
        self.cache = cache
        self.device = device
        self.decode = BatchDecode(*shape, max_batch_size=limits.max_decode_rows, **common)
        self.prefill = BatchPrefill(
            *shape,
            max_batch_size=limits.max_prefill_rows,
            max_num_tokens=limits.max_prefill_tokens,
            causal=True,
            **common,
        )

    def plan(self, layout: StepLayout) -> None:
        if layout.decode is not None:
            self.decode.plan(layout.decode)
        if layout.prefill is not None:
            self.prefill.plan(layout.prefill, num_tokens=layout.num_prefill_tokens,
                              num_kv_tokens=layout.num_prefill_kv_tokens)

    def warm_up(self) -> None:
        """Run both kernels once on a one-page scratch cache, so that JIT builds and module
        loads happen while vLLM starts, not inside a CUDA-graph capture or a first request."""
        cache, dev = self.cache, self.device
        k = torch.zeros(1, cache.page_size, cache.num_kv_heads, cache.head_dim, dtype=cache.dtype, device=dev)
        q = torch.zeros(1, self.key.num_qo_heads, cache.head_dim, dtype=cache.dtype, device=dev)
        rows = torch.tensor([0, 1], dtype=INDEX_DTYPE, device=dev)
        one_row = BSR(rows, rows[:1].clone(), rows[1:].clone(), rows, cache.page_size).validate()
        slopes = torch.ones(self.key.num_qo_heads, dtype=torch.float32, device=dev) if self.key.variant.alibi else None
        for wrapper in (self.decode, self.prefill):
            wrapper.plan(one_row)
            wrapper.run(q, k, k, alibi_slopes=slopes)
