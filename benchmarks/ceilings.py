"""Hardware ceilings measured on the GPU at hand, to put kernel numbers in proportion.

* copy bandwidth: a large device-to-device copy, counting bytes read plus bytes written (the
  figure a memory-bound attention kernel can at best approach);
* bf16 GEMM rate: an 8192^3 matrix product on random data (zeros run faster on Hopper: the
  tensor cores draw less power, so clocks stay higher), 2*M*N*K flops per product.

Both are medians of many runs timed with CUDA events (benchmarks.timing). The copy is far
larger than L2, so no flush is needed between runs; the GEMM is compute bound.

    python -m benchmarks.ceilings     # prints the two numbers as JSON

Numbers are in plain SI units (bytes/s, flop/s); divide for display.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from benchmarks.timing import time_cuda

COPY_BYTES = 2 << 30  # 2 GiB each way: ~1 ms at 3-4 TB/s, so launch cost is negligible
GEMM_SIZE = 8192


@dataclass(frozen=True)
class Ceilings:
    device: str
    copy_bandwidth: float  # (bytes read + bytes written) per second
    bf16_gemm_rate: float  # flop per second


def copy_bandwidth(num_bytes: int = COPY_BYTES, runs: int = 50) -> float:
    """Device-to-device copy rate in bytes/s, counting each byte once read and once written."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    timing = time_cuda(lambda: dst.copy_(src), warmup=5, runs=runs, flush=False)
    return 2 * src.numel() * src.element_size() / timing.median_s


def gemm_rate(size: int = GEMM_SIZE, runs: int = 30) -> float:
    """Rate of a size^3 bf16 matrix product on random data, in flop/s."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda", generator=generator)
    b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda", generator=generator)
    out = torch.empty(size, size, dtype=torch.bfloat16, device="cuda")
    timing = time_cuda(lambda: torch.mm(a, b, out=out), warmup=10, runs=runs, flush=False)
    return 2 * size**3 / timing.median_s


def measure() -> Ceilings:
    if not torch.cuda.is_available():
        raise RuntimeError("ceilings need a CUDA GPU")
    return Ceilings(
        device=torch.cuda.get_device_name(),
        copy_bandwidth=copy_bandwidth(),
        bf16_gemm_rate=gemm_rate(),
    )


if __name__ == "__main__":
    found = measure()
    print(json.dumps(asdict(found), indent=2))
    print(f"copy {found.copy_bandwidth / 1e12:.2f} TB/s (read + write), "
          f"bf16 GEMM {found.bf16_gemm_rate / 1e12:.0f} TFLOP/s")
