"""Kernel wrappers behind the SGLang backend: one BatchDecode + BatchPrefill per layer shape.

A batch is planned once per step per distinct ``LayerShape`` (usually one; two for models
that alternate sliding-window and full layers), then every layer of that shape runs on the
plan. ``engine_backend.decode`` / ``engine_backend.prefill`` are imported here, lazily, so the
plugin and the metadata translation never need the kernels (nor a GPU).

The same decode wrapper serves eager steps and every captured CUDA graph: plan() rewrites the
wrapper's own buffers before each replay, and the graphs read the KV page ids from the
backend's persistent index buffer (see ``backend``).
"""

from __future__ import annotations

from .compat import AttentionSetup, LayerShape
from .layout import BatchLayout


class LayerKernels:
    """Decode and prefill wrappers for one LayerShape."""

    def __init__(self, shape: LayerShape, setup: AttentionSetup):
        self.shape = shape
        self.setup = setup
        self.decode_capacity = setup.max_batch_size
        self.decode = self._make_decode(self.decode_capacity)
        self.prefill = self._make_prefill()

    def _common(self) -> dict:
        setup, shape = self.setup, self.shape
        return dict(dtype=setup.dtype, variant=shape.variant, sm_scale=shape.sm_scale, device=setup.device)

    def _make_decode(self, max_batch_size: int):
        from engine_backend.decode import BatchDecode

        s = self.shape
        return BatchDecode(
            s.num_qo_heads,
            s.num_kv_heads,
            s.head_dim,
            self.setup.page_size,
            max_batch_size=max_batch_size,
            **self._common(),
        )

    def _make_prefill(self):
        from engine_backend.prefill import BatchPrefill

        s = self.shape
        return BatchPrefill(
            s.num_qo_heads,
            s.num_kv_heads,
            s.head_dim,
            self.setup.page_size,
            max_batch_size=self.setup.max_batch_size,
            max_num_tokens=self.setup.max_extend_tokens,
            causal=True,
            **self._common(),
        )

    def ensure_decode_capacity(self, max_batch_size: int) -> None:
        """Graph capture may pad batches beyond the request pool's size; grow before capture."""
        if max_batch_size > self.decode_capacity:
            self.decode = self._make_decode(max_batch_size)
            self.decode_capacity = max_batch_size

    def plan(self, layout: BatchLayout) -> None:
        if layout.is_decode:
            self.decode.plan(layout.kv)
        else:
            self.prefill.plan(layout.kv, num_tokens=layout.num_query_tokens, num_kv_tokens=layout.num_kv_tokens)

    def run(self, layout: BatchLayout, q, k_pages, v_pages, out=None):
        return (self.decode if layout.is_decode else self.prefill).run(q, k_pages, v_pages, out=out)


class KernelSet:
    """Kernels per distinct layer shape, looked up by SGLang layer id."""

    def __init__(self, setup: AttentionSetup, factory=LayerKernels):
        self.by_shape = {shape: factory(shape, setup) for shape in setup.distinct_shapes}
        self.by_layer = {layer_id: self.by_shape[shape] for layer_id, shape in setup.layer_shapes.items()}

    def for_layer(self, layer_id: int):
        try:
            return self.by_layer[layer_id]
        except KeyError:
            raise RuntimeError(
                f"engine_backend was built for layers {sorted(self.by_layer)}, not layer {layer_id}"
            ) from None

    def ensure_decode_capacity(self, max_batch_size: int) -> None:
        for kernels in self.by_shape.values():
            kernels.ensure_decode_capacity(max_batch_size)

    def decode_capacity(self) -> int:
        return min(kernels.decode_capacity for kernels in self.by_shape.values())

    def plan(self, layout: BatchLayout) -> None:
        for kernels in self.by_shape.values():
            kernels.plan(layout)
