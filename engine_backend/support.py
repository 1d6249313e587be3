"""What the kernels support, checked once where a backend is chosen.

Adapters call ``check_supported`` when an engine selects this backend, so an unsupported
model is refused with a message naming what is supported, never by a crash in a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import is_integer
from .kernels import DTYPES, HEAD_DIMS  # what the kernels are built for: defined there once
from .variants import DEFAULT, Variant

PAGE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # per-token addressing: any power of two
MAX_GROUP = 64  # query heads per KV head


@dataclass(frozen=True)
class Support:
    head_dims: tuple = HEAD_DIMS
    dtypes: tuple = DTYPES
    page_sizes: tuple = PAGE_SIZES

    def describe(self) -> str:
        dts = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
        return (
            f"head dims {list(self.head_dims)}, dtypes [{dts}] (KV cache in the same dtype), "
            f"page sizes {list(self.page_sizes)}, query heads a multiple of KV heads "
            f"(up to {MAX_GROUP} per KV head)"
        )


SUPPORTED = Support()


def check_supported(
    *,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    kv_dtype: torch.dtype | None = None,
    page_size: int = 1,
    variant: Variant = DEFAULT,
) -> None:
    """Raise ValueError naming what is supported if this configuration is not."""
    if not isinstance(variant, Variant):
        raise ValueError(f"variant must be an engine_backend.Variant, got {type(variant).__name__}")
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    problems = []
    if not is_integer(head_dim) or head_dim not in HEAD_DIMS:
        problems.append(f"head dim {head_dim}")
    if dtype not in DTYPES:
        problems.append(f"dtype {dtype}")
    if kv_dtype != dtype:
        problems.append(f"KV cache dtype {kv_dtype} differing from the query dtype {dtype}")
    if not is_integer(page_size) or page_size not in PAGE_SIZES:
        problems.append(f"page size {page_size}")
    if not (is_integer(num_qo_heads) and is_integer(num_kv_heads)) or min(num_qo_heads, num_kv_heads) <= 0 \
            or num_qo_heads % num_kv_heads:
        problems.append(f"{num_qo_heads} query heads over {num_kv_heads} KV heads")
    elif num_qo_heads // num_kv_heads > MAX_GROUP:
        problems.append(f"{num_qo_heads // num_kv_heads} query heads per KV head")
    if variant.alibi and variant.logits_soft_cap > 0:
        problems.append("ALiBi together with logits soft-cap")
    if problems:
        raise ValueError(f"engine_backend does not support {'; '.join(problems)}. Supported: {SUPPORTED.describe()}.")
