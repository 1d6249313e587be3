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

from engine_backend.adapters.sglang import testing
from engine_backend.adapters.sglang.layout import layout_from_forward_batch, paged_kv_view

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
        num_pages=indptr[-1],
    )


def assert_layout(layout, requests, page_size, query_lens, *, is_decode):
    want = expected_bsr(requests, page_size, query_lens)
    kv = layout.kv
    for name in ("indptr", "indices", "kv_lens", "qo_indptr"):
        assert getattr(kv, name).dtype == torch.int32, name
    assert kv.indptr.tolist() == want["indptr"]
    assert kv.indices[: want["num_pages"]].tolist() == want["indices"]
    assert kv.kv_lens.tolist() == want["kv_lens"]
    assert kv.qo_indptr.tolist() == want["qo_indptr"]
    assert kv.page_size == page_size
    assert layout.num_rows == len(requests)
    assert layout.num_pages == want["num_pages"]
    assert layout.num_query_tokens == sum(query_lens)
    assert layout.num_kv_tokens == sum(want["kv_lens"])  # from the host mirror the batches carry
    assert layout.is_decode is is_decode


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_decode_batch_of_mixed_lengths(tmp_path, page_size):
    run = testing.runner(tmp_path, page_size=page_size)
    requests = testing.place_requests(run, [1, 17, 33, 100, 16])
    batch = testing.decode_batch(run, requests)
    layout = layout_from_forward_batch(batch, run.req_to_token_pool.req_to_token, page_size)
    assert_layout(layout, requests, page_size, [1] * len(requests), is_decode=True)
    assert layout.kv.indices.shape[0] == layout.num_pages  # eager: sized exactly, no padding


def test_decode_query_pointers_are_slices_of_one_persistent_arange(tmp_path):
    """Before every decode graph replay: qo_indptr is sliced from the backend's arange, not allocated."""
    from engine_backend.adapters.common import StridedAranges

    run = testing.runner(tmp_path, page_size=1)
    aranges = StridedAranges("cpu", initial_rows=8)
    table = run.req_to_token_pool.req_to_token
    layouts = []
    for lens in ([1, 17, 33], [5, 2]):
        requests = testing.place_requests(run, lens)
        layout = layout_from_forward_batch(testing.decode_batch(run, requests), table, 1, aranges=aranges)
        assert_layout(layout, requests, 1, [1] * len(requests), is_decode=True)
        layouts.append(layout)
    assert layouts[0].kv.qo_indptr.data_ptr() == layouts[1].kv.qo_indptr.data_ptr() == aranges.get(8, 1).data_ptr()


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_extend_with_cached_prefix_shared_between_requests(tmp_path, page_size):
    """A radix-cache hit: requests 1 and 2 reuse request 0's first 32 tokens (whole pages)
    and extend past them; request 0 is a fresh prefill."""
    run = testing.runner(tmp_path, page_size=page_size)
    shared_pages = 32 // page_size
    requests = testing.place_requests(run, [40, 64, 48], shared_prefix_pages=shared_pages)
    assert requests[1].slots[:32] == requests[0].slots[:32] == requests[2].slots[:32]
    extend = [40, 9, 16]
    batch = testing.extend_batch(run, requests, extend)
    layout = layout_from_forward_batch(batch, run.req_to_token_pool.req_to_token, page_size)
    assert_layout(layout, requests, page_size, extend, is_decode=False)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_mixed_batch_of_prefill_chunks_and_decodes(tmp_path, page_size):
    """MIXED (chunked prefill + decode): decode rows are extend rows of one token."""
    run = testing.runner(tmp_path, page_size=page_size)
    requests = testing.place_requests(run, [7, 30, 65, 129])
    extend = [7, 1, 1, 50]
    batch = testing.extend_batch(run, requests, extend, mixed=True)
    layout = layout_from_forward_batch(batch, run.req_to_token_pool.req_to_token, page_size)
    assert_layout(layout, requests, page_size, extend, is_decode=False)


class PlanRecorder:
    def __init__(self):
        self.calls = []

    def plan(self, bsr, **counts):
        self.calls.append((bsr, counts))


