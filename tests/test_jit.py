"""The JIT build system, on a CPU-only machine: needs the CUDA toolkit, never a GPU.

Most tests build a tiny kernel from a temporary source folder (about a second per build);
the real merge kernel is compiled once, into a cache shared with the CLI test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine_backend.kernels import catalog, jit

ARCH = "90a"
REPO = Path(__file__).resolve().parents[1]

TINY_CU = """// A trivial kernel for build tests. Value: ${VALUE}
#include "tiny.cuh"
__global__ void tiny_kernel(float* x) { x[threadIdx.x] = tiny_value(${VALUE}); }
"""
TINY_CUH = "#pragma once\n__device__ inline float tiny_value(float v) { return v + 1.f; }\n"


@pytest.fixture
def tiny_src(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny.cu").write_text(TINY_CU)
    (src / "tiny.cuh").write_text(TINY_CUH)
    return src


def tiny_spec(src: Path, value: str = "2.0f", cuda_flags=()) -> jit.KernelSpec:
    return jit.KernelSpec.make("tiny", ("tiny.cu",), {"VALUE": value}, cuda_flags=cuda_flags, source_dir=src)


def stamp_of(lib: Path) -> Path:
    return lib.with_suffix(".so.sha256")


def assert_installed(lib: Path) -> None:
    assert lib.is_file() and stamp_of(lib).read_text().strip() == jit._sha256(lib)
    assert not lib.with_suffix(".so.partial").exists()


def building_lines(text: str, name: str = "tiny") -> list[str]:
    return [line for line in text.splitlines() if f"building {name} for sm_{ARCH}" in line]


# -------------------------------------------------------------------- environment
def test_cache_dir_comes_from_the_environment(jit_cache):
    assert jit.cache_dir() == jit_cache


def test_target_arch_explicit_then_environment(monkeypatch):
    monkeypatch.setenv(jit.ARCH_ENV, "sm_100a")
    assert jit.target_arch() == "100a"
    assert jit.target_arch("sm_90a") == "90a"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error; this machine has a GPU")
def test_target_arch_without_gpu_or_setting_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv(jit.ARCH_ENV, raising=False)
    with pytest.raises(jit.JitBuildError, match=jit.ARCH_ENV):
        jit.target_arch()


# ----------------------------------------------------------------------- cache key
def test_cache_key_is_stable(cuda_home, tiny_src):
    spec = tiny_spec(tiny_src)
    same = jit.KernelSpec.make("tiny", ["tiny.cu"], {"VALUE": "2.0f"}, source_dir=str(tiny_src))
    assert jit.cache_key(spec, ARCH) == jit.cache_key(spec, ARCH) == jit.cache_key(same, ARCH)


def test_cache_key_follows_every_input(cuda_home, tiny_src):
    spec = tiny_spec(tiny_src)
    base = jit.cache_key(spec, ARCH)
    assert jit.cache_key(tiny_spec(tiny_src, value="3.0f"), ARCH) != base
    assert jit.cache_key(tiny_spec(tiny_src, cuda_flags=("-DEXTRA=1",)), ARCH) != base
    assert jit.cache_key(spec, "100a") != base
    (tiny_src / "tiny.cu").write_text(TINY_CU + "// edited\n")
    edited_source = jit.cache_key(spec, ARCH)
    assert edited_source != base
    (tiny_src / "tiny.cuh").write_text(TINY_CUH + "// edited\n")
    assert jit.cache_key(spec, ARCH) not in (base, edited_source)


def test_missing_template_parameter_is_a_build_error(cuda_home, tiny_src):
    spec = jit.KernelSpec.make("tiny", ("tiny.cu",), {}, source_dir=tiny_src)
    with pytest.raises(jit.JitBuildError, match="tiny.cu: missing or bad parameter 'VALUE'"):
        jit.cache_key(spec, ARCH)


# --------------------------------------------------------------------------- build
def test_build_installs_a_checksummed_library_and_reports_progress(cuda_home, jit_cache, tiny_src, capfd):
    spec = tiny_spec(tiny_src)
    lib = jit.build(spec, arch=ARCH)
    assert lib == jit_cache / f"tiny-{jit.cache_key(spec, ARCH)}" / "tiny.so"
    assert_installed(lib)
    err = capfd.readouterr().err
    assert len(building_lines(err)) == 1
    assert re.search(r"^\[engine_backend\] built tiny in \d+\.\d s$", err, re.M), err


def test_second_build_is_a_cache_hit(cuda_home, jit_cache, tiny_src, capfd):
    spec = tiny_spec(tiny_src)
    lib = jit.build(spec, arch=ARCH)
    mtime = lib.stat().st_mtime_ns
    capfd.readouterr()
    assert jit.build(spec, arch=ARCH) == lib
    assert lib.stat().st_mtime_ns == mtime
    assert capfd.readouterr().err == ""


def test_changed_parameters_build_a_separate_library(cuda_home, jit_cache, tiny_src):
    a, b = jit.build(tiny_spec(tiny_src), arch=ARCH), jit.build(tiny_spec(tiny_src, "5.0f"), arch=ARCH)
    assert a != b
    assert_installed(a)
    assert_installed(b)


def _leftover_partial(lib: Path) -> None:  # killed while linking: no library installed yet
    lib.rename(lib.with_suffix(".so.partial"))
    stamp_of(lib).unlink()


def _missing_stamp(lib: Path) -> None:  # killed between installing the library and its stamp
    stamp_of(lib).unlink()


def _wrong_stamp(lib: Path) -> None:
    stamp_of(lib).write_text("0" * 64)


def _truncated_library(lib: Path) -> None:  # corrupt file, stale stamp
    data = lib.read_bytes()
    lib.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_leftover_partial, _missing_stamp, _wrong_stamp, _truncated_library])
def test_damaged_cache_entries_are_rebuilt(cuda_home, jit_cache, tiny_src, capfd, damage):
    spec = tiny_spec(tiny_src)
    lib = jit.build(spec, arch=ARCH)
    good = lib.read_bytes()
    damage(lib)
    capfd.readouterr()
    assert jit.build(spec, arch=ARCH) == lib
    assert len(building_lines(capfd.readouterr().err)) == 1
    assert_installed(lib)
    assert len(lib.read_bytes()) == len(good)


def test_compiler_errors_raise_with_the_compilers_message(cuda_home, jit_cache, tiny_src):
    (tiny_src / "tiny.cu").write_text(TINY_CU + "this_is_not_cuda x;\n")
    spec = tiny_spec(tiny_src)
    with pytest.raises(jit.JitBuildError) as err:
        jit.build(spec, arch=ARCH)
    message = str(err.value)
    assert "building tiny (sm_90a) failed" in message
    assert "this_is_not_cuda" in message and "error" in message
    assert not (jit_cache / f"tiny-{jit.cache_key(spec, ARCH)}" / "tiny.so").exists()


WORKER = """
import sys, time
from pathlib import Path
from engine_backend.kernels import jit

