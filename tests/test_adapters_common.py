"""Engine-agnostic adapter helpers (CPU): ``query_rows`` reads an engine's query in place where it can."""

from __future__ import annotations

import torch

from engine_backend.adapters.common import query_rows

HQ, HKV, D = 32, 8, 128


def fused_qkv(tokens: int) -> torch.Tensor:
    return torch.randn(tokens, (HQ + 2 * HKV) * D, dtype=torch.bfloat16)


def test_a_fused_qkv_column_slice_is_read_in_place():
    qkv = fused_qkv(5)
    q = qkv[:, : HQ * D]  # what SGLang's models hand attention: rows strided by the QKV width
    rows = query_rows(q, HQ, D)
    assert rows.data_ptr() == qkv.data_ptr()  # no copy
    assert rows.stride() == (qkv.shape[1], D, 1) and not rows.is_contiguous()
    assert torch.equal(rows, q.contiguous().view(-1, HQ, D))


def test_a_slice_off_16_byte_boundaries_is_copied():
    qkv = fused_qkv(3)
    q = qkv[:, 4 : 4 + HQ * D]  # 8 bytes in: 16-byte loads cannot read it
    rows = query_rows(q, HQ, D)
    assert rows.is_contiguous() and rows.data_ptr() != qkv.data_ptr()
    assert torch.equal(rows, q.contiguous().view(-1, HQ, D))


def test_contiguous_queries_pass_through_and_three_dim_ones_too():
    q = torch.randn(4, HQ * D, dtype=torch.float16)
    assert query_rows(q, HQ, D).data_ptr() == q.data_ptr()
    q3 = q.view(4, HQ, D)
    assert query_rows(q3, HQ, D).data_ptr() == q3.data_ptr()
