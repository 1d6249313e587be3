"""SGLang adapter, CPU: ForwardBatch -> BSR translation against SGLang 0.5.16's real objects.

Requests get their KV slots from SGLang's own token allocators (pages handed out round-robin,
so no request's pages are contiguous, and radix-cache hits share a first request's pages) and
are entered into a real ReqToTokenPool; batches are real ForwardBatch objects, and CUDA-graph
replay views come from SGLang's own buffer registry and ``build_replay_fb_view``. Every BSR
field is checked against values derived from the allocator's page grants, never from the
request table the translation reads.
"""

import os

import pytest

if os.environ.get("ENGINE_BACKEND_REQUIRE_SGLANG", "0") not in ("", "0"):
    import sglang  # noqa: F401  (the SGLang CI step: a missing SGLang must fail, never skip)
else:
    pytest.importorskip("sglang")

import torch

from engine_backend.adapters.common.indptr import StridedAranges
from engine_backend.adapters.sglang.backend import EngineBackendAttnBackend
from engine_backend.adapters.sglang.layout import kv_pool_pages, layout_from_forward_batch, paged_kv_view

import sglang_fixtures as fixtures
from reference_kernels import ReferenceKernels

pytestmark = pytest.mark.sglang

PAGE_SIZES = (1, 16)


