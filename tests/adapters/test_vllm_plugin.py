"""vLLM adapter, CPU: plugin discovery and registration, backend declarations, and refusal of
configurations the kernels cannot run, all against the installed vLLM 0.26."""

import logging
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

if os.environ.get("ENGINE_BACKEND_REQUIRE_VLLM", "0") not in ("", "0"):
    import vllm  # noqa: F401  (the vLLM CI job: a missing vLLM must fail, never skip)
else:
    pytest.importorskip("vllm")

import torch
import vllm.plugins
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.selector import AttentionSelectorConfig

from engine_backend.adapters.vllm.backend import EngineBackendAttentionBackend
from engine_backend.adapters.vllm.plugin import BACKEND_CLASS_PATH, LOGGER_NAME, register
from engine_backend.support import HEAD_DIMS, PAGE_SIZES

from log_records import Records

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
H100 = DeviceCapability(9, 0)


@pytest.fixture
def clean_registry():
    """CUSTOM unregistered before the test, and restored to its prior state after."""
    custom = AttentionBackendEnum.CUSTOM
    before = custom.get_path() if custom.is_overridden() else None
    custom.clear_override()
    yield custom
    custom.clear_override()
    if before is not None:
        register_backend(custom, before)


def our_entry_point():
    matches = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "engine_backend"]
    assert len(matches) == 1, "engine_backend is not installed (pip install --no-deps -e .)"
    return matches[0]


# ------------------------------------------------------------------ registration
def test_entry_point_is_discoverable_and_is_register():
    ep = our_entry_point()
    assert ep.value == "engine_backend.adapters.vllm.plugin:register"
    assert ep.load() is register


def test_entry_point_registers_custom(clean_registry):
    with pytest.raises(ValueError, match="must be registered"):
        clean_registry.get_path()
    our_entry_point().load()()
    assert clean_registry.get_path() == BACKEND_CLASS_PATH
    assert clean_registry.get_class() is EngineBackendAttentionBackend


def test_register_is_idempotent(clean_registry):
    register()
    register()
    assert clean_registry.get_class() is EngineBackendAttentionBackend


def test_register_keeps_another_plugins_custom_backend(clean_registry):
    other = "someone_else.backend.TheirBackend"
    register_backend(clean_registry, other)
    records = Records()
    vllm_logger = logging.getLogger(LOGGER_NAME)
    vllm_logger.addHandler(records)
    try:
        register()
    finally:
        vllm_logger.removeHandler(records)
    assert clean_registry.get_path() == other
    assert any(other in message and record.levelno == logging.WARNING
               for record, message in zip(records.records, records.messages()))


