"""The merge kernels against ``reference.merge_state(s)`` computed in float64.

The kernel accumulates in float32 and rounds once to fp16/bf16, so values may differ from
the exact result by one rounding step (relative eps of the dtype) plus float32 noise; lse is
float32 throughout. Outputs are poisoned with NaN first so an unwritten element fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine_backend import merge, reference
from engine_backend.kernels import DTYPES, HEAD_DIMS
NH = [(1, 1), (5, 4), (130, 32), (1000, 3)]


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).cuda()


def states(n, h, d, dtype, seed, empty_frac=0.25):
    """Random states; about ``empty_frac`` of the (n, h) entries have lse = -inf (no keys)."""
    v = randn(n, h, d, seed=seed).to(dtype)
    lse = randn(n, h, seed=seed + 1, scale=5.0)
    empty = torch.rand(n, h, generator=torch.Generator().manual_seed(seed + 2)) < empty_frac
    lse[empty.cuda()] = -math.inf
    return v, lse


def poisoned(shape, dtype):
    return torch.full(shape, math.nan, dtype=dtype, device="cuda"), torch.full(shape[:2], math.nan, device="cuda")


def exact_merge(a, b):
    return reference.merge_state(a[0].double(), a[1].double(), b[0].double(), b[1].double())


def assert_state_close(got, want, dtype):
    v, lse = got
    assert not v.isnan().any() and not lse.isnan().any(), "output not fully written"
    torch.testing.assert_close(v.double(), want[0].double(), atol=1e-5, rtol=torch.finfo(dtype).eps)
    torch.testing.assert_close(lse.double(), want[1].double(), atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------- pairwise
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("n, h", NH)
def test_merge_state_matches_reference(n, h, d, dtype):
    a, b = states(n, h, d, dtype, seed=1), states(n, h, d, dtype, seed=11)
    out = poisoned((n, h, d), dtype)
    got = merge.merge_state(*a, *b, out=out[0], out_lse=out[1])
    assert got[0] is out[0] and got[1] is out[1]
    assert_state_close(got, exact_merge(a, b), dtype)
    both_empty = torch.isneginf(a[1]) & torch.isneginf(b[1])
    assert not got[0][both_empty].any() and torch.isneginf(got[1][both_empty]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_state_allocates_outputs(dtype):
    a, b = states(33, 8, 128, dtype, seed=2), states(33, 8, 128, dtype, seed=3)
    assert_state_close(merge.merge_state(*a, *b), exact_merge(a, b), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_an_empty_side_leaves_the_other_unchanged(dtype):
    a = states(17, 4, 64, dtype, seed=4, empty_frac=0.0)
    empty = (randn(17, 4, 64, seed=5).to(dtype), torch.full((17, 4), -math.inf, device="cuda"))
    for got in (merge.merge_state(*a, *empty), merge.merge_state(*empty, *a)):
        # The other side's weight is exp2(0) = 1: exact, or within one rounding of the dtype.
        torch.testing.assert_close(got[0], a[0], atol=0, rtol=torch.finfo(dtype).eps)
        torch.testing.assert_close(got[1], a[1], atol=1e-5, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("into", ["a", "b"])
def test_in_place(dtype, into):
    a, b = states(130, 8, 128, dtype, seed=6), states(130, 8, 128, dtype, seed=7)
    want = exact_merge(a, b)
    if into == "a":
        got = merge.merge_state_(*a, *b)
        assert got[0] is a[0] and got[1] is a[1]
    else:
        got = merge.merge_state(*a, *b, out=b[0], out_lse=b[1])
    assert_state_close(got, want, dtype)


def strided_states(n, h, d, dtype, seed, layout):
    """The same kind of states as ``states``, as non-contiguous views of larger buffers."""
    v, lse = states(n, h, d, dtype, seed)
    if layout == "every_other_n":
        big_v, big_lse = torch.zeros(2 * n, h, d, dtype=dtype, device="cuda"), torch.zeros(2 * n, h, device="cuda")
        view_v, view_lse = big_v[1::2], big_lse[1::2]
    elif layout == "every_other_h":
        big_v, big_lse = torch.zeros(n, 2 * h, d, dtype=dtype, device="cuda"), torch.zeros(n, 2 * h, device="cuda")
        view_v, view_lse = big_v[:, 1::2], big_lse[:, 1::2]
    else:  # "head_major": [H, N, D] storage seen as [N, H, D]; lse transposed too
        view_v = torch.zeros(h, n, d, dtype=dtype, device="cuda").transpose(0, 1)
        view_lse = torch.zeros(h, n, device="cuda").t()
    view_v.copy_(v)
    view_lse.copy_(lse)
    assert not view_v.is_contiguous()
    return view_v, view_lse


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["every_other_n", "every_other_h", "head_major"])
def test_non_contiguous_views(dtype, layout):
    n, h, d = 37, 6, 128
    a = strided_states(n, h, d, dtype, 8, layout)
    b = strided_states(n, h, d, dtype, 9, layout)
    out = strided_states(n, h, d, dtype, 10, layout)
    out[0].fill_(math.nan)
    out[1].fill_(math.nan)
    want = exact_merge(a, b)
    assert_state_close(merge.merge_state(*a, *b, out=out[0], out_lse=out[1]), want, dtype)
    assert_state_close(merge.merge_state_(*a, *b), want, dtype)


# --------------------------------------------------------------------------- n-way
def ranges(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize(
    "lengths",
    [
        [1, 2, 3, 4, 5, 6, 7, 8],
        [0, 3, 0, 0, 8, 1],  # empty ranges give (0, -inf)
        torch.randint(0, 9, (150,), generator=torch.Generator().manual_seed(0)).tolist(),
    ],
    ids=["1..8", "with-empty", "random-150"],
)
def test_merge_states_matches_reference(lengths, d, dtype):
    h = 4
    v, lse = states(sum(lengths), h, d, dtype, seed=12)
    indptr = ranges(lengths)
    out = poisoned((len(lengths), h, d), dtype)
    got = merge.merge_states(v, lse, indptr, out=out[0], out_lse=out[1])
    assert_state_close(got, reference.merge_states(v.double(), lse.double(), indptr.cpu()), dtype)
    empty = torch.tensor(lengths, device="cuda") == 0
    assert not got[0][empty].any() and torch.isneginf(got[1][empty]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_states_of_non_contiguous_input_allocating_output(dtype):
    lengths = [2, 0, 5, 1, 8]
    v, lse = strided_states(sum(lengths), 8, 64, dtype, 13, "every_other_h")
    indptr = ranges(lengths)
    got = merge.merge_states(v, lse, indptr)
    assert_state_close(got, reference.merge_states(v.double(), lse.double(), indptr.cpu()), dtype)


@pytest.mark.gpu
def test_merge_states_with_no_output_rows():
    v, lse = states(3, 2, 64, torch.bfloat16, seed=14)
    out, out_lse = merge.merge_states(v, lse, torch.zeros(1, dtype=torch.int32, device="cuda"))
    assert out.shape == (0, 2, 64) and out_lse.shape == (0, 2)


# ------------------------------------------------------------------ refused arguments
def test_cpu_tensors_are_refused():
    v, lse = torch.zeros(2, 2, 64, dtype=torch.float16), torch.zeros(2, 2)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        merge.merge_state(v, lse, v, lse)


@pytest.mark.gpu
def test_bad_arguments_are_refused_before_any_launch():
    v, lse = states(4, 2, 64, torch.float16, seed=15)
    with pytest.raises(ValueError, match="states differ"):
        merge.merge_state(v, lse, v.bfloat16(), lse)
    with pytest.raises(ValueError, match="lse must be float32"):
        merge.merge_state(v, lse.double(), v, lse)
    with pytest.raises(ValueError, match="head dim must be 8 times a divisor of 256"):
        merge.merge_state(v[..., :60], lse, v[..., :60], lse)
    with pytest.raises(ValueError, match=r"out: expected \(4, 2, 64\)"):
        merge.merge_state(v, lse, v, lse, out=v[:3], out_lse=lse[:3])
    misaligned = torch.zeros(4, 2, 68, dtype=torch.float16, device="cuda")[..., :64]  # row stride 68
    with pytest.raises(ValueError, match="16-byte aligned"):
        merge.merge_state(misaligned, lse, v, lse)
    with pytest.raises(ValueError, match="indptr must be a 1-D int32"):
        merge.merge_states(v, lse, torch.tensor([0, 4], device="cuda"))
    with pytest.raises(ValueError, match=r"out: expected \(1, 2, 64\)"):
        merge.merge_states(v, lse, ranges([4]), out=v[:2], out_lse=lse[:2])
