"""The per-layer attention implementation vLLM calls every step.

vLLM 0.26 splits a layer's work in two custom ops: ``do_kv_cache_update`` writes this step's
K/V into the paged cache with vLLM's own ``reshape_and_cache_flash`` (skipped for layers that
share another layer's cache), then ``forward`` runs decode on the first
``num_decode_tokens`` query tokens and prefill on the next ``num_prefill_tokens``, writing
in place into the slices of vLLM's ``output``.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from ...support import check_supported
from ..common.kernels import LayerShape
from ..common.variant import variant_for
from .builder import EngineBackendMetadata
from .capabilities import refuse
from .kv_cache import kv_cache_torch_dtype, split_kv

# Unquantized cache of the model's dtype: the cache op's "no conversion" mode.
_CACHE_OP_DTYPE = "auto"


class EngineBackendAttentionImpl(AttentionImpl[EngineBackendMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **unsupported_options,
    ) -> None:
        if attn_type != AttentionType.DECODER:
            raise refuse(f"attention type {getattr(attn_type, 'value', attn_type)!r}")
        if sinks is not None:
            raise refuse("attention sinks")
        options = {name: value for name, value in unsupported_options.items() if value is not None}
        if options:
            raise refuse(f"attention options {sorted(options)}")
        if self.dcp_world_size > 1 or self.pcp_world_size > 1:
            raise refuse("decode/prefill context parallelism")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.alibi_slopes = None if alibi_slopes is None else torch.tensor(alibi_slopes, dtype=torch.float32)
        # vLLM's sliding_window W keeps the current token and the W - 1 before it.
        self.layer_shape = LayerShape(
            num_qo_heads=num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=head_size,
            sm_scale=self.scale,
            variant=variant_for(
                window_left=None if sliding_window is None else sliding_window - 1,
                logits_soft_cap=logits_soft_cap,
                alibi=alibi_slopes is not None,
            ),
        )
        # vLLM builds attention layers with the model dtype as torch's default dtype.
        # check_supported's message names the supported head dims, dtypes and head ratios.
        model_dtype = torch.get_default_dtype()
        check_supported(
            num_qo_heads=num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=head_size,
            dtype=model_dtype,
            kv_dtype=kv_cache_torch_dtype(kv_cache_dtype, model_dtype),
            variant=self.layer_shape.variant,
        )

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        from vllm._custom_ops import reshape_and_cache_flash

        # key/value may carry padding tokens; the op stops at len(slot_mapping) and skips
        # slots of -1 (padding, dummy runs).
        k_cache, v_cache = split_kv(kv_cache)
        scales = (layer._k_scale, layer._v_scale)
        reshape_and_cache_flash(key, value, k_cache, v_cache, slot_mapping, _CACHE_OP_DTYPE, *scales)

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: EngineBackendMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("engine_backend does not fuse output quantization")
        if attn_metadata is None:
            # Memory-profiling run: no KV cache is bound yet and nothing reads the result.
            return output.fill_(0)
        layout = attn_metadata.layout
        kernels = attn_metadata.kernels[self.layer_shape]
        k_cache, v_cache = split_kv(kv_cache)
        slopes = self._alibi_slopes_on(query.device)
        decoded = layout.num_decode_tokens
        if decoded:
            kernels.decode.run(query[:decoded], k_cache, v_cache, out=output[:decoded], alibi_slopes=slopes)
        if layout.num_prefill_tokens:
            start, end = layout.prefill_token_range
            kernels.prefill.run(query[start:end], k_cache, v_cache, out=output[start:end], alibi_slopes=slopes)
        return output

    def _alibi_slopes_on(self, device: torch.device) -> torch.Tensor | None:
        # Moved on first use: vLLM runs un-captured warm-up steps before any graph capture.
        if self.alibi_slopes is not None and self.alibi_slopes.device != device:
            self.alibi_slopes = self.alibi_slopes.to(device)
        return self.alibi_slopes
