"""vLLM adapter, GPU: the real builder and impl (vLLM's cache-write op, our kernels) against
engine_backend.reference, eagerly and under CUDA-graph replay, and without host syncs.

The reference is computed request by request from vLLM's own fields (one BSR per request),
independently of the adapter's decode/prefill split.
"""

import os

import pytest

if os.environ.get("ENGINE_BACKEND_REQUIRE_VLLM", "0") not in ("", "0"):
    import vllm  # noqa: F401  (the vLLM CI job: a missing vLLM must fail, never skip)
else:
    pytest.importorskip("vllm")

import torch

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from vllm.config import VllmConfig
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec

from engine_backend import BSR
from engine_backend.adapters.vllm.backend import EngineBackendAttentionBackend
from engine_backend.adapters.vllm.builder import EngineBackendMetadataBuilder
from engine_backend.reference import attention

import vllm_fixtures

DEVICE = "cuda"
DTYPE = torch.bfloat16
HQ, HKV, D, PAGE = 32, 8, 128, 16
NUM_BLOCKS = 1024  # > MAX_REQS * WIDTH: every table entry a distinct page
MAX_REQS, WIDTH = 16, 32
# bf16 rounds the output and the softmax probabilities (8 mantissa bits): a relative L2 error
# of a few 1e-3 (the kernel tests use the same bound).
REL_TOL = 1.5e-2


def assert_matches(out, want):
    assert not out.isnan().any(), "some query tokens were not written"
    rel = float((out.float() - want.float()).norm() / want.float().norm().clamp_min(1e-6))
    assert rel < REL_TOL, f"relative L2 error {rel:.3g} >= {REL_TOL}"


def make_impl(**variant):
    return vllm_fixtures.make_impl(
        DTYPE, num_heads=HQ, head_size=D, scale=D**-0.5, num_kv_heads=HKV, kv_cache_dtype="auto", **variant
    )


def make_builder(impl):
    config = VllmConfig()
    layer = vllm_fixtures.register_layer(config, "layers.0.attn", vllm_fixtures.StubLayer(impl, DEVICE))
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=D, dtype=DTYPE)
    builder = EngineBackendMetadataBuilder(spec, ["layers.0.attn"], config, torch.device(DEVICE))
    return builder, layer


