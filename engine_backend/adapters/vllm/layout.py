"""vLLM's per-step batch description -> the decode and prefill BSRs the kernels plan on.

vLLM reorders every batch so that decodes (query length <= the builder's
``reorder_batch_threshold``, 1 here) come first; ``split_decodes_and_prefills`` finds the
boundary from the host copy of ``query_start_loc``. Then

* decode part: requests ``[0, D)``, one query token each, tokens ``[0, D)``;
* prefill part (prefills, chunked-prefill continuations, spec-decode verification):
  requests ``[D, R)``, tokens ``[D, T)`` with ``T = query_start_loc[R]``, query pointers
  rebased to 0.

Both parts are zero-copy views of vLLM's persistent block table (``BSR.from_block_table`` with
row pointers sliced from persistent aranges, so a CUDA-graph replay reads the table where it
lies and nothing is allocated per step). Counts come from the
host tensors vLLM already provides, so building a layout never waits for the GPU; the prefill
part's KV count (``seq_lens_cpu_upper_bound``, exact for prefill rows) picks its tile shape.
Padding: under full CUDA graphs vLLM pads a decode batch with requests of query length 0
and sequence length 0 (and as many padding tokens); they stay decode rows with nothing to
attend to. Padding tokens past ``query_start_loc[R]`` in a mixed batch belong to no row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from ...format import BSR
from ..common.faults import drop_kv
from ..common.indptr import StridedAranges, rebased

DECODE_QUERY_LEN = 1  # the builder's reorder_batch_threshold


@dataclass(frozen=True)
class StepLayout:
    num_decodes: int  # requests [0, num_decodes) are decodes
    num_prefills: int  # requests [num_decodes, num_decodes + num_prefills)
    num_decode_tokens: int  # tokens [0, num_decode_tokens)
    num_prefill_tokens: int  # tokens [num_decode_tokens, num_decode_tokens + num_prefill_tokens)
    num_prefill_kv_tokens: int | None  # KV tokens of the prefill rows (host count; None if vLLM gave none)
    decode: BSR | None  # None when there is no decode request
    prefill: BSR | None  # None when there is no prefill request

    @property
    def num_reqs(self) -> int:
        return self.num_decodes + self.num_prefills

    @property
    def prefill_token_range(self) -> tuple[int, int]:
        return self.num_decode_tokens, self.num_decode_tokens + self.num_prefill_tokens

    @property
    def is_uniform_decode(self) -> bool:
        return self.num_prefills == 0


def step_layout(
    common: CommonAttentionMetadata,
    page_size: int,
    aranges: StridedAranges,
    dropped_kv_tokens: int = 0,
    pool_pages: int | None = None,
) -> StepLayout:
    """Split ``common`` into its decode and prefill BSRs (``dropped_kv_tokens``: see
    ``common.faults``). ``pool_pages``, the KV cache's page count, bounds the page ids the rows read
    wherever the BSRs' values are checked (see ``BSR.validate``)."""
    if common.causal is not True:  # a per-step override (drafters); never silently causal
        raise RuntimeError("engine_backend computes causal attention only; this step asks for non-causal")
    num_reqs = common.num_reqs
    num_decodes, _, num_decode_tokens, _ = split_decodes_and_prefills(common, decode_threshold=DECODE_QUERY_LEN)
    if num_decode_tokens != num_decodes:
        # Only zero-length requests ahead of a prefill could cause this; vLLM puts its
        # padding requests last, so this is a broken invariant, not a user error.
        raise RuntimeError(
            f"engine_backend: {num_decodes} decode requests carry {num_decode_tokens} tokens; "
            "expected exactly one query token per decode request"
        )
    qsl_cpu = common.query_start_loc_cpu
    num_prefill_tokens = int(qsl_cpu[num_reqs]) - int(qsl_cpu[num_decodes])
    kv_lens = drop_kv(common.seq_lens[:num_reqs], dropped_kv_tokens)
    table = common.block_table_tensor[:num_reqs]
    host_seq_lens = common.seq_lens_cpu_upper_bound  # the device seq_lens would need a sync
    num_prefill_kv_tokens = None
    if host_seq_lens is not None:
        num_prefill_kv_tokens = int(drop_kv(host_seq_lens[num_decodes:num_reqs], dropped_kv_tokens).sum())

    def table_rows(rows: slice, qo_indptr: torch.Tensor) -> BSR:
        part = table[rows]
        return BSR.from_block_table(
            part,
            kv_lens[rows],
            page_size,
            qo_indptr,
            indptr=aranges.get(part.shape[0], part.shape[1]),
            num_pages=pool_pages,
        )

    decode = None
    if num_decodes:
        decode = table_rows(slice(0, num_decodes), aranges.get(num_decodes, 1))
    prefill = None
    if num_reqs > num_decodes:
        qo_indptr = rebased(common.query_start_loc[num_decodes : num_reqs + 1], int(qsl_cpu[num_decodes]))
        prefill = table_rows(slice(num_decodes, num_reqs), qo_indptr)
    return StepLayout(
        num_decodes=num_decodes,
        num_prefills=num_reqs - num_decodes,
        num_decode_tokens=num_decode_tokens,
        num_prefill_tokens=num_prefill_tokens,
        num_prefill_kv_tokens=num_prefill_kv_tokens,
        decode=decode,
        prefill=prefill,
    )
