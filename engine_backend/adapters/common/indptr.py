"""Row pointers the per-step builders reuse instead of allocating: under CUDA graphs every tensor a
captured kernel reads must keep its address, and an allocation per step is a launch per step."""

from __future__ import annotations

import torch

from ...format import INDEX_DTYPE


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


def rebased(indptr: torch.Tensor, origin: int) -> torch.Tensor:
    """``indptr - origin`` as int32 (``origin`` a host int: no device sync): the row pointers of a
    slice of a batch's rows, which the BSR wants starting at 0."""
    out = indptr - origin if origin else indptr
    return out if out.dtype == INDEX_DTYPE else out.to(INDEX_DTYPE)
