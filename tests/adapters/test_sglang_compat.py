"""SGLang adapter, CPU: which models and server configurations the backend accepts, how layer
features map to kernel variants, and the refusal messages, with SGLang 0.5.16's real
ServerArgs, ModelConfig, RadixAttention layers and KV pools."""

import json
import os

import pytest

if os.environ.get("ENGINE_BACKEND_REQUIRE_SGLANG", "0") not in ("", "0"):
    import sglang  # noqa: F401  (the SGLang CI step: a missing SGLang must fail, never skip)
else:
    pytest.importorskip("sglang")

import torch
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.layers.radix_attention import AttentionType, RadixAttention
from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

from engine_backend import Variant
from engine_backend.adapters.common.faults import FAULT_ENV
from engine_backend.adapters.common.kernels import LayerShape
from engine_backend.adapters.sglang.backend import EngineBackendAttnBackend
from engine_backend.adapters.sglang.compat import UnsupportedSetup, check_runner, max_extend_tokens

import sglang_fixtures as fixtures
from reference_kernels import ReferenceKernels

pytestmark = pytest.mark.sglang

CONFIG = fixtures.LLAMA_LIKE
SCALE = 1.0 / CONFIG["head_dim"] ** 0.5


def refusal(run) -> str:
    with pytest.raises(UnsupportedSetup) as info:
        check_runner(run)
    message = str(info.value)
    assert "cannot serve this model/configuration" in message and "--attention-backend" in message
    return message


def layer(layer_id, **kwargs):
    args = dict(num_heads=8, head_dim=64, scaling=SCALE, num_kv_heads=2, layer_id=layer_id)
    args.update(kwargs)
    return RadixAttention(**args)


# ------------------------------------------------------------------ accepted
@pytest.mark.parametrize("page_size", [1, 16])
def test_llama_like_model_is_accepted_with_one_kernel_shape(tmp_path, page_size):
    run = fixtures.runner(tmp_path, page_size=page_size, max_requests=8, context_len=512)
    setup = check_runner(run)
    shape = LayerShape(num_qo_heads=8, num_kv_heads=2, head_dim=64, sm_scale=SCALE, variant=Variant())
    assert setup.layer_shapes == {0: shape, 1: shape}
    assert setup.distinct_shapes == [shape]
    assert (setup.page_size, setup.dtype, setup.device) == (page_size, torch.bfloat16, torch.device("cpu"))
    assert setup.max_batch_size == 8
    args = run.server_args
    assert setup.max_extend_tokens == max(args.chunked_prefill_size, args.max_prefill_tokens) + 8


def test_extend_token_bound_covers_whole_prompts_without_chunked_prefill():
    class Args:
        chunked_prefill_size = -1
        max_prefill_tokens = 16384

    assert max_extend_tokens(Args, context_len=131072, max_batch_size=64) == 131072 + 64
    Args.chunked_prefill_size = 8192
    assert max_extend_tokens(Args, context_len=131072, max_batch_size=64) == 16384 + 64


def test_window_and_soft_cap_layers_become_variants(tmp_path):
    """Gemma-2 style: alternating sliding-window layers; all layers soft-capped."""
    layers = torch.nn.ModuleList(
        [
            layer(0, sliding_window_size=127, logit_cap=30.0),
            layer(1, logit_cap=30.0),
            layer(2, sliding_window_size=127, logit_cap=30.0),
        ]
    )
    run = fixtures.runner(tmp_path, model=layers, config_overrides={"num_hidden_layers": 3})
    setup = check_runner(run)
    windowed = LayerShape(8, 2, 64, SCALE, Variant(logits_soft_cap=30.0, window_left=127))
    full = LayerShape(8, 2, 64, SCALE, Variant(logits_soft_cap=30.0))
    assert setup.layer_shapes == {0: windowed, 1: full, 2: windowed}
    assert set(setup.distinct_shapes) == {windowed, full}


def test_per_layer_softmax_scale_is_kept(tmp_path):
    layers = torch.nn.ModuleList([layer(0, scaling=0.5), layer(1)])
    setup = check_runner(fixtures.runner(tmp_path, model=layers))
    assert setup.layer_shapes[0].sm_scale == 0.5 and setup.layer_shapes[1].sm_scale == SCALE