class PersistentBatch:
    """vLLM-style persistent step buffers, refilled in place every step."""

    def __init__(self):
        self.table = torch.zeros(MAX_REQS, WIDTH, dtype=torch.int32, device=DEVICE)
        self.seq_lens = torch.zeros(MAX_REQS, dtype=torch.int32, device=DEVICE)
        self.qsl = torch.zeros(MAX_REQS + 1, dtype=torch.int32, device=DEVICE)
        self.qsl_cpu = torch.zeros(MAX_REQS + 1, dtype=torch.int32)
        self.steps = 0

    def fill(self, query_lens, seq_lens) -> CommonAttentionMetadata:
        reqs, tokens = len(query_lens), sum(query_lens)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        self.qsl_cpu.fill_(tokens)
        self.qsl_cpu[: reqs + 1] = torch.tensor(starts, dtype=torch.int32)
        self.qsl.copy_(self.qsl_cpu)
        self.seq_lens.zero_()
        self.seq_lens[:reqs] = torch.tensor(seq_lens, dtype=torch.int32)
        # Distinct pages for every table entry, a new assignment every step.
        self.steps += 1
        pages = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(self.steps))
        self.table.copy_(pages[: MAX_REQS * WIDTH].view(MAX_REQS, WIDTH))
        table = self.table.cpu()
        slots = [
            int(table[r, pos // PAGE]) * PAGE + pos % PAGE
            for r, (q, s) in enumerate(zip(query_lens, seq_lens))
            for pos in range(s - q, s)
        ]
        return CommonAttentionMetadata(
            query_start_loc=self.qsl[: reqs + 1],
            query_start_loc_cpu=self.qsl_cpu[: reqs + 1],
            seq_lens=self.seq_lens[:reqs],
            num_reqs=reqs,
            num_actual_tokens=tokens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_table_tensor=self.table[:reqs],
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        )


def reference_output(q, kv_cache, common, impl):
    """Per request, from vLLM's fields only."""
    out = torch.zeros_like(q)
    qsl = common.query_start_loc_cpu.tolist()
    for r in range(common.num_reqs):
        q0, q1 = qsl[r], qsl[r + 1]
        if q1 == q0:
            continue
        row = BSR.from_block_table(
            common.block_table_tensor[r : r + 1],
            common.seq_lens[r : r + 1],
            PAGE,
            qo_indptr=torch.tensor([0, q1 - q0], dtype=torch.int32, device=DEVICE),
        )
        out[q0:q1] = attention(
            q[q0:q1],
            kv_cache[0],
            kv_cache[1],
            row,
            causal=True,
            sm_scale=impl.scale,
            variant=impl.layer_shape.variant,
            alibi_slopes=None if impl.alibi_slopes is None else impl.alibi_slopes.to(DEVICE),
        )[0]
    return out


def fill_cache_history(kv_cache, seed=3):
    """Random K/V everywhere: the history every request's queries attend to."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    kv_cache.copy_(torch.randn(kv_cache.shape, generator=gen, device=DEVICE, dtype=torch.float32).to(DTYPE))


def run_step(builder, layer, kv_cache, query_lens, seq_lens, batch, seed=0):
    common = batch.fill(query_lens, seq_lens)
    fill_cache_history(kv_cache)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    tokens = common.num_actual_tokens
    q = torch.randn(tokens, HQ, D, generator=gen, device=DEVICE).to(DTYPE)
    k = torch.randn(tokens, HKV, D, generator=gen, device=DEVICE).to(DTYPE)
    v = torch.randn(tokens, HKV, D, generator=gen, device=DEVICE).to(DTYPE)
    layer.impl.do_kv_cache_update(layer, k, v, kv_cache, common.slot_mapping)
    metadata = builder.build(0, common)
    out = torch.full((tokens, HQ, D), float("nan"), dtype=DTYPE, device=DEVICE)
    layer.impl.forward(layer, q, k, v, kv_cache, metadata, out)
    return out, reference_output(q, kv_cache, common, layer.impl)


def new_kv_cache():
    shape = EngineBackendAttentionBackend.get_kv_cache_shape(NUM_BLOCKS, PAGE, HKV, D)
    return torch.zeros(shape, dtype=DTYPE, device=DEVICE)


STEPS = {
    "decode_only": ([1, 1, 1, 1, 1], [1, 17, 64, 300, 33]),
    "prefill_only": ([40, 7, 129], [40, 7, 129]),
    "mixed_with_chunked_prefill": ([1, 1, 1, 25, 64, 3], [90, 5, 211, 25, 200, 3]),
}
VARIANTS = {
    "default": {},
    "sliding_window": dict(sliding_window=32),
    "soft_cap": dict(logits_soft_cap=20.0),
    "alibi": dict(alibi_slopes=[2.0 ** (-(h + 1) / 4) for h in range(HQ)]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("step", list(STEPS))
def test_forward_matches_reference(step, variant):
    builder, layer = make_builder(make_impl(**VARIANTS[variant]))
    out, want = run_step(builder, layer, new_kv_cache(), *STEPS[step], PersistentBatch())
    assert_matches(out, want)


def test_kv_cache_update_writes_vllm_slots():
    builder, layer = make_builder(make_impl())
    batch, kv_cache = PersistentBatch(), new_kv_cache()
    common = batch.fill([3], [10])
    k = torch.randn(3, HKV, D, device=DEVICE).to(DTYPE)
    v = torch.randn(3, HKV, D, device=DEVICE).to(DTYPE)
    layer.impl.do_kv_cache_update(layer, k, v, kv_cache, common.slot_mapping)
    slots = common.slot_mapping
    assert torch.equal(kv_cache[0].flatten(0, 1)[slots], k)
    assert torch.equal(kv_cache[1].flatten(0, 1)[slots], v)


def test_build_never_syncs_with_the_device():
    builder, layer = make_builder(make_impl())
    batch = PersistentBatch()
    common = batch.fill(*STEPS["mixed_with_chunked_prefill"])
    builder.build(0, common)  # first build may allocate
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        builder.build(0, common)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_decode_cuda_graphs_replay_fresh_metadata():
    """Capture decode graphs at two batch sizes from one builder (as vLLM does), then replay each
    after planning new sequence lengths and pages: replays must match the reference."""
    builder, layer = make_builder(make_impl())
    batch, kv_cache = PersistentBatch(), new_kv_cache()
    q_buf = torch.zeros(MAX_REQS, HQ, D, dtype=DTYPE, device=DEVICE)
    out_buf = torch.zeros(MAX_REQS, HQ, D, dtype=DTYPE, device=DEVICE)
    graphs = {}
    for size in (2, 4):
        capture = batch.fill([1] * size, [1] * size)
        metadata = builder.build_for_cudagraph_capture(capture)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer.impl.forward(layer, q_buf[:size], None, None, kv_cache, metadata, out_buf[:size])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer.impl.forward(layer, q_buf[:size], None, None, kv_cache, metadata, out_buf[:size])
        graphs[size] = graph

    for size, seq_lens in ((4, [70, 3, 250, 18]), (2, [129, 40]), (4, [1, 300, 64, 5])):
        common = batch.fill([1] * size, seq_lens)
        fill_cache_history(kv_cache, seed=size + seq_lens[0])
        q_buf[:size].normal_()
        builder.build(0, common)  # vLLM builds metadata before every replay
        graphs[size].replay()
        want = reference_output(q_buf[:size], kv_cache, common, layer.impl)
        assert_matches(out_buf[:size], want)
