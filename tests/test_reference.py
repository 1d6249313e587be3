"""The torch reference against a naive float64 softmax written here, and the algebra of
attention-state merging. Every kernel test trusts ``reference``; this file is why."""

from __future__ import annotations

import math

import pytest
import torch

from engine_backend import BSR, Variant, reference

F64 = torch.float64


# ------------------------------------------------------------------------ the naive oracle
def naive_attention(q, k_cache, v_cache, pages, kv_lens, q_lens, *, causal, sm_scale, variant, alibi_slopes=None):
    """Per-row, per-query, per-head loops; keys gathered token by token; float64 throughout."""
    page_size, hkv = k_cache.shape[1], k_cache.shape[2]
    hq = q.shape[1]
    out = torch.zeros(q.shape[0], hq, v_cache.shape[-1], dtype=F64)
    lse = torch.full((q.shape[0], hq), -math.inf, dtype=F64)
    q0 = 0
    for row_pages, kv_len, q_len in zip(pages, kv_lens, q_lens):
        tokens = [(row_pages[t // page_size], t % page_size) for t in range(kv_len)]
        for i in range(q_len):
            q_pos = kv_len - q_len + i  # the queries are the newest tokens of the row
            for h in range(hq):
                kv_h = h // (hq // hkv)
                scores, values = [], []
                for t, (page, off) in enumerate(tokens):
                    if causal and t > q_pos:
                        continue
                    if variant.window_left >= 0 and q_pos - t > variant.window_left:
                        continue
                    s = float(q[q0 + i, h].to(F64) @ k_cache[page, off, kv_h].to(F64)) * sm_scale
                    if variant.logits_soft_cap > 0:
                        s = variant.logits_soft_cap * math.tanh(s / variant.logits_soft_cap)
                    if variant.alibi:
                        s += float(alibi_slopes[h]) * (t - q_pos)
                    scores.append(s)
                    values.append(v_cache[page, off, kv_h].to(F64))
                if not scores:
                    continue
                m = max(scores)
                weights = [math.exp(s - m) for s in scores]
                total = sum(weights)
                out[q0 + i, h] = sum(w * v for w, v in zip(weights, values)) / total
                lse[q0 + i, h] = m + math.log(total)
        q0 += q_len
    return out, lse


def make_case(kv_lens, q_lens, *, hq=4, hkv=4, d=16, page_size=4, dtype=F64, seed=0):
    """Random paged KV (pages scattered in a larger cache) and a BSR built from a block table."""
    gen = torch.Generator().manual_seed(seed)
    width = max(1, max(-(-n // page_size) for n in kv_lens)) + 1  # one padding page per row
    num_pages = len(kv_lens) * width + 3
    perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
    table = perm[: len(kv_lens) * width].view(len(kv_lens), width)
    pages = [table[r].tolist() for r in range(len(kv_lens))]
    k_cache = torch.randn(num_pages, page_size, hkv, d, generator=gen, dtype=F64).to(dtype)
    v_cache = torch.randn(num_pages, page_size, hkv, d, generator=gen, dtype=F64).to(dtype)
    q = torch.randn(sum(q_lens), hq, d, generator=gen, dtype=F64).to(dtype)
    qo_indptr = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    bsr = BSR.from_block_table(table, torch.tensor(kv_lens, dtype=torch.int32), page_size, qo_indptr=qo_indptr)
    return q, k_cache, v_cache, bsr, pages


def check_against_naive(kv_lens, q_lens, *, causal=False, sm_scale=None, variant=Variant(), alibi=None, **case):
    q, k_cache, v_cache, bsr, pages = make_case(kv_lens, q_lens, **case)
    out, lse = reference.attention(
        q, k_cache, v_cache, bsr, causal=causal, sm_scale=sm_scale, variant=variant, alibi_slopes=alibi
    )
    scale = 1 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    want_out, want_lse = naive_attention(
        q, k_cache, v_cache, pages, kv_lens, q_lens, causal=causal, sm_scale=scale, variant=variant, alibi_slopes=alibi
    )
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    assert not out.isnan().any() and not lse.isnan().any()
    tol = dict(atol=1e-10, rtol=1e-10) if q.dtype == F64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.to(F64), want_out, **tol)
    torch.testing.assert_close(lse.to(F64), want_lse, **tol)
    return out, lse


SHAPES = {  # (kv_lens, q_lens): several rows of different lengths each
    "decode": ([9, 1, 17, 4], [1, 1, 1, 1]),
    "append": ([9, 3, 17, 12], [3, 1, 5, 12]),  # q_len < kv_len, plus one q_len = kv_len
    "prefill": ([6, 1, 11], [6, 1, 11]),  # q_len = kv_len
}
HEADS = {"mha": (4, 4), "gqa4": (8, 2), "mqa": (4, 1)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("heads", HEADS)
def test_matches_naive_softmax(shape, causal, page_size, heads):
    hq, hkv = HEADS[heads]
    check_against_naive(*SHAPES[shape], causal=causal, page_size=page_size, hq=hq, hkv=hkv)


def test_float32_inputs_give_float32_lse_and_match():
    out, lse = check_against_naive([7, 12], [2, 12], causal=True, dtype=torch.float32)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


def test_bf16_output_keeps_the_query_dtype():
    q, k_cache, v_cache, bsr, _ = make_case([8], [3], dtype=torch.bfloat16)
    out, lse = reference.attention(q, k_cache, v_cache, bsr, causal=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_sm_scale():
    check_against_naive([10, 5], [4, 1], causal=True, sm_scale=0.37)


def test_logits_soft_cap():
    # A large sm_scale makes raw logits exceed the cap, so the tanh matters.
    check_against_naive([10, 5], [4, 1], causal=True, sm_scale=3.0, variant=Variant(logits_soft_cap=2.5))


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window(window, causal):
    check_against_naive([12, 5, 9], [4, 5, 1], causal=causal, variant=Variant(window_left=window), page_size=4)


def test_alibi():
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=F64)
    check_against_naive([12, 5], [3, 5], causal=True, variant=Variant(alibi=True), alibi=slopes, hq=4, hkv=2)


def test_alibi_without_slopes_is_refused():
    q, k_cache, v_cache, bsr, _ = make_case([4], [1])
    with pytest.raises(ValueError, match="alibi_slopes"):
        reference.attention(q, k_cache, v_cache, bsr, variant=Variant(alibi=True))


def test_rows_without_keys_give_zero_and_minus_inf():
    out, lse = check_against_naive([0, 6, 0], [1, 2, 3], causal=True)
    empty = torch.tensor([True, False, False, True, True, True])  # queries of rows 0 and 2
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()


def test_fully_masked_queries_give_zero_and_minus_inf():
    # Causal with q_len > kv_len: the first q_len - kv_len queries sit before every key.
    out, lse = check_against_naive([2], [4], causal=True)
    assert torch.isneginf(lse[:2]).all() and not out[:2].any()


def test_lse_is_natural_log():
    # q = 0 makes every score 0, so lse = ln(kv_len) exactly and out is the mean of the values.
    q, k_cache, v_cache, bsr, pages = make_case([5, 12], [1, 1], page_size=4)
    out, lse = reference.attention(torch.zeros_like(q), k_cache, v_cache, bsr)
    torch.testing.assert_close(lse, torch.tensor([[math.log(5)] * 4, [math.log(12)] * 4], dtype=F64))
    row1 = torch.stack([v_cache[pages[1][t // 4], t % 4] for t in range(12)])
    torch.testing.assert_close(out[1], row1.mean(0))


def test_gqa_mismatched_heads_is_refused():
    q, k_cache, v_cache, bsr, _ = make_case([4], [1], hq=4, hkv=4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        reference.attention(q[:, :3], k_cache, v_cache, bsr)


# --------------------------------------------------------------------------- merge_state
def random_state(n=6, h=3, d=8, seed=0, scale=5.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, d, generator=gen, dtype=F64), torch.randn(n, h, generator=gen, dtype=F64) * scale


def close(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a[1], b[1], atol=1e-12, rtol=1e-12)


def test_merge_is_commutative_and_associative():
    a, b, c = random_state(seed=1), random_state(seed=2), random_state(seed=3)
    close(reference.merge_state(*a, *b), reference.merge_state(*b, *a))
    close(
        reference.merge_state(*reference.merge_state(*a, *b), *c),
        reference.merge_state(*a, *reference.merge_state(*b, *c)),
    )


def test_merge_of_disjoint_key_sets_equals_attention_over_their_union():
    # Page size 1: a row's KV is exactly the token ids listed, so a random split of each row's
    # tokens into two BSRs gives two disjoint key sets (some rows get an empty side).
    gen = torch.Generator().manual_seed(7)
    hq, hkv, d, kv_lens = 8, 2, 16, [9, 1, 14, 5]
    num_tokens = 40
    k_cache = torch.randn(num_tokens, 1, hkv, d, generator=gen, dtype=F64)
    v_cache = torch.randn(num_tokens, 1, hkv, d, generator=gen, dtype=F64)
    q = torch.randn(len(kv_lens), hq, d, generator=gen, dtype=F64)
    tokens = torch.randperm(num_tokens, generator=gen)[: sum(kv_lens)].split(kv_lens)
    masks = [torch.rand(n, generator=gen) < 0.5 for n in kv_lens]
    masks[1][:] = True  # row 1: everything on one side, the other side empty

    def bsr_of(rows):
        lens = [len(r) for r in rows]
        indptr = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        indices = torch.cat(rows).to(torch.int32) if sum(lens) else torch.zeros(0, dtype=torch.int32)
        return BSR(indptr, indices, torch.tensor(lens, dtype=torch.int32), torch.arange(len(rows) + 1, dtype=torch.int32), 1)

    whole = reference.attention(q, k_cache, v_cache, bsr_of(list(tokens)))
    part_a = reference.attention(q, k_cache, v_cache, bsr_of([t[m] for t, m in zip(tokens, masks)]))
    part_b = reference.attention(q, k_cache, v_cache, bsr_of([t[~m] for t, m in zip(tokens, masks)]))
    assert torch.isneginf(part_b[1][1]).all()  # the empty side of row 1
    close(reference.merge_state(*part_a, *part_b), whole)


def test_minus_inf_state_is_the_identity():
    a = random_state(seed=4)
    empty = (torch.randn_like(a[0]), torch.full_like(a[1], -math.inf))  # values are ignored
    for merged in (reference.merge_state(*a, *empty), reference.merge_state(*empty, *a)):
        assert torch.equal(merged[0], a[0]) and torch.equal(merged[1], a[1])


def test_merging_two_empty_states_gives_zero_and_minus_inf():
    v, lse = random_state()
    out, out_lse = reference.merge_state(v, torch.full_like(lse, -math.inf), v, torch.full_like(lse, -math.inf))
    assert not out.any() and torch.isneginf(out_lse).all()


def test_merge_does_not_overflow_for_large_lse():
    v_a, v_b = torch.ones(1, 1, 4, dtype=F64), torch.zeros(1, 1, 4, dtype=F64)
    out, lse = reference.merge_state(v_a, torch.tensor([[1000.0]], dtype=F64), v_b, torch.tensor([[999.0]], dtype=F64))
    w_a = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(out, torch.full_like(out, w_a))
    torch.testing.assert_close(lse, torch.tensor([[1000.0 + math.log(1 + math.exp(-1.0))]], dtype=F64))


def test_merge_states_equals_pairwise_fold_and_empty_ranges_are_identity():
    v, lse = random_state(n=12, seed=5)
    lse[3] = -math.inf  # one empty state inside a range
    indptr = torch.tensor([0, 0, 1, 5, 5, 12], dtype=torch.int32)
    out, out_lse = reference.merge_states(v, lse, indptr)
    assert out.shape == (5, 3, 8) and out_lse.shape == (5, 3)
    bounds = indptr.tolist()
    for i in range(5):
        if bounds[i] == bounds[i + 1]:
            assert not out[i].any() and torch.isneginf(out_lse[i]).all()
            continue
        acc = (v[bounds[i] : bounds[i] + 1], lse[bounds[i] : bounds[i] + 1])
        for s in range(bounds[i] + 1, bounds[i + 1]):
            acc = reference.merge_state(*acc, v[s : s + 1], lse[s : s + 1])
        close((out[i : i + 1], out_lse[i : i + 1]), acc)


def test_merge_states_of_lse_weights_is_a_softmax():
    # n-way merge of states whose values are one-hot: the result is softmax(lse).
    lse = torch.tensor([[0.3], [-1.2], [2.0]], dtype=F64)
    v = torch.eye(3, dtype=F64).view(3, 1, 3)
    out, out_lse = reference.merge_states(v, lse, torch.tensor([0, 3], dtype=torch.int32))
    torch.testing.assert_close(out[0, 0], torch.softmax(lse[:, 0], 0))
    torch.testing.assert_close(out_lse[0, 0], torch.logsumexp(lse[:, 0], 0))


def test_cache_page_size_differing_from_the_bsrs_is_refused():
    # Read with the cache's own page size, the rows' tokens would come from the wrong slots.
    q, k_cache, v_cache, bsr, _ = make_case([8, 5], [1, 1], page_size=4)
    with pytest.raises(ValueError, match=r"the caches must be \[pages, 4 \(the BSR's page size\)"):
        reference.attention(q, k_cache.view(-1, 2, *k_cache.shape[2:]), v_cache.view(-1, 2, *v_cache.shape[2:]), bsr)


def test_fewer_query_rows_than_the_bsr_lists_are_refused():
    q, k_cache, v_cache, bsr, _ = make_case([8, 5], [3, 2])
    with pytest.raises(ValueError, match="q has 4 rows but the BSR's queries number 5"):
        reference.attention(q[:4], k_cache, v_cache, bsr)


def test_alibi_slopes_without_an_alibi_variant_are_refused():
    # Silently ignored, they would hide a variant that lost its ALiBi flag.
    q, k_cache, v_cache, bsr, _ = make_case([4], [1])
    with pytest.raises(ValueError, match="alibi_slopes given to a variant without ALiBi"):
        reference.attention(q, k_cache, v_cache, bsr, alibi_slopes=torch.ones(q.shape[1], dtype=F64))
