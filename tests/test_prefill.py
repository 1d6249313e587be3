"""Prefill / append kernel vs the torch reference (GPU)."""

from __future__ import annotations

import random

import pytest
import torch

from engine_backend import reference
from engine_backend.format import BSR
from engine_backend.kernels import jit
from engine_backend.prefill import HOPPER_LONG_KEYS_PER_QUERY, LONG_QUERY_TOKENS, BatchPrefill, TileShape, tile_shapes
from engine_backend.variants import Variant

from paged_inputs import TOL, layout_kv, poisoned_like, rel_err, scattered_block_table

pytestmark = pytest.mark.gpu

HEADS = [(32, 8), (32, 4), (8, 8), (16, 1)]
# Hopper's warpgroup-MMA mainloop: 128 rows per warpgroup (4 warps x 64 keys) and 64 (8 warps x 128 keys).
WGMMA_TILES = (TileShape(4, 64, "wgmma"), TileShape(8, 128, "wgmma"))


def other_mainloop_tiles(pre: BatchPrefill) -> list[TileShape]:
    """On an sm_90a target, the shapes of the mainloop ``pre``'s plans do not pick (mma.sync, or wgmma), so
    every kernel the GPU can run is checked; elsewhere none."""
    if jit.target_arch() != "90a" or pre.head_dim not in (64, 128):
        return []
    shapes = {*tile_shapes(pre.head_dim), *tile_shapes(pre.head_dim, "90a"), *WGMMA_TILES}
    return sorted(shapes - {pre.short_tile, pre.long_tile}, key=str)


def paged_batch(q_lens, kv_lens, page_size, hq, hkv, dim, dtype, layout="vllm"):
    table, pool = scattered_block_table(kv_lens, page_size)
    k, v = layout_kv(pool, page_size, hkv, dim, dtype, layout)
    qo_indptr = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    bsr = BSR.from_block_table(table.cuda(), torch.tensor(kv_lens, dtype=torch.int32).cuda(), page_size, qo_indptr.cuda())
    q = torch.randn(sum(q_lens), hq, dim, dtype=dtype, device="cuda")
    return q, k, v, bsr


def like(pre: BatchPrefill, tile: TileShape) -> BatchPrefill:
    return BatchPrefill(pre.num_qo_heads, pre.num_kv_heads, pre.head_dim, pre.page_size, dtype=pre.dtype,
                        max_batch_size=pre.max_batch_size, max_num_tokens=pre.max_num_tokens, causal=pre.causal,
                        variant=pre.variant, sm_scale=pre.sm_scale, tile=tile)


def check(pre, q, k, v, bsr, causal, variant=Variant(), alibi=None):
    """Both tile shapes of ``pre`` against the reference: a plan told of no queries takes the
    short-query shape, one told nothing the long-query shape; on Hopper also the other mainloop's."""
    ref, ref_lse = reference.attention(q, k, v, bsr, causal=causal, variant=variant, alibi_slopes=alibi)
    finite = torch.isfinite(ref_lse)
    runs = [(pre, 0, pre.short_tile), (pre, None, pre.long_tile)]
    runs += [(like(pre, tile), None, tile) for tile in other_mainloop_tiles(pre)]
    for pre, num_tokens, shape in runs:
        pre.plan(bsr, num_tokens=num_tokens)
        assert pre.tile == shape
        out = poisoned_like(q)
        _, lse = pre.run(q, k, v, out=out, return_lse=True, alibi_slopes=alibi)
        assert not out.isnan().any(), f"output not fully written ({shape})"
        assert rel_err(out, ref) < TOL[q.dtype], shape
        assert torch.equal(finite, torch.isfinite(lse)), shape
        assert torch.allclose(lse[finite], ref_lse[finite], atol=2e-2, rtol=1e-3), shape


def ragged_lens(rng, batch, longest):
    q_lens, kv_lens = [], []
    for _ in range(batch):
        q = rng.choice([1, rng.randint(1, 40), rng.randint(1, longest)])
        kv = q + rng.choice([0, 0, rng.randint(0, 2 * longest)])  # prefill (q = kv) or append
        q_lens.append(q)
        kv_lens.append(kv)
    return q_lens, kv_lens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("page_size", [1, 16, 32, 64])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
