"""Pre-compile the FlashInfer kernels our peer benchmarks use, on a machine with no GPU.

FlashInfer JIT-compiles one shared library per kernel family ("module"); compiling the
two we need (FA2 and FA3 batch prefill, bf16, head_dim 128) costs many minutes of nvcc, which
we do not want to pay on the GPU host. FlashInfer loads a module from its AOT folder
(``<flashinfer package>/data/aot/<uri>/<uri>.so``) without running ninja or nvcc when that file
exists, so this script builds the modules here and lays them out in that shape. The GPU command
then copies the folder into the installed package (see docs/peers.md).

Run with an interpreter that has flashinfer-python (the exact version the GPU host installs)
and torch installed; no GPU is needed:

    /work/venvs/fi/bin/python benchmarks/build_peer_cache.py --out .stage/flashinfer-aot

The decode wrapper with ``use_tensor_cores=True`` and both prefill wrappers all resolve to the
same batch-prefill module per backend (it holds plan, ragged_run and paged_run), so two modules
cover every peer in benchmarks/peers.py. A third, the CUDA-core batch-decode module, is what
SGLang's ``flashinfer`` backend decodes with for Llama-3-shaped models (group size 4, see
``should_use_tensor_core`` there): carried too, so the end-to-end runs do not compile it on GPU time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

FLASHINFER_VERSION = "0.6.14"
TARGET_ARCH = "9.0a"  # H100 / H200; FA3 needs the sm_90a feature set (wgmma, TMA)
HEAD_DIM = 128
BACKENDS = ("fa2", "fa3")


def configure_environment(workspace: Path, jobs: int) -> None:
    """FlashInfer reads these at import time, so they must be set before the first import."""
    os.environ["FLASHINFER_CUDA_ARCH_LIST"] = TARGET_ARCH  # no GPU to detect the arch from
    os.environ["FLASHINFER_WORKSPACE_BASE"] = str(workspace)
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda-13.0")
    os.environ["MAX_JOBS"] = str(jobs)


def curand_include_dir() -> Path | None:
    """Folder holding curand_kernel.h, which FA3's CUTLASS utility headers include.

    A minimal CUDA toolkit (like this machine's) lacks it; the nvidia-curand wheel that torch
    pulls in ships it. Returns None when the toolkit has it already.
    """
    if (Path(os.environ["CUDA_HOME"]) / "include" / "curand_kernel.h").is_file():
        return None
    for entry in sys.path:
        for major in ("cu13", "cu12"):
            candidate = Path(entry) / "nvidia" / major / "include"
            if (candidate / "curand_kernel.h").is_file():
                return candidate
    sys.exit("curand_kernel.h found neither in CUDA_HOME/include nor in an installed nvidia-curand wheel")


def extra_cuda_flags(backend: str) -> str:
    """Only FA3 needs the curand headers; FA2's compile commands stay unchanged, so an earlier
    FA2 build stays up to date for ninja."""
    include = curand_include_dir() if backend == "fa3" else None
    return f"-isystem {include}" if include else ""


def libcuda_link_flags(workspace: Path) -> str:
    """Linker flags that let ``-lcuda`` resolve on a machine without the NVIDIA driver.

    FlashInfer links every module with ``-lcuda``, which only records DT_NEEDED libcuda.so.1:
    a shared object may leave its symbols undefined, and the GPU host's driver supplies them
    at load time. A toolkit without its stubs folder (like this machine's) has no libcuda at
    all, so an empty library carrying that soname stands in for the stub.
    """
    cuda_home = Path(os.environ["CUDA_HOME"])
    if any((cuda_home / sub / "libcuda.so").is_file() for sub in ("lib64", "lib64/stubs")):
        return ""
    stub_dir = workspace / "libcuda-stub"
    stub = stub_dir / "libcuda.so"
    if not stub.is_file():
        stub_dir.mkdir(parents=True, exist_ok=True)
        empty = stub_dir / "empty.c"
        empty.write_text("/* soname-only stand-in for the driver's libcuda stub */\n")
        subprocess.run(["cc", "-shared", "-o", str(stub), str(empty), "-Wl,-soname,libcuda.so.1"], check=True)
    return f"-L{stub_dir}"


def module_specs():
    """JitSpecs of the batch-prefill modules, with the arguments the wrappers pass for our shapes.

    Argument order follows get_batch_prefill_module(backend, q, kv, o, idx, d_qk, d_vo, posenc,
    sliding_window, logits_soft_cap, fp16_qk_reduction); the wrappers derive the last four from
    their defaults (no RoPE, window_left=-1, no soft cap, fp32 QK accumulation) and idx from the
    indptr dtype, which the peers always pass as int32.
    """
    import torch
    from flashinfer.jit.attention.modules import gen_batch_prefill_module

    from flashinfer.jit.attention.modules import gen_batch_decode_module

    bf16 = torch.bfloat16
    prefill = [
        gen_batch_prefill_module(
            backend, bf16, bf16, bf16, torch.int32, HEAD_DIM, HEAD_DIM, 0, False, False, False
        )
        for backend in BACKENDS
    ]
    decode = gen_batch_decode_module(bf16, bf16, bf16, torch.int32, HEAD_DIM, HEAD_DIM, 0, False, False)
    return [*prefill, decode]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def install_into(out_dir: Path, specs) -> dict:
    """Copy each built library to <out>/<uri>/<uri>.so, the AOT layout FlashInfer looks up."""
    manifest = {"flashinfer": FLASHINFER_VERSION, "arch": TARGET_ARCH, "modules": {}}
    for spec in specs:
        target = out_dir / spec.name / f"{spec.name}.so"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec.jit_library_path, target)
        manifest["modules"][spec.name] = {
            "bytes": target.stat().st_size,
            "sha256": sha256_of(target),
        }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".stage/flashinfer-aot"))
    parser.add_argument("--workspace", type=Path, default=Path(".stage/flashinfer-build"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    configure_environment(args.workspace.resolve(), args.jobs)
    import flashinfer
    from flashinfer.jit.core import build_jit_specs

    if flashinfer.__version__ != FLASHINFER_VERSION:
        sys.exit(f"flashinfer {flashinfer.__version__} found; the GPU host installs {FLASHINFER_VERSION}")
    specs = module_specs()
    os.environ["FLASHINFER_EXTRA_LDFLAGS"] = libcuda_link_flags(args.workspace.resolve())
    for backend, spec in zip((*BACKENDS, "decode"), specs):
        os.environ["FLASHINFER_EXTRA_CUDAFLAGS"] = extra_cuda_flags(backend)  # read when the ninja file is written
        started = time.monotonic()
        build_jit_specs([spec], verbose=True)
        print(f"{spec.name}: built in {time.monotonic() - started:.0f} s", flush=True)
    manifest = install_into(args.out.resolve(), specs)
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
