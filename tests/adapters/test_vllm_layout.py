"""vLLM adapter, CPU: vLLM's real CommonAttentionMetadata -> decode / prefill BSRs.

Every expectation is computed here from the per-request lists the batch is made of, never
from the code under test; the semantic check compares engine_backend.reference on the two
BSRs with causal attention computed request by request straight from vLLM's fields.
"""

import math
import os
from dataclasses import dataclass

import pytest

if os.environ.get("ENGINE_BACKEND_REQUIRE_VLLM", "0") not in ("", "0"):
    import vllm  # noqa: F401  (the vLLM CI job: a missing vLLM must fail, never skip)
else:
    pytest.importorskip("vllm")

import torch
from vllm.config import DeviceConfig, VllmConfig
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec

from engine_backend import BSR
from engine_backend.adapters.common.indptr import StridedAranges
from engine_backend.adapters.vllm.builder import EngineBackendMetadataBuilder
from engine_backend.adapters.vllm.layout import step_layout
from engine_backend.reference import attention

import vllm_fixtures
from reference_kernels import ReferenceKernels

pytestmark = pytest.mark.vllm

PAGE = 4
WIDTH = 8  # block-table columns (max pages per request)
TABLE_ROWS = 16  # vLLM's persistent table has max_num_seqs rows; a step uses a prefix


@dataclass
class Batch:
    query_lens: list  # per request (0 for padding requests)
    seq_lens: list  # per request: KV length after this step's tokens
    padded_tokens: int = 0  # tokens past the last request (full-CUDA-graph padding)
    host_seq_lens: bool = True  # vLLM's runner fills seq_lens_cpu_upper_bound; other callers may not

    def metadata(self, seed=0) -> CommonAttentionMetadata:
        gen = torch.Generator().manual_seed(seed)
        reqs = len(self.query_lens)
        # Distinct page ids per request, as vLLM's allocator gives; unused columns hold junk.
        persistent_table = torch.randperm(TABLE_ROWS * WIDTH, generator=gen).view(TABLE_ROWS, WIDTH).int()
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        qsl = torch.tensor(starts, dtype=torch.int32)
        tokens = starts[-1] + self.padded_tokens
        return CommonAttentionMetadata(
            query_start_loc=qsl.clone(),
            query_start_loc_cpu=qsl,
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32),
            num_reqs=reqs,
            num_actual_tokens=tokens,
            max_query_len=max(self.query_lens),
            max_seq_len=max(self.seq_lens),
            block_table_tensor=persistent_table[:reqs],
            slot_mapping=torch.zeros(tokens, dtype=torch.int64),
            seq_lens_cpu_upper_bound=torch.tensor(self.seq_lens, dtype=torch.int32) if self.host_seq_lens else None,
        )