def test_prefill_coverage(heads, page_size, dim, dtype):
    rng = random.Random(hash((heads, page_size, dim, str(dtype))))
    q_lens, kv_lens = ragged_lens(rng, rng.randint(1, 6), 300)
    q, k, v, bsr = paged_batch(q_lens, kv_lens, page_size, *heads, dim, dtype)
    check(BatchPrefill(*heads, dim, page_size, dtype=dtype, max_batch_size=8, max_num_tokens=4096), q, k, v, bsr, True)


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_ragged_kv(causal):
    """New tokens only: K/V ragged [tokens, H, D] read as one-token pages."""
    q_lens = [1, 77, 513, 16, 300]
    indptr = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32).cuda()
    total = sum(q_lens)
    q = torch.randn(total, 32, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(total, 8, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    bsr = BSR.from_ragged(indptr, total)
    pre = BatchPrefill(32, 8, 128, 1, causal=causal, max_num_tokens=total)
    check(pre, q, k.unsqueeze(1), v.unsqueeze(1), bsr, causal)


def test_prefill_append_short_queries_long_kv():
    q, k, v, bsr = paged_batch([1, 3, 17, 64], [9000, 4000, 17, 20000], 16, 32, 8, 128, torch.bfloat16)
    check(BatchPrefill(32, 8, 128, 16), q, k, v, bsr, True)


def test_prefill_equal_q_and_kv_long():
    q, k, v, bsr = paged_batch([4096, 1000], [4096, 1000], 16, 32, 8, 128, torch.bfloat16)
    check(BatchPrefill(32, 8, 128, 16), q, k, v, bsr, True)


def test_prefill_empty_rows():
    q, k, v, bsr = paged_batch([0, 5, 3], [0, 5, 10], 16, 32, 8, 128, torch.bfloat16)
    check(BatchPrefill(32, 8, 128, 16), q, k, v, bsr, True)


@pytest.mark.parametrize("layout", ["flashinfer", "hnd"])
def test_prefill_cache_layouts(layout):
    q, k, v, bsr = paged_batch([100, 37], [300, 37], 16, 32, 8, 128, torch.bfloat16, layout=layout)
    check(BatchPrefill(32, 8, 128, 16), q, k, v, bsr, True)


@pytest.mark.parametrize(
    "variant", [Variant(logits_soft_cap=30.0), Variant(window_left=100), Variant(alibi=True)], ids=["softcap", "window", "alibi"]
)
def test_prefill_variants(variant):
    q, k, v, bsr = paged_batch([200, 1, 64], [700, 300, 64], 16, 32, 8, 128, torch.bfloat16)
    alibi = torch.rand(32, device="cuda") * 0.1 if variant.alibi else None
    check(BatchPrefill(32, 8, 128, 16, variant=variant), q, k, v, bsr, True, variant, alibi)


def test_prefill_plan_picks_tile_shape_by_query_count():
    q, k, v, bsr = paged_batch([300, 50], [900, 50], 16, 32, 8, 128, torch.bfloat16)
    pre = BatchPrefill(32, 8, 128, 16)
    assert pre.short_tile != pre.long_tile  # head dim 128 has two tuned shapes
    pre.plan(bsr, num_tokens=350)  # 175 per request
    assert pre.tile == pre.short_tile
    pre.plan(bsr, num_tokens=4 * max(LONG_QUERY_TOKENS, 2 * HOPPER_LONG_KEYS_PER_QUERY))  # long on every arch
    assert pre.tile == pre.long_tile
    fixed = BatchPrefill(32, 8, 128, 16, tile=TileShape(8, 64))
    fixed.plan(bsr, num_tokens=350)
    assert fixed.tile == TileShape(8, 64)
    check(fixed, q, k, v, bsr, True)


def test_prefill_cuda_graph_replay():
    hq, hkv, dim, page, max_tokens, max_b = 32, 8, 128, 16, 2048, 8
    pool, width = 3000, 300
    k = torch.randn(pool, page, hkv, dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    table = torch.randint(0, pool, (max_b, width), dtype=torch.int32, device="cuda")
    kv_lens = torch.zeros(max_b, dtype=torch.int32, device="cuda")
    qo = torch.zeros(max_b + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(max_tokens, hq, dim, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    pre = BatchPrefill(hq, hkv, dim, page, max_batch_size=max_b, max_num_tokens=max_tokens)

    def fill(q_lens, lens):
        n = len(q_lens)
        kv_lens.zero_()
        kv_lens[:n] = torch.tensor(lens, dtype=torch.int32)
        qo.zero_()
        qo[: n + 1] = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
        q.copy_(torch.randn_like(q))
        return BSR.from_block_table(table[:n], kv_lens[:n], page, qo[: n + 1])

    pre.plan(fill([256] * max_b, [256] * max_b))
    pre.run(q, k, v, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pre.run(q, k, v, out=out)
    for q_lens, lens in (([2048 // max_b] * max_b, [1000] * max_b), ([5, 700], [900, 700]), ([1], [4000])):
        bsr = fill(q_lens, lens)
        pre.plan(bsr)
        out.fill_(float("nan"))
        graph.replay()
        n = sum(q_lens)
        ref, _ = reference.attention(q[:n], k, v, bsr, causal=True)
        assert not out[:n].isnan().any()
        assert rel_err(out[:n], ref) < TOL[torch.bfloat16]


def test_prefill_rejects_bad_inputs():
    with pytest.raises(ValueError, match="head dim 96"):
        BatchPrefill(32, 8, 96, 16)
    pre = BatchPrefill(32, 8, 128, 16, max_num_tokens=64)
    q, k, v, bsr = paged_batch([100], [100], 16, 32, 8, 128, torch.bfloat16)
    pre.plan(bsr)
    with pytest.raises(ValueError, match="max_num_tokens"):
        pre.run(q, k, v)


def test_prefill_reads_a_fused_qkv_slice_in_place():
    """SGLang hands attention a column slice of the fused QKV projection; the adapter passes it as it is."""
    from engine_backend.adapters.common.queries import query_rows

    hq, hkv, dim = 32, 8, 128
    q, k, v, bsr = paged_batch([100, 1, 37], [300, 50, 37], 1, hq, hkv, dim, torch.bfloat16, layout="sglang")
    qkv = poisoned_like(torch.empty(q.shape[0], (hq + 2 * hkv) * dim, dtype=q.dtype, device="cuda"))
    qkv[:, : hq * dim] = q.reshape(q.shape[0], -1)
    strided = query_rows(qkv[:, : hq * dim], hq, dim)
    assert strided.data_ptr() == qkv.data_ptr() and not strided.is_contiguous()
    ref, _ = reference.attention(q, k, v, bsr, causal=True)
    pre = BatchPrefill(hq, hkv, dim, 1)
    runs = [(pre, 0), (pre, None)] + [(like(pre, tile), None) for tile in other_mainloop_tiles(pre)]
    for pre, num_tokens in runs:  # every tile shape (see check)
        pre.plan(bsr, num_tokens=num_tokens)
        out = pre.run(strided, k, v, out=poisoned_like(q))
        assert rel_err(out, ref) < TOL[torch.bfloat16], pre.tile


def test_prefill_plan_buffer_size_is_the_kernels():
    """The wrapper sizes its plan buffer by the op's report (the kernel's layout, written once in C++)."""
    pre = BatchPrefill(32, 8, 128, 16, max_batch_size=8, max_num_tokens=1024)
    for ops in pre._kernels.values():
        assert pre._plan.numel() == ops.plan_ints(pre.max_tiles) == 4 + 5 * pre.max_tiles
    q, k, v, bsr = paged_batch([100, 1, 37], [300, 50, 37], 16, 32, 8, 128, torch.bfloat16)
    check(pre, q, k, v, bsr, causal=True)


@pytest.mark.parametrize("heads", [(12, 4), (20, 4), (28, 4), (18, 3), (14, 2)], ids=lambda h: f"group{h[0] // h[1]}")
def test_prefill_group_sizes_not_powers_of_two(heads):
    """Packed rows split into (token, head) by the group size through a multiply-high (prefill/params.h's Divisor):
    groups 3, 5, 6 and 7, over ragged rows, both tile shapes."""
    rng = random.Random(heads[0])
    q_lens, kv_lens = ragged_lens(rng, 6, 300)
    q, k, v, bsr = paged_batch(q_lens, kv_lens, 16, *heads, 128, torch.bfloat16)
    check(BatchPrefill(*heads, 128, 16, max_batch_size=8, max_num_tokens=4096), q, k, v, bsr, True)


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_rows_without_keys(causal):
    """Rows whose queries see no key (query tiles with no K/V tile) between rows with keys."""
    q, k, v, bsr = paged_batch([5, 40, 1, 7, 3], [0, 300, 0, 7, 0], 16, 32, 8, 128, torch.bfloat16)
    check(BatchPrefill(32, 8, 128, 16, causal=causal), q, k, v, bsr, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_many_short_rows(causal):
    """More query tiles than resident CTAs, many streaming one K/V tile, page size 1."""
    rng = random.Random(5)
    q_lens = [rng.choice([1, 2, rng.randint(1, 64), rng.randint(64, 300)]) for _ in range(96)]
    kv_lens = [n + rng.choice([0, 0, rng.randint(0, 500)]) for n in q_lens]
    q, k, v, bsr = paged_batch(q_lens, kv_lens, 1, 32, 8, 128, torch.bfloat16)
    check(BatchPrefill(32, 8, 128, 1, causal=causal, max_batch_size=96, max_num_tokens=sum(q_lens)), q, k, v, bsr,
          causal)
