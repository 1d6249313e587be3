"""Every JIT specialization of the package: which sources a kernel family compiles and which
template values specialise them. The modules that run the kernels ask here for their spec and
``jit.load`` it; ``catalog`` lists the ones built ahead of time.

A spec is a value (``jit.KernelSpec``): equal arguments give equal specs, hence one cached
library each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..variants import Variant
from . import dtype_params, jit

if TYPE_CHECKING:  # for the annotation only: prefill imports this module
    from ..prefill import TileShape


def decode_spec(dtype: torch.dtype, head_dim: int, variant: Variant) -> jit.KernelSpec:
    params = dict(dtype_params(dtype), HEAD_DIM=head_dim, **variant.template_args())
    return jit.KernelSpec.make("decode", ("decode.cu", "decode_ops.cpp"), params)


def prefill_spec(dtype: torch.dtype, head_dim: int, variant: Variant, tile: TileShape) -> jit.KernelSpec:
    """``tile``: the CTA shape (``prefill.TileShape``: its warps, K/V tile and mainloop)."""
    params = dict(dtype_params(dtype), HEAD_DIM=head_dim, WARPS=tile.warps, KV_TILE=tile.kv_tile,
                  WGMMA=int(tile.mainloop == "wgmma"), **variant.template_args())
    return jit.KernelSpec.make("prefill", ("prefill.cu", "prefill_ops.cpp"), params)


def merge_state_spec(dtype: torch.dtype) -> jit.KernelSpec:
    return jit.KernelSpec.make("merge_state", ("merge_state.cu", "merge_state_ops.cpp"), dtype_params(dtype))


def token_table_spec() -> jit.KernelSpec:
    return jit.KernelSpec.make("token_table", ("token_table.cu", "token_table_ops.cpp"))
