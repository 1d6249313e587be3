"""SGLang's token table -> BSR on the GPU in one kernel launch: ``BSR.from_token_table``'s device path.

The SGLang adapter builds this layout every step, before every decode CUDA-graph replay. Written
as torch ops (``format.BSR.from_token_table``'s CPU path) it takes some 35 small launches, each
with its dispatcher time on the host: about 0.6 ms of host time per step for the layout and the
plan together on the H200 (``benchmarks/bench_extend.py``), where SGLang's ``triton`` backend
spends a few launches. The kernel (``kernels/csrc/token_table.cu``) gives the same arrays, bit for
bit (tests/test_format.py compares the two), and never synchronizes with the host.
"""

from __future__ import annotations

import torch

from .kernels import jit, specs


def applies(req_to_token: torch.Tensor) -> bool:
    """Whether the device path takes this table: an int32 CUDA table, contiguous along its tokens
    (SGLang's ``req_to_token``); anything else goes through the torch ops."""
    return (req_to_token.is_cuda and req_to_token.dtype == torch.int32 and req_to_token.shape[1] > 0
            and req_to_token.stride(1) == 1)


def build(
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    indices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill ``indices`` (int32, its whole length) with the page ids; return (indptr, kv_lens)."""
    rows = req_indices.shape[0]
    device = req_to_token.device
    indptr = torch.empty(rows + 1, dtype=torch.int32, device=device)
    kv_lens = torch.empty(rows, dtype=torch.int32, device=device)
    ops = jit.load(specs.token_table_spec())
    ops.build(req_to_token, req_indices.contiguous(), seq_lens.contiguous(), page_size, indptr, indices, kv_lens)
    return indptr, kv_lens
