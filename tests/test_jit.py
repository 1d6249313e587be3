"""The JIT build system, on a CPU-only machine: needs the CUDA toolkit, never a GPU.

Most tests build a tiny kernel from a temporary source folder (about a second per build);
the real merge kernel is compiled once, into a cache shared with the CLI test.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine_backend.kernels import jit, specs
from engine_backend.log import logger

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


class Lines(logging.Handler):
    """The package logger's messages, one per line, as the tests read stderr."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    @property
    def text(self) -> str:
        return "".join(m + "\n" for m in self.messages)

    def take(self) -> str:
        text, self.messages = self.text, []
        return text


@pytest.fixture
def log():
    handler = Lines()
    logger().addHandler(handler)
    yield handler
    logger().removeHandler(handler)


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
    monkeypatch.delenv(jit.ARCH_LIST_ENV, raising=False)
    with pytest.raises(jit.JitBuildError, match=jit.ARCH_ENV):
        jit.target_arch()


@pytest.fixture
def no_arch_setting(monkeypatch):
    """Neither arch variable set, no GPU: each test states the one it needs."""
    for var in (jit.ARCH_ENV, jit.ARCH_LIST_ENV):
        monkeypatch.setenv(var, "")  # recorded, so the teardown restores the original
        monkeypatch.delenv(var)
    monkeypatch.setattr(jit, "_device_arch", lambda: None)
    return monkeypatch


@pytest.mark.parametrize("listed, arch", [("9.0", "90"), ("9.0a", "90a"), ("9.0+PTX", "90"), (" 8.6 ", "86"),
                                          ("10.0a+PTX", "100a"), ("9.0;9.0", "90")])
def test_torch_cuda_arch_list_names_the_target(no_arch_setting, listed, arch):
    no_arch_setting.setenv(jit.ARCH_LIST_ENV, listed)
    assert jit.target_arch() == arch
    no_arch_setting.setenv(jit.ARCH_ENV, "100a")  # the package's own setting comes first
    assert jit.target_arch() == "100a"
    assert jit.target_arch("80") == "80"


def test_several_listed_archs_take_the_gpus_own_or_ask_for_one(no_arch_setting):
    no_arch_setting.setenv(jit.ARCH_LIST_ENV, "8.0;8.6 9.0+PTX")
    with pytest.raises(jit.JitBuildError, match=rf"several archs \(sm_80, sm_86, sm_90\).*no GPU.*{jit.ARCH_ENV}"):
        jit.target_arch()
    no_arch_setting.setattr(jit, "_device_arch", lambda: "90a")
    assert jit.target_arch() == "90a"  # the Hopper GPU's own target: its capability 9.0 is listed
    no_arch_setting.setattr(jit, "_device_arch", lambda: "89")
    with pytest.raises(jit.JitBuildError, match=rf"GPU's sm_89 is not among them.*{jit.ARCH_ENV}"):
        jit.target_arch()


def test_unreadable_arch_list_entry_is_named(no_arch_setting):
    no_arch_setting.setenv(jit.ARCH_LIST_ENV, "9.0 Hopper")
    with pytest.raises(jit.JitBuildError, match=rf"{jit.ARCH_LIST_ENV}: cannot read 'Hopper'.*{jit.ARCH_ENV}"):
        jit.target_arch()


@pytest.mark.parametrize("var", ["CUDA_HOME", "CUDA_PATH"])
def test_a_wrong_toolkit_setting_is_an_error_naming_it(monkeypatch, tmp_path, var):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv(var, str(tmp_path))  # set, but no bin/nvcc there: never fall back silently
    with pytest.raises(jit.JitBuildError, match=rf"{var}={re.escape(str(tmp_path))} holds no bin/nvcc"):
        jit.cuda_home()


def test_max_jobs_sets_ninjas_parallel_jobs(cuda_home, jit_cache, tiny_src, monkeypatch):
    commands = []
    run = subprocess.run

    def recording_run(cmd, *args, **kwargs):
        commands.append(list(cmd))
        return run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    monkeypatch.setenv("MAX_JOBS", "1")
    assert_installed(jit.build(tiny_spec(tiny_src), arch=ARCH))
    (ninja,) = [c for c in commands if "-C" in c]
    assert ninja[ninja.index("-j") + 1] == "1"
    monkeypatch.setenv("MAX_JOBS", "lots")
    with pytest.raises(jit.JitBuildError, match="MAX_JOBS='lots'"):
        jit.build(tiny_spec(tiny_src, value="7.0f"), arch=ARCH)


def _read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder / "jit"
    for candidate in (Path("/sys/engine-backend-test-cache"), Path("/proc/engine-backend-test-cache")):
        try:  # root writes anywhere a permission allows: take a folder no one can create
            candidate.mkdir()
        except OSError:
            return candidate
        candidate.rmdir()
    pytest.skip("no read-only folder for root on this machine")


