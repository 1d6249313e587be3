"""Which SGLang models and server configurations ``engine_backend`` can serve.

``check_runner`` runs when SGLang's ModelRunner builds the backend (after the model and the
KV pool exist, before CUDA-graph capture). It reads the real objects -- ServerArgs,
ModelConfig, the model's RadixAttention layers, the KV pool -- and either returns the
per-layer kernel shapes or raises one ValueError that names every problem, so an unsupported
model fails at startup with a reason instead of inside a kernel.

Per layer, SGLang's sliding window (``sliding_window_size``, already ``Variant.window_left``'s
meaning) and tanh logit cap (``logit_cap``) become ``engine_backend.Variant`` fields; layers
that differ get their own kernels (see ``adapters.common.kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...support import check_supported
from ..common.kernels import KernelLimits, LayerShape
from ..common.variant import variant_for
from . import BACKEND_NAME


@dataclass(frozen=True)
class AttentionSetup:
    layer_shapes: dict = field(hash=False)  # layer_id -> LayerShape
    page_size: int
    dtype: torch.dtype
    device: torch.device
    max_batch_size: int  # most requests in one batch (the request pool's size)
    max_extend_tokens: int  # most query tokens in one EXTEND/MIXED batch

    @property
    def distinct_shapes(self) -> list:
        return sorted(set(self.layer_shapes.values()), key=repr)

    @property
    def limits(self) -> KernelLimits:
        """Decode and prefill batches both hold up to the request pool's size of requests (decode
        graphs may pad beyond it: see ``LayerKernels.ensure_decode_capacity``)."""
        return KernelLimits(
            max_decode_rows=self.max_batch_size,
            max_prefill_rows=self.max_batch_size,
            max_prefill_tokens=self.max_extend_tokens,
        )


class UnsupportedSetup(ValueError):
    """Raised at backend construction; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"SGLang attention backend '{BACKEND_NAME}' cannot serve this model/configuration:\n{lines}\n"
            f"Use another --attention-backend (e.g. flashinfer or triton) for it."
        )


# --------------------------------------------------------------------------- pieces
def radix_layers(model: torch.nn.Module) -> list:
    from sglang.srt.layers.radix_attention import RadixAttention

    return [m for m in model.modules() if isinstance(m, RadixAttention)]


def layer_problems(layer) -> list[str]:
    """Features of one RadixAttention layer the kernels do not implement."""
    from sglang.srt.layers.radix_attention import AttentionType

    where = f"layer {layer.layer_id}"
    problems = []
    if layer.is_cross_attention:
        problems.append(f"{where}: cross-attention (encoder-decoder)")
    if layer.attn_type != AttentionType.DECODER:
        problems.append(f"{where}: non-causal attention type '{layer.attn_type.value}' (only causal decoder attention)")
    if layer.qk_head_dim != layer.v_head_dim:
        problems.append(f"{where}: K head dim {layer.qk_head_dim} differs from V head dim {layer.v_head_dim}")
    if (layer.logit_cap or 0) > 0 and layer.logit_capping_method != "tanh":
        problems.append(f"{where}: logit capping method '{layer.logit_capping_method}' (only tanh soft-cap)")
    if getattr(layer, "use_irope", False):
        problems.append(f"{where}: iRoPE / chunked local attention")
    if getattr(layer, "xai_temperature_len", -1) > 0:
        problems.append(f"{where}: xAI attention temperature scaling")
    if getattr(layer, "pos_encoding_mode", "NONE") != "NONE":
        problems.append(f"{where}: in-kernel position encoding '{layer.pos_encoding_mode}'")
    return problems


def layer_shape(layer) -> LayerShape:
    return LayerShape(
        num_qo_heads=int(layer.tp_q_head_num),
        num_kv_heads=int(layer.tp_k_head_num),
        head_dim=int(layer.head_dim),
        sm_scale=float(layer.scaling),
        variant=variant_for(window_left=layer.sliding_window_size, logits_soft_cap=layer.logit_cap),
    )


def server_problems(server_args) -> list[str]:
    """Serving features whose batches this backend does not lay out (yet)."""
    get = lambda name, default=None: getattr(server_args, name, default)  # noqa: E731
    spec, dllm = get("speculative_algorithm"), get("dllm_algorithm")
    dcp, cp = get("dcp_size") or 1, get("attn_cp_size") or 1
    full_prefill_graph = _runs_prefill(server_args) and _prefill_graph_backend(server_args) == "full"
    checks = [
        (
            spec is not None,
            f"speculative decoding (--speculative-algorithm {spec}): target-verify and draft-extend batches",
        ),
        (dllm is not None, f"diffusion LLM decoding (--dllm-algorithm {dllm})"),
        (bool(get("enable_dp_attention")), "DP attention (--enable-dp-attention)"),
        (bool(get("enable_two_batch_overlap")), "two-batch overlap (--enable-two-batch-overlap)"),
        (bool(get("enable_pdmux")), "PD multiplexing (--enable-pdmux)"),
        (bool(get("enable_mis")), "multi-item scoring (--enable-mis): needs custom attention masks"),
        (dcp > 1, f"decode context parallelism (--dcp-size {dcp})"),
        (cp > 1, f"attention context parallelism (attn_cp_size {cp})"),
        (
            bool(get("enable_deterministic_inference")),
            "deterministic inference (--enable-deterministic-inference): no batch-invariant kernels",
        ),
        (
            full_prefill_graph,
            "full prefill CUDA graph (cuda_graph_config prefill backend 'full'); "
            "use 'breakable' (default), 'tc_piecewise' or 'disabled'",
        ),
    ]
    return [message for bad, message in checks if bad]


