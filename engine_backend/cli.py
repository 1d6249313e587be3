"""Self-check: ``python -m engine_backend`` (console script ``engine-backend``).

Prints the environment, then builds every kernel family of ``kernels.catalog`` and, on a
GPU, runs its entry of ``VERIFY`` (a comparison with the torch reference on random inputs).
``--arch 90a --compile-only`` only builds (and loads) the kernels, which needs the CUDA
toolkit but no GPU; ``--only FAMILY`` narrows either to some families. Exit status 1 if any
check fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import __version__
from .kernels import CUDA_TYPES, catalog, jit

ENGINES = ("vllm", "sglang", "flashinfer-python")  # reported by distribution metadata, never imported


# ----------------------------------------------------------------------- merge_state
def _assert_state_close(got, want, dtype) -> None:
    # The kernel rounds its float32 result once to the output dtype.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=1e-5, rtol=eps)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)


def _merge_verify() -> None:
    from . import merge, reference

    torch.manual_seed(0)
    n, h, d = 67, 8, 128
    for dtype in CUDA_TYPES:
        v = torch.randn(2 * n, h, d, device="cuda", dtype=dtype)
        lse = torch.randn(2 * n, h, device="cuda") * 4
        lse[::7] = -math.inf  # empty states
        a, b = (v[:n], lse[:n]), (v[n:], lse[n:])
        _assert_state_close(merge.merge_state(*a, *b), reference.merge_state(*a, *b), dtype)
        indptr = torch.tensor([0, 0, 1, 9, 40, 2 * n], dtype=torch.int32, device="cuda")
        _assert_state_close(merge.merge_states(v, lse, indptr), reference.merge_states(v, lse, indptr), dtype)


def _random_paged_batch(q_lens, kv_lens, page_size=16, hq=32, hkv=8, d=128, dtype=torch.bfloat16):
    """Scattered pages of a random pool, fresh random data: wrong indexing reads wrong data."""
    from .format import BSR

    pages = [-(-n // page_size) for n in kv_lens]
    perm = torch.randperm(sum(pages) + 3, device="cuda").to(torch.int32)
    table = torch.zeros(len(kv_lens), max(pages) + 1, dtype=torch.int32, device="cuda")
    at = 0
    for r, n in enumerate(pages):
        table[r, :n] = perm[at : at + n]
        at += n
    k = torch.randn(perm.numel(), page_size, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    qo = torch.tensor([0] + list(q_lens), device="cuda").cumsum(0).to(torch.int32)
    kv = BSR.from_block_table(table, torch.tensor(kv_lens, dtype=torch.int32, device="cuda"), page_size, qo)
    return torch.randn(sum(q_lens), hq, d, device="cuda", dtype=dtype), k, v, kv


def _assert_close(out, ref, what):
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    if not err < 1.5e-2:
        raise AssertionError(f"{what}: relative error {err:.2e} against the reference")


def _decode_verify() -> None:
    from . import reference
    from .decode import BatchDecode

    torch.manual_seed(0)
    q, k, v, kv = _random_paged_batch([1] * 5, [1, 17, 300, 4096, 9000])
    dec = BatchDecode(32, 8, 128, 16, max_batch_size=5)
    dec.plan(kv)
    _assert_close(dec.run(q, k, v), reference.attention(q, k, v, kv)[0], "decode")


def _prefill_verify() -> None:
    from . import reference
    from .prefill import BatchPrefill

    torch.manual_seed(0)
    q, k, v, kv = _random_paged_batch([1, 100, 700], [50, 100, 2000])
    pre = BatchPrefill(32, 8, 128, 16, max_batch_size=3, max_num_tokens=801)
    pre.plan(kv)
    _assert_close(pre.run(q, k, v), reference.attention(q, k, v, kv, causal=True)[0], "prefill")


# GPU checks against the reference, run after a kernel family builds: add one per family.
# Families are the spec names of ``kernels.catalog.default_specs()``.
VERIFY: dict[str, Callable[[], None]] = {
    "merge_state": _merge_verify,
    "decode": _decode_verify,
    "prefill": _prefill_verify,
}


@dataclass(frozen=True)
class Check:
    name: str
    specs: tuple[jit.KernelSpec, ...]  # the family's kernels: built and loaded for the target arch
    verify: Callable[[], None] | None  # run them on the GPU against the reference; raise on mismatch


def checks(arch: str | None = None) -> list[Check]:
    """One check per kernel family in the catalog for ``arch`` (prefill's tile shapes, hence its
    kernels, depend on it; None: jit's target arch), in catalog order."""
    families: dict[str, list[jit.KernelSpec]] = {}
    for spec in catalog.default_specs(arch=arch):
        families.setdefault(spec.name, []).append(spec)
    return [Check(name, tuple(specs), VERIFY.get(name)) for name, specs in families.items()]


# ----------------------------------------------------------------------- environment
def _gpu() -> str:
    if not torch.cuda.is_available():
        return "no GPU"
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"


def _toolkit() -> str:
    try:
        home = jit.cuda_home()
        out = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, check=True)
    except Exception as e:  # a missing or broken toolkit is reported, not fatal
        return f"not found: {e}"
    release = [line for line in out.stdout.splitlines() if "release" in line]
    return f"{home} (nvcc: {release[-1].strip() if release else out.stdout.strip()})"