def expected_bsr(requests, page_size, query_lens):
    """BSR fields from the allocator's grants: pages per request, in order."""
    pages = [r.pages[: -(-len(r.slots) // page_size)] for r in requests]
    counts = [len(p) for p in pages]
    indptr = [0]
    for c in counts:
        indptr.append(indptr[-1] + c)
    qo = [0]
    for n in query_lens:
        qo.append(qo[-1] + n)
    return dict(
        indptr=indptr,
        indices=[p for row in pages for p in row],
        kv_lens=[len(r.slots) for r in requests],
        qo_indptr=qo,
        num_listed_pages=indptr[-1],
    )


def assert_layout(layout, requests, page_size, query_lens, *, is_decode):
    want = expected_bsr(requests, page_size, query_lens)
    kv = layout.kv
    for name in ("indptr", "indices", "kv_lens", "qo_indptr"):
        assert getattr(kv, name).dtype == torch.int32, name
    assert kv.indptr.tolist() == want["indptr"]
    assert kv.indices[: want["num_listed_pages"]].tolist() == want["indices"]
    assert kv.kv_lens.tolist() == want["kv_lens"]
    assert kv.qo_indptr.tolist() == want["qo_indptr"]
    assert kv.page_size == page_size
    assert layout.num_rows == len(requests)
    assert layout.num_listed_pages == want["num_listed_pages"]
    assert layout.num_query_tokens == sum(query_lens)
    assert layout.num_kv_tokens == sum(want["kv_lens"])  # from the host mirror the batches carry
    assert layout.is_decode is is_decode


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_decode_batch_of_mixed_lengths(tmp_path, page_size):
    run = fixtures.runner(tmp_path, page_size=page_size)
    requests = fixtures.place_requests(run, [1, 17, 33, 100, 16])
    batch = fixtures.decode_batch(run, requests)
    layout = layout_from_forward_batch(batch, run.req_to_token_pool.req_to_token, page_size)
    assert_layout(layout, requests, page_size, [1] * len(requests), is_decode=True)
    assert layout.kv.indices.shape[0] == layout.num_listed_pages  # eager: sized exactly, no padding


def test_decode_query_pointers_are_slices_of_one_persistent_arange(tmp_path):
    """Before every decode graph replay: qo_indptr is sliced from the backend's arange, not allocated."""
    run = fixtures.runner(tmp_path, page_size=1)
    aranges = StridedAranges("cpu", initial_rows=8)
    table = run.req_to_token_pool.req_to_token
    layouts = []
    for lens in ([1, 17, 33], [5, 2]):
        requests = fixtures.place_requests(run, lens)
        layout = layout_from_forward_batch(fixtures.decode_batch(run, requests), table, 1, aranges=aranges)
        assert_layout(layout, requests, 1, [1] * len(requests), is_decode=True)
        layouts.append(layout)
    assert layouts[0].kv.qo_indptr.data_ptr() == layouts[1].kv.qo_indptr.data_ptr() == aranges.get(8, 1).data_ptr()


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_extend_with_cached_prefix_shared_between_requests(tmp_path, page_size):
    """A radix-cache hit: requests 1 and 2 reuse request 0's first 32 tokens (whole pages)
    and extend past them; request 0 is a fresh prefill."""
    run = fixtures.runner(tmp_path, page_size=page_size)
    shared_pages = 32 // page_size
    requests = fixtures.place_requests(run, [40, 64, 48], shared_prefix_pages=shared_pages)
    assert requests[1].slots[:32] == requests[0].slots[:32] == requests[2].slots[:32]
    extend = [40, 9, 16]
    batch = fixtures.extend_batch(run, requests, extend)
    layout = layout_from_forward_batch(batch, run.req_to_token_pool.req_to_token, page_size)
    assert_layout(layout, requests, page_size, extend, is_decode=False)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_mixed_batch_of_prefill_chunks_and_decodes(tmp_path, page_size):
    """MIXED (chunked prefill + decode): decode rows are extend rows of one token."""
    run = fixtures.runner(tmp_path, page_size=page_size)
    requests = fixtures.place_requests(run, [7, 30, 65, 129])
    extend = [7, 1, 1, 50]
    batch = fixtures.extend_batch(run, requests, extend, mixed=True)
    layout = layout_from_forward_batch(batch, run.req_to_token_pool.req_to_token, page_size)
    assert_layout(layout, requests, page_size, extend, is_decode=False)


def test_extend_plans_the_prefill_with_its_host_counts(tmp_path):
    """The prefill wrapper picks its tile shape from the host counts (on Hopper a short extend onto a long
    cached prefix runs the long-KV shape), so the adapter must hand over both."""
    run = fixtures.runner(tmp_path, page_size=16)
    backend = EngineBackendAttnBackend(run, kernel_factory=ReferenceKernels)
    requests = fixtures.place_requests(run, [300, 40])
    backend.init_forward_metadata(fixtures.extend_batch(run, requests, [8, 40]))
    kernels = backend.kernels_for(0)
    assert kernels.decode.plans == 0 and kernels.prefill.plans == 1
    assert kernels.prefill.planned is backend.layout.kv
    assert kernels.prefill.counts == {"num_tokens": 8 + 40, "num_kv_tokens": 300 + 40}


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_persistent_index_buffer_is_reused_in_place(tmp_path, page_size):
    """CUDA graphs read the page ids from one buffer: each step refills it, and the BSR
    handed to plan() must be that very storage, whatever the batch."""
    run = fixtures.runner(tmp_path, page_size=page_size)
    table = run.req_to_token_pool.req_to_token
    buffer = torch.full((4 * -(-table.shape[1] // page_size),), -7, dtype=torch.int32)
    big = fixtures.place_requests(run, [100, 90, 80])
    first = layout_from_forward_batch(fixtures.decode_batch(run, big), table, page_size, indices_out=buffer)
    assert first.kv.indices.data_ptr() == buffer.data_ptr()
    assert_layout(first, big, page_size, [1, 1, 1], is_decode=True)
    small = fixtures.place_requests(run, [3])
    second = layout_from_forward_batch(fixtures.decode_batch(run, small), table, page_size, indices_out=buffer)
    assert second.kv.indices.data_ptr() == buffer.data_ptr()
    assert_layout(second, small, page_size, [1], is_decode=True)


def test_persistent_index_buffer_overflow_is_an_error(tmp_path):
    run = fixtures.runner(tmp_path)
    requests = fixtures.place_requests(run, [50, 50])
    with pytest.raises(ValueError, match="persistent index buffer holds 64"):
        layout_from_forward_batch(
            fixtures.decode_batch(run, requests),
            run.req_to_token_pool.req_to_token,
            1,
            indices_out=torch.zeros(64, dtype=torch.int32),
        )


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_cuda_graph_replay_view_with_padded_slots(tmp_path, page_size):
    """The decode graph runner pads a batch of 3 to a captured size of 4: SGLang fills the
    padded slot with request-table row 0 and seq_len = the backend's fill value (1)."""
    run = fixtures.runner(tmp_path, page_size=page_size)
    table = run.req_to_token_pool.req_to_token
    requests = fixtures.place_requests(run, [5, 37, 18])
    graph_inputs = fixtures.DecodeGraphInputs(run, max_bs=8, seq_len_fill_value=1)
    view = graph_inputs.load(fixtures.decode_batch(run, requests), padded_bs=4)
    layout = layout_from_forward_batch(view, table, page_size)
    padding_row = fixtures.Request(row=0, slots=[int(table[0, 0])], pages=[int(table[0, 0]) // page_size])
    assert_layout(layout, requests + [padding_row], page_size, [1] * 4, is_decode=True)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_drop_last_kv_fault_shortens_every_row_by_one(tmp_path, page_size):
    run = fixtures.runner(tmp_path, page_size=page_size)
    requests = fixtures.place_requests(run, [1, 20, 33])
    batch = fixtures.extend_batch(run, requests, [1, 4, 33])
    table = run.req_to_token_pool.req_to_token
    honest = layout_from_forward_batch(batch, table, page_size)
    faulty = layout_from_forward_batch(batch, table, page_size, dropped_kv_tokens=1)
    assert faulty.kv.kv_lens.tolist() == [0, 19, 32]
    assert faulty.num_kv_tokens == 0 + 19 + 32
    for name in ("indptr", "indices", "qo_indptr"):
        assert torch.equal(getattr(faulty.kv, name), getattr(honest.kv, name)), name


def test_unsupported_forward_mode_is_refused(tmp_path):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    run = fixtures.runner(tmp_path)
    batch = fixtures.decode_batch(run, fixtures.place_requests(run, [4]))
    batch.forward_mode = ForwardMode.TARGET_VERIFY
    with pytest.raises(NotImplementedError, match="forward mode TARGET_VERIFY"):
        layout_from_forward_batch(batch, run.req_to_token_pool.req_to_token, 1)


# ------------------------------------------------------------------ debug mode: the pool's page count
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_pool_pages_are_what_the_kernels_can_address(tmp_path, page_size):
    run = fixtures.runner(tmp_path, page_size=page_size, num_slots=1024)
    pool = run.token_to_kv_pool
    pages = kv_pool_pages(pool, page_size)
    assert pages == paged_kv_view(pool.get_key_buffer(0), page_size).shape[0]
    assert pages == (1024 + page_size) // page_size  # SGLang's pool: `size` slots plus one page of padding


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_debug_mode_refuses_page_ids_past_the_pool(tmp_path, page_size, monkeypatch):
    """With ENGINE_BACKEND_DEBUG=1 (on CPU the values are checked anyway) a request-table entry past the KV
    pool is an error naming the pool's range, before any kernel would read outside the pool."""
    monkeypatch.setenv("ENGINE_BACKEND_DEBUG", "1")
    run = fixtures.runner(tmp_path, page_size=page_size, num_slots=1024)
    backend = EngineBackendAttnBackend(run, kernel_factory=ReferenceKernels)
    requests = fixtures.place_requests(run, [20, 40])
    backend.init_forward_metadata(fixtures.decode_batch(run, requests))  # within the pool: fine
    pages = backend.pool_pages
    stray = [pages * page_size + t for t in range(40)]  # the slots of the pages just past the pool
    run.req_to_token_pool.write((requests[1].row, slice(0, 40)), torch.tensor(stray, dtype=torch.int32))
    with pytest.raises(ValueError, match=rf"out of range \[0, {pages}\)"):
        backend.init_forward_metadata(fixtures.decode_batch(run, requests))


# ------------------------------------------------------------------ the KV pool's layout
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_paged_view_addresses_what_set_kv_buffer_wrote(tmp_path, page_size):
    """Slot s written by the pool's own set_kv_buffer is page s // P, offset s % P of the
    view the kernels read, and the view shares the pool's storage."""
    run = fixtures.runner(tmp_path, page_size=page_size)
    pool, layer = run.token_to_kv_pool, run.model[1]
    placed = fixtures.place_requests(run, [40, 21])
    slots = torch.tensor(placed[0].slots + placed[1].slots + [1000])  # distinct; 1000: never allocated
    assert len(set(slots.tolist())) == slots.shape[0]
    k = torch.randn(slots.shape[0], pool.head_num, pool.head_dim).to(pool.dtype)
    v = torch.randn_like(k)
    pool.set_kv_buffer(layer, slots, k, v)
    for buffer, written in ((pool.get_key_buffer(1), k), (pool.get_value_buffer(1), v)):
        view = paged_kv_view(buffer, page_size)
        assert view.data_ptr() == buffer.data_ptr()
        assert view.shape[1:] == (page_size, pool.head_num, pool.head_dim)
        assert torch.equal(view[slots // page_size, slots % page_size], written)