src, ready, go = map(Path, sys.argv[1:4])
spec = jit.KernelSpec.make("tiny", ("tiny.cu",), {"VALUE": "2.0f"}, source_dir=src)
jit.cache_key(spec, "90a")  # pay for imports and nvcc --version before the race starts
ready.touch()
while not go.exists():
    time.sleep(0.002)
print(jit.build(spec, arch="90a"))
"""


def test_concurrent_processes_build_once_and_share_the_library(cuda_home, jit_cache, tiny_src, tmp_path):
    env = {**os.environ, jit.CACHE_ENV: str(jit_cache), "CUDA_HOME": str(cuda_home), "PYTHONPATH": str(REPO)}
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tiny_src), str(r), str(go)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in ready
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    go.touch()  # release both at once: one builds, the other waits on the lock
    results = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    assert_installed(Path(paths.pop()))
    stderr = "".join(err for _, err in results)
    assert len(building_lines(stderr)) == 1, stderr
    assert stderr.count("] built tiny in ") == 1, stderr


# ------------------------------------------------------------------ the real kernel
def test_merge_kernel_compiles_for_hopper_without_a_gpu(cuda_home, kernel_cache, monkeypatch):
    monkeypatch.setenv(jit.CACHE_ENV, str(kernel_cache))
    spec = catalog.merge_spec(torch.float16)
    lib = jit.build(spec, arch=ARCH)
    assert_installed(lib)
    assert b"sm_90a" in lib.read_bytes()
    ops = jit.load(spec, arch=ARCH)  # loading needs no GPU: the ops register with torch
    assert "Tensor(a!) v_out" in str(ops.merge_state.default._schema)
    assert hasattr(ops, "merge_states")
