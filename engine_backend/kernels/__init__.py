"""CUDA kernels: C++/CUDA templates under ``csrc/``, built on first use by ``jit``.

``HEAD_DIMS`` and ``DTYPES`` are what the kernels are built for: the one definition that
``support`` checks models against and ``kernels.catalog`` compiles ahead of time.
``dtype_params`` is the dispatch table from torch dtypes to the template arguments that
specialise a kernel for them; every kernel family uses it, so no source is copied per dtype.
This module imports no JIT machinery: adapters import it on a host without the CUDA toolkit.
"""

from __future__ import annotations

import torch

# torch dtype -> (CUDA element type, ATen scalar type)
CUDA_TYPES = {
    torch.float16: ("half", "at::kHalf"),
    torch.bfloat16: ("__nv_bfloat16", "at::kBFloat16"),
}
DTYPES = tuple(CUDA_TYPES)  # fp16, bf16
HEAD_DIMS = (64, 128, 256)


def check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in CUDA_TYPES:
        names = ", ".join(str(d) for d in CUDA_TYPES)
        raise ValueError(f"{what}: dtype {dtype} is not supported (supported: {names})")


def dtype_params(dtype: torch.dtype, prefix: str = "") -> dict[str, str]:
    check_dtype(dtype, prefix.lower() or "tensor")
    cuda, aten = CUDA_TYPES[dtype]
    return {f"{prefix}DTYPE": cuda, f"{prefix}TORCH_DTYPE": aten}
