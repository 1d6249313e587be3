"""The adapters' kernel wrappers on ``engine_backend.reference`` instead of the CUDA kernels, so an
adapter's whole path (planning, growing, the choice of wrapper, the run) runs on CPU in tests."""

from __future__ import annotations

import torch

from engine_backend import reference
from engine_backend.adapters.common.kernels import LayerKernels, LayerShape


class ReferenceWrapper:
    """A ``BatchDecode`` / ``BatchPrefill`` stand-in that computes with ``engine_backend.reference``.

    Like the real wrappers it keeps the BSR it was last planned on and reads its page ids when it
    runs, so a refilled persistent index buffer is honoured exactly as a CUDA-graph replay would.
    """

    def __init__(self, shape: LayerShape):
        self.shape = shape
        self.planned = None  # the BSR of the last plan()
        self.counts: dict = {}  # the host counts the last plan() was given
        self.plans = 0
        self.last_out: torch.Tensor | None = None  # the ``out`` the last run() was given

    def plan(self, bsr, **counts) -> None:
        self.planned, self.counts = bsr, counts
        self.plans += 1

    def run(self, q, k_pages, v_pages, out=None, alibi_slopes=None):
        assert self.planned is not None, "run() before plan()"
        result, _ = reference.attention(
            q, k_pages, v_pages, self.planned, causal=True, sm_scale=self.shape.sm_scale, variant=self.shape.variant,
            alibi_slopes=alibi_slopes,
        )
        self.last_out = out
        return result if out is None else out.copy_(result)


class ReferenceKernels(LayerKernels):
    """``LayerKernels`` whose wrappers are ``ReferenceWrapper``: planning and growing are
    ``LayerKernels``' own code; only the attention itself is the reference's."""

    def _make_decode(self, max_batch_size: int) -> ReferenceWrapper:
        return ReferenceWrapper(self.shape)

    def _make_prefill(self) -> ReferenceWrapper:
        return ReferenceWrapper(self.shape)
