"""Helpers every engine adapter shares: nothing here knows about vLLM or SGLang.

* ``StridedAranges``: persistent ``0, s, 2s, ...`` index tensors, sliced per step instead of
  allocated per step (no kernel launch, fixed storage under CUDA graphs).
* ``dense_table_bsr``: the zero-copy BSR of rows of a dense ``[rows, max_pages]`` page table.
* ``rebased``: an indptr slice shifted to start at 0.
* ``variant_for``: an engine's per-layer attention options as a ``Variant``.
* ``load_kernels``: the GPU wrapper classes, imported only when a step is first planned.
* ``query_rows``: an engine's query as ``[tokens, heads, head_dim]``, copied only where the kernels
  cannot read it in place.
"""

from __future__ import annotations

import torch

from ..cache import rows_readable_in_place
from ..format import BSR, INDEX_DTYPE
from ..variants import Variant


class StridedAranges:
    """``arange(0, (rows + 1) * stride, stride)`` as slices of one tensor per stride.

    A dense page table's row pointers are ``r * width`` and one-query-per-row ``qo_indptr``
    is ``r``; both are aranges. Each stride gets one int32 tensor on ``device``, grown (and
    then reallocated) only when a step needs more rows than any step before it.
    """

    def __init__(self, device: torch.device | str, initial_rows: int = 0):
        self.device = torch.device(device)
        self.initial_rows = initial_rows
        self._by_stride: dict[int, torch.Tensor] = {}

    def get(self, rows: int, stride: int) -> torch.Tensor:
        """int32 ``[rows + 1]``: ``0, stride, ..., rows * stride``."""
        cached = self._by_stride.get(stride)
        if cached is None or cached.shape[0] < rows + 1:
            capacity = max(rows, self.initial_rows, 2 * (cached.shape[0] - 1) if cached is not None else 0)
            cached = torch.arange(0, (capacity + 1) * stride, stride, dtype=INDEX_DTYPE, device=self.device)
            self._by_stride[stride] = cached
        return cached[: rows + 1]


def dense_table_bsr(
    table_rows: torch.Tensor,
    kv_lens: torch.Tensor,
    page_size: int,
    qo_indptr: torch.Tensor,
    aranges: StridedAranges,
) -> BSR:
    """BSR of consecutive rows of a dense page table (``table_rows[r, j]`` = j-th page of row r).

    Same layout as ``BSR.from_block_table`` (row r's pages start at ``r * width`` of the
    flattened rows), but zero-copy for an int32 contiguous slice and with ``indptr`` taken
    from ``aranges``: ``indices`` then aliases the engine's own table storage, which is what a
    CUDA graph replay reads.
    """
    if table_rows.dim() != 2:
        raise ValueError(f"page table rows must be 2-D [rows, pages], got {tuple(table_rows.shape)}")
    rows, width = table_rows.shape
    indices = table_rows if table_rows.dtype == INDEX_DTYPE else table_rows.to(INDEX_DTYPE)
    indices = indices.contiguous().view(-1)
    kv_lens = kv_lens if kv_lens.dtype == INDEX_DTYPE else kv_lens.to(INDEX_DTYPE)
    return BSR(aranges.get(rows, width), indices, kv_lens, qo_indptr, page_size).validate()


def rebased(indptr: torch.Tensor, origin: int) -> torch.Tensor:
    """``indptr - origin`` as int32 (``origin`` a host int: no device sync)."""
    out = indptr - origin if origin else indptr
    return out if out.dtype == INDEX_DTYPE else out.to(INDEX_DTYPE)


def variant_for(
    *,
    window_left: int | None = None,
    logits_soft_cap: float | None = None,
    alibi: bool = False,
) -> Variant:
    """A ``Variant`` from engine options where None / 0 / negative mean "off"."""
    return Variant(
        logits_soft_cap=float(logits_soft_cap) if logits_soft_cap and logits_soft_cap > 0 else 0.0,
        window_left=int(window_left) if window_left is not None and window_left >= 0 else -1,
        alibi=bool(alibi),
    )


def load_kernels():
    """``(BatchDecode, BatchPrefill)``, imported at first use so that selecting and
    configuring a backend never needs the GPU code (or a GPU)."""
    try:
        from ..decode import BatchDecode
        from ..prefill import BatchPrefill
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(f"engine_backend's GPU kernels are unavailable: {exc}") from exc
    return BatchDecode, BatchPrefill


def query_rows(q: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``q`` as ``[tokens, heads, head_dim]``: a view wherever the kernels can read it in place.

    SGLang hands attention a column slice of the fused QKV projection (token rows strided by the
    QKV width). Copying it to a contiguous tensor was one more kernel per layer and step (78 us
    per decode step at batch 32 on the H200, e2e/sglang_one_batch, where the step is ~7 ms)."""
    rows = q.reshape(-1, heads, head_dim)  # a view when the head dim is contiguous
    return rows if rows_readable_in_place(rows) else rows.contiguous()
