"""SGLang ForwardBatch -> ``BSR``: the whole metadata translation, pure torch.

SGLang keeps one table ``req_to_token[req_pool_idx, t]``: the KV slot of token ``t`` of a
request. Before attention runs, the backend writes the step's new K/V into the pool at
``out_cache_loc`` (which the scheduler has already entered into that table), so at attention
time every request's whole KV -- cached prefix and new tokens -- is in the pool. One BSR row per
request therefore covers ``seq_lens[r]`` tokens, and its queries are the newest ones:

* decode: one query per request, ``qo_indptr = [0, 1, ..., B]``;
* extend (prefill, chunked prefill, prefix-cache hits, MIXED batches): ``extend_seq_lens[r]``
  queries per request, the last ones of its ``seq_lens[r]`` KV tokens -- exactly the BSR's
  "queries are the newest tokens" convention, so the causal mask needs nothing else
  (``extend_prefix_lens = seq_lens - extend_seq_lens`` is implied).

Page ids come from ``BSR.from_token_table``. Its output size (``capacity``) is the exact page
count, computed on the host from SGLang's CPU mirror ``seq_lens_cpu``, so the gather costs the
batch's size and nothing syncs with the device. For CUDA graphs the indices are copied into a
persistent buffer (``indices_out``) whose storage the captured kernels keep reading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_backend.format import BSR, INDEX_DTYPE

from ..common import StridedAranges

DECODE_MODES = ("DECODE",)
EXTEND_MODES = ("EXTEND", "MIXED")


@dataclass(frozen=True)
class BatchLayout:
    """One step's attention layout and the host-side counts the launch code needs."""

    kv: BSR  # rows = requests; KV = the request's whole sequence in the pool
    num_rows: int
    num_query_tokens: int | None  # host count; None when SGLang gave no host mirror
    num_kv_tokens: int | None  # host count of the rows' KV tokens (seq_lens_cpu); None without the mirror
    num_pages: int  # entries of kv.indices filled with page ids (kv.indptr[-1] or a bound)
    is_decode: bool


