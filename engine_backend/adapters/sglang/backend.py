"""``EngineBackendAttnBackend``: SGLang's AttentionBackend contract on engine_backend kernels.

Per step SGLang calls, in order:

1. metadata: ``init_forward_metadata(forward_batch)`` (eager steps, and prefill under the
   breakable / tc_piecewise prefill graphs, whose attention runs eagerly between captured
   segments), or ``init_forward_metadata_out_graph(view, in_capture)`` right before capturing or
   replaying a decode CUDA graph. Both translate the batch to a ``BSR`` (``layout``) and plan
   the kernels, on the device, without host syncs.
2. per layer: ``forward_decode`` / ``forward_extend``: write the step's K/V into the pool with
   the pool's own ``set_kv_buffer``, then run the kernels on the per-layer K/V buffers in
   place (``paged_kv_view``).

CUDA graphs (decode): ``init_cuda_graph_state`` allocates the persistent page-index buffer
(one row of ``max_pages_per_request`` per captured batch slot); every capture and replay fills
it in place and re-plans, so the captured kernels read the current batch. Padded graph slots
get ``seq_len = get_cuda_graph_seq_len_fill_value() = 1`` and request-table row 0, SGLang's
reserved padding row, so they read a valid slot and their output is discarded.

SGLang 0.5.16 removed the legacy ``init_forward_metadata_capture_cuda_graph`` /
``..._replay_cuda_graph`` pair from the base class; ``init_forward_metadata_out_graph(fb,
in_capture)`` is the hook both capture and replay call (``init_forward_metadata_in_graph`` stays
the base no-op: planning happens outside the graph).
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from ...format import INDEX_DTYPE
from ...log import logger
from ..common.faults import dropped_kv_tokens
from ..common.indptr import StridedAranges
from ..common.kernels import KernelsByShape, LayerKernels
from ..common.queries import query_rows
from .compat import check_runner
from .layout import (
    DECODE_MODES,
    BatchLayout,
    kv_pool_pages,
    layout_from_forward_batch,
    max_pages_per_request,
    mode_name,
    paged_kv_view,
)

# Padded CUDA-graph slots decode one token over one KV slot (see module docstring).
GRAPH_SEQ_LEN_FILL = 1


@torch.compiler.disable
def _run_kernels(kernels, layout, q, k_pages, v_pages, out):
    """The kernel launch, kept out of torch.compile traces (--enable-torch-compile wraps the
    model's decode forward; the JIT extension's ops are opaque to it)."""
    wrapper = kernels.decode if layout.is_decode else kernels.prefill
    return wrapper.run(q, k_pages, v_pages, out=out)


def _engine_output(forward_batch, q: torch.Tensor) -> torch.Tensor | None:
    """The output slice SGLang's prefill graphs (breakable, tc_piecewise) hand the attention
    call as ``forward_batch._attn_output`` -- their static buffer, narrowed to the real tokens.
    Writing there spares the copy their wrapper makes of any other result (SGLang's own
    triton and fa3 backends write there too). Anything that does not fit ``q`` is ignored."""
    out = getattr(forward_batch, "_attn_output", None)
    if (
        isinstance(out, torch.Tensor)
        and out.dtype == q.dtype
        and out.device == q.device
        and out.numel() == q.numel()
        and out.is_contiguous()
    ):
        return out.view(q.shape)
    return None


class EngineBackendAttnBackend(AttentionBackend):
    # Exact page counts come from SGLang's host mirror seq_lens_cpu; keep it published.
    needs_cpu_seq_lens: bool = True

    def __init__(self, model_runner, *, kernel_factory=LayerKernels):
        super().__init__()
        self.setup = check_runner(model_runner)  # refuses before anything is allocated
        self.dropped_kv_tokens = dropped_kv_tokens()
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.kv_pool = model_runner.token_to_kv_pool
        self.page_size = self.setup.page_size
        self.pool_pages = kv_pool_pages(self.kv_pool, self.page_size)
        setup = self.setup
        self.kernels = KernelsByShape(
            setup.distinct_shapes,
            lambda shape: kernel_factory(
                shape, page_size=setup.page_size, dtype=setup.dtype, limits=setup.limits, device=setup.device
            ),
        )
        # Decode's qo_indptr (0, 1, ..., B), sliced each step instead of allocated before every replay.
        self.aranges = StridedAranges(self.req_to_token.device, initial_rows=self.setup.max_batch_size)
        self.graph_indices: torch.Tensor | None = None
        self.layout: BatchLayout | None = None
        logger().info(
            "engine_backend attention: page size %d, %s, layer shapes %s",
            self.page_size,
            self.setup.dtype,
            self.setup.distinct_shapes,
        )

    # ------------------------------------------------------------------ metadata
    def init_forward_metadata(self, forward_batch) -> None:
        self.layout = self._plan(forward_batch, indices_out=None)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        if max_num_tokens != max_bs:
            raise NotImplementedError(
                f"engine_backend captures decode graphs with one query per request; SGLang asked for "
                f"{max_num_tokens} tokens over {max_bs} requests (speculative or multi-token decode)"
            )
        self.kernels.ensure_decode_capacity(max_bs)
        pages = max_bs * max_pages_per_request(self.req_to_token, self.page_size)
        # Keep an existing buffer that is large enough: graphs captured on it stay valid.
        if self.graph_indices is None or self.graph_indices.shape[0] < pages:
            self.graph_indices = torch.zeros(pages, dtype=INDEX_DTYPE, device=self.req_to_token.device)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        if mode_name(forward_batch) not in DECODE_MODES:
            raise NotImplementedError(
                f"engine_backend captures CUDA graphs for DECODE only, not {mode_name(forward_batch)}; "
                "use the breakable or tc_piecewise prefill graph backend (their attention runs eagerly)"
            )
        if self.graph_indices is None:
            raise RuntimeError("init_cuda_graph_state must run before a decode graph is captured or replayed")
        self.layout = self._plan(forward_batch, indices_out=self.graph_indices)

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return GRAPH_SEQ_LEN_FILL

    def _plan(self, forward_batch, indices_out: torch.Tensor | None) -> BatchLayout | None:
        if forward_batch.forward_mode.is_idle() or forward_batch.batch_size == 0:
            return None
        layout = layout_from_forward_batch(
            forward_batch,
            self.req_to_token,
            self.page_size,
            indices_out=indices_out,
            dropped_kv_tokens=self.dropped_kv_tokens,
            aranges=self.aranges,
            pool_pages=self.pool_pages,
        )
        self._check_capacity(layout)
        if layout.is_decode:
            self.kernels.plan(decode=layout.kv)
        else:
            self.kernels.plan(
                prefill=layout.kv, num_prefill_tokens=layout.num_query_tokens, num_prefill_kv_tokens=layout.num_kv_tokens
            )
        return layout

    def kernels_for(self, layer_id: int) -> LayerKernels:
        """The kernels of SGLang layer ``layer_id``'s shape."""
        shape = self.setup.layer_shapes.get(layer_id)
        if shape is None:
            raise RuntimeError(
                f"engine_backend was built for layers {sorted(self.setup.layer_shapes)}, not layer {layer_id}"
            )
        return self.kernels[shape]

    def _check_capacity(self, layout: BatchLayout) -> None:
        limit = self.kernels.decode_capacity if layout.is_decode else self.setup.max_batch_size
        if layout.num_rows > limit:
            raise RuntimeError(f"engine_backend was sized for {limit} requests per batch, got {layout.num_rows}")
        if not layout.is_decode and (layout.num_query_tokens or 0) > self.setup.max_extend_tokens:
            raise RuntimeError(
                f"engine_backend was sized for {self.setup.max_extend_tokens} prefill tokens per batch (from "
                f"--chunked-prefill-size / --max-prefill-tokens), got {layout.num_query_tokens}; raise "
                "--max-prefill-tokens for batches this large"
            )

    # ------------------------------------------------------------------ attention
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache, kwargs, decode=True)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache, kwargs, decode=False)

    def _attend(self, q, k, v, layer, forward_batch, save_kv_cache, kwargs, *, decode: bool):
        if kwargs:
            raise NotImplementedError(f"engine_backend does not support attention inputs {sorted(kwargs)}")
        layout = self._layout_for(q, decode)
        self._save_kv(layer, forward_batch, k, v, save_kv_cache)
        heads, dim = layer.tp_q_head_num, layer.head_dim
        k_pages = paged_kv_view(self.kv_pool.get_key_buffer(layer.layer_id), self.page_size)
        v_pages = paged_kv_view(self.kv_pool.get_value_buffer(layer.layer_id), self.page_size)
        kernels = self.kernels_for(layer.layer_id)
        q = query_rows(q, heads, dim)
        out = _run_kernels(kernels, layout, q, k_pages, v_pages, _engine_output(forward_batch, q))
        return out.view(-1, heads * dim)

    def _layout_for(self, q: torch.Tensor, decode: bool) -> BatchLayout:
        layout = self.layout
        if layout is None:
            raise RuntimeError("engine_backend: attention ran before its metadata was initialised for this batch")
        if layout.is_decode != decode:
            planned = "decode" if layout.is_decode else "extend"
            raise RuntimeError(f"engine_backend: metadata was planned for {planned}, attention ran the other mode")
        if layout.num_query_tokens is not None and q.shape[0] != layout.num_query_tokens:
            raise RuntimeError(
                f"engine_backend: q has {q.shape[0]} tokens but the metadata planned {layout.num_query_tokens}"
            )
        return layout

    def _save_kv(self, layer, forward_batch, k, v, save_kv_cache: bool) -> None:
        if k is None:  # K/V shared with an earlier layer: already in the pool
            return
        if not save_kv_cache:
            raise NotImplementedError(
                "engine_backend reads the step's K/V from the KV cache, so it cannot run with save_kv_cache=False"
            )
        self.kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, layer.k_scale, layer.v_scale)
