"""The kernel specializations a default install and its test suite use: what
``python -m engine_backend --compile-only`` and ``prebuild`` compile ahead of time."""

from __future__ import annotations

import torch

from ..log import logger
from ..variants import DEFAULT, Variant
from . import DTYPES, HEAD_DIMS, jit
from .specs import decode_spec, merge_state_spec, prefill_spec, token_table_spec

TEST_VARIANTS = (Variant(logits_soft_cap=30.0), Variant(window_left=100), Variant(alibi=True))


def _target_arch(arch: str | None) -> str | None:
    try:
        return jit.target_arch(arch)
    except jit.JitBuildError:  # no GPU and no arch given: the shapes every arch runs
        return None


def default_specs(with_test_variants: bool = True, arch: str | None = None) -> list[jit.KernelSpec]:
    """For ``arch`` (default: jit's target arch, if one is known): prefill tile shapes are per arch."""
    from ..prefill import tile_shapes

    arch = _target_arch(arch)

    def prefill_specs(dtype, dim, variant):  # a BatchPrefill loads one kernel per tile shape
        return [prefill_spec(dtype, dim, variant, tile) for tile in dict.fromkeys(tile_shapes(dim, arch))]

    found = [token_table_spec(), *(merge_state_spec(d) for d in DTYPES)]
    for dtype in DTYPES:
        for dim in HEAD_DIMS:
            found += [decode_spec(dtype, dim, DEFAULT), *prefill_specs(dtype, dim, DEFAULT)]
    if with_test_variants:
        for variant in TEST_VARIANTS:
            found += [decode_spec(torch.bfloat16, 128, variant), *prefill_specs(torch.bfloat16, 128, variant)]
    return found


def describe(spec: jit.KernelSpec) -> str:
    """``name`` and the template values that tell its specializations apart, for progress lines."""
    values = " ".join(f"{k}={v}" for k, v in spec.params if k != "TORCH_DTYPE")
    return f"{spec.name} {values}".strip()


def build_one(spec: jit.KernelSpec, arch: str | None, index: int, total: int, load: bool = False):
    """Build ``spec`` (``load``: and load it, which proves the library links), saying first which of
    how many it is: ahead-of-time builds take minutes. (A compile then logs its start and seconds.)"""
    where = f" (sm_{arch})" if arch else ""
    logger().info(f"building {index}/{total}: {describe(spec)}{where} ...")
    return jit.load(spec, arch) if load else jit.build(spec, arch)


def prebuild(arch: str, specs: list[jit.KernelSpec] | None = None) -> list:
    """Compile every spec for ``arch`` (no GPU needed) into the JIT cache."""
    todo = default_specs(arch=arch) if specs is None else specs
    return [build_one(spec, arch, i, len(todo)) for i, spec in enumerate(todo, 1)]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Compile the kernels into the JIT cache ahead of time.")
    parser.add_argument("--arch", required=True, help="target arch, e.g. 90a for H100")
    args = parser.parse_args()
    for path in prebuild(args.arch):
        print(path)
