"""Bad inputs to the public API: each raises a clear ValueError, never a silent wrong answer or a raw error.

CPU only: the argument checks of the GPU wrappers run before any GPU work, and BSR values on CPU
tensors are always checked (on a device only in debug mode, see tests/test_format.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine_backend import BSR, Variant
from engine_backend.checks import as_finite, as_int, check_plan_input, cuda_device, is_integer
from engine_backend.format import lengths_to_indptr
from engine_backend.support import check_supported

I32 = torch.int32
TABLE = torch.tensor([[3, 1, 0], [2, 4, 0]], dtype=I32)
LENS = torch.tensor([5, 7], dtype=I32)


# ------------------------------------------------------------------- from_block_table
@pytest.mark.parametrize(
    "table, lens, message",
    [
        (TABLE.float(), LENS, "table must have an integer dtype"),
        (TABLE, LENS.float(), "kv_lens must have an integer dtype"),
        (TABLE.numpy(), LENS, "table must be a torch.Tensor, got ndarray"),
        (TABLE, [5, 7], "kv_lens must be a torch.Tensor, got list"),
    ],
)
def test_block_table_of_the_wrong_type_is_refused(table, lens, message):
    with pytest.raises(ValueError, match=message):
        BSR.from_block_table(table, lens, 4)


@pytest.mark.parametrize("page_id", [2**31, 2**32 + 3])  # int32 casts wrap these (2**32 + 3 to page 3)
def test_int64_page_id_past_int32_is_refused(page_id):
    table = TABLE.long()
    table[0, 0] = page_id
    with pytest.raises(ValueError, match="outside the int32 range"):
        BSR.from_block_table(table, LENS, 4)


def test_int64_lengths_past_int32_are_refused():
    with pytest.raises(ValueError, match="kv_lens holds values outside the int32 range"):
        BSR.from_block_table(TABLE, torch.tensor([5, 2**32 + 7]), 4)


def test_negative_page_id_read_is_refused():
    table = TABLE.clone()
    table[1, 1] = -4  # row 1 reads two pages of 4 tokens
    with pytest.raises(ValueError, match=r"row 1: page ids \[2, -4\] negative"):
        BSR.from_block_table(table, LENS, 4)


@pytest.mark.parametrize("page_size, message", [(0, "page_size must be >= 1, got 0"),
                                                (4.0, "page_size must be an integer, got 4.0"),
                                                (True, "page_size must be an integer, got True")])
def test_page_size_must_be_a_positive_integer(page_size, message):
    with pytest.raises(ValueError, match=message):
        BSR.from_block_table(TABLE, LENS, page_size)
    with pytest.raises(ValueError, match=message):
        BSR.from_token_table(torch.zeros(2, 8, dtype=I32), torch.tensor([0, 1]), torch.tensor([1, 1]), page_size)


def test_num_pages_bounds_the_page_ids_read_without_debug_mode(monkeypatch):
    monkeypatch.delenv("ENGINE_BACKEND_DEBUG", raising=False)
    BSR.from_block_table(TABLE, LENS, 4, num_pages=5)
    with pytest.raises(ValueError, match=r"row 1: page ids \[2, 4\] out of range \[0, 4\)"):
        BSR.from_block_table(TABLE, LENS, 4, num_pages=4)


def test_precomputed_indptr_is_used_as_it_is():
    arange = torch.arange(0, 10 * 3, 3, dtype=I32)  # a persistent arange of a wider batch
    indptr = arange[:3]
    bsr = BSR.from_block_table(TABLE, LENS, 4, indptr=indptr)
    assert bsr.indptr.data_ptr() == arange.data_ptr() and bsr.indptr.tolist() == [0, 3, 6]
    assert bsr.indices.data_ptr() == TABLE.data_ptr()  # and the table itself: nothing allocated


@pytest.mark.parametrize(
    "indptr, message",
    [
        (torch.tensor([0, 3, 6]), "indptr must be int32 \\[3\\]"),
        (torch.tensor([0, 3], dtype=I32), "indptr must be int32 \\[3\\]"),
        (torch.tensor([0, 2, 4], dtype=I32), "indptr must be 0, 3, ..., 6"),
        ([0, 3, 6], "indptr must be a torch.Tensor"),
    ],
)
def test_precomputed_indptr_must_match_the_table(indptr, message):
    with pytest.raises(ValueError, match=message):
        BSR.from_block_table(TABLE, LENS, 4, indptr=indptr)


def test_float_qo_indptr_is_refused():
    with pytest.raises(ValueError, match="qo_indptr must have an integer dtype"):
        BSR.from_block_table(TABLE, LENS, 4, qo_indptr=torch.tensor([0.0, 1.0, 2.0]))


# ------------------------------------------------------------------- from_token_table
def token_pool(page_size: int) -> torch.Tensor:
    """Two rows of 16 tokens in aligned pages: row 0 in pages 2.., row 1 in pages 7.."""
    t = torch.arange(16)
    return torch.stack([2 * page_size + t, 7 * page_size + t]).to(I32)


def test_sequence_longer_than_the_table_row_is_refused():
    # Once past the row, the torch ops clamp to its last column: the last page would repeat.
    with pytest.raises(ValueError, match="seq_lens\\[1\\] = 20 exceeds the table's width of 16 tokens"):
        BSR.from_token_table(token_pool(4), torch.tensor([0, 1]), torch.tensor([16, 20]), page_size=4)


@pytest.mark.parametrize("row", [-1, 2])  # -1 would wrap to the last row
def test_request_index_outside_the_table_is_refused(row):
    with pytest.raises(ValueError, match=f"req_indices\\[1\\] = {row} is not a row of the table"):
        BSR.from_token_table(token_pool(4), torch.tensor([0, row]), torch.tensor([3, 3]), page_size=4)


def test_negative_length_is_refused():
    with pytest.raises(ValueError, match="seq_lens\\[0\\] = -1 is negative"):
        BSR.from_token_table(token_pool(1), torch.tensor([0, 1]), torch.tensor([-1, 3]))


@pytest.mark.parametrize("shift", [1, 3])
def test_unaligned_slots_at_page_size_above_one_are_refused(shift):
    # Slots shifted off the page boundary: page ids slot // P would read other tokens.
    pool = token_pool(4) + shift
    with pytest.raises(ValueError, match="with page_size 4 the slots of a page must be contiguous"):
        BSR.from_token_table(pool, torch.tensor([0, 1]), torch.tensor([5, 5]), page_size=4)
    BSR.from_token_table(pool, torch.tensor([0, 1]), torch.tensor([5, 5]), page_size=1)  # any slot is a page


def test_non_contiguous_slots_in_a_page_are_refused_but_unread_slots_are_free():
    pool = token_pool(4)
    pool[0, 6] = 99  # token 6: page 1, offset 2
    with pytest.raises(ValueError, match="request 0: token 6 is in slot 99, not 14"):
        BSR.from_token_table(pool, torch.tensor([0, 1]), torch.tensor([7, 5]), page_size=4)
    BSR.from_token_table(pool, torch.tensor([0, 1]), torch.tensor([6, 5]), page_size=4)  # token 6 is not read


def test_negative_slot_is_refused():
    pool = token_pool(1)
    pool[1, 0] = -5
    with pytest.raises(ValueError, match="request 1: token 0 has the negative slot -5"):
        BSR.from_token_table(pool, torch.tensor([0, 1]), torch.tensor([2, 2]))


def test_int64_slots_giving_page_ids_past_int32_are_refused():
    pool = token_pool(1).long() + 2**32
    with pytest.raises(ValueError, match="page ids past the int32 range"):
        BSR.from_token_table(pool, torch.tensor([0, 1]), torch.tensor([2, 2]))


@pytest.mark.parametrize(
    "args, message",
    [
        ((token_pool(1).numpy(), torch.tensor([0]), torch.tensor([1])), "req_to_token must be a torch.Tensor"),
        ((token_pool(1), torch.tensor([0.0]), torch.tensor([1])), "req_indices must have an integer dtype"),
        ((token_pool(1), torch.tensor([0]), torch.tensor([1.0])), "seq_lens must have an integer dtype"),
        ((token_pool(1), [0], torch.tensor([1])), "req_indices must be a torch.Tensor, got list"),
    ],
)
def test_token_table_of_the_wrong_type_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        BSR.from_token_table(*args)


@pytest.mark.parametrize("capacity, message", [(-1, "capacity must be >= 0"), (2.5, "capacity must be an integer")])
def test_capacity_must_be_a_non_negative_integer(capacity, message):
    with pytest.raises(ValueError, match=message):
        BSR.from_token_table(token_pool(1), torch.tensor([0]), torch.tensor([1]), capacity=capacity)


def test_out_is_the_indices_itself():
    out = torch.full((40,), -7, dtype=I32)
    bsr = BSR.from_token_table(token_pool(4), torch.tensor([1, 0]), torch.tensor([9, 4]), page_size=4, capacity=5,
                               out=out)
    assert bsr.indices is out  # the whole persistent buffer, not a view of its first entries
    assert out[:5].tolist() == [7, 8, 9, 2, 0] and out[5:].tolist() == [-7] * 35


def test_out_larger_than_a_too_small_capacity_is_still_refused():
    out = torch.zeros(40, dtype=I32)
    with pytest.raises(ValueError, match="the rows list 4 pages but capacity is 3"):
        BSR.from_token_table(token_pool(4), torch.tensor([1, 0]), torch.tensor([9, 4]), page_size=4, capacity=3,
                             out=out)


# ------------------------------------------------------------------------ from_ragged
def test_ragged_offsets_past_int32_are_refused_clearly():
    # Cast to int32 they used to wrap and be reported as "non-decreasing".
    with pytest.raises(ValueError, match="kv_indptr holds values outside the int32 range"):
        BSR.from_ragged(torch.tensor([0, 3, 2**31 + 5]), 5)


@pytest.mark.parametrize(
    "kv_indptr, tokens, message",
    [
        ([0, 3, 5], 5, "kv_indptr must be a torch.Tensor, got list"),
        (torch.tensor([0.0, 3.0]), 3, "kv_indptr must have an integer dtype"),
        (torch.tensor([0, 3]), 3.0, "num_kv_tokens must be an integer"),
        (torch.zeros(0, dtype=I32), 0, "kv_indptr needs rows \\+ 1 entries"),
    ],
)
def test_ragged_inputs_of_the_wrong_type_are_refused(kv_indptr, tokens, message):
    with pytest.raises(ValueError, match=message):
        BSR.from_ragged(kv_indptr, tokens)


# ------------------------------------------------------------------ lengths_to_indptr
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_lengths_to_indptr_is_the_exclusive_cumsum_in_int32(dtype):
    indptr = lengths_to_indptr(torch.tensor([3, 0, 5, 1], dtype=dtype))
    assert indptr.dtype == I32 and indptr.tolist() == [0, 3, 3, 8, 9]
    assert lengths_to_indptr(torch.zeros(0, dtype=dtype)).tolist() == [0]


@pytest.mark.parametrize(
    "lens, message",
    [
        (torch.tensor([2**30, 2**30], dtype=I32), "lengths sum to 2147483648, past the int32 range"),
        (torch.tensor([3, -1]), "lengths must be non-negative"),
        (torch.tensor([3.0, 1.0]), "lens must have an integer dtype"),
    ],
)
def test_lengths_to_indptr_refuses_bad_lengths(lens, message):
    with pytest.raises(ValueError, match=message):
        lengths_to_indptr(lens)


# ----------------------------------------------------------------------------- BSR
def test_bsr_page_size_may_be_any_integer_type_and_is_normalised():
    bsr = BSR(torch.tensor([0, 3, 6], dtype=I32), TABLE.view(-1), LENS, torch.tensor([0, 1, 2], dtype=I32),
              np.int64(4)).validate()
    assert type(bsr.page_size) is int and bsr.page_size == 4


def test_validate_num_pages_must_be_an_integer():
    with pytest.raises(ValueError, match="num_pages must be an integer"):
        BSR.from_block_table(TABLE, LENS, 4).validate(num_pages=8.0)


# ------------------------------------------------------------------------- Variant
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(logits_soft_cap=math.nan), "logits_soft_cap must be finite"),
        (dict(logits_soft_cap=math.inf), "logits_soft_cap must be finite"),
        (dict(logits_soft_cap="30"), "logits_soft_cap must be a number"),
        (dict(window_left=2.5), "window_left must be an integer"),
        (dict(window_left=4.0), "window_left must be an integer"),
        (dict(window_left=True), "window_left must be an integer"),
        (dict(alibi="no"), "alibi must be a bool"),
    ],
)
def test_variant_refuses_values_that_are_not_what_it_holds(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Variant(**kwargs)


def test_variant_normalises_numbers_so_equal_variants_are_one_specialization():
    a, b = Variant(logits_soft_cap=30, window_left=np.int64(8)), Variant(logits_soft_cap=30.0, window_left=8)
    assert a == b and hash(a) == hash(b)
    assert type(a.logits_soft_cap) is float and type(a.window_left) is int


# ----------------------------------------------------------------- check_supported
BASE = dict(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, page_size=16)


@pytest.mark.parametrize(
    "change, problem",
    [
        (dict(num_qo_heads=0), "0 query heads over 8 KV heads"),
        (dict(num_qo_heads=-8), "-8 query heads over 8 KV heads"),
        (dict(num_kv_heads=-8), "32 query heads over -8 KV heads"),
        (dict(num_kv_heads=8.0), "32 query heads over 8.0 KV heads"),
        (dict(head_dim=128.0), "head dim 128.0"),
        (dict(page_size=16.0), "page size 16.0"),
        (dict(page_size=True), "page size True"),
    ],
)
def test_check_supported_refuses_counts_that_are_not_positive_integers(change, problem):
    with pytest.raises(ValueError, match=f"does not support {problem}"):
        check_supported(**{**BASE, **change})


def test_check_supported_accepts_numpy_integers():
    check_supported(**{**BASE, "head_dim": np.int64(128), "page_size": np.int32(16)})


def test_check_supported_refuses_a_variant_that_is_not_one():
    with pytest.raises(ValueError, match="variant must be an engine_backend.Variant, got NoneType"):
        check_supported(**BASE, variant=None)


# --------------------------------------------------- the GPU wrappers' arguments
def wrappers():
    from engine_backend.decode import BatchDecode
    from engine_backend.prefill import BatchPrefill

    return BatchDecode, BatchPrefill


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_batch_size=0), "max_batch_size must be >= 1"),
        (dict(max_batch_size=2.5), "max_batch_size must be an integer"),
        (dict(sm_scale=math.nan), "sm_scale must be finite"),
        (dict(sm_scale=math.inf), "sm_scale must be finite"),
        (dict(sm_scale=0.0), "sm_scale must be positive"),
        (dict(sm_scale=-0.1), "sm_scale must be positive"),
    ],
)
@pytest.mark.parametrize("which", [0, 1])
def test_wrapper_arguments_are_checked_before_any_gpu_work(kwargs, message, which):
    with pytest.raises(ValueError, match=message):
        wrappers()[which](32, 8, 128, 16, **kwargs)


@pytest.mark.parametrize("kwargs, message", [(dict(max_num_tokens=0), "max_num_tokens must be >= 1"),
                                             (dict(max_num_tokens=1e4), "max_num_tokens must be an integer")])
def test_prefill_token_capacity_is_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        wrappers()[1](32, 8, 128, 16, **kwargs)


@pytest.mark.parametrize("ctas", [0, 1.5])
def test_decode_ctas_per_sm_is_checked(ctas):
    with pytest.raises(ValueError, match="ctas_per_sm must be"):
        wrappers()[0](32, 8, 128, 16, ctas_per_sm=ctas)


def test_wrappers_run_on_cuda_devices_only():
    with pytest.raises(ValueError, match="kernels run on CUDA devices, got cpu"):
        cuda_device("cpu")


def test_plan_takes_a_bsr():
    with pytest.raises(ValueError, match="plan\\(\\) takes an engine_backend.BSR, got dict"):
        check_plan_input({}, max_batch_size=4, page_size=16, device=torch.device("cpu"))


# --------------------------------------------------------------- number arguments
def test_integer_arguments_exclude_floats_and_bools():
    assert is_integer(3) and is_integer(np.int32(3)) and is_integer(torch.tensor(3))
    assert not any(is_integer(v) for v in (3.0, True, "3", None, torch.tensor(3.0)))
    assert as_int("n", np.int64(7), minimum=0) == 7 and type(as_int("n", np.int64(7))) is int


def test_finite_arguments_exclude_nan_inf_bools_and_strings():
    assert as_finite("x", np.float32(0.5)) == 0.5 and as_finite("x", 2) == 2.0
    for bad in (math.nan, -math.inf, True, "1.0", None):
        with pytest.raises(ValueError):
            as_finite("x", bad)
