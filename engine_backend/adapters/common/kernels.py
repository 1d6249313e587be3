"""The GPU wrappers behind an engine adapter: one decode and one prefill wrapper per layer shape.

A *layer shape* is what a wrapper pair is specialised on besides the KV cache's page size and
dtype: query and KV heads, head dim, softmax scale and variant. Layers with equal shapes share one
pair; a model whose layers differ (alternating sliding-window and full layers, say) gets one pair
per distinct shape, all planned on the same step's BSRs, and each layer runs on its shape's plan.

``engine_backend.decode`` / ``engine_backend.prefill`` are imported when the first wrappers are
built, so that selecting and configuring a backend (and the adapters' CPU tests) never needs the
GPU code, nor a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ...format import BSR, INDEX_DTYPE
from ...variants import Variant


@dataclass(frozen=True)
class LayerShape:
    """Everything a layer's kernels are specialised on besides the KV cache's page size and dtype."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    sm_scale: float
    variant: Variant


@dataclass(frozen=True)
class KernelLimits:
    """The batch sizes the wrappers are allocated for (their plan buffers are fixed-size)."""

    max_decode_rows: int  # requests in one decode batch, CUDA-graph padding included
    max_prefill_rows: int  # requests in one prefill / mixed batch
    max_prefill_tokens: int  # query tokens in one prefill / mixed batch


def load_kernels():
    """``(BatchDecode, BatchPrefill)``, imported at first use (see the module docstring)."""
    try:
        from ...decode import BatchDecode
        from ...prefill import BatchPrefill
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(f"engine_backend's GPU kernels are unavailable: {exc}") from exc
    return BatchDecode, BatchPrefill


class LayerKernels:
    """One ``BatchDecode`` and one ``BatchPrefill`` for one ``LayerShape``, created once and planned
    every step. The same decode wrapper serves eager steps and every captured CUDA graph: ``plan``
    rewrites the wrapper's own buffers before each replay."""

    def __init__(
        self,
        shape: LayerShape,
        *,
        page_size: int,
        dtype: torch.dtype,
        limits: KernelLimits,
        device: torch.device | str,
    ):
        self.shape = shape
        self.page_size = page_size
        self.dtype = dtype
        self.limits = limits
        self.device = torch.device(device)
        self.decode_capacity = limits.max_decode_rows
        self.decode = self._make_decode(self.decode_capacity)
        self.prefill = self._make_prefill()

    def _wrapper_args(self) -> tuple[tuple, dict]:
        s = self.shape
        return (s.num_qo_heads, s.num_kv_heads, s.head_dim, self.page_size), dict(
            dtype=self.dtype, variant=s.variant, sm_scale=s.sm_scale, device=self.device
        )

    def _make_decode(self, max_batch_size: int):
        BatchDecode, _ = load_kernels()
        args, kwargs = self._wrapper_args()
        return BatchDecode(*args, max_batch_size=max_batch_size, **kwargs)

    def _make_prefill(self):
        _, BatchPrefill = load_kernels()
        args, kwargs = self._wrapper_args()
        return BatchPrefill(
            *args,
            max_batch_size=self.limits.max_prefill_rows,
            max_num_tokens=self.limits.max_prefill_tokens,
            causal=True,
            **kwargs,
        )

    def ensure_decode_capacity(self, max_batch_size: int) -> None:
        """Graph capture may pad decode batches beyond ``limits``; grow the decode wrapper before
        any graph is captured on it."""
        if max_batch_size > self.decode_capacity:
            self.decode = self._make_decode(max_batch_size)
            self.decode_capacity = max_batch_size

    def plan(
        self,
        decode: BSR | None = None,
        prefill: BSR | None = None,
        *,
        num_prefill_tokens: int | None = None,
        num_prefill_kv_tokens: int | None = None,
    ) -> None:
        """Plan this step's decode rows and prefill rows (either may be absent). The prefill planner
        picks its tile shape from the host counts of query and KV tokens (a short extend onto a long
        cached prefix is long work), so the adapter hands over both where the engine has them."""
        if decode is not None:
            self.decode.plan(decode)
        if prefill is not None:
            self.prefill.plan(prefill, num_tokens=num_prefill_tokens, num_kv_tokens=num_prefill_kv_tokens)

    def warm_up(self) -> None:
        """Run both kernels once on a one-page scratch cache, so that JIT builds and module loads
        happen while the engine starts, not inside a CUDA-graph capture or a first request."""
        s, dev = self.shape, self.device
        k = torch.zeros(1, self.page_size, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=dev)
        q = torch.zeros(1, s.num_qo_heads, s.head_dim, dtype=self.dtype, device=dev)
        rows = torch.tensor([0, 1], dtype=INDEX_DTYPE, device=dev)
        one_row = BSR(rows, rows[:1].clone(), rows[1:].clone(), rows, self.page_size).validate()
        slopes = torch.ones(s.num_qo_heads, dtype=torch.float32, device=dev) if s.variant.alibi else None
        for wrapper in (self.decode, self.prefill):
            wrapper.plan(one_row)
            wrapper.run(q, k, k, alibi_slopes=slopes)


class KernelsByShape:
    """One ``LayerKernels`` per distinct ``LayerShape``, built by ``make`` in first-seen order."""

    def __init__(self, shapes: Iterable[LayerShape], make: Callable[[LayerShape], LayerKernels]):
        self._by_shape = {shape: make(shape) for shape in dict.fromkeys(shapes)}

    def __getitem__(self, shape: LayerShape) -> LayerKernels:
        try:
            return self._by_shape[shape]
        except KeyError:
            raise RuntimeError(
                f"engine_backend built kernels for the layer shapes {list(self._by_shape)}, not for {shape}"
            ) from None

    def __len__(self) -> int:
        return len(self._by_shape)

    def values(self):
        return self._by_shape.values()

    @property
    def decode_capacity(self) -> int:
        """Rows every shape's decode wrapper can plan."""
        return min((kernels.decode_capacity for kernels in self.values()), default=0)

    def ensure_decode_capacity(self, max_batch_size: int) -> None:
        for kernels in self.values():
            kernels.ensure_decode_capacity(max_batch_size)

    def plan(self, decode: BSR | None = None, prefill: BSR | None = None, **host_counts) -> None:
        """Plan every shape's wrappers on the same step (see ``LayerKernels.plan``)."""
        for kernels in self.values():
            kernels.plan(decode, prefill, **host_counts)

    def warm_up(self) -> None:
        for kernels in self.values():
            kernels.warm_up()
