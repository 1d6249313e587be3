"""An engine's query tensor as the kernels' ``[tokens, heads, head_dim]`` rows."""

from __future__ import annotations

import torch

from ...checks import rows_readable_in_place


def query_rows(q: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``q`` as ``[tokens, heads, head_dim]``: a view wherever the kernels can read it in place.

    SGLang hands attention a column slice of the fused QKV projection (token rows strided by the
    QKV width); a contiguous copy of it would be one more kernel per layer and step, so the slice is
    read where it lies and copied only where the kernels cannot read it (see
    ``checks.rows_readable_in_place``)."""
    rows = q.reshape(-1, heads, head_dim)  # a view when the head dim is contiguous
    return rows if rows_readable_in_place(rows) else rows.contiguous()
