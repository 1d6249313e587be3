"""The kernel specializations a default install and its test suite use: what
``python -m engine_backend --compile-only`` and ``prebuild`` compile ahead of time."""

from __future__ import annotations

import torch

from ..variants import DEFAULT, Variant
from . import dtype_params, jit

DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 128, 256)
TEST_VARIANTS = (Variant(logits_soft_cap=30.0), Variant(window_left=100), Variant(alibi=True))


def merge_spec(dtype: torch.dtype) -> jit.KernelSpec:
    return jit.KernelSpec.make("merge_state", ("merge_state.cu", "merge_state_ops.cpp"), dtype_params(dtype))


def _target_arch(arch: str | None) -> str | None:
    try:
        return jit.target_arch(arch)
    except jit.JitBuildError:  # no GPU and no arch given: the shapes every arch runs
        return None


def default_specs(with_test_variants: bool = True, arch: str | None = None) -> list[jit.KernelSpec]:
    """For ``arch`` (default: jit's target arch, if one is known): prefill tile shapes are per arch."""
    from ..decode import kernel_spec as decode_spec
    from ..prefill import kernel_spec as prefill_spec, tile_shapes

    arch = _target_arch(arch)

    def prefill_specs(dtype, dim, variant):  # a BatchPrefill loads one kernel per tile shape
        return [prefill_spec(dtype, dim, variant, tile) for tile in dict.fromkeys(tile_shapes(dim, arch))]

    from ..token_table import SPEC as token_table_spec

    specs = [token_table_spec, *(merge_spec(d) for d in DTYPES)]
    for dtype in DTYPES:
        for dim in HEAD_DIMS:
            specs += [decode_spec(dtype, dim, DEFAULT), *prefill_specs(dtype, dim, DEFAULT)]
    if with_test_variants:
        for variant in TEST_VARIANTS:
            specs += [decode_spec(torch.bfloat16, 128, variant), *prefill_specs(torch.bfloat16, 128, variant)]
    return specs


def prebuild(arch: str, specs: list[jit.KernelSpec] | None = None) -> list:
    """Compile every spec for ``arch`` (no GPU needed) into the JIT cache."""
    return [jit.build(spec, arch) for spec in (specs if specs is not None else default_specs(arch=arch))]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Compile the kernels into the JIT cache ahead of time.")
    parser.add_argument("--arch", required=True, help="target arch, e.g. 90a for H100")
    args = parser.parse_args()
    for path in prebuild(args.arch):
        print(path)