@pytest.mark.parametrize("shape", ["file", "read-only"])
def test_an_unusable_cache_dir_is_a_build_error_with_the_hint(cuda_home, tiny_src, tmp_path, monkeypatch, shape):
    if shape == "file":
        cache = tmp_path / "a-file"
        cache.write_text("not a folder")
    else:
        cache = _read_only_dir(tmp_path)
    monkeypatch.setenv(jit.CACHE_ENV, str(cache))
    with pytest.raises(jit.JitBuildError, match=rf"{re.escape(str(cache))} is not a writable folder.*{jit.CACHE_ENV}"):
        jit.build(tiny_spec(tiny_src), arch=ARCH)


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


def test_cache_key_follows_headers_in_subfolders(cuda_home, tiny_src):
    spec = tiny_spec(tiny_src)
    (tiny_src / "mainloop").mkdir()
    nested = tiny_src / "mainloop" / "deep.cuh"
    nested.write_text("#pragma once\n")
    base = jit.cache_key(spec, ARCH)
    nested.write_text("#pragma once\n// edited\n")
    assert jit.cache_key(spec, ARCH) != base


def test_cache_key_follows_the_shipped_headers_in_subfolders(cuda_home, tmp_path, monkeypatch):
    """The real layout: a spec reads csrc/, whose headers may sit in subfolders."""
    csrc = tmp_path / "csrc"
    (csrc / "decode").mkdir(parents=True)
    (csrc / "tiny.cu").write_text(TINY_CU)
    (csrc / "tiny.cuh").write_text(TINY_CUH)
    (csrc / "decode" / "planner.cuh").write_text("#pragma once\n")
    monkeypatch.setattr(jit, "CSRC", csrc)
    spec = tiny_spec(csrc)
    base = jit.cache_key(spec, ARCH)
    (csrc / "decode" / "planner.cuh").write_text("#pragma once\nconstexpr int kSlack = 1;\n")
    assert jit.cache_key(spec, ARCH) != base


def _package_data_patterns() -> list[str]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "engine_backend.kernels"]


def _shipped(root: Path, patterns: list[str]) -> set[str]:
    # setuptools expands package-data with glob(recursive=True) relative to the package folder.
    return {f for pattern in patterns for f in glob.glob(pattern, root_dir=root, recursive=True)}


def test_package_data_ships_every_kernel_source(tmp_path):
    patterns = _package_data_patterns()
    kernels = REPO / "engine_backend" / "kernels"
    every = {str(p.relative_to(kernels)) for p in (kernels / "csrc").rglob("*") if p.is_file()
             and "__pycache__" not in p.parts}
    assert every and every <= _shipped(kernels, patterns)
    layout = ["csrc/a.cu", "csrc/a.cuh", "csrc/a_ops.cpp", "csrc/a.h", "csrc/decode/kernel.cuh",
              "csrc/decode/params.h", "csrc/prefill/mainloop/wgmma.cuh", "csrc/prefill/inst.cu", "csrc/x/y.cpp"]
    for name in layout:  # kernel code in subfolders, as the sources are laid out
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert _shipped(tmp_path, patterns) == set(layout)


def test_missing_template_parameter_is_a_build_error(cuda_home, tiny_src):
    spec = jit.KernelSpec.make("tiny", ("tiny.cu",), {}, source_dir=tiny_src)
    with pytest.raises(jit.JitBuildError, match="tiny.cu: missing or bad parameter 'VALUE'"):
        jit.cache_key(spec, ARCH)


# --------------------------------------------------------------------------- build
def test_build_installs_a_checksummed_library_and_reports_progress(cuda_home, jit_cache, tiny_src, log):
    spec = tiny_spec(tiny_src)
    lib = jit.build(spec, arch=ARCH)
    assert lib == jit_cache / f"tiny-{jit.cache_key(spec, ARCH)}" / "tiny.so"
    assert_installed(lib)
    assert len(building_lines(log.text)) == 1
    assert re.search(r"^built tiny for sm_90a in \d+\.\d s$", log.text, re.M), log.text


def test_second_build_is_a_cache_hit(cuda_home, jit_cache, tiny_src, log):
    spec = tiny_spec(tiny_src)
    lib = jit.build(spec, arch=ARCH)
    mtime = lib.stat().st_mtime_ns
    log.take()
    assert jit.build(spec, arch=ARCH) == lib
    assert lib.stat().st_mtime_ns == mtime
    assert log.text == ""


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
def test_damaged_cache_entries_are_rebuilt(cuda_home, jit_cache, tiny_src, log, damage):
    spec = tiny_spec(tiny_src)
    lib = jit.build(spec, arch=ARCH)
    good = lib.read_bytes()
    damage(lib)
    log.take()
    assert jit.build(spec, arch=ARCH) == lib
    assert len(building_lines(log.take())) == 1
    assert_installed(lib)
    assert len(lib.read_bytes()) == len(good)


def test_a_source_in_a_subfolder_builds(cuda_home, jit_cache, tiny_src):
    (tiny_src / "inst").mkdir()
    (tiny_src / "inst" / "tiny.cu").write_text(TINY_CU)  # its header stays at the top: found through -I
    assert_installed(jit.build(jit.KernelSpec.make("tiny", ("inst/tiny.cu",), {"VALUE": "1.0f"}, source_dir=tiny_src),
                               arch=ARCH))


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
    assert stderr.count("] built tiny for sm_90a in ") == 1, stderr