# ------------------------------------------------------------------ refused: kernels
def test_unsupported_head_dim(tmp_path):
    run = fixtures.runner(tmp_path, config_overrides={"head_dim": 96})
    assert "head dim 96" in refusal(run)


def test_fp8_kv_cache(tmp_path):
    run = fixtures.runner(tmp_path, kv_cache_dtype=torch.float8_e4m3fn)
    assert "KV cache dtype torch.float8_e4m3fn" in refusal(run)


def test_page_size_not_a_power_of_two(tmp_path):
    assert "page size 24" in refusal(fixtures.runner(tmp_path, page_size=24))


# ------------------------------------------------------------------ refused: layers
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(is_cross_attention=True), "layer 1: cross-attention"),
        (dict(attn_type=AttentionType.ENCODER_ONLY), "layer 1: non-causal attention type 'encoder_only'"),
        (
            dict(attn_type=AttentionType.DECODER_BIDIRECTIONAL),
            "layer 1: non-causal attention type 'decoder_bidirectional'",
        ),
        (dict(v_head_dim=128), "layer 1: K head dim 64 differs from V head dim 128"),
        (dict(logit_cap=30.0, logit_capping_method="xai"), "layer 1: logit capping method 'xai'"),
        (dict(use_irope=True), "layer 1: iRoPE"),
    ],
)
def test_layer_features_without_kernels(tmp_path, kwargs, expected):
    layers = torch.nn.ModuleList([layer(0), layer(1, **kwargs)])
    assert expected in refusal(fixtures.runner(tmp_path, model=layers))


def test_attention_sinks(tmp_path):
    model = torch.nn.Module()
    model.layers = fixtures.make_radix_layers(CONFIG)
    model.register_parameter("sinks", torch.nn.Parameter(torch.zeros(8)))
    assert "attention sinks" in refusal(fixtures.runner(tmp_path, model=model))


def test_model_without_radix_attention(tmp_path):
    assert "no RadixAttention layers" in refusal(fixtures.runner(tmp_path, model=torch.nn.Linear(2, 2)))


# ------------------------------------------------------------------ refused: models
def test_mla_model(tmp_path):
    mla_dir = tmp_path / "mla"
    mla_dir.mkdir()
    (mla_dir / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["DeepseekV2ForCausalLM"],
                "model_type": "deepseek_v2",
                "hidden_size": 512,
                "intermediate_size": 1024,
                "moe_intermediate_size": 256,
                "num_attention_heads": 8,
                "num_key_value_heads": 8,
                "num_hidden_layers": 2,
                "vocab_size": 1000,
                "max_position_embeddings": 2048,
                "kv_lora_rank": 128,
                "qk_nope_head_dim": 64,
                "qk_rope_head_dim": 32,
                "v_head_dim": 64,
                "torch_dtype": "bfloat16",
            }
        )
    )
    run = fixtures.runner(tmp_path)
    run.model_config = ModelConfig(model_path=str(mla_dir))
    assert run.model_config.attention_arch.name == "MLA"
    assert "MLA attention" in refusal(run)


def test_chunked_local_attention_model(tmp_path):
    run = fixtures.runner(tmp_path, config_overrides={"attention_chunk_size": 8192})
    assert run.attention_chunk_size == 8192
    assert "chunked local attention (attention_chunk_size=8192)" in refusal(run)


@pytest.mark.parametrize(
    "attribute, expected",
    [("is_encoder_decoder", "encoder-decoder models"), ("is_multimodal", "multimodal models")],
)
def test_model_kinds(tmp_path, attribute, expected):
    run = fixtures.runner(tmp_path)
    setattr(run.model_config, attribute, True)
    assert expected in refusal(run)


def test_hybrid_sliding_window_kv_pool(tmp_path):
    run = fixtures.runner(tmp_path)
    run.token_to_kv_pool = SWAKVPool(
        size=256,
        size_swa=64,
        page_size=1,
        dtype=torch.bfloat16,
        head_num=2,
        head_dim=64,
        swa_attention_layer_ids=[0],
        full_attention_layer_ids=[1],
        device="cpu",
        enable_memory_saver=False,
    )
    assert "KV pool SWAKVPool" in refusal(run)


