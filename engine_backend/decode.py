"""Batch decode attention over a paged BSR KV cache (one query token per request).

Usage (the plan/run split)::

    dec = BatchDecode(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16)
    dec.plan(BSR.from_block_table(block_table, seq_lens, 16))   # once per step
    out = dec.run(q, k_cache, v_cache)                          # once per layer

``plan`` launches a one-CTA planning kernel that reads the lengths on the device and writes
the work split into buffers this object owns (see ``kernels/csrc/decode/planner.cuh`` for the
cost model): it never waits for the device, costs one launch, and can run ahead of a CUDA-graph
replay. ``run`` launches the attention kernel on a fixed grid and reads only those buffers,
the BSR ``indices`` and the tensors passed to it, so one captured graph serves every batch up
to ``max_batch_size`` (the row count is read from the plan on the device).

The grid holds as many CTAs per SM as fit (two for head dims up to 128), except for batches of
at most ``SMALL_BATCH`` requests, which get one CTA per SM: one is faster for a few long
requests and two for many requests, because a CTA stops streaming at each request boundary to
merge its warps' states and a second CTA on the SM streams meanwhile. ``plan`` picks the grid
from the batch and ``run`` launches it. The choice only ever shrinks with the batch, so a graph
captured at a batch size launches a grid at least as large as any batch up to that size plans
for (a plan's CTAs beyond the grid would be missing; CTAs beyond the plan exit at once).
``ctas_per_sm`` fixes the CTAs per SM for every batch instead.
"""

from __future__ import annotations

import torch

from .checks import check_plan_input, check_run_inputs, cuda_device, wrapper_args
from .format import BSR
from .kernels import jit, specs
from .support import check_supported
from .variants import DEFAULT, Variant

HEAD_TILE = 16  # query heads of one KV head computed together (the MMA's rows)
REQUEST_OVERHEAD = 32  # cost of a request beyond its KV tokens, in tokens (see kernels/csrc/decode/planner.cuh)
SMALL_BATCH = 16  # batches up to this many requests run one CTA per SM (see the module docstring)


class BatchDecode:
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
        variant: Variant = DEFAULT,
        sm_scale: float | None = None,
        ctas_per_sm: int | None = None,
        device: torch.device | str | None = None,
    ):
        check_supported(
            num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
            kv_dtype=kv_dtype, page_size=page_size, variant=variant,
        )
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.page_size, self.dtype, self.variant = page_size, dtype, variant
        self.max_batch_size = max_batch_size
        self.sm_scale = wrapper_args(sm_scale=sm_scale, head_dim=head_dim, max_batch_size=max_batch_size,
                                     ctas_per_sm=ctas_per_sm)
        self.device = cuda_device(device)
        self._ops = jit.load(specs.decode_spec(dtype, head_dim, variant))
        self.head_tiles = -(-(num_qo_heads // num_kv_heads) // HEAD_TILE)
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        with torch.cuda.device(self.device):
            fit = max(1, int(self._ops.max_ctas_per_sm()))
        per_sm = fit if ctas_per_sm is None else ctas_per_sm
        if not 1 <= per_sm <= fit:
            raise ValueError(f"ctas_per_sm={ctas_per_sm}: this kernel fits 1 to {fit} CTAs per SM")
        tiles = num_kv_heads * self.head_tiles
        self.ctas = max(1, round(sms * per_sm / tiles))  # CTAs per head tile: the plan buffers' size
        self.small_batch_ctas = max(1, round(sms / tiles)) if ctas_per_sm is None else self.ctas
        self._grid_ctas = self.ctas  # the grid of the last plan
        self._alloc_buffers()
        self._indices: torch.Tensor | None = None
        self._rows = 0

    def _alloc_buffers(self) -> None:
        rows, ctas, tiles = self.max_batch_size, self.ctas, self.num_kv_heads * self.head_tiles
        plan_ints = int(self._ops.plan_ints(rows, ctas, tiles))  # the kernel's layout (decode/params.h)
        self._plan = torch.zeros(plan_ints, dtype=torch.int32, device=self.device)
        slots = rows + ctas  # every CTA boundary adds at most one piece
        self._work_o = torch.empty(slots, self.num_qo_heads, self.head_dim, dtype=torch.float32, device=self.device)
        self._work_lse = torch.empty(slots, self.num_qo_heads, dtype=torch.float32, device=self.device)

    def plan(self, kv: BSR) -> None:
        """Split the work of this batch; rows of ``kv`` are the decode requests."""
        check_plan_input(kv, max_batch_size=self.max_batch_size, page_size=self.page_size, device=self.device)
        window = self.variant.window_left
        tiles = self.num_kv_heads * self.head_tiles
        self._grid_ctas = self.small_batch_ctas if kv.num_rows <= SMALL_BATCH else self.ctas
        self._ops.plan(kv.indptr, kv.kv_lens, self._plan, self.max_batch_size, self.ctas, self._grid_ctas, tiles,
                       REQUEST_OVERHEAD, window)
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
        """Attention of ``q [rows, Hq, D]`` over the planned KV; returns ``out`` (and ``lse``)."""
        if self._indices is None:
            raise RuntimeError("BatchDecode.run() called before plan()")
        hq = self.num_qo_heads
        out, alibi = check_run_inputs(
            q, k_cache, v_cache, out, rows=self._rows, heads=hq, kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            page_size=self.page_size, dtype=self.dtype, alibi=self.variant.alibi, alibi_slopes=alibi_slopes,
            device=self.device,
        )
        lse = torch.empty(q.shape[0], hq, dtype=torch.float32, device=q.device) if return_lse else None
        self._ops.run(
            q, k_cache, v_cache, self._indices, self._plan, self._work_o, self._work_lse, out, lse,
            alibi, self.max_batch_size, self.ctas, self._grid_ctas, self.head_tiles,
            self.page_size, REQUEST_OVERHEAD, self.sm_scale, self.variant.logits_soft_cap, self.variant.window_left,
        )
        return (out, lse) if return_lse else out
