"""GPU timing shared by every benchmark: CUDA events around the call alone, median of many runs.

Each run is timed on its own (not one event pair around a loop) so the L2 flush between runs
stays outside the measurement: without the flush, a decode batch whose KV fits in the 50 MB
L2 would be timed reading from cache, not from HBM as in a real model step.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch

L2_FLUSH_BYTES = 256 << 20  # several times the H100/H200 L2 (50 / 60 MB)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    runs: int

    @property
    def median_s(self) -> float:
        return self.median_ms * 1e-3


_flush_buffer: torch.Tensor | None = None


_flush_sink: torch.Tensor | None = None


def flush_l2() -> None:
    """Read a buffer larger than L2, evicting whatever the previous run left there.

    Reading, not writing: a write would leave L2 full of dirty lines whose write-back the next
    (timed) kernel would pay for, some 50 MB of extra traffic that no real model step has."""
    global _flush_buffer, _flush_sink
    if _flush_buffer is None:
        _flush_buffer = torch.ones(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
        _flush_sink = torch.empty((), dtype=torch.int64, device="cuda")
    torch.sum(_flush_buffer, dim=0, out=_flush_sink)


def time_cuda(fn: Callable[[], object], *, warmup: int = 5, runs: int = 50, flush: bool = True) -> Timing:
    """Median and minimum wall time of ``fn()`` on the current stream, in milliseconds."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for start, end in zip(starts, ends):
        if flush:
            flush_l2()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) for start, end in zip(starts, ends)]
    return Timing(median_ms=statistics.median(times), min_ms=min(times), runs=runs)