def cumulative(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def expected_split(query_lens):
    """vLLM's rule for a reordered batch: all decodes if no query is longer than one token,
    else the requests before the first longer query."""
    if max(query_lens) <= 1:
        return len(query_lens)
    return next(i for i, n in enumerate(query_lens) if n > 1)


def check_bsr(bsr, table, rows, seq_lens, qo_indptr):
    """Every field of ``bsr`` against the requests ``rows`` of the batch."""
    assert bsr.num_rows == len(rows)
    assert bsr.page_size == PAGE
    assert bsr.indptr.tolist() == [r * WIDTH for r in range(len(rows) + 1)]
    assert bsr.kv_lens.tolist() == [seq_lens[r] for r in rows]
    assert bsr.qo_indptr.tolist() == qo_indptr
    for i, r in enumerate(rows):
        used = math.ceil(seq_lens[r] / PAGE)
        start = bsr.indptr[i].item()
        assert bsr.indices[start : start + used].tolist() == table[r, :used].tolist()
    # Zero-copy: the indices alias vLLM's table from the part's first row on.
    assert bsr.indices.data_ptr() == table[rows[0]].data_ptr()
    # The package's own constructor agrees field by field.
    ref = BSR.from_block_table(table[rows[0] : rows[-1] + 1], bsr.kv_lens, PAGE, bsr.qo_indptr)
    for name in ("indptr", "indices", "kv_lens", "qo_indptr"):
        assert torch.equal(getattr(bsr, name), getattr(ref, name)), name


BATCHES = {
    "decode_only": Batch(query_lens=[1, 1, 1, 1], seq_lens=[5, 1, 17, 32]),
    "prefill_only": Batch(query_lens=[7, 3, 12], seq_lens=[7, 3, 12]),
    "mixed": Batch(query_lens=[1, 1, 1, 9, 4, 6], seq_lens=[13, 2, 30, 9, 20, 6]),  # decodes, chunk, prefills
    "spec_verify_rows_are_prefill": Batch(query_lens=[1, 3, 3], seq_lens=[8, 11, 4]),
    "graph_padded_decode": Batch(query_lens=[1, 1, 1, 0], seq_lens=[9, 4, 21, 0], padded_tokens=1),
    "mixed_with_token_padding": Batch(query_lens=[1, 5, 2], seq_lens=[6, 5, 10], padded_tokens=3),
    "no_host_seq_lens": Batch(query_lens=[1, 4, 2], seq_lens=[6, 9, 2], host_seq_lens=False),
}


@pytest.mark.parametrize("name", list(BATCHES))
def test_layout_fields(name):
    batch = BATCHES[name]
    common = batch.metadata()
    table = common.block_table_tensor
    layout = step_layout(common, PAGE, StridedAranges("cpu"))

    reqs = len(batch.query_lens)
    decodes = expected_split(batch.query_lens)
    decode_tokens = sum(batch.query_lens[:decodes]) + (batch.padded_tokens if decodes == reqs else 0)
    prefill_tokens = sum(batch.query_lens[decodes:])
    assert (layout.num_decodes, layout.num_prefills) == (decodes, reqs - decodes)
    assert layout.num_decode_tokens == decode_tokens == decodes
    assert layout.prefill_token_range == (decode_tokens, decode_tokens + prefill_tokens)
    prefill_kv_tokens = sum(batch.seq_lens[decodes:]) if batch.host_seq_lens else None
    assert layout.num_prefill_kv_tokens == prefill_kv_tokens

    if decodes:
        check_bsr(layout.decode, table, list(range(decodes)), batch.seq_lens, list(range(decodes + 1)))
    else:
        assert layout.decode is None
    if decodes < reqs:
        qo = cumulative(batch.query_lens[decodes:])
        check_bsr(layout.prefill, table, list(range(decodes, reqs)), batch.seq_lens, qo)
    else:
        assert layout.prefill is None
    assert layout.is_uniform_decode == (decodes == reqs)


def naive_vllm_attention(q, k_cache, v_cache, common, sm_scale):
    """Causal attention per request straight from vLLM's fields: request r's queries are the
    last query_len tokens of its seq_len, its KV the first seq_len slots of its block row."""
    out = torch.zeros_like(q)
    qsl, seq_lens = common.query_start_loc_cpu.tolist(), common.seq_lens.tolist()
    for r in range(common.num_reqs):
        q_r = q[qsl[r] : qsl[r + 1]].double()
        n_q, n_kv = q_r.shape[0], seq_lens[r]
        if n_q == 0 or n_kv == 0:
            continue
        slots = [common.block_table_tensor[r, t // PAGE].item() * PAGE + t % PAGE for t in range(n_kv)]
        k = k_cache.flatten(0, 1)[slots].double()
        v = v_cache.flatten(0, 1)[slots].double()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q_r, k) * sm_scale
        q_pos = torch.arange(n_q)[:, None] + (n_kv - n_q)
        scores = scores.masked_fill(torch.arange(n_kv)[None, :] > q_pos, -math.inf)
        out[qsl[r] : qsl[r + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


@pytest.mark.parametrize("name", list(BATCHES))
def test_layout_means_what_vllm_means(name):
    """Reference attention over the two BSRs == per-request causal attention from vLLM's fields."""
    common = BATCHES[name].metadata(seed=1)
    gen = torch.Generator().manual_seed(2)
    hq, hkv, d = 4, 2, 16
    q = torch.randn(common.num_actual_tokens, hq, d, generator=gen, dtype=torch.float64)
    k_cache = torch.randn(TABLE_ROWS * WIDTH, PAGE, hkv, d, generator=gen, dtype=torch.float64)
    v_cache = torch.randn(TABLE_ROWS * WIDTH, PAGE, hkv, d, generator=gen, dtype=torch.float64)
    sm_scale = d**-0.5

    layout = step_layout(common, PAGE, StridedAranges("cpu"))
    got = torch.zeros_like(q)
    if layout.decode is not None:
        n = layout.num_decode_tokens
        got[:n] = attention(q[:n], k_cache, v_cache, layout.decode, causal=True, sm_scale=sm_scale)[0]
    if layout.prefill is not None:
        start, end = layout.prefill_token_range
        got[start:end] = attention(q[start:end], k_cache, v_cache, layout.prefill, causal=True, sm_scale=sm_scale)[0]
    want = naive_vllm_attention(q, k_cache, v_cache, common, sm_scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_row_pointers_are_persistent_across_steps():
    aranges = StridedAranges("cpu", initial_rows=16)
    first = step_layout(BATCHES["decode_only"].metadata(), PAGE, aranges)
    second = step_layout(BATCHES["mixed"].metadata(), PAGE, aranges)
    assert first.decode.indptr.data_ptr() == second.decode.indptr.data_ptr()
    assert first.decode.qo_indptr.data_ptr() == second.decode.qo_indptr.data_ptr()
    assert first.decode.indptr.data_ptr() == second.prefill.indptr.data_ptr()


def test_strided_aranges_grow_past_their_initial_size():
    aranges = StridedAranges("cpu", initial_rows=2)
    assert aranges.get(2, 3).tolist() == [0, 3, 6]
    assert aranges.get(5, 3).tolist() == [0, 3, 6, 9, 12, 15]
    assert aranges.get(1, 1).tolist() == [0, 1]


def test_dropped_kv_token_fault_shortens_every_row():
    batch = BATCHES["mixed"]
    layout = step_layout(batch.metadata(), PAGE, StridedAranges("cpu"), dropped_kv_tokens=1)
    kv = layout.decode.kv_lens.tolist() + layout.prefill.kv_lens.tolist()
    assert kv == [max(n - 1, 0) for n in batch.seq_lens]
    assert layout.num_prefill_kv_tokens == sum(kv[layout.num_decodes :])


def test_layout_refuses_zero_length_requests_among_decodes():
    # vLLM puts padding requests last; one ahead of a prefill would misalign decode tokens.
    common = Batch(query_lens=[1, 0, 1, 4], seq_lens=[3, 0, 5, 4]).metadata()
    with pytest.raises(RuntimeError, match="one query token per decode request"):
        step_layout(common, PAGE, StridedAranges("cpu"))


@pytest.mark.parametrize("causal", [False, torch.tensor([True, False, True, True])])
def test_layout_refuses_non_causal_steps(causal):
    common = BATCHES["decode_only"].metadata().replace(causal=causal)
    with pytest.raises(RuntimeError, match="causal attention only"):
        step_layout(common, PAGE, StridedAranges("cpu"))


# ------------------------------------------------------------------ the real builder, on CPU
@pytest.fixture(scope="module")
def builder():
    config = VllmConfig(device_config=DeviceConfig(device="cpu"))
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    # No layers are registered in this config, so no GPU kernels are created.
    return EngineBackendMetadataBuilder(spec, [], config, torch.device("cpu")), config


def test_builder_reorders_decodes_first_and_sizes_from_config(builder):
    b, config = builder
    assert b.reorder_batch_threshold == 1
    assert b.limits.max_prefill_rows == config.scheduler_config.max_num_seqs
    assert b.limits.max_prefill_tokens == config.scheduler_config.max_num_batched_tokens
    assert b.limits.max_decode_rows >= config.scheduler_config.max_num_seqs
    assert b.page_size == PAGE and b.dtype == torch.bfloat16


def test_builder_build_carries_the_layout_and_vllm_fields(builder):
    b, _ = builder
    common = BATCHES["mixed"].metadata()
    metadata = b.build(0, common)
    expected = step_layout(common, PAGE, StridedAranges("cpu"))
    assert (metadata.layout.num_decodes, metadata.layout.prefill_token_range) == (
        expected.num_decodes,
        expected.prefill_token_range,
    )
    assert metadata.seq_lens is common.seq_lens and metadata.block_table is common.block_table_tensor
    assert metadata.num_actual_tokens == common.num_actual_tokens


def test_builder_refuses_to_capture_a_mixed_batch(builder):
    b, _ = builder
    b.build_for_cudagraph_capture(BATCHES["graph_padded_decode"].metadata())
    with pytest.raises(RuntimeError, match="UNIFORM_SINGLE_TOKEN_DECODE"):
        b.build_for_cudagraph_capture(BATCHES["mixed"].metadata())


# ------------------------------------------------------------------ a builder with layers, on CPU
HQ, HKV, D = 4, 2, 64


def builder_with_a_layer(num_blocks=None, **impl_options):
    """The real builder over one registered layer with the real impl; ``num_blocks``: bind a KV cache of
    the backend's layout with that many blocks to the layer, as vLLM does once it has allocated it."""
    config = VllmConfig(device_config=DeviceConfig(device="cpu"))
    impl = vllm_fixtures.make_impl(num_heads=HQ, head_size=D, scale=D**-0.5, num_kv_heads=HKV, **impl_options)
    layer = vllm_fixtures.register_layer(config, "layers.0.attn", vllm_fixtures.StubLayer(impl))
    if num_blocks is not None:
        # The backend's layout (K then V: see adapters.vllm.kv_cache), at this file's small page size.
        layer.kv_cache = torch.randn(2, num_blocks, PAGE, HKV, D).to(torch.bfloat16)
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=D, dtype=torch.bfloat16)
    return EngineBackendMetadataBuilder(spec, ["layers.0.attn"], config, torch.device("cpu")), layer


def test_builder_plans_the_step_with_its_host_counts(monkeypatch):
    """The prefill wrapper picks its tile shape from the host counts (on Hopper a short append onto a long
    cache runs the long-KV shape), so the builder must hand over both, and both parts' BSRs."""
    monkeypatch.setattr(EngineBackendMetadataBuilder, "kernel_factory", ReferenceKernels)
    b, layer = builder_with_a_layer()
    metadata = b.build(0, BATCHES["mixed"].metadata())
    kernels = metadata.kernels[layer.impl.layer_shape]
    assert kernels.decode.planned is metadata.layout.decode
    assert kernels.prefill.planned is metadata.layout.prefill
    assert kernels.prefill.counts == {"num_tokens": 9 + 4 + 6, "num_kv_tokens": 9 + 20 + 6}


@pytest.mark.parametrize("name", ["mixed", "graph_padded_decode", "prefill_only"])
def test_forward_runs_each_part_on_its_own_rows(monkeypatch, name):
    """impl.forward on reference kernels: decode tokens through the decode wrapper, prefill tokens through
    the prefill one, written in place into vLLM's output; equal to per-request attention from vLLM's fields."""
    monkeypatch.setattr(EngineBackendMetadataBuilder, "kernel_factory", ReferenceKernels)
    b, layer = builder_with_a_layer(num_blocks=TABLE_ROWS * WIDTH)
    common = BATCHES[name].metadata(seed=3)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(common.num_actual_tokens, HQ, D, generator=gen).to(torch.bfloat16)
    output = torch.full_like(q, float("nan"))
    metadata = b.build(0, common)
    assert layer.impl.forward(layer, q, None, None, layer.kv_cache, metadata, output) is output
    want = naive_vllm_attention(q, layer.kv_cache[0], layer.kv_cache[1], common, D**-0.5)
    real = int(common.query_start_loc_cpu[-1])  # padding tokens past the last request belong to no row
    torch.testing.assert_close(output[:real].float(), want[:real].float(), atol=2e-2, rtol=2e-2)


def test_builder_bounds_page_ids_by_the_bound_kv_cache(monkeypatch):
    """Debug mode (ENGINE_BACKEND_DEBUG=1; on CPU the values are checked anyway): once vLLM has bound the
    layers' KV cache, a page id past its blocks is an error naming the range, before any kernel reads it."""
    monkeypatch.setenv("ENGINE_BACKEND_DEBUG", "1")
    common = BATCHES["mixed"].metadata()  # page ids up to TABLE_ROWS * WIDTH - 1
    highest_read = max(
        int(common.block_table_tensor[r, : math.ceil(n / PAGE)].max()) for r, n in enumerate(BATCHES["mixed"].seq_lens)
    )
    unbound, _ = builder_with_a_layer()
    unbound.layout(common)  # nothing bound yet: no bound to check against
    fits, _ = builder_with_a_layer(num_blocks=highest_read + 1)
    fits.layout(common)
    too_small, _ = builder_with_a_layer(num_blocks=highest_read)
    with pytest.raises(ValueError, match=rf"out of range \[0, {highest_read}\)"):
        too_small.layout(common)