def _engines() -> str:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return ", ".join(f"{dist} {version(dist)}" for dist in ENGINES)


def _report_environment(arch: str | None) -> None:
    try:
        target = f"sm_{jit.target_arch(arch)}"
    except jit.JitBuildError as e:
        target = f"none ({e})"
    rows = {
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "GPU": _gpu(),
        "CUDA_HOME": _toolkit(),
        "JIT cache": str(jit.cache_dir()),
        "target arch": target,
        "engines": _engines(),
    }
    print(f"engine_backend {__version__} self-check")
    for key, value in rows.items():
        print(f"  {key:<12} {value}", flush=True)


# ------------------------------------------------------------------------------ main
def _run(check: Check, compile_only: bool, load: Callable[[jit.KernelSpec], object]) -> bool:
    t0 = time.perf_counter()
    try:
        for spec in check.specs:
            load(spec)  # loading also proves the library links
        if not compile_only and check.verify is not None:
            check.verify()
    except Exception as e:  # every failure becomes a FAIL line, with its message
        print(f"  {check.name:<12} FAIL ({type(e).__name__})\n    " + str(e).replace("\n", "\n    "), flush=True)
        return False
    if compile_only or check.verify:
        status = "PASS (compiled" if compile_only else "PASS (matches the reference"
    else:
        status = "BUILT (no reference check registered"
    print(f"  {check.name:<12} {status}, {time.perf_counter() - t0:.1f} s)", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine-backend", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", help="target CUDA arch, e.g. 90a (default: the GPU's)")
    parser.add_argument("--compile-only", action="store_true", help="build the kernels; run nothing (no GPU needed)")
    parser.add_argument("--only", action="append", metavar="FAMILY", help="check only this kernel family (repeatable)")
    args = parser.parse_args(argv)
    if args.arch:
        # Before the check list is made: the catalog's kernels depend on the arch. The kernel
        # modules the verify steps use build for the arch jit resolves, hence the environment.
        os.environ[jit.ARCH_ENV] = args.arch
    known = checks(args.arch)
    selected = [c for c in known if not args.only or c.name in args.only]
    unknown = set(args.only or ()) - {c.name for c in selected}
    if unknown:
        parser.error(f"unknown kernel families {sorted(unknown)}; known: {[c.name for c in known]}")
    _report_environment(args.arch)
    if not args.compile_only and not torch.cuda.is_available():
        print("checks\n  SKIPPED: no GPU (use --arch 90a --compile-only to check that the kernels compile)")
        return 0
    print("checks", flush=True)
    try:
        arch = jit.target_arch(args.arch)
    except jit.JitBuildError:
        arch = None  # every load fails with jit's message, reported per check
    total, done = sum(len(c.specs) for c in selected), itertools.count(1)

    def load(spec):
        return catalog.build_one(spec, arch, next(done), total, load=True)

    ok = [_run(check, args.compile_only, load) for check in selected]
    return 0 if all(ok) else 1
