"""Per-step attention metadata: the step layout plus wrappers planned on it.

CUDA graphs: ``UNIFORM_SINGLE_TOKEN_DECODE``. vLLM then captures full graphs only for
batches of one-token decodes (padded to a capture size) and runs every other batch with
attention outside the graph. A replay reads what ``plan`` wrote into the decode wrapper's
own buffers plus ``kv.indices``, which aliases vLLM's persistent block table (row 0
onwards, the same address every step), so re-planning before each replay is all it takes.
Spec-decode batches (several query tokens per request) go to the prefill wrapper, which is
never captured: that is why the level is not ``UNIFORM_BATCH``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadata,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from ...support import check_supported
from ..common.faults import dropped_kv_tokens
from ..common.indptr import StridedAranges
from ..common.kernels import KernelLimits, KernelsByShape, LayerKernels, LayerShape
from .kv_cache import bound_pages
from .layout import StepLayout, step_layout


@dataclass
class EngineBackendMetadata(AttentionMetadata):
    layout: StepLayout
    kernels: KernelsByShape  # planned on ``layout``
    # vLLM's own view of the step, kept for debugging and for independent checks.
    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor


class EngineBackendMetadataBuilder(AttentionMetadataBuilder[EngineBackendMetadata]):
    _cudagraph_support = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    # What builds each layer shape's wrappers; the CPU tests put reference kernels here.
    kernel_factory = LayerKernels

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)  # decodes first, one query token each
        self.page_size, self.dtype = cache_format(kv_cache_spec)
        self.limits = kernel_limits(vllm_config)
        self.aranges = StridedAranges(device, self.limits.max_decode_rows)
        self.dropped_kv_tokens = dropped_kv_tokens()
        self.layers = list(get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names).values())
        self.layer_shapes = layer_shapes(self.layers)
        for shape in self.layer_shapes:
            check_layer_shape(shape, kv_cache_spec)
        self._kernels: KernelsByShape | None = None
        if torch.device(device).type == "cuda":
            self._planned_kernels()  # allocate and warm up now, before any graph capture

    def _planned_kernels(self) -> KernelsByShape:
        if self._kernels is None:
            self._kernels = KernelsByShape(
                self.layer_shapes,
                lambda shape: self.kernel_factory(
                    shape, page_size=self.page_size, dtype=self.dtype, limits=self.limits, device=self.device
                ),
            )
            self._kernels.warm_up()
        return self._kernels

    def layout(self, common: CommonAttentionMetadata) -> StepLayout:
        # The pool's page count bounds the page ids wherever the BSRs' values are checked (debug
        # mode, see engine_backend.checks); vLLM binds the caches after building the builders.
        return step_layout(
            common, self.page_size, self.aranges, self.dropped_kv_tokens, pool_pages=bound_pages(self.layers)
        )

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> EngineBackendMetadata:
        # common_prefix_len is always 0: use_cascade_attention() keeps vLLM's default False.
        layout = self.layout(common_attn_metadata)
        kernels = self._planned_kernels()
        kernels.plan(
            layout.decode,
            layout.prefill,
            num_prefill_tokens=layout.num_prefill_tokens,
            num_prefill_kv_tokens=layout.num_prefill_kv_tokens,
        )
        return EngineBackendMetadata(
            layout=layout,
            kernels=kernels,
            num_actual_tokens=common_attn_metadata.num_actual_tokens,
            query_start_loc=common_attn_metadata.query_start_loc,
            seq_lens=common_attn_metadata.seq_lens,
            block_table=common_attn_metadata.block_table_tensor,
        )

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> EngineBackendMetadata:
        metadata = self.build(0, common_attn_metadata)
        if not metadata.layout.is_uniform_decode:
            raise RuntimeError(
                "engine_backend supports full CUDA graphs for one-token decode batches only "
                f"(UNIFORM_SINGLE_TOKEN_DECODE), but vLLM is capturing a batch with "
                f"{metadata.layout.num_prefills} prefill requests"
            )
        return metadata


def cache_format(spec: AttentionSpec) -> tuple[int, torch.dtype]:
    """(page size, dtype) of a KV-cache group's cache."""
    head_size_v = getattr(spec, "head_size_v", spec.head_size)
    if head_size_v != spec.head_size:
        raise ValueError(
            f"engine_backend needs equal K and V head sizes, got {spec.head_size} and {head_size_v}"
        )
    return spec.block_size, spec.dtype


def check_layer_shape(shape: LayerShape, spec: AttentionSpec) -> None:
    """A layer's kernels run on its group's cache: the heads and head dim must be the cache's, and
    the kernels must support the combination (``check_supported`` names what they support)."""
    if (shape.num_kv_heads, shape.head_dim) != (spec.num_kv_heads, spec.head_size):
        raise ValueError(
            f"engine_backend: a layer with {shape.num_kv_heads} KV heads of dim {shape.head_dim} shares a KV "
            f"cache of {spec.num_kv_heads} heads of dim {spec.head_size}"
        )
    check_supported(
        num_qo_heads=shape.num_qo_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        dtype=spec.dtype,
        page_size=spec.block_size,
        variant=shape.variant,
    )


def kernel_limits(vllm_config: VllmConfig) -> KernelLimits:
    scheduler = vllm_config.scheduler_config
    largest_graph = vllm_config.compilation_config.max_cudagraph_capture_size or 0
    return KernelLimits(
        max_decode_rows=max(scheduler.max_num_seqs, largest_graph),
        max_prefill_rows=scheduler.max_num_seqs,
        max_prefill_tokens=scheduler.max_num_batched_tokens,
    )


def layer_shapes(layers) -> list[LayerShape]:
    """Distinct shapes of a group's layers, in layer order."""
    shapes = (getattr(layer.impl, "layer_shape", None) for layer in layers)
    return list(dict.fromkeys(shape for shape in shapes if shape is not None))