def max_pages_per_request(req_to_token: torch.Tensor, page_size: int) -> int:
    return -(-req_to_token.shape[1] // page_size)


def host_counts(
    seq_lens_cpu: torch.Tensor | None, rows: int, req_to_token: torch.Tensor, page_size: int, drop_last_kv: bool
) -> tuple[int, int | None]:
    """(pages the batch lists, KV tokens the kernels will see) from one pass over the host mirror. Pages: exact;
    without a mirror the table-width bound (correct, only slower: ``from_token_table`` zero-fills the unused
    tail). KV tokens (the prefill planner picks its tile shape by KV per request: a short extend onto a long
    cached prefix is long work): None without a mirror."""
    if seq_lens_cpu is None:
        return rows * max_pages_per_request(req_to_token, page_size), None
    lens = seq_lens_cpu[:rows].to(torch.int64)
    kv_tokens = (lens - 1).clamp(min=0).sum() if drop_last_kv else lens.sum()
    return int(((lens + page_size - 1) // page_size).sum()), int(kv_tokens)


def _exclusive_cumsum(lens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lens.shape[0] + 1, dtype=INDEX_DTYPE, device=lens.device)
    torch.cumsum(lens.to(INDEX_DTYPE), dim=0, out=out[1:])
    return out


def _request_bsr(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: torch.Tensor | None,
    page_size: int,
    qo_indptr: torch.Tensor | None,
    indices_out: torch.Tensor | None,
    drop_last_kv: bool,
) -> tuple[BSR, int, int | None]:
    """The rows' BSR, its page count and KV token count (see host_counts)."""
    rows = req_pool_indices.shape[0]
    num_pages, num_kv_tokens = host_counts(seq_lens_cpu, rows, req_to_token, page_size, drop_last_kv)
    if indices_out is not None and num_pages > indices_out.shape[0]:
        raise ValueError(
            f"batch lists {num_pages} KV pages but the persistent index buffer holds {indices_out.shape[0]}"
        )
    bsr = BSR.from_token_table(
        req_to_token, req_pool_indices, seq_lens, page_size=page_size, qo_indptr=qo_indptr, capacity=num_pages,
        out=indices_out,
    )
    if indices_out is not None:  # the graphs read the whole persistent buffer, not the view of it
        bsr.indices = indices_out
    if drop_last_kv:  # faults.DROP_LAST_KV: leave each request's newest token out
        bsr = BSR(bsr.indptr, bsr.indices, (bsr.kv_lens - 1).clamp_(min=0), bsr.qo_indptr, page_size).validate()
    return bsr, num_pages, num_kv_tokens


def decode_layout(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: torch.Tensor | None,
    page_size: int,
    *,
    indices_out: torch.Tensor | None = None,
    drop_last_kv: bool = False,
    aranges: StridedAranges | None = None,
) -> BatchLayout:
    """One query per request; ``seq_lens`` already counts the token being decoded. ``aranges``
    supplies ``qo_indptr = 0, 1, ..., B`` as a slice, where otherwise every step allocates it."""
    rows = req_pool_indices.shape[0]
    qo_indptr = aranges.get(rows, 1) if aranges is not None else None
    kv, num_pages, num_kv_tokens = _request_bsr(
        req_to_token, req_pool_indices, seq_lens, seq_lens_cpu, page_size, qo_indptr, indices_out, drop_last_kv
    )
    return BatchLayout(kv=kv, num_rows=rows, num_query_tokens=rows, num_kv_tokens=num_kv_tokens, num_pages=num_pages,
                       is_decode=True)


def extend_layout(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    seq_lens_cpu: torch.Tensor | None,
    num_query_tokens: int | None,
    page_size: int,
    *,
    indices_out: torch.Tensor | None = None,
    drop_last_kv: bool = False,
) -> BatchLayout:
    """``extend_seq_lens[r]`` new queries per request, the last of its ``seq_lens[r]`` tokens."""
    qo_indptr = _exclusive_cumsum(extend_seq_lens)
    kv, num_pages, num_kv_tokens = _request_bsr(
        req_to_token, req_pool_indices, seq_lens, seq_lens_cpu, page_size, qo_indptr, indices_out, drop_last_kv
    )
    rows = req_pool_indices.shape[0]
    return BatchLayout(kv=kv, num_rows=rows, num_query_tokens=num_query_tokens, num_kv_tokens=num_kv_tokens,
                       num_pages=num_pages, is_decode=False)


def mode_name(forward_batch) -> str:
    return getattr(forward_batch.forward_mode, "name", str(forward_batch.forward_mode))


def layout_from_forward_batch(
    forward_batch,
    req_to_token: torch.Tensor,
    page_size: int,
    *,
    indices_out: torch.Tensor | None = None,
    drop_last_kv: bool = False,
    aranges: StridedAranges | None = None,
) -> BatchLayout:
    """Translate a ForwardBatch (or the graph runner's replay view of one, which carries the
    same decode fields) for a DECODE, EXTEND or MIXED step; other modes are refused."""
    mode = mode_name(forward_batch)
    bs = forward_batch.batch_size
    seq_lens_cpu = getattr(forward_batch, "seq_lens_cpu", None)
    if mode in DECODE_MODES:
        return decode_layout(
            req_to_token,
            forward_batch.req_pool_indices[:bs],
            forward_batch.seq_lens[:bs],
            seq_lens_cpu,
            page_size,
            indices_out=indices_out,
            drop_last_kv=drop_last_kv,
            aranges=aranges,
        )
    if mode in EXTEND_MODES:
        return extend_layout(
            req_to_token,
            forward_batch.req_pool_indices[:bs],
            forward_batch.seq_lens[:bs],
            forward_batch.extend_seq_lens[:bs],
            seq_lens_cpu,
            forward_batch.extend_num_tokens,
            page_size,
            indices_out=indices_out,
            drop_last_kv=drop_last_kv,
        )
    raise NotImplementedError(
        f"engine_backend does not support SGLang forward mode {mode} "
        f"(supported: {', '.join(DECODE_MODES + EXTEND_MODES)} and IDLE)"
    )


def paged_kv_view(buffer: torch.Tensor, page_size: int) -> torch.Tensor:
    """SGLang's per-layer K or V buffer ``[slots, H, D]`` as ``[pages, page_size, H, D]``,
    without copying: slot ``s`` is page ``s // page_size``, offset ``s % page_size`` (SGLang's
    paged allocator keeps a page's slots contiguous and aligned). A trailing partial page, if
    the pool's row count is not a multiple of the page size, is never addressed and is cut."""
    if page_size == 1:
        return buffer.unsqueeze(1)
    usable = buffer.shape[0] // page_size * page_size
    return buffer[:usable].view(-1, page_size, *buffer.shape[1:])
