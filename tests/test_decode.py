"""Decode kernel vs the torch reference (GPU)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from engine_backend import BSR, decode, reference
from engine_backend.decode import BatchDecode
from engine_backend.variants import Variant

from paged_inputs import TOL, decode_batch, poisoned_like, rel_err

pytestmark = pytest.mark.gpu

HEADS = [(32, 8), (32, 4), (8, 8), (16, 1)]  # GQA 4, GQA 8, MHA, MQA


def run_case(kv_lens, page_size, hq, hkv, dim, dtype, layout="vllm", variant=Variant(), alibi=None, dec=None):
    q, k, v, bsr = decode_batch(kv_lens, page_size, hq, hkv, dim, dtype, layout)
    dec = dec or BatchDecode(hq, hkv, dim, page_size, dtype=dtype, max_batch_size=max(len(kv_lens), 1), variant=variant)
    dec.plan(bsr)
    out = poisoned_like(q)
    _, lse = dec.run(q, k, v, out=out, return_lse=True, alibi_slopes=alibi)
    ref, ref_lse = reference.attention(q, k, v, bsr, variant=variant, alibi_slopes=alibi)
    assert not out.isnan().any(), "output not fully written"
    assert rel_err(out, ref) < TOL[dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert torch.allclose(lse[finite], ref_lse[finite], atol=2e-2, rtol=1e-3)
    return dec


def random_lens(rng, batch, longest):
    return [rng.choice([1, rng.randint(1, 64), rng.randint(1, longest)]) for _ in range(batch)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("page_size", [1, 16, 32, 64])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
def test_decode_coverage(heads, page_size, dim, dtype):
    rng = random.Random(hash((heads, page_size, dim, str(dtype))))
    run_case(random_lens(rng, rng.randint(1, 24), 3000), page_size, *heads, dim, dtype)


@pytest.mark.parametrize("batch", [1, 7, 64, 256])
def test_decode_batch_sizes_mixed_lengths(batch):
    rng = random.Random(batch)
    lens = random_lens(rng, batch, 9000)
    lens[0] = 1
    run_case(lens, 16, 32, 8, 128, torch.bfloat16)


def test_decode_very_long_and_short_in_one_batch():
    run_case([131072, 1, 37, 4096], 16, 32, 8, 128, torch.bfloat16)


def test_decode_skewed_batch():
    run_case([32768] + [512] * 127, 16, 32, 8, 128, torch.bfloat16)


def test_decode_empty_rows_give_zero_and_minus_inf():
    q, k, v, bsr = decode_batch([0, 5, 0, 300], 16, 32, 8, 128, torch.bfloat16)
    dec = BatchDecode(32, 8, 128, 16, max_batch_size=4)
    dec.plan(bsr)
    out, lse = dec.run(q, k, v, out=poisoned_like(q), return_lse=True)
    assert torch.all(out[[0, 2]] == 0) and torch.all(lse[[0, 2]] == -math.inf)
    ref, _ = reference.attention(q, k, v, bsr)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("layout,page_size", [("vllm", 16), ("flashinfer", 16), ("hnd", 32), ("sglang", 1)])
def test_decode_cache_layouts(layout, page_size):
    run_case([100, 2000, 1, 777], page_size, 32, 8, 128, torch.bfloat16, layout=layout)


@pytest.mark.parametrize(
    "variant", [Variant(logits_soft_cap=30.0), Variant(window_left=100), Variant(alibi=True)], ids=["softcap", "window", "alibi"]
)
def test_decode_variants(variant):
    alibi = torch.rand(32, device="cuda") * 0.1 if variant.alibi else None
    run_case([5, 300, 4000, 1], 16, 32, 8, 128, torch.bfloat16, variant=variant, alibi=alibi)


def test_decode_fresh_inputs_reuse_one_wrapper():
    dec = BatchDecode(32, 8, 128, 16, max_batch_size=32)
    rng = random.Random(3)
    for _ in range(4):
        run_case(random_lens(rng, rng.randint(1, 32), 5000), 16, 32, 8, 128, torch.bfloat16, dec=dec)


@pytest.mark.parametrize("max_b", [48, 12])  # captured with the large grid / the small-batch grid
def test_decode_cuda_graph_replay_serves_smaller_batches(max_b):
    """Capture run() once at the maximum batch, then plan + replay other batches and lengths."""
    hq, hkv, dim, page = 32, 8, 128, 16
    pool_pages, width = 6000, 600
    k = torch.randn(pool_pages, page, hkv, dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    table = torch.zeros(max_b, width, dtype=torch.int32, device="cuda")
    seq_lens = torch.zeros(max_b, dtype=torch.int32, device="cuda")
    q = torch.randn(max_b, hq, dim, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    dec = BatchDecode(hq, hkv, dim, page, max_batch_size=max_b)

    def fill(lens):
        table.copy_(torch.randint(0, pool_pages, table.shape, dtype=torch.int32))
        seq_lens.zero_()
        seq_lens[: len(lens)] = torch.tensor(lens, dtype=torch.int32)
        q.copy_(torch.randn_like(q))
        return BSR.from_block_table(table[: len(lens)], seq_lens[: len(lens)], page)

    dec.plan(fill([1000] * max_b))
    dec.run(q, k, v, out=out)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec.run(q, k, v, out=out)
    rng = random.Random(0)
    for batch in [b for b in (max_b, 17, 1, 16, 33, 7) if b <= max_b]:
        lens = random_lens(rng, batch, 9000)
        bsr = fill(lens)
        dec.plan(bsr)
        out.fill_(float("nan"))
        graph.replay()
        ref, _ = reference.attention(q[:batch], k, v, bsr)
        assert not out[:batch].isnan().any()
        assert rel_err(out[:batch], ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("ctas_per_sm", [1, 2])
def test_decode_explicit_ctas_per_sm(ctas_per_sm):
    """Fewer CTAs per SM than fit (the `ctas_per_sm` choice) compute the same attention."""
    dec = BatchDecode(32, 8, 128, 16, max_batch_size=40, ctas_per_sm=ctas_per_sm)
    assert dec.small_batch_ctas == dec.ctas  # a fixed grid: no small-batch switch
    rng = random.Random(ctas_per_sm)
    for batch in (3, 40):
        run_case(random_lens(rng, batch, 9000), 16, 32, 8, 128, torch.bfloat16, dec=dec)


def test_decode_one_wrapper_switches_grids_between_batches():
    """Eager plan/run alternating between small-batch (one CTA per SM) and large-batch grids."""
    dec = BatchDecode(32, 8, 128, 16, max_batch_size=64)
    assert dec.small_batch_ctas < dec.ctas  # two CTAs fit per SM at head dim 128
    rng = random.Random(5)
    for batch in (3, 64, 16, 17, 1):
        run_case(random_lens(rng, batch, 9000), 16, 32, 8, 128, torch.bfloat16, dec=dec)


def test_decode_refuses_more_ctas_per_sm_than_fit():
    with pytest.raises(ValueError, match="ctas_per_sm=64"):
        BatchDecode(32, 8, 128, 16, ctas_per_sm=64)


def test_decode_rejects_bad_inputs_before_launch():
    with pytest.raises(ValueError, match="head dim 96"):
        BatchDecode(32, 8, 96, 16)
    with pytest.raises(ValueError, match="query heads"):
        BatchDecode(30, 8, 128, 16)
    q, k, v, bsr = decode_batch([10, 20], 16, 32, 8, 128, torch.bfloat16)
    dec = BatchDecode(32, 8, 128, 16, max_batch_size=1)
    with pytest.raises(ValueError, match="max_batch_size"):
        dec.plan(bsr)
    dec = BatchDecode(32, 8, 128, 16, max_batch_size=2)
    dec.plan(bsr)
    with pytest.raises(ValueError, match="dtype"):
        dec.run(q.half(), k, v)
    with pytest.raises(ValueError, match="page_size"):
        dec.run(q, k.view(-1, 8, 8, 128), v)


def test_decode_reads_a_fused_qkv_slice_in_place():
    """SGLang hands attention a column slice of the fused QKV projection; the adapter passes it as it is."""
    from engine_backend.adapters.common.queries import query_rows

    hq, hkv, dim = 32, 8, 128
    q, k, v, bsr = decode_batch([700, 1, 64, 2000], 1, hq, hkv, dim, torch.bfloat16, "sglang")
    qkv = poisoned_like(torch.empty(q.shape[0], (hq + 2 * hkv) * dim, dtype=q.dtype, device="cuda"))
    qkv[:, : hq * dim] = q.reshape(q.shape[0], -1)
    strided = query_rows(qkv[:, : hq * dim], hq, dim)
    assert strided.data_ptr() == qkv.data_ptr() and not strided.is_contiguous()
    dec = BatchDecode(hq, hkv, dim, 1, max_batch_size=4)
    dec.plan(bsr)
    out = dec.run(strided, k, v, out=poisoned_like(q))
    ref, _ = reference.attention(q, k, v, bsr)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_aligned_planner_gives_each_request_to_one_cta():
    """A uniform batch of one request fewer than the grid's CTAs, each request a little over a share: the
    plan gives each request its own CTA (no partial states) where an equal split of the KV would cut them."""
    dec = BatchDecode(32, 8, 128, 1, max_batch_size=256)
    rows = dec.ctas - 1
    assert rows > decode.SMALL_BATCH  # the two-CTAs-per-SM grid, whose CTA count the plan sees
    q, k, v, bsr = decode_batch([256] * rows, 1, 32, 8, 128, torch.bfloat16)
    dec.plan(bsr)
    assert dec._plan[:4].tolist()[2:] == [rows, 0]  # CTAs used, partial-state slots
    out = dec.run(q, k, v)
    ref, _ = reference.attention(q, k, v, bsr)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_plan_buffer_size_is_the_kernels():
    """The wrapper sizes its plan buffer by the op's report (the kernel's layout, written once in C++)."""
    rows = 40
    dec = BatchDecode(32, 8, 128, 16, max_batch_size=rows)
    tiles = dec.num_kv_heads * dec.head_tiles
    need = dec._ops.plan_ints(rows, dec.ctas, tiles)
    assert dec._plan.numel() == need
    # The layout: header, cost starts, six per-request arrays, CTA starts, first request and first segment
    # (five fields) per CTA, one semaphore per (request, head tile).
    assert need == 4 + (rows + 1) + 6 * rows + (dec.ctas + 1) + 6 * dec.ctas + rows * tiles
    run_case([100, 7, 3000], 16, 32, 8, 128, torch.bfloat16, dec=dec)


def test_long_requests_keep_the_stream_k_split():
    """Aligned groups only where the extra tokens are cheap: 39 requests of 2048 tokens on 33 CTAs would give
    some CTAs two requests (1.7 shares) where every CTA streams at the bandwidth limit, so the plan cuts."""
    dec = BatchDecode(32, 8, 128, 1, max_batch_size=256)
    rows = dec.ctas + dec.ctas // 5
    q, k, v, bsr = decode_batch([2048] * rows, 1, 32, 8, 128, torch.bfloat16)
    dec.plan(bsr)
    header = dec._plan[:4].tolist()
    assert header[2] == dec.ctas and header[3] > 0
    out = dec.run(q, k, v)
    ref, _ = reference.attention(q, k, v, bsr)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("length, aligned", [(1024, True), (4096, False)])
def test_aligned_groups_may_exceed_a_share_by_the_slack_tokens_only(length, aligned):
    """Groups of 4 requests on all but one CTA: 4 * (1024 + 32) tokens is 128 over a share (aligned: one CTA
    idle, no request cut), 4 * 4128 is 501 over (the slack is 256 tokens), so that plan splits the batch over
    every CTA of the grid. The plan reads only the lengths."""
    page = 16
    dec = BatchDecode(32, 8, 128, page, max_batch_size=256)
    rows = 4 * (dec.ctas - 1)
    seq = torch.full((rows,), length, dtype=torch.int32, device="cuda")
    table = torch.zeros(rows, length // page, dtype=torch.int32, device="cuda")
    dec.plan(BSR.from_block_table(table, seq, page))
    used, slots = dec._plan[2:4].tolist()
    assert used == (dec.ctas - 1 if aligned else dec.ctas)
    if aligned:
        assert slots == 0