def log_probe(level: str) -> subprocess.CompletedProcess:
    """A fresh interpreter, configured by vLLM from VLLM_LOGGING_LEVEL as every vLLM process is, that
    registers the plugin and logs one message of ours at INFO and one at WARNING."""
    probe = textwrap.dedent(
        """
        from engine_backend.adapters.vllm.plugin import register
        from engine_backend.log import logger

        register()
        logger().info("eb-info-probe")
        logger().warning("eb-warning-probe")
        print("logger:", logger().name)
        """
    )
    env = {**os.environ, "VLLM_LOGGING_LEVEL": level, "VLLM_CONFIGURE_LOGGING": "1"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_register_routes_our_messages_through_vllms_logger():
    """Our messages obey VLLM_LOGGING_LEVEL and come out in vLLM's own format (level, time, file)."""
    quiet, chatty = log_probe("WARNING"), log_probe("INFO")
    assert f"logger: {LOGGER_NAME}" in quiet.stdout
    quiet_out, chatty_out = quiet.stdout + quiet.stderr, chatty.stdout + chatty.stderr
    assert "eb-warning-probe" in quiet_out and "eb-info-probe" not in quiet_out
    assert "eb-warning-probe" in chatty_out and "eb-info-probe" in chatty_out
    line = next(line for line in quiet_out.splitlines() if "eb-warning-probe" in line)
    assert "WARNING" in line and "[engine_backend]" not in line


def test_vllm_plugin_loader_registers_custom(clean_registry, monkeypatch):
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    monkeypatch.setenv("VLLM_PLUGINS", "engine_backend")
    vllm.plugins.load_general_plugins()
    assert clean_registry.get_class() is EngineBackendAttentionBackend


def test_register_is_cheap_and_cuda_free():
    """What every vLLM process pays: no backend module, no kernels, no CUDA context."""
    probe = textwrap.dedent(
        """
        import sys, torch
        from engine_backend.adapters.vllm.plugin import register
        register()
        heavy = [m for m in ("engine_backend.adapters.vllm.backend", "engine_backend.decode",
                             "engine_backend.prefill", "vllm._custom_ops") if m in sys.modules]
        print("heavy:", heavy, "cuda:", torch.cuda.is_initialized())
        """
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "heavy: [] cuda: False" in result.stdout


def test_backend_name_round_trips_through_the_enum():
    # vLLM's Attention layer does AttentionBackendEnum[backend.get_name()].
    assert AttentionBackendEnum[EngineBackendAttentionBackend.get_name()] is AttentionBackendEnum.CUSTOM


# ------------------------------------------------------------------ declarations
def test_kv_cache_shape_is_k_then_v():
    shape = EngineBackendAttentionBackend.get_kv_cache_shape(100, 16, 8, 128)
    assert shape == (2, 100, 16, 8, 128)
    assert EngineBackendAttentionBackend.get_kv_cache_block_dim(16, 8, 128) == 1
    assert EngineBackendAttentionBackend.get_kv_cache_stride_order() == (0, 1, 2, 3, 4)
    assert not EngineBackendAttentionBackend.indexes_kv_by_block_stride()


@pytest.mark.parametrize("block_size", [8, 48])
def test_kv_cache_shape_refuses_unsupported_block_size(block_size):
    with pytest.raises(ValueError, match=f"block size {block_size}"):
        EngineBackendAttentionBackend.get_kv_cache_shape(10, block_size, 8, 128)


def test_block_sizes_are_the_kernels_pages_from_16():
    sizes = EngineBackendAttentionBackend.get_supported_kernel_block_sizes()
    assert sizes == [s for s in PAGE_SIZES if s >= 16] and min(sizes) == 16
    assert EngineBackendAttentionBackend.get_preferred_block_size(16) == 16


def test_vllm_splits_manager_blocks_into_kernel_pages():
    from vllm.v1.worker.utils import select_common_block_size

    for manager_block, kernel_block in ((16, 16), (64, 64), (48, 16), (528, 16), (1024, 256)):
        assert select_common_block_size(manager_block, [EngineBackendAttentionBackend]) == kernel_block


def test_sliding_window_layers_get_16_token_blocks():
    # vLLM gives a sliding-window layer the smallest kernel block listed (no padded page).
    from vllm.model_executor.layers.attention.attention import _largest_kernel_block_within

    assert _largest_kernel_block_within(EngineBackendAttentionBackend, 4096, None, 16) == 16


def test_block_size_below_16_is_refused():
    assert_refused(selection_reasons(block_size=8), "block_size not supported", "multiples of 16")


def test_cuda_graph_level_is_single_token_decode():
    builder = EngineBackendAttentionBackend.get_builder_cls()
    assert builder.get_cudagraph_support(None, None) is AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


def test_kv_cache_update_is_a_separate_step():
    assert EngineBackendAttentionBackend.forward_includes_kv_cache_update is False
    assert hasattr(EngineBackendAttentionBackend.get_impl_cls(), "do_kv_cache_update")


# ------------------------------------------------------------------ selection
def selection_reasons(**overrides):
    """What vLLM's CUDA platform computes for an explicitly selected backend."""
    config = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None)
    config.update(overrides)
    capability = config.pop("device_capability", H100)
    selector = AttentionSelectorConfig(**config)
    return EngineBackendAttentionBackend.validate_configuration(device_capability=capability, **selector._asdict())


@pytest.mark.parametrize("head_size", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_supported_configurations_are_accepted(head_size, dtype):
    assert selection_reasons(head_size=head_size, dtype=dtype) == []


def test_llama_like_with_sliding_window_and_block_size_is_accepted():
    assert selection_reasons(block_size=16, has_sliding_window=True) == []


def assert_refused(reasons, *expected_fragments):
    text = " | ".join(reasons)
    assert reasons, "configuration was accepted"
    assert "engine_backend supports:" in text  # names what is supported
    for fragment in expected_fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def test_head_size_96_is_refused_naming_supported_head_dims():
    assert_refused(selection_reasons(head_size=96), "head dim 96", "head dims [64, 128, 256]")


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_fp8_kv_cache_is_refused(kv_cache_dtype):
    assert_refused(selection_reasons(kv_cache_dtype=kv_cache_dtype), f"KV cache dtype {kv_cache_dtype}", "auto")


def test_kv_cache_dtype_other_than_the_model_dtype_is_refused():
    assert_refused(selection_reasons(dtype=torch.bfloat16, kv_cache_dtype="float16"), "KV cache dtype torch.float16")


def test_float32_model_is_refused():
    assert_refused(selection_reasons(dtype=torch.float32), "dtype torch.float32", "dtypes [float16, bfloat16]")


def test_mla_is_refused():
    assert_refused(selection_reasons(use_mla=True, head_size=576), "MLA not supported", "Not supported: MLA")


@pytest.mark.parametrize(
    "attn_type", [AttentionType.ENCODER, AttentionType.ENCODER_ONLY, AttentionType.ENCODER_DECODER]
)
def test_encoder_attention_is_refused(attn_type):
    assert_refused(selection_reasons(attn_type=attn_type), f"attention type {attn_type}", "cross-attention")


@pytest.mark.parametrize(
    "feature",
    ["has_sink", "use_sparse", "use_mm_prefix", "use_non_causal", "use_batch_invariant", "use_kv_connector", "use_pcp"],
)
def test_unsupported_features_are_refused(feature):
    assert_refused(selection_reasons(**{feature: True}))


def test_old_gpus_are_refused():
    assert_refused(selection_reasons(device_capability=DeviceCapability(7, 5)), "compute capability")


# ------------------------------------------------------------------ the impl's own checks
@pytest.fixture
def bf16_default():
    # vLLM constructs attention layers with the model dtype as torch's default dtype.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    yield
    torch.set_default_dtype(previous)


def make_impl(**overrides):
    args = dict(
        num_heads=32,
        head_size=128,
        scale=128**-0.5,
        num_kv_heads=8,
        alibi_slopes=None,
        sliding_window=None,
        kv_cache_dtype="auto",
    )
    args.update(overrides)
    return EngineBackendAttentionBackend.get_impl_cls()(**args)


def test_impl_accepts_llama_and_keys_its_kernels(bf16_default):
    impl = make_impl(sliding_window=4096, logits_soft_cap=30.0)
    shape = impl.layer_shape
    assert (shape.num_qo_heads, shape.num_kv_heads, shape.head_dim, shape.sm_scale) == (32, 8, 128, 128**-0.5)
    assert shape.variant.window_left == 4095  # vLLM's window W keeps W tokens: W - 1 to the left
    assert shape.variant.logits_soft_cap == 30.0 and not shape.variant.alibi
    assert make_impl().layer_shape.variant.is_default


def test_impl_alibi_variant(bf16_default):
    impl = make_impl(alibi_slopes=[0.5] * 32)
    assert impl.layer_shape.variant.alibi
    assert impl.alibi_slopes.tolist() == [0.5] * 32


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(head_size=96), "head dim 96"),
        (dict(kv_cache_dtype="fp8"), "KV cache dtype fp8"),
        (dict(num_heads=30, num_kv_heads=8), "30 query heads over 8 KV heads"),
        (dict(attn_type=AttentionType.ENCODER_ONLY), "attention type"),
        (dict(attn_type=AttentionType.ENCODER_DECODER), "attention type"),
        (dict(sinks=torch.zeros(32)), "attention sinks"),
        (dict(use_alibi_sqrt=True), "use_alibi_sqrt"),
    ],
)
def test_impl_refuses_what_the_kernels_cannot_run(bf16_default, overrides, fragment):
    with pytest.raises(ValueError, match="[Ss]upport") as err:
        make_impl(**overrides)
    assert fragment in str(err.value)


