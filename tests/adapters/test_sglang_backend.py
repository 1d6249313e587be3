"""SGLang adapter: the backend's whole attention path against an independent attention.

The backend is driven the way SGLang's ModelRunner drives it -- ``init_forward_metadata`` then
``forward`` per layer (extend with cached prefixes, MIXED, decode), and for CUDA graphs
``init_cuda_graph_state`` + ``init_forward_metadata_out_graph`` over the padded views SGLang's
own graph buffers produce -- with SGLang 0.5.16's real pools writing the K/V.

CPU tests run the backend with ``ReferenceKernels`` (engine_backend.reference) in
place of the CUDA kernels; GPU tests (``gpu`` marker) run the real kernels, eagerly and inside
a captured ``torch.cuda.CUDAGraph`` replayed on a different batch. Expected outputs come from
``naive_attention`` below, which reads each request's tokens as the test generated them and
knows nothing of pages, BSR or the pool.
"""

import math
import os

import pytest

if os.environ.get("ENGINE_BACKEND_REQUIRE_SGLANG", "0") not in ("", "0"):
    import sglang  # noqa: F401  (the SGLang CI step: a missing SGLang must fail, never skip)
else:
    pytest.importorskip("sglang")

import torch
from sglang.srt.layers.radix_attention import RadixAttention

from engine_backend.adapters.common.faults import FAULT_ENV
from engine_backend.adapters.sglang.backend import EngineBackendAttnBackend

import sglang_fixtures as fixtures
from reference_kernels import ReferenceKernels

pytestmark = pytest.mark.sglang

HQ, HKV, D = 8, 2, 64
SCALE = 1.0 / math.sqrt(D)
ATOL = RTOL = 1e-2  # bf16 output: a few units in the last place of values of order 1

CPU = pytest.param("cpu", id="cpu-reference-kernels")
GPU = pytest.param("cuda", id="gpu-kernels", marks=pytest.mark.gpu)