# ------------------------------------------------------------------ refused: serving modes
@pytest.mark.parametrize(
    "attribute, value, expected",
    [
        ("speculative_algorithm", "EAGLE", "speculative decoding (--speculative-algorithm EAGLE)"),
        ("dllm_algorithm", "LowConfidence", "diffusion LLM decoding"),
        ("enable_dp_attention", True, "DP attention"),
        ("enable_two_batch_overlap", True, "two-batch overlap"),
        ("enable_pdmux", True, "PD multiplexing"),
        ("enable_mis", True, "multi-item scoring"),
        ("dcp_size", 2, "decode context parallelism"),
        ("enable_deterministic_inference", True, "deterministic inference"),
    ],
)
def test_serving_modes(tmp_path, attribute, value, expected):
    run = fixtures.runner(tmp_path)
    assert hasattr(run.server_args, attribute)
    setattr(run.server_args, attribute, value)
    assert expected in refusal(run)


def test_full_prefill_cuda_graph(tmp_path):
    run = fixtures.runner(tmp_path)
    run.server_args.cuda_graph_config.prefill.backend = "full"
    assert "full prefill CUDA graph" in refusal(run)


def test_full_prefill_cuda_graph_is_fine_when_we_only_decode(tmp_path):
    run = fixtures.runner(
        tmp_path, server_overrides={"prefill_attention_backend": "triton", "decode_attention_backend": "engine_backend"}
    )
    assert run.server_args.get_attention_backends() == ("triton", "engine_backend")
    run.server_args.cuda_graph_config.prefill.backend = "full"
    check_runner(run)


def test_every_problem_is_named_at_once(tmp_path):
    layers = torch.nn.ModuleList([layer(0, is_cross_attention=True), layer(1)])
    run = fixtures.runner(tmp_path, model=layers)
    run.server_args.speculative_algorithm = "EAGLE"
    message = refusal(run)
    assert "speculative decoding" in message and "layer 0: cross-attention" in message


# ------------------------------------------------------------------ the backend constructor
class CountingKernels(ReferenceKernels):
    built = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        type(self).built += 1


def test_backend_refuses_before_building_kernels(tmp_path):
    CountingKernels.built = 0
    layers = torch.nn.ModuleList([layer(0, attn_type=AttentionType.ENCODER_ONLY), layer(1)])
    with pytest.raises(UnsupportedSetup, match="non-causal"):
        EngineBackendAttnBackend(fixtures.runner(tmp_path, model=layers), kernel_factory=CountingKernels)
    assert CountingKernels.built == 0


def test_backend_builds_kernels_once_per_distinct_shape(tmp_path):
    CountingKernels.built = 0
    layers = torch.nn.ModuleList([layer(0, sliding_window_size=63), layer(1), layer(2, sliding_window_size=63)])
    run = fixtures.runner(tmp_path, model=layers, config_overrides={"num_hidden_layers": 3})
    backend = EngineBackendAttnBackend(run, kernel_factory=CountingKernels)
    assert CountingKernels.built == 2
    assert backend.kernels_for(0) is backend.kernels_for(2) is not backend.kernels_for(1)
    assert backend.kernels_for(0).shape.variant.window_left == 63 and backend.kernels_for(1).shape.variant.is_default
    with pytest.raises(RuntimeError, match="not layer 7"):
        backend.kernels_for(7)


def test_unknown_fault_name_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "drop_everything")
    with pytest.raises(ValueError, match="not a known fault"):
        EngineBackendAttnBackend(fixtures.runner(tmp_path), kernel_factory=ReferenceKernels)


def test_fault_injection_is_announced(tmp_path, monkeypatch, package_log):
    monkeypatch.setenv(FAULT_ENV, "drop_last_kv")
    backend = EngineBackendAttnBackend(fixtures.runner(tmp_path), kernel_factory=ReferenceKernels)
    assert backend.dropped_kv_tokens == 1
    assert any("FAULT INJECTION" in message for message in package_log.messages())