def test_impl_refuses_float32_models():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with pytest.raises(ValueError, match="dtype torch.float32"):
            make_impl()
    finally:
        torch.set_default_dtype(previous)


# ------------------------------------------------------------------ example configs
CONFIGS = sorted((REPO / "configs").glob("vllm-*.yaml"))


@pytest.fixture
def engine_arg_parser(monkeypatch):
    """vLLM's own `vllm serve` engine-argument parser. On a machine without a GPU vLLM cannot
    infer a device type for its defaults, so say "cpu" there (parsing only)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if not current_platform.device_type:
        monkeypatch.setattr(type(current_platform), "device_type", "cpu")
    return EngineArgs.add_cli_args(FlexibleArgumentParser())


def test_example_configs_exist():
    assert {p.name for p in CONFIGS} >= {"vllm-serve.yaml", "vllm-e2e-llama3-8b-shape.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_selects_custom(engine_arg_parser, path):
    from vllm.config.attention import AttentionConfig
    from vllm.engine.arg_utils import EngineArgs

    args = engine_arg_parser.parse_args(["--config", str(path)])
    engine_args = EngineArgs.from_cli_args(args)
    assert AttentionConfig.validate_backend_before(engine_args.attention_backend) is AttentionBackendEnum.CUSTOM
    assert engine_args.kv_cache_dtype == "auto"


def test_e2e_config_uses_the_dummy_model(engine_arg_parser):
    from vllm.engine.arg_utils import EngineArgs

    args = engine_arg_parser.parse_args(["--config", str(REPO / "configs" / "vllm-e2e-llama3-8b-shape.yaml")])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.model == "e2e/models/llama3-8b-shape"
    assert engine_args.load_format == "dummy"