# ----------------------------------------------------------------------- ground truth
def naive_attention(q, keys, values, positions, *, window=-1, soft_cap=0.0):
    """q [n, HQ, D] at token ``positions`` of one request whose tokens have ``keys`` /
    ``values`` [len, HKV, D]; causal, GQA, float32."""
    k = keys.float().repeat_interleave(HQ // HKV, dim=1)
    v = values.float().repeat_interleave(HQ // HKV, dim=1)
    out = torch.empty(q.shape, dtype=torch.float32)
    for i, p in enumerate(positions):
        lo = 0 if window < 0 else max(0, p - window)
        s = torch.einsum("hd,khd->hk", q[i].float(), k[lo : p + 1]) * SCALE
        if soft_cap > 0:
            s = soft_cap * torch.tanh(s / soft_cap)
        out[i] = torch.einsum("hk,khd->hd", torch.softmax(s, dim=-1), v[lo : p + 1])
    return out


class Scenario:
    """Requests, their token K/V per layer, and the pool/table state SGLang would have."""

    def __init__(self, run, seq_lens, shared_prefix_pages=0, seed=0):
        self.run = run
        self.gen = torch.Generator().manual_seed(seed)
        self.requests = fixtures.place_requests(run, seq_lens, shared_prefix_pages)
        self.kv = {}  # (layer, request index) -> (keys, values) [len, HKV, D] bf16 on CPU
        for layer in range(len(run.model)):
            for r, n in enumerate(seq_lens):
                self.kv[layer, r] = (self.randn(n, HKV, D), self.randn(n, HKV, D))
        # A shared prefix holds the first request's tokens.
        for layer in range(len(run.model)):
            for r in range(1, len(seq_lens)):
                shared = shared_prefix_pages * run.page_size
                self.kv[layer, r][0][:shared] = self.kv[layer, 0][0][:shared]
                self.kv[layer, r][1][:shared] = self.kv[layer, 0][1][:shared]

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen).to(torch.bfloat16)

    def view(self, lengths):
        """The requests as they stand after ``lengths[r]`` tokens."""
        return [fixtures.Request(r.row, r.slots[:n], r.pages) for r, n in zip(self.requests, lengths)]

    def cache_tokens(self, lengths_before, lengths_after):
        """Write tokens [before, after) of every request into the pool, as earlier steps did."""
        pool = self.run.token_to_kv_pool
        for layer_id, layer in enumerate(self.run.model):
            for r, (a, b) in enumerate(zip(lengths_before, lengths_after)):
                if b > a:
                    keys, values = self.kv[layer_id, r]
                    loc = torch.tensor(self.requests[r].slots[a:b], device=self.run.device)
                    pool.set_kv_buffer(layer, loc, keys[a:b].to(self.run.device), values[a:b].to(self.run.device))

    def step_inputs(self, layer_id, prefix_lens, seq_lens):
        """q, and the new tokens' k and v, packed over requests as SGLang packs them. q is a column slice of a
        fused QKV buffer, as SGLang's models hand it (rows strided by the QKV width), so the adapter's in-place
        read of it is what these tests check."""
        qs, ks, vs, expected = [], [], [], []
        layer = self.run.model[layer_id]
        window = layer.sliding_window_size
        for r, (p, n) in enumerate(zip(prefix_lens, seq_lens)):
            keys, values = self.kv[layer_id, r]
            q = self.randn(n - p, HQ, D)
            qs.append(q)
            ks.append(keys[p:n])
            vs.append(values[p:n])
            expected.append(
                naive_attention(q, keys[:n], values[:n], range(p, n), window=window, soft_cap=layer.logit_cap or 0.0)
            )
        dev = self.run.device
        q = torch.cat(qs).view(-1, HQ * D)
        qkv = torch.full((q.shape[0], (HQ + 2 * HKV) * D), float("nan"), dtype=q.dtype, device=dev)
        qkv[:, : HQ * D] = q.to(dev)
        return (
            qkv[:, : HQ * D],
            torch.cat(ks).to(dev),
            torch.cat(vs).to(dev),
            torch.cat(expected).view(-1, HQ * D),
        )


def backend_for(tmp_path, device, page_size, model=None, layers=2):
    run = fixtures.runner(
        tmp_path,
        page_size=page_size,
        device=device,
        num_slots=2048,
        max_requests=8,
        context_len=512,
        model=model,
        config_overrides={"num_hidden_layers": layers},
    )
    factory = ReferenceKernels if device == "cpu" else None
    backend = EngineBackendAttnBackend(run, **({"kernel_factory": factory} if factory else {}))
    return run, backend


def assert_close(actual, expected):
    torch.testing.assert_close(actual.float().cpu(), expected, atol=ATOL, rtol=RTOL)


def gemma_like_layers():
    return torch.nn.ModuleList(
        [
            RadixAttention(HQ, D, SCALE, HKV, layer_id=0, sliding_window_size=7, logit_cap=20.0),
            RadixAttention(HQ, D, SCALE, HKV, layer_id=1, logit_cap=20.0),
        ]
    )


# ----------------------------------------------------------------------- eager
@pytest.mark.parametrize(
    "device, layers",
    [
        pytest.param("cpu", "llama", id="cpu-reference-kernels-llama"),
        pytest.param("cpu", "gemma", id="cpu-reference-kernels-gemma"),
        # The kernels' own tests cover window and soft-cap variants; one GPU shape here keeps
        # the JIT builds this file triggers to the default variant.
        pytest.param("cuda", "llama", id="gpu-kernels-llama", marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize("page_size", [1, 16])
def test_extend_with_prefix_then_decode(tmp_path, device, page_size, layers):
    """Step 1 extends three requests (a fresh prompt, and two radix-cache hits on its first
    32 tokens); step 2 decodes one token for each. Every layer is checked. "gemma" layers:
    a sliding window of 7 and soft-cap 20, then soft-cap 20 alone."""
    model = gemma_like_layers() if layers == "gemma" else None
    run, backend = backend_for(tmp_path, device, page_size, model=model)
    final = [41, 65, 49]
    scene = Scenario(run, final, shared_prefix_pages=32 // page_size)
    prefix, extended = [0, 32, 32], [40, 64, 48]
    scene.cache_tokens([0, 0, 0], prefix)
    batch = fixtures.extend_batch(run, scene.view(extended), [e - p for p, e in zip(prefix, extended)])
    backend.init_forward_metadata(batch)
    for layer_id, layer in enumerate(run.model):
        q, k, v, expected = scene.step_inputs(layer_id, prefix, extended)
        assert_close(backend.forward(q, k, v, layer, batch), expected)

    batch = fixtures.decode_batch(run, scene.view(final))
    backend.init_forward_metadata(batch)
    for layer_id, layer in enumerate(run.model):
        q, k, v, expected = scene.step_inputs(layer_id, extended, final)
        assert_close(backend.forward(q, k, v, layer, batch), expected)


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("page_size", [1, 16])
def test_mixed_batch(tmp_path, device, page_size):
    """Chunked prefill: a prompt's second chunk next to two single-token decodes."""
    run, backend = backend_for(tmp_path, device, page_size)
    scene = Scenario(run, [100, 21, 1])
    prefix, final = [60, 20, 0], [100, 21, 1]
    scene.cache_tokens([0, 0, 0], prefix)
    batch = fixtures.extend_batch(run, scene.view(final), [f - p for p, f in zip(prefix, final)], mixed=True)
    backend.init_forward_metadata(batch)
    for layer_id, layer in enumerate(run.model):
        q, k, v, expected = scene.step_inputs(layer_id, prefix, final)
        assert_close(backend.forward(q, k, v, layer, batch), expected)


@pytest.mark.parametrize("device", [CPU, GPU])
def test_drop_last_kv_fault_breaks_the_output(tmp_path, device, monkeypatch):
    """The e2e check's deliberate fault must produce output this comparison rejects."""
    monkeypatch.setenv(FAULT_ENV, "drop_last_kv")
    run, backend = backend_for(tmp_path, device, 1)
    scene = Scenario(run, [30, 9])
    scene.cache_tokens([0, 0], [29, 8])
    batch = fixtures.decode_batch(run, scene.view([30, 9]))
    backend.init_forward_metadata(batch)
    q, k, v, expected = scene.step_inputs(0, [29, 8], [30, 9])
    out = backend.forward(q, k, v, run.model[0], batch)
    assert not torch.allclose(out.float().cpu(), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("device", [CPU, GPU])
def test_prefill_graph_attention_writes_into_sglangs_output(tmp_path, device):
    """Under SGLang's prefill CUDA graphs (breakable, tc_piecewise) attention runs through SGLang's
    own ``unified_attention_with_output``: it narrows the bucket-padded inputs to the real tokens
    and hands the backend its output slice as ``forward_batch._attn_output``. The result must be
    right, written into that slice (so SGLang makes no copy), and the padded tail zero."""
    from sglang.srt.layers.radix_attention import unified_attention_with_output
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
    from sglang.srt.model_executor.runner_backend_utils.tc_piecewise_cuda_graph.context_manager import (
        set_tc_piecewise_forward_context,
    )

    run, backend = backend_for(tmp_path, device, 1)
    scene = Scenario(run, [40, 17])
    prefix, final = [24, 0], [40, 17]
    scene.cache_tokens([0, 0], prefix)
    batch = fixtures.extend_batch(run, scene.view(final), [f - p for p, f in zip(prefix, final)])
    real, padded = batch.extend_num_tokens, 48  # 33 real tokens in the 48-token capture bucket
    batch.num_token_non_padded_cpu = real
    backend.init_forward_metadata(batch)

    def pad(t):
        return torch.cat([t, t.new_full((padded - real, *t.shape[1:]), 7.0)])

    for layer_id, layer in enumerate(run.model):
        q, k, v, expected = scene.step_inputs(layer_id, prefix, final)
        output = torch.full((padded, HQ * D), float("nan"), dtype=q.dtype, device=q.device)
        with forward_context(ForwardContext(attn_backend=backend)), set_tc_piecewise_forward_context(
            batch, run.model, None, [], [], num_tokens=padded, raw_num_tokens=real
        ):
            args = (pad(q), pad(k), pad(v), output, True, layer_id)
            if device == "cuda":
                unified_attention_with_output(*args)
            else:  # SGLang registers the op's Python kernel for CUDA only; it runs on CPU tensors too
                unified_attention_with_output.default.redispatch(torch._C.DispatchKeySet("CUDA"), *args)
        assert_close(output[:real], expected)
        assert bool((output[real:] == 0).all())
        if device == "cpu":  # the reference kernels record the buffer they were given
            given = backend.kernels_for(layer_id).prefill.last_out
            assert given is not None and given.data_ptr() == output.data_ptr()


def test_an_output_slice_that_does_not_fit_is_not_used():
    from engine_backend.adapters.sglang.backend import _engine_output

    q = torch.zeros(5, HQ, D, dtype=torch.bfloat16)
    fits = torch.empty(5, HQ * D, dtype=torch.bfloat16)
    batch = type("Batch", (), {})()
    assert _engine_output(batch, q) is None  # no slice given (eager steps, decode graphs)
    for wrong in (fits.float(), torch.empty(6, HQ * D, dtype=torch.bfloat16), torch.empty(HQ * D, 10, dtype=torch.bfloat16)[:, :5].T):
        batch._attn_output = wrong
        assert _engine_output(batch, q) is None
    batch._attn_output = fits
    assert _engine_output(batch, q).data_ptr() == fits.data_ptr()


def test_the_query_slice_reaches_the_kernels_without_a_copy(tmp_path, monkeypatch):
    """SGLang's models hand attention a column slice of the fused QKV projection; a copy of it would be one more
    kernel per layer and step. The kernels must get the slice's own storage."""
    from engine_backend.adapters.sglang import backend as backend_module

    run, backend = backend_for(tmp_path, "cpu", 1)
    scene = Scenario(run, [5, 9])
    scene.cache_tokens([0, 0], [4, 8])
    batch = fixtures.decode_batch(run, scene.view([5, 9]))
    backend.init_forward_metadata(batch)
    q, k, v, expected = scene.step_inputs(0, [4, 8], [5, 9])
    seen = []
    run_kernels = backend_module._run_kernels
    monkeypatch.setattr(backend_module, "_run_kernels", lambda kernels, layout, q_rows, *rest: (
        seen.append(q_rows), run_kernels(kernels, layout, q_rows, *rest))[1])
    assert_close(backend.forward(q, k, v, run.model[0], batch), expected)
    assert not q.is_contiguous() and seen[0].data_ptr() == q.data_ptr() and seen[0].stride(0) == q.stride(0)


def test_an_extend_beyond_the_prefill_budget_is_refused_at_planning(tmp_path):
    """The prefill buffers are sized from SGLang's prefill budget; a batch beyond it (SGLang's one-batch
    benchmark prefills a whole batch at once) is refused by name, before any kernel runs."""
    import dataclasses

    run, backend = backend_for(tmp_path, "cpu", 1)
    backend.setup = dataclasses.replace(backend.setup, max_extend_tokens=39)
    scene = Scenario(run, [40])
    batch = fixtures.extend_batch(run, scene.view([40]), [40])
    with pytest.raises(RuntimeError, match="sized for 39 prefill tokens per batch .* got 40; raise --max-prefill-tokens"):
        backend.init_forward_metadata(batch)


def test_attention_before_metadata_is_an_error(tmp_path):
    run, backend = backend_for(tmp_path, "cpu", 1)
    scene = Scenario(run, [5])
    batch = fixtures.decode_batch(run, scene.view([5]))
    q, k, v, _ = scene.step_inputs(0, [4], [5])
    with pytest.raises(RuntimeError, match="before its metadata"):
        backend.forward(q, k, v, run.model[0], batch)


def test_unsupported_attention_inputs_are_refused(tmp_path):
    run, backend = backend_for(tmp_path, "cpu", 1)
    scene = Scenario(run, [5])
    batch = fixtures.decode_batch(run, scene.view([5]))
    backend.init_forward_metadata(batch)
    q, k, v, _ = scene.step_inputs(0, [4], [5])
    with pytest.raises(NotImplementedError, match="sinks"):
        backend.forward(q, k, v, run.model[0], batch, sinks=torch.zeros(HQ))


# ----------------------------------------------------------------------- CUDA graphs
def graph_step(scene, layer_id, prefix, final, padded_bs):
    """Padded q/k/v for a decode graph of ``padded_bs`` slots and the expected real rows."""
    q, k, v, expected = scene.step_inputs(layer_id, prefix, final)
    pad = padded_bs - q.shape[0]
    return (
        torch.cat([q, q.new_zeros(pad, q.shape[1])]),
        torch.cat([k, k.new_zeros(pad, *k.shape[1:])]),
        torch.cat([v, v.new_zeros(pad, *v.shape[1:])]),
        expected,
    )


@pytest.mark.parametrize("page_size", [1, 16])
def test_graph_metadata_path_on_cpu(tmp_path, page_size):
    """Capture-then-replay metadata for two different batches padded to 4 slots, through
    SGLang's own graph buffers; the planned page ids live in the persistent buffer."""
    run, backend = backend_for(tmp_path, "cpu", page_size)
    backend.init_cuda_graph_state(max_bs=8, max_num_tokens=8)
    inputs = fixtures.DecodeGraphInputs(run, max_bs=8, seq_len_fill_value=backend.get_cuda_graph_seq_len_fill_value())
    for step, (lengths, in_capture) in enumerate([([7, 40, 19], True), ([100, 2, 33], False)]):
        scene = Scenario(run, lengths, seed=step)
        scene.cache_tokens([0] * 3, [n - 1 for n in lengths])
        batch = fixtures.decode_batch(run, scene.view(lengths))
        view = inputs.load(batch, padded_bs=4)
        backend.init_forward_metadata_out_graph(view, in_capture=in_capture)
        assert backend.layout.kv.indices.data_ptr() == backend.graph_indices.data_ptr()
        static = fixtures.decode_batch(run, scene.view(lengths))
        static.out_cache_loc = inputs.buffers.out_cache_loc[:4]
        for layer_id, layer in enumerate(run.model):
            q, k, v, expected = graph_step(scene, layer_id, [n - 1 for n in lengths], lengths, 4)
            out = backend.forward_decode(q, k, v, layer, static)
            assert out.shape == (4, HQ * D)
            assert_close(out[:3], expected)


def test_graph_metadata_refuses_other_modes(tmp_path):
    run, backend = backend_for(tmp_path, "cpu", 1)
    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
    scene = Scenario(run, [6])
    batch = fixtures.extend_batch(run, scene.view([6]), [6])
    with pytest.raises(NotImplementedError, match="DECODE only, not EXTEND"):
        backend.init_forward_metadata_out_graph(batch, in_capture=True)
    with pytest.raises(NotImplementedError, match="one query per request"):
        backend.init_cuda_graph_state(max_bs=4, max_num_tokens=8)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_captured_decode_graph_replays_a_different_batch(tmp_path, page_size):
    """Capture forward_decode of layer 0 for a batch of 3 padded to 4, replay it for another
    batch of 3 with other lengths and other pages: the replay must match that batch."""
    run, backend = backend_for(tmp_path, "cuda", page_size)
    layer = run.model[0]
    backend.init_cuda_graph_state(max_bs=8, max_num_tokens=8)
    inputs = fixtures.DecodeGraphInputs(run, max_bs=8, seq_len_fill_value=backend.get_cuda_graph_seq_len_fill_value())

    def load(lengths, seed, in_capture):
        scene = Scenario(run, lengths, seed=seed)
        scene.cache_tokens([0] * 3, [n - 1 for n in lengths])
        batch = fixtures.decode_batch(run, scene.view(lengths))
        backend.init_forward_metadata_out_graph(inputs.load(batch, padded_bs=4), in_capture=in_capture)
        return scene, batch, graph_step(scene, 0, [n - 1 for n in lengths], lengths, 4)

    scene, batch, (q, k, v, _) = load([9, 50, 17], seed=1, in_capture=True)
    static_q, static_k, static_v = q.clone(), k.clone(), v.clone()
    batch.out_cache_loc = inputs.buffers.out_cache_loc[:4]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as SGLang's runner does
        backend.forward_decode(static_q, static_k, static_v, layer, batch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = backend.forward_decode(static_q, static_k, static_v, layer, batch)

    _, _, (q, k, v, expected) = load([130, 3, 66], seed=2, in_capture=False)
    static_q.copy_(q), static_k.copy_(k), static_v.copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(static_out[:3], expected)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_planning_never_syncs_with_the_device(tmp_path, page_size):
    """SGLang's overlap scheduler launches step N+1 while step N still runs on the GPU; a host
    sync in our per-step planning (decode replay or eager extend) would serialise the two.
    Planning runs with torch's sync check set to raise."""
    run, backend = backend_for(tmp_path, "cuda", page_size)
    backend.init_cuda_graph_state(max_bs=8, max_num_tokens=8)
    inputs = fixtures.DecodeGraphInputs(run, max_bs=8, seq_len_fill_value=backend.get_cuda_graph_seq_len_fill_value())
    lengths = [9, 50, 17]
    scene = Scenario(run, lengths, seed=3)
    scene.cache_tokens([0] * 3, [n - 1 for n in lengths])
    view = inputs.load(fixtures.decode_batch(run, scene.view(lengths)), padded_bs=4)
    extend = fixtures.extend_batch(run, scene.view(lengths), [4, 50, 1])
    backend.init_forward_metadata_out_graph(view, in_capture=True)  # first plans may allocate
    backend.init_forward_metadata(extend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        backend.init_forward_metadata_out_graph(view, in_capture=False)
        backend.init_forward_metadata(extend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
