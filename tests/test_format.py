"""BSR constructors and validation.

Each constructor is checked by reading back, from the BSR alone, the KV slots every row
attends to (page * page_size + offset) and comparing them with the slots computed directly
from the engine-side inputs.
"""

from __future__ import annotations

import pytest
import torch

from engine_backend import BSR
from engine_backend.format import lengths_to_indptr

I32 = torch.int32


def row_slots(bsr: BSR) -> list[list[int]]:
    """KV slot of every token of every row, as the BSR defines it."""
    indptr, indices, kv_lens = bsr.indptr.tolist(), bsr.indices.tolist(), bsr.kv_lens.tolist()
    p = bsr.page_size
    return [[indices[indptr[r] + t // p] * p + t % p for t in range(kv_lens[r])] for r in range(bsr.num_rows)]


def random_pages(gen: torch.Generator, num_pages: int, count: int) -> list[int]:
    return torch.randperm(num_pages, generator=gen)[:count].tolist()


def block_table_case(seq_lens: list[int], page_size: int, width: int, seed: int = 0):
    """A vLLM-style block table: distinct random pages, padding filled with -1."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.full((len(seq_lens), width), -1, dtype=I32)
    pages = random_pages(gen, 4 * width * len(seq_lens), sum(-(-n // page_size) for n in seq_lens))
    for r, n in enumerate(seq_lens):
        used = -(-n // page_size)
        table[r, :used] = torch.tensor(pages[:used], dtype=I32)
        pages = pages[used:]
    return table


def token_table_case(seq_lens: list[int], page_size: int, width: int, pool_rows: int, seed: int = 0):
    """An SGLang-style req_to_token pool: each request on random pool row, its tokens in
    random aligned pages (slot = page * page_size + offset), unused entries garbage."""
    gen = torch.Generator().manual_seed(seed)
    req_to_token = torch.randint(0, 10**6, (pool_rows, width), generator=gen, dtype=I32)
    req_indices = torch.randperm(pool_rows, generator=gen)[: len(seq_lens)].to(I32)
    pages = random_pages(gen, 4 * width * len(seq_lens), sum(-(-n // page_size) for n in seq_lens))
    for r, n in enumerate(seq_lens):
        t = torch.arange(n)
        row_pages = torch.tensor(pages[: -(-n // page_size)], dtype=torch.int64)
        pages = pages[len(row_pages) :]
        req_to_token[req_indices[r], :n] = (row_pages[t // page_size] * page_size + t % page_size).to(I32)
    return req_to_token, req_indices


def assert_int32_fields(bsr: BSR) -> None:
    for t in (bsr.indptr, bsr.indices, bsr.kv_lens, bsr.qo_indptr):
        assert t.dtype == I32


# ------------------------------------------------------------------- from_block_table
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_from_block_table_reads_each_requests_tokens(page_size):
    seq_lens = [5, 0, 33, 16, 1]
    width = -(-max(seq_lens) // page_size) + 2  # padded rows: more pages than any request needs
    table = block_table_case(seq_lens, page_size, width)
    bsr = BSR.from_block_table(table, torch.tensor(seq_lens, dtype=I32), page_size)
    expected = [[int(table[r, t // page_size]) * page_size + t % page_size for t in range(n)] for r, n in enumerate(seq_lens)]
    assert row_slots(bsr) == expected
    assert bsr.num_rows == len(seq_lens)
    assert bsr.kv_lens.tolist() == seq_lens
    assert bsr.qo_indptr.tolist() == list(range(len(seq_lens) + 1))  # decode: one query per row
    assert_int32_fields(bsr)


def test_from_block_table_is_zero_copy_for_a_contiguous_int32_table():
    # CUDA graphs replay with the same indices storage, so the BSR must alias the table.
    table = block_table_case([7, 3], 4, 3)
    bsr = BSR.from_block_table(table, torch.tensor([7, 3], dtype=I32), 4)
    assert bsr.indices.data_ptr() == table.data_ptr()
    table[0, 0] = 99
    assert int(bsr.indices[0]) == 99


def test_from_block_table_accepts_int64_inputs_and_custom_qo_indptr():
    table = block_table_case([9, 4], 4, 3).long()
    qo_indptr = torch.tensor([0, 3, 7])
    bsr = BSR.from_block_table(table, torch.tensor([9, 4]), 4, qo_indptr=qo_indptr)
    assert_int32_fields(bsr)
    assert bsr.qo_indptr.tolist() == [0, 3, 7]
    assert row_slots(bsr)[0] == [int(table[0, t // 4]) * 4 + t % 4 for t in range(9)]


def test_from_block_table_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        BSR.from_block_table(torch.zeros(4, dtype=I32), torch.zeros(4, dtype=I32), 1)
    with pytest.raises(ValueError, match=r"kv_lens must have shape \(2,\)"):
        BSR.from_block_table(torch.zeros(2, 3, dtype=I32), torch.zeros(3, dtype=I32), 1)


# ------------------------------------------------------------------- from_token_table
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("capacity", [None, 200])
def test_from_token_table_reads_each_requests_tokens(page_size, capacity):
    seq_lens = [17, 1, 0, 64, 40]
    width = 80
    req_to_token, req_indices = token_table_case(seq_lens, page_size, width, pool_rows=9)
    bsr = BSR.from_token_table(
        req_to_token, req_indices, torch.tensor(seq_lens, dtype=I32), page_size=page_size, capacity=capacity
    )
    expected = [req_to_token[req_indices[r], :n].tolist() for r, n in enumerate(seq_lens)]
    assert row_slots(bsr) == expected
    pages_needed = [-(-n // page_size) for n in seq_lens]
    assert bsr.indptr.tolist() == [sum(pages_needed[:r]) for r in range(len(seq_lens) + 1)]  # compact
    default_capacity = len(seq_lens) * -(-width // page_size)
    assert bsr.indices.shape[0] == (default_capacity if capacity is None else capacity)
    assert not bsr.indices[bsr.indptr[-1] :].any()  # the tail past indptr[-1] is zeroed
    assert bsr.qo_indptr.tolist() == list(range(len(seq_lens) + 1))
    assert_int32_fields(bsr)


def test_from_token_table_width_not_a_multiple_of_page_size():
    seq_lens = [50, 33]
    req_to_token, req_indices = token_table_case(seq_lens, 16, width=50, pool_rows=2, seed=3)
    bsr = BSR.from_token_table(req_to_token, req_indices, torch.tensor(seq_lens), page_size=16)
    assert row_slots(bsr) == [req_to_token[req_indices[r], :n].tolist() for r, n in enumerate(seq_lens)]


def test_from_token_table_with_no_requests():
    bsr = BSR.from_token_table(torch.zeros(4, 8, dtype=I32), torch.zeros(0, dtype=I32), torch.zeros(0, dtype=I32), capacity=5)
    assert bsr.num_rows == 0 and bsr.indptr.tolist() == [0] and bsr.indices.tolist() == [0] * 5


def test_from_token_table_capacity_too_small_is_refused():
    req_to_token, req_indices = token_table_case([30, 30], 1, width=32, pool_rows=2)
    with pytest.raises(ValueError, match="the rows list 60 pages but capacity is 50"):
        BSR.from_token_table(req_to_token, req_indices, torch.tensor([30, 30]), capacity=50)


# ------------------------------------------------------------------------ from_ragged
def test_from_ragged_rows_own_their_token_ranges():
    kv_indptr = torch.tensor([0, 3, 3, 10, 11])
    bsr = BSR.from_ragged(kv_indptr, num_kv_tokens=11)
    assert row_slots(bsr) == [[0, 1, 2], [], list(range(3, 10)), [10]]
    assert bsr.page_size == 1
    assert bsr.qo_indptr.tolist() == kv_indptr.tolist()  # default: the queries are the new tokens
    assert_int32_fields(bsr)


def test_from_ragged_with_separate_queries():
    bsr = BSR.from_ragged(torch.tensor([0, 4, 6], dtype=I32), 6, qo_indptr=torch.tensor([0, 1, 2], dtype=I32))
    assert bsr.qo_indptr.tolist() == [0, 1, 2] and bsr.kv_lens.tolist() == [4, 2]


# ------------------------------------------------------------------------- validation
def good_fields() -> dict:
    return dict(
        indptr=torch.tensor([0, 2, 3], dtype=I32),
        indices=torch.tensor([5, 1, 7], dtype=I32),
        kv_lens=torch.tensor([20, 16], dtype=I32),
        qo_indptr=torch.tensor([0, 1, 2], dtype=I32),
        page_size=16,
    )


def make(**changes) -> BSR:
    return BSR(**{**good_fields(), **changes})


def test_valid_bsr_passes():
    make().validate(debug=True, num_pages=8)


@pytest.mark.parametrize("field", ["indptr", "indices", "kv_lens", "qo_indptr"])
def test_int64_field_is_refused(field):
    with pytest.raises(ValueError, match=f"BSR.{field} must be int32, got torch.int64"):
        make(**{field: good_fields()[field].long()}).validate()


def test_mismatched_devices_are_refused():
    # A meta tensor stands in for "another device" on a CPU-only machine.
    with pytest.raises(ValueError, match="BSR.indices is on meta but indptr is on cpu"):
        make(indices=torch.empty(3, dtype=I32, device="meta")).validate()


@pytest.mark.parametrize("field", ["indptr", "qo_indptr"])
def test_non_monotone_indptr_is_refused(field):
    with pytest.raises(ValueError, match=f"BSR.{field} must start at 0 and be non-decreasing"):
        make(**{field: torch.tensor([0, 2, 1], dtype=I32)}).validate()


def test_indptr_not_starting_at_zero_is_refused():
    with pytest.raises(ValueError, match="must start at 0"):
        make(indptr=torch.tensor([1, 2, 3], dtype=I32)).validate()


def test_kv_len_larger_than_listed_pages_is_refused():
    with pytest.raises(ValueError, match="row 1: kv_len 17 needs 2 pages of 16 tokens but only 1 are listed"):
        make(kv_lens=torch.tensor([20, 17], dtype=I32)).validate()


def test_negative_kv_len_is_refused():
    with pytest.raises(ValueError, match="non-negative"):
        make(kv_lens=torch.tensor([20, -1], dtype=I32)).validate()


def test_indices_shorter_than_indptr_is_refused():
    with pytest.raises(ValueError, match="exceeds len"):
        make(indices=torch.tensor([5, 1], dtype=I32)).validate()


def test_wrong_row_counts_and_page_size_are_refused():
    with pytest.raises(ValueError, match="needs indptr and qo_indptr of 3 entries"):
        make(qo_indptr=torch.tensor([0, 1], dtype=I32)).validate()
    with pytest.raises(ValueError, match="page_size must be >= 1, got 0"):
        make(page_size=0).validate()


def test_page_ids_out_of_range_are_refused_on_cpu_tensors():
    bad = make(indices=torch.tensor([5, 8, 7], dtype=I32))  # page 8 of 8 pages
    bad.validate(num_pages=9)
    for debug in (False, True):  # CPU values cost no device sync: checked in either mode
        with pytest.raises(ValueError, match=r"row 0: page ids \[5, 8\] out of range \[0, 8\)"):
            bad.validate(debug=debug, num_pages=8)
    with pytest.raises(ValueError, match="out of range"):
        make(indices=torch.tensor([5, 1, -1], dtype=I32)).validate(num_pages=8)


def test_negative_page_ids_are_refused_without_num_pages():
    with pytest.raises(ValueError, match=r"row 1: page ids \[-3\] negative"):
        make(indices=torch.tensor([5, 1, -3], dtype=I32)).validate()


def test_debug_mode_ignores_pages_a_row_lists_but_does_not_read():
    # A padded block-table row: page -1 sits past the pages kv_len needs.
    table = torch.tensor([[3, -1, -1], [2, 4, -1]], dtype=I32)
    BSR.from_block_table(table, torch.tensor([4, 5], dtype=I32), 4).validate(debug=True, num_pages=5)


def meta_bsr() -> BSR:
    """A BSR on a device whose values cannot be read: the meta device stands in for a GPU."""
    return BSR(**{k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in good_fields().items()})


def test_device_values_are_read_only_in_debug_mode(monkeypatch):
    monkeypatch.setenv("ENGINE_BACKEND_DEBUG", "0")
    meta_bsr().validate(num_pages=8)  # shapes and dtypes only: no device sync
    monkeypatch.setenv("ENGINE_BACKEND_DEBUG", "1")
    with pytest.raises(NotImplementedError):  # debug mode reads the values (meta has none to read)
        meta_bsr().validate(num_pages=8)
    meta_bsr().validate(debug=False, num_pages=8)


# ------------------------------------------------------------------------------- GPU
def engine_inputs(device: str) -> dict[str, torch.Tensor]:
    seq_lens = [5, 0, 33, 16]
    req_to_token, req_indices = token_table_case(seq_lens, 16, 48, pool_rows=6)
    inputs = dict(
        table=block_table_case(seq_lens, 16, 4),
        seq_lens=torch.tensor(seq_lens, dtype=I32),
        req_to_token=req_to_token,
        req_indices=req_indices,
        kv_indptr=torch.tensor([0, 3, 3, 10], dtype=I32),
        table_indptr=torch.arange(0, 4 * 9, 4, dtype=I32),  # a persistent arange, wider than the batch
        out=torch.zeros(80, dtype=I32),
    )
    return {k: v.to(device) for k, v in inputs.items()}


def construct_all(x: dict[str, torch.Tensor]) -> dict[str, BSR]:
    table, lens = x["table"], x["seq_lens"]
    tokens = (x["req_to_token"], x["req_indices"], lens)
    return {
        "block_table": BSR.from_block_table(table, lens, 16),
        "block_table_indptr": BSR.from_block_table(table, lens, 16, indptr=x["table_indptr"][:5], num_pages=1000),
        "token_table": BSR.from_token_table(*tokens, page_size=16, capacity=64),
        "token_table_out": BSR.from_token_table(*tokens, page_size=16, capacity=64, out=x["out"], num_pages=10**6),
        "ragged": BSR.from_ragged(x["kv_indptr"], 10),
        "lengths": lengths_to_indptr(lens),
    }


@pytest.mark.gpu
def test_constructors_never_synchronize(monkeypatch):
    monkeypatch.delenv("ENGINE_BACKEND_DEBUG", raising=False)
    inputs = engine_inputs("cuda")  # host-to-device copies sync: done before the guarded region
    construct_all(inputs)  # warm-up (allocator, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        built = construct_all(inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(b.device.type == "cuda" for b in built.values())
    assert built["token_table_out"].indices is inputs["out"]


@pytest.mark.gpu
def test_gpu_constructors_match_cpu():
    cpu, gpu = construct_all(engine_inputs("cpu")), construct_all(engine_inputs("cuda"))
    for name in cpu:
        if isinstance(cpu[name], torch.Tensor):
            assert torch.equal(cpu[name], gpu[name].cpu()), name
            continue
        for field in ("indptr", "indices", "kv_lens", "qo_indptr"):
            assert torch.equal(getattr(cpu[name], field), getattr(gpu[name], field).cpu()), (name, field)


# ---------------------------------------------------- from_token_table: the device path
def token_table_on(device: str, seq_lens: list[int], page_size: int, width: int, index_dtype: torch.dtype,
                   capacity: int, seed: int):
    req_to_token, req_indices = token_table_case(seq_lens, page_size, width, pool_rows=len(seq_lens) + 3, seed=seed)
    lens = torch.tensor(seq_lens, dtype=index_dtype)
    out = torch.full((capacity + 7,), -7, dtype=I32)  # poisoned: every entry up to capacity must be written
    args = (req_to_token, req_indices.to(index_dtype), lens)
    args = tuple(t.to(device) for t in args)
    return BSR.from_token_table(*args, page_size=page_size, capacity=capacity, out=out.to(device))


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("rows", [0, 1, 7, 1500])  # 1500: two scan chunks, more rows than CTAs
def test_token_table_kernel_gives_the_torch_ops_arrays(page_size, index_dtype, rows):
    gen = torch.Generator().manual_seed(rows + page_size)
    seq_lens = torch.randint(0, 3 * page_size + 40, (rows,), generator=gen).tolist()
    if rows:
        seq_lens[0] = 0  # a request with no KV lists no pages
    width = max(seq_lens, default=0) + 5  # not a multiple of the page size in general
    exact = sum(-(-n // page_size) for n in seq_lens)
    for capacity in (exact, exact + 50):  # a larger capacity's tail must come back zeroed
        cpu = token_table_on("cpu", seq_lens, page_size, width, index_dtype, capacity, seed=rows)
        gpu = token_table_on("cuda", seq_lens, page_size, width, index_dtype, capacity, seed=rows)
        assert gpu.indices.shape == (capacity + 7,)  # out itself, not a view of its first entries
        for field in ("indptr", "indices", "kv_lens", "qo_indptr"):
            assert torch.equal(getattr(cpu, field), getattr(gpu, field).cpu()), (field, capacity)
        assert row_slots(gpu) == row_slots(cpu)


@pytest.mark.gpu
def test_token_table_kernel_writes_into_the_given_buffer_and_no_further():
    seq_lens = [33, 0, 17]
    req_to_token, req_indices = token_table_case(seq_lens, 16, 48, pool_rows=5)
    buffer = torch.full((20,), -7, dtype=I32, device="cuda")
    bsr = BSR.from_token_table(req_to_token.cuda(), req_indices.cuda(), torch.tensor(seq_lens).cuda(), page_size=16,
                               capacity=6, out=buffer)
    assert bsr.indices.data_ptr() == buffer.data_ptr()
    cpu = BSR.from_token_table(req_to_token, req_indices, torch.tensor(seq_lens), page_size=16, capacity=6)
    assert buffer[:5].tolist() == cpu.indices[:5].tolist()  # 3 + 0 + 2 pages listed
    assert buffer[5].item() == 0  # the rest of the capacity zeroed
    assert buffer[6:].tolist() == [-7] * 14  # past capacity: untouched


@pytest.mark.gpu
def test_token_table_kernel_is_one_launch_without_sync():
    seq_lens = [40, 3, 90, 16]
    req_to_token, req_indices = (t.cuda() for t in token_table_case(seq_lens, 1, 96, pool_rows=6))
    lens = torch.tensor(seq_lens, device="cuda")
    BSR.from_token_table(req_to_token, req_indices, lens, capacity=sum(seq_lens))  # warm-up: build and load
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")
        try:
            BSR.from_token_table(req_to_token, req_indices, lens, capacity=sum(seq_lens))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # The token-table kernel and qo_indptr's arange; nothing else.
    assert len(kernels) == 2 and any("token_table_kernel" in k for k in kernels), kernels
