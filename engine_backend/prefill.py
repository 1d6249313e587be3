"""Batch prefill / append attention: ragged queries over a paged BSR KV (or ragged new K/V).

Usage::

    pre = BatchPrefill(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16)
    pre.plan(BSR.from_block_table(block_table, seq_lens, 16, qo_indptr=query_start_loc))
    out = pre.run(q, k_cache, v_cache)

Query ``i`` of a request with ``q_len`` queries and ``kv_len`` keys sits at position
``kv_len - q_len + i``; with ``causal`` it sees keys up to that position (prefill when
``q_len == kv_len``, append/chunked prefill when the KV already holds a cached prefix).
Ragged K/V ``[tokens, H, D]``: ``BSR.from_ragged`` with ``k.unsqueeze(1)`` as the cache.

``plan`` launches a one-CTA kernel that lays out the query tiles (longest-running first), each
with its request's numbers, in a buffer this object owns; ``run`` launches one CTA per
(query tile, KV head) on a grid sized from the host-known token count, so it can be captured
in a CUDA graph and replayed for any batch of at most that many tokens.
"""

from __future__ import annotations

import math

import torch

from .cache import check_plan_input, check_run_inputs
from .decode import _cuda_device
from .format import BSR
from .kernels import dtype_params, jit
from .support import check_supported
from .variants import DEFAULT, Variant


DEFAULT_WARPS = 4  # 32 query rows per warp (16 at D=256); two such CTAs share an SM


def kernel_spec(dtype: torch.dtype, head_dim: int, variant: Variant, warps: int | None = None) -> jit.KernelSpec:
    params = dict(dtype_params(dtype), HEAD_DIM=head_dim, WARPS=warps or DEFAULT_WARPS, **variant.template_args())
    return jit.KernelSpec.make("prefill", ("prefill.cu", "prefill_ops.cpp"), params)


class BatchPrefill:
    def __init__(
        self,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        kv_dtype: torch.dtype | None = None,
        max_batch_size: int = 256,
        max_num_tokens: int = 16384,
        causal: bool = True,
        variant: Variant = DEFAULT,
        sm_scale: float | None = None,
        device: torch.device | str | None = None,
        warps: int | None = None,
    ):
        check_supported(
            num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
            kv_dtype=kv_dtype, page_size=page_size, variant=variant,
        )
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.page_size, self.dtype, self.variant, self.causal = page_size, dtype, variant, causal
        self.max_batch_size, self.max_num_tokens = max_batch_size, max_num_tokens
        self.sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
        if not self.sm_scale > 0:  # the kernel folds the scale into exp2 after a max of raw scores
            raise ValueError(f"sm_scale must be positive, got {self.sm_scale}")
        self.device = _cuda_device(device)
        self._ops = jit.load(kernel_spec(dtype, head_dim, variant, warps))
        self.group = num_qo_heads // num_kv_heads
        self.tile_rows = int(self._ops.tile_rows())
        self.max_tiles = self._tiles_bound(max_num_tokens, max_batch_size)
        plan_ints = 4 + 5 * self.max_tiles  # header, per-tile request records (int4) and indices
        self._plan = torch.zeros(plan_ints, dtype=torch.int32, device=self.device)
        self._indices: torch.Tensor | None = None
        self._rows = 0

    def _tiles_bound(self, tokens: int, rows: int) -> int:
        """Most query tiles ``tokens`` queries over ``rows`` requests can need (each request
        rounds its own last tile up)."""
        return -(-tokens * self.group // self.tile_rows) + rows

    def plan(self, kv: BSR) -> None:
        check_plan_input(kv, max_batch_size=self.max_batch_size, page_size=self.page_size, device=self.device)
        self._ops.plan(kv.qo_indptr, kv.indptr, kv.kv_lens, self._plan, self.max_batch_size, self.max_tiles, self.group)
        self._indices, self._rows = kv.indices, kv.num_rows

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        out: torch.Tensor | None = None,
        *,
        return_lse: bool = False,
        alibi_slopes: torch.Tensor | None = None,
    ):
        """Attention of the packed queries ``q [tokens, Hq, D]``; returns ``out`` (and ``lse``)."""
        if self._indices is None:
            raise RuntimeError("BatchPrefill.run() called before plan()")
        hq, d = self.num_qo_heads, self.head_dim
        tokens = q.shape[0]
        if tokens > self.max_num_tokens:
            raise ValueError(f"{tokens} query tokens exceed max_num_tokens={self.max_num_tokens}")
        out, alibi = check_run_inputs(
            q, k_cache, v_cache, out, rows=tokens, heads=hq, kv_heads=self.num_kv_heads, head_dim=d,
            page_size=self.page_size, dtype=self.dtype, alibi=self.variant.alibi, alibi_slopes=alibi_slopes,
        )
        lse = torch.empty(tokens, hq, dtype=torch.float32, device=q.device) if return_lse else None
        launch_tiles = min(self._tiles_bound(tokens, self._rows), self.max_tiles)
        self._ops.run(
            q, k_cache, v_cache, self._indices, self._plan, out, lse, alibi,
            self.max_tiles, launch_tiles, self.page_size, self.causal, self.sm_scale,
            self.variant.logits_soft_cap, self.variant.window_left,
        )
        return (out, lse) if return_lse else out