def test_extend_plans_the_prefill_with_its_host_counts(tmp_path):
    """The prefill wrapper picks its tile shape from the host counts (on Hopper a short extend onto a long
    cached prefix runs the long-KV shape), so the adapter must hand over both."""
    from engine_backend.adapters.sglang.kernels import LayerKernels

    run = testing.runner(tmp_path, page_size=16)
    requests = testing.place_requests(run, [300, 40])
    layout = layout_from_forward_batch(
        testing.extend_batch(run, requests, [8, 40]), run.req_to_token_pool.req_to_token, 16
    )
    kernels = LayerKernels.__new__(LayerKernels)  # the wrappers alone, without building GPU kernels
    kernels.decode, kernels.prefill = PlanRecorder(), PlanRecorder()
    kernels.plan(layout)
    assert kernels.decode.calls == []
    (bsr, counts), = kernels.prefill.calls
    assert bsr is layout.kv
    assert counts == {"num_tokens": 8 + 40, "num_kv_tokens": 300 + 40}


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_persistent_index_buffer_is_reused_in_place(tmp_path, page_size):
    """CUDA graphs read the page ids from one buffer: each step refills it, and the BSR
    handed to plan() must be that very storage, whatever the batch."""
    run = testing.runner(tmp_path, page_size=page_size)
    table = run.req_to_token_pool.req_to_token
    buffer = torch.full((4 * -(-table.shape[1] // page_size),), -7, dtype=torch.int32)
    big = testing.place_requests(run, [100, 90, 80])
    first = layout_from_forward_batch(testing.decode_batch(run, big), table, page_size, indices_out=buffer)
    assert first.kv.indices.data_ptr() == buffer.data_ptr()
    assert_layout(first, big, page_size, [1, 1, 1], is_decode=True)
    small = testing.place_requests(run, [3])
    second = layout_from_forward_batch(testing.decode_batch(run, small), table, page_size, indices_out=buffer)
    assert second.kv.indices.data_ptr() == buffer.data_ptr()
    assert_layout(second, small, page_size, [1], is_decode=True)


def test_persistent_index_buffer_overflow_is_an_error(tmp_path):
    run = testing.runner(tmp_path)
    requests = testing.place_requests(run, [50, 50])
    with pytest.raises(ValueError, match="persistent index buffer holds 64"):
        layout_from_forward_batch(
            testing.decode_batch(run, requests),
            run.req_to_token_pool.req_to_token,
            1,
            indices_out=torch.zeros(64, dtype=torch.int32),
        )


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_cuda_graph_replay_view_with_padded_slots(tmp_path, page_size):
    """The decode graph runner pads a batch of 3 to a captured size of 4: SGLang fills the
    padded slot with request-table row 0 and seq_len = the backend's fill value (1)."""
    run = testing.runner(tmp_path, page_size=page_size)
    table = run.req_to_token_pool.req_to_token
    requests = testing.place_requests(run, [5, 37, 18])
    graph_inputs = testing.DecodeGraphInputs(run, max_bs=8, seq_len_fill_value=1)
    view = graph_inputs.load(testing.decode_batch(run, requests), padded_bs=4)
    layout = layout_from_forward_batch(view, table, page_size)
    padding_row = testing.Request(row=0, slots=[int(table[0, 0])], pages=[int(table[0, 0]) // page_size])
    assert_layout(layout, requests + [padding_row], page_size, [1] * 4, is_decode=True)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_drop_last_kv_fault_shortens_every_row_by_one(tmp_path, page_size):
    run = testing.runner(tmp_path, page_size=page_size)
    requests = testing.place_requests(run, [1, 20, 33])
    batch = testing.extend_batch(run, requests, [1, 4, 33])
    table = run.req_to_token_pool.req_to_token
    honest = layout_from_forward_batch(batch, table, page_size)
    faulty = layout_from_forward_batch(batch, table, page_size, drop_last_kv=True)
    assert faulty.kv.kv_lens.tolist() == [0, 19, 32]
    assert faulty.num_kv_tokens == 0 + 19 + 32
    for name in ("indptr", "indices", "qo_indptr"):
        assert torch.equal(getattr(faulty.kv, name), getattr(honest.kv, name)), name


def test_unsupported_forward_mode_is_refused(tmp_path):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    run = testing.runner(tmp_path)
    batch = testing.decode_batch(run, testing.place_requests(run, [4]))
    batch.forward_mode = ForwardMode.TARGET_VERIFY
    with pytest.raises(NotImplementedError, match="forward mode TARGET_VERIFY"):
        layout_from_forward_batch(batch, run.req_to_token_pool.req_to_token, 1)


# ------------------------------------------------------------------ the KV pool's layout
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_paged_view_addresses_what_set_kv_buffer_wrote(tmp_path, page_size):
    """Slot s written by the pool's own set_kv_buffer is page s // P, offset s % P of the
    view the kernels read, and the view shares the pool's storage."""
    run = testing.runner(tmp_path, page_size=page_size)
    pool, layer = run.token_to_kv_pool, run.model[1]
    placed = testing.place_requests(run, [40, 21])
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
