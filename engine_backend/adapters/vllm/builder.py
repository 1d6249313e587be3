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
from ..common import StridedAranges
from .faults import dropped_kv_tokens
from .kernels import CacheGeometry, KernelKey, KernelLimits, KernelSet
from .layout import StepLayout, step_layout


@dataclass
class EngineBackendMetadata(AttentionMetadata):
    layout: StepLayout
    kernels: dict[KernelKey, KernelSet]  # planned on ``layout``
    # vLLM's own view of the step, kept for debugging and for independent checks.
    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor


class EngineBackendMetadataBuilder(AttentionMetadataBuilder[EngineBackendMetadata]):
    _cudagraph_support = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)  # decodes first, one query token each
        self.cache = cache_geometry(kv_cache_spec)
        self.limits = kernel_limits(vllm_config)
        self.aranges = StridedAranges(device, self.limits.max_decode_rows)
        self.dropped_kv_tokens = dropped_kv_tokens()
        self.kernel_keys = kernel_keys_of_layers(vllm_config, layer_names)
        for key in self.kernel_keys:
            check_supported(
                num_qo_heads=key.num_qo_heads,
                num_kv_heads=self.cache.num_kv_heads,
                head_dim=self.cache.head_dim,
                dtype=self.cache.dtype,
                page_size=self.cache.page_size,
                variant=key.variant,
            )
        self._kernels: dict[KernelKey, KernelSet] | None = None
        if torch.device(device).type == "cuda":
            self._kernel_sets()  # allocate and warm up now, before any graph capture

    def _kernel_sets(self) -> dict[KernelKey, KernelSet]:
        if self._kernels is None:
            self._kernels = {key: KernelSet(key, self.cache, self.limits, self.device) for key in self.kernel_keys}
            for kernels in self._kernels.values():
                kernels.warm_up()
        return self._kernels

    def layout(self, common: CommonAttentionMetadata) -> StepLayout:
        return step_layout(common, self.cache.page_size, self.aranges, self.dropped_kv_tokens)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> EngineBackendMetadata:
        # common_prefix_len is always 0: use_cascade_attention() keeps vLLM's default False.
        layout = self.layout(common_attn_metadata)
        kernels = self._kernel_sets()
        for kernel_set in kernels.values():
            kernel_set.plan(layout)
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


def cache_geometry(spec: AttentionSpec) -> CacheGeometry:
    head_size_v = getattr(spec, "head_size_v", spec.head_size)
    if head_size_v != spec.head_size:
        raise ValueError(
            f"engine_backend needs equal K and V head sizes, got {spec.head_size} and {head_size_v}"
        )
    return CacheGeometry(
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_size,
        page_size=spec.block_size,
        dtype=spec.dtype,
    )


def kernel_limits(vllm_config: VllmConfig) -> KernelLimits:
    scheduler = vllm_config.scheduler_config
    largest_graph = vllm_config.compilation_config.max_cudagraph_capture_size or 0
    return KernelLimits(
        max_decode_rows=max(scheduler.max_num_seqs, largest_graph),
        max_prefill_rows=scheduler.max_num_seqs,
        max_prefill_tokens=scheduler.max_num_batched_tokens,
    )


def kernel_keys_of_layers(vllm_config: VllmConfig, layer_names: list[str]) -> list[KernelKey]:
    """Distinct kernel keys of this group's layers, in layer order."""
    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
    keys: list[KernelKey] = []
    for layer in layers.values():
        key = getattr(layer.impl, "kernel_key", None)
        if key is not None and key not in keys:
            keys.append(key)
    return keys
