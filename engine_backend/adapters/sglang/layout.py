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
batch's size and nothing syncs with the device. For CUDA graphs the page ids go into a
persistent buffer (``indices_out``), which is then the BSR's ``indices``: the captured kernels
keep reading its storage. ``pool_pages`` (the KV pool's page count, ``kv_pool_pages``) bounds
the page ids wherever the BSR's values are checked (debug mode, see ``BSR.validate``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ...format import BSR, lengths_to_indptr
from ..common.faults import drop_kv
from ..common.indptr import StridedAranges

DECODE_MODES = ("DECODE",)
EXTEND_MODES = ("EXTEND", "MIXED")


@dataclass(frozen=True)
class BatchLayout:
    """One step's attention layout and the host-side counts the launch code needs."""

    kv: BSR  # rows = requests; KV = the request's whole sequence in the pool
    num_rows: int
    num_query_tokens: int | None  # host count; None when SGLang gave no host mirror
    num_kv_tokens: int | None  # host count of the rows' KV tokens (seq_lens_cpu); None without the mirror
    num_listed_pages: int  # entries of kv.indices filled with page ids (kv.indptr[-1] or a bound)
    is_decode: bool


def max_pages_per_request(req_to_token: torch.Tensor, page_size: int) -> int:
    return -(-req_to_token.shape[1] // page_size)


def kv_pool_pages(kv_pool, page_size: int) -> int:
    """Pages the kernels can address in the pool's per-layer K/V buffers (see ``paged_kv_view``)."""
    return kv_pool.get_key_buffer(kv_pool.start_layer).shape[0] // page_size


def host_counts(
    seq_lens_cpu: torch.Tensor | None, rows: int, req_to_token: torch.Tensor, page_size: int, dropped_kv_tokens: int
) -> tuple[int, int | None]:
    """(pages the batch lists, KV tokens the kernels will see) from one pass over the host mirror. Pages: exact;
    without a mirror the table-width bound (correct, only slower: ``from_token_table`` zero-fills the unused
    tail). KV tokens (the prefill planner picks its tile shape by KV per request: a short extend onto a long
    cached prefix is long work): None without a mirror."""
    if seq_lens_cpu is None:
        return rows * max_pages_per_request(req_to_token, page_size), None
    lens = seq_lens_cpu[:rows].to(torch.int64)
    kv_tokens = drop_kv(lens, dropped_kv_tokens).sum()
    return int(((lens + page_size - 1) // page_size).sum()), int(kv_tokens)


def _request_bsr(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: torch.Tensor | None,
    page_size: int,
    qo_indptr: torch.Tensor | None,
    indices_out: torch.Tensor | None,
    dropped_kv_tokens: int,
    pool_pages: int | None,
) -> tuple[BSR, int, int | None]:
    """The rows' BSR, its listed page count and KV token count (see host_counts)."""
    rows = req_pool_indices.shape[0]
    num_listed_pages, num_kv_tokens = host_counts(seq_lens_cpu, rows, req_to_token, page_size, dropped_kv_tokens)
    if indices_out is not None and num_listed_pages > indices_out.shape[0]:
        raise ValueError(
            f"batch lists {num_listed_pages} KV pages but the persistent index buffer holds {indices_out.shape[0]}"
        )
    bsr = BSR.from_token_table(
        req_to_token, req_pool_indices, seq_lens, page_size=page_size, qo_indptr=qo_indptr,
        capacity=num_listed_pages, out=indices_out, num_pages=pool_pages,
    )
    if dropped_kv_tokens:  # common.faults: the rows keep their pages and read fewer of their tokens
        bsr = dataclasses.replace(bsr, kv_lens=drop_kv(bsr.kv_lens, dropped_kv_tokens)).validate(num_pages=pool_pages)
    return bsr, num_listed_pages, num_kv_tokens


def decode_layout(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: torch.Tensor | None,
    page_size: int,
    *,
    indices_out: torch.Tensor | None = None,
    dropped_kv_tokens: int = 0,
    aranges: StridedAranges | None = None,
    pool_pages: int | None = None,
) -> BatchLayout:
    """One query per request; ``seq_lens`` already counts the token being decoded. ``aranges``
    supplies ``qo_indptr = 0, 1, ..., B`` as a slice, where otherwise every step allocates it."""
    rows = req_pool_indices.shape[0]
    qo_indptr = aranges.get(rows, 1) if aranges is not None else None
    kv, num_listed_pages, num_kv_tokens = _request_bsr(
        req_to_token, req_pool_indices, seq_lens, seq_lens_cpu, page_size, qo_indptr, indices_out,
        dropped_kv_tokens, pool_pages,
    )
    return BatchLayout(kv=kv, num_rows=rows, num_query_tokens=rows, num_kv_tokens=num_kv_tokens,
                       num_listed_pages=num_listed_pages, is_decode=True)


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
    dropped_kv_tokens: int = 0,
    pool_pages: int | None = None,
) -> BatchLayout:
    """``extend_seq_lens[r]`` new queries per request, the last of its ``seq_lens[r]`` tokens."""
    qo_indptr = lengths_to_indptr(extend_seq_lens)
    kv, num_listed_pages, num_kv_tokens = _request_bsr(
        req_to_token, req_pool_indices, seq_lens, seq_lens_cpu, page_size, qo_indptr, indices_out,
        dropped_kv_tokens, pool_pages,
    )
    rows = req_pool_indices.shape[0]
    return BatchLayout(kv=kv, num_rows=rows, num_query_tokens=num_query_tokens, num_kv_tokens=num_kv_tokens,
                       num_listed_pages=num_listed_pages, is_decode=False)


def mode_name(forward_batch) -> str:
    return getattr(forward_batch.forward_mode, "name", str(forward_batch.forward_mode))


def layout_from_forward_batch(
    forward_batch,
    req_to_token: torch.Tensor,
    page_size: int,
    *,
    indices_out: torch.Tensor | None = None,
    dropped_kv_tokens: int = 0,
    aranges: StridedAranges | None = None,
    pool_pages: int | None = None,
) -> BatchLayout:
    """Translate a ForwardBatch (or the graph runner's replay view of one, which carries the
    same decode fields) for a DECODE, EXTEND or MIXED step; other modes are refused.
    ``dropped_kv_tokens``: see ``common.faults``; ``pool_pages``: see the module docstring."""
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
            dropped_kv_tokens=dropped_kv_tokens,
            aranges=aranges,
            pool_pages=pool_pages,
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
            dropped_kv_tokens=dropped_kv_tokens,
            pool_pages=pool_pages,
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