HOLDER = """
import sys, time
from pathlib import Path
from engine_backend.kernels import jit

src, holding, release = map(Path, sys.argv[1:4])
spec = jit.KernelSpec.make("tiny", ("tiny.cu",), {"VALUE": "2.0f"}, source_dir=src)
real_build = jit._build


def stalled_build(*args):  # inside the lock: hold it until the test says go
    holding.touch()
    while not release.exists():
        time.sleep(0.01)
    return real_build(*args)


jit._build = stalled_build
print(jit.build(spec, arch="90a"))
"""

WAITER = """
import sys
from pathlib import Path
from engine_backend.kernels import jit

jit.WAIT_REPORT_S = float(sys.argv[2])
spec = jit.KernelSpec.make("tiny", ("tiny.cu",), {"VALUE": "2.0f"}, source_dir=Path(sys.argv[1]))
print(jit.build(spec, arch="90a"))
"""


def _wait_for_file(path: Path, procs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.poll() for p in procs]
        time.sleep(0.01)


def _wait_for_text(path: Path, text: str, count: int, procs, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while (found := path.read_text()).count(text) < count:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), found
        time.sleep(0.02)
    return found


def test_a_waiter_says_whom_it_waits_for_and_keeps_saying_it(cuda_home, jit_cache, tiny_src, tmp_path):
    env = {**os.environ, jit.CACHE_ENV: str(jit_cache), "CUDA_HOME": str(cuda_home), "PYTHONPATH": str(REPO)}
    holding, release = tmp_path / "holding", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tiny_src), str(holding), str(release)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_file(holding, [holder])
    waiter_err = tmp_path / "waiter.err"
    with open(waiter_err, "w") as err:
        waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(tiny_src), "0.2"],
                                  env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        seen = _wait_for_text(waiter_err, "still waiting", 3, [holder, waiter])
    finally:
        release.touch()
    results = [p.communicate(timeout=180) for p in (holder, waiter)]
    assert holder.returncode == waiter.returncode == 0, results
    host = socket.gethostname()
    first = [line for line in seen.splitlines() if "waiting for" in line][0]
    assert re.fullmatch(rf"\[engine_backend\] waiting for pid {holder.pid} on host {re.escape(host)}, building tiny "
                        rf"\(sm_90a\) since \d\d:\d\d:\d\d \(lock .*tiny-\w+\.lock\)", first), first
    assert re.search(rf"still waiting, \d+ s now, for pid {holder.pid} on host ", seen), seen
    assert "no longer running" not in seen
    waited = waiter_err.read_text()
    assert not building_lines(waited), waited  # the holder built it; the waiter found it installed
    assert results[0][0] == results[1][0]


def test_a_waiter_says_when_the_recorded_builder_is_gone(cuda_home, jit_cache, tiny_src, log, monkeypatch):
    """The kernel frees an flock when its holder dies, so a dead recorded builder means someone else
    holds the lock: the message must say so, not blame the dead process."""
    spec = tiny_spec(tiny_src)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = jit_cache / f"tiny-{jit.cache_key(spec, ARCH)}.lock"
    lock.parent.mkdir(parents=True)
    record = {"pid": gone.pid, "host": socket.gethostname(), "kernel": "tiny (sm_90a)", "since": time.time()}
    lock.write_text(json.dumps(record))
    monkeypatch.setattr(jit, "WAIT_REPORT_S", 0.05)
    with open(lock, "r+") as held:  # another open file: this process's waiter blocks on it too
        fcntl.flock(held, fcntl.LOCK_EX)

        def release_when_reported():
            deadline = time.monotonic() + 60
            while sum("still waiting" in m for m in log.messages) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            fcntl.flock(held, fcntl.LOCK_UN)

        releaser = threading.Thread(target=release_when_reported)
        releaser.start()
        lib = jit.build(spec, arch=ARCH)
        releaser.join()
    assert_installed(lib)
    waits = [m for m in log.messages if "waiting" in m]
    assert len(waits) >= 3 and all(f"pid {gone.pid} is no longer running" in m for m in waits), waits
    assert "another process holds the lock" in waits[0]
    assert json.loads(lock.read_text() or "null") is None  # the lock's record is cleared on release


# ------------------------------------------------------------------ the real kernel
def test_merge_kernel_compiles_for_hopper_without_a_gpu(cuda_home, kernel_cache, monkeypatch):
    monkeypatch.setenv(jit.CACHE_ENV, str(kernel_cache))
    spec = specs.merge_state_spec(torch.float16)
    lib = jit.build(spec, arch=ARCH)
    assert_installed(lib)
    assert b"sm_90a" in lib.read_bytes()
    ops = jit.load(spec, arch=ARCH)  # loading needs no GPU: the ops register with torch
    assert "Tensor(a!) v_out" in str(ops.merge_state.default._schema)
    assert hasattr(ops, "merge_states")