def _runs_prefill(server_args) -> bool:
    """Whether this backend serves prefill (not only decode, next to another prefill backend)."""
    backends = getattr(server_args, "get_attention_backends", None)
    return backends is None or backends()[0] == BACKEND_NAME


def _prefill_graph_backend(server_args) -> str | None:
    config = getattr(server_args, "cuda_graph_config", None)
    prefill = getattr(config, "prefill", None)
    return getattr(prefill, "backend", None)


def model_problems(model_config, attention_chunk_size=None) -> list[str]:
    arch = getattr(model_config.attention_arch, "name", str(model_config.attention_arch))
    checks = [
        (arch == "MLA", "MLA attention (latent KV, DeepSeek-style models)"),
        (bool(model_config.is_encoder_decoder), "encoder-decoder models (cross-attention)"),
        (bool(model_config.is_multimodal), "multimodal models (encoder / non-causal attention over media tokens)"),
        (attention_chunk_size is not None, f"chunked local attention (attention_chunk_size={attention_chunk_size})"),
    ]
    return [message for bad, message in checks if bad]


def pool_problems(kv_pool, allocator=None) -> list[str]:
    """The kernels read one [slots, heads, dim] K and V buffer per layer, addressed by slot."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    problems = []
    if type(kv_pool) is not MHATokenToKVPool:
        problems.append(
            f"KV pool {type(kv_pool).__name__} (only MHATokenToKVPool: hybrid sliding-window pools, "
            "linear-attention/Mamba hybrids, FP4/MXFP8 and page-major pools are not supported)"
        )
        return problems
    if getattr(kv_pool, "use_hnd", False) or getattr(kv_pool, "kv_cache_layout", "nhd") != "nhd":
        problems.append(f"KV cache layout '{getattr(kv_pool, 'kv_cache_layout', 'hnd')}' (only NHD)")
    if kv_pool.is_quantized_kv_cache:
        problems.append("quantized KV cache")
    if allocator is not None and getattr(allocator, "translate_kv_loc", None) is not None:
        problems.append("unified memory pool (virtual KV slots)")
    return problems


def shape_problems(shapes: dict, kv_pool, dtype, kv_dtype, page_size: int) -> list[str]:
    problems = []
    for shape in sorted(set(shapes.values()), key=repr):
        ids = sorted(i for i, s in shapes.items() if s == shape)
        try:
            check_supported(
                num_qo_heads=shape.num_qo_heads,
                num_kv_heads=shape.num_kv_heads,
                head_dim=shape.head_dim,
                dtype=dtype,
                kv_dtype=kv_dtype,
                page_size=page_size,
                variant=shape.variant,
            )
        except ValueError as e:
            problems.append(f"layers {ids}: {e}")
        if (shape.num_kv_heads, shape.head_dim) != (kv_pool.head_num, kv_pool.head_dim):
            problems.append(
                f"layers {ids}: {shape.num_kv_heads} KV heads of dim {shape.head_dim}, but the KV pool "
                f"holds {kv_pool.head_num} heads of dim {kv_pool.head_dim}"
            )
    return problems


def max_extend_tokens(server_args, context_len: int, max_batch_size: int) -> int:
    """Most query tokens one EXTEND/MIXED batch can carry: a prefill chunk (or a whole prompt
    when chunked prefill is off), at least ``max_prefill_tokens``, plus one decode token per
    request a MIXED batch adds."""
    chunk = getattr(server_args, "chunked_prefill_size", None) or -1
    per_batch = chunk if chunk > 0 else context_len
    return max(per_batch, getattr(server_args, "max_prefill_tokens", 0) or 0) + max_batch_size


# --------------------------------------------------------------------------- entry
def check_runner(model_runner) -> AttentionSetup:
    """Validate a ModelRunner (model loaded, KV pool allocated); raise UnsupportedSetup."""
    server_args = model_runner.server_args
    model_config = model_runner.model_config
    kv_pool = model_runner.token_to_kv_pool
    dtype = getattr(model_runner, "dtype", None) or model_config.dtype
    kv_dtype = model_runner.kv_cache_dtype
    page_size = int(model_runner.page_size or 1)

    problems = server_problems(server_args)
    problems += model_problems(model_config, getattr(model_runner, "attention_chunk_size", None))
    problems += pool_problems(kv_pool, getattr(model_runner, "token_to_kv_pool_allocator", None))
    if any(name.endswith("sinks") for name, _ in model_runner.model.named_parameters()):
        problems.append("attention sinks (per-head sink logits)")
    layers = radix_layers(model_runner.model)
    if not layers:
        problems.append("no RadixAttention layers found in the model")
    for layer in layers:
        problems += layer_problems(layer)
    shapes = {layer.layer_id: layer_shape(layer) for layer in layers}
    if not problems:
        problems += shape_problems(shapes, kv_pool, dtype, kv_dtype, page_size)
    if problems:
        raise UnsupportedSetup(problems)

    max_batch_size = max(int(model_runner.req_to_token_pool.size), 1)
    return AttentionSetup(
        layer_shapes=shapes,
        page_size=page_size,
        dtype=dtype,
        # The request table's device carries the GPU index ("cuda:N"); runner.device is "cuda".
        device=model_runner.req_to_token_pool.req_to_token.device,
        max_batch_size=max_batch_size,
        max_extend_tokens=max_extend_tokens(server_args, int(model_config.context_len), max_batch_size),
    )
