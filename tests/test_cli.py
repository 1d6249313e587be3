"""The self-check CLI: environment report, PASS/FAIL per check, exit status."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_backend import cli
from engine_backend.kernels import catalog, jit
from engine_backend.kernels.specs import merge_state_spec
from engine_backend.log import logger

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, jit.CACHE_ENV: str(cache), "PYTHONPATH": str(REPO)}
    env.pop(jit.ARCH_ENV, None)
    env.pop(jit.ARCH_LIST_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "engine_backend", *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_self_check_reports_the_environment(kernel_cache):
    proc = run_cli("--only", "merge_state", cache=kernel_cache)  # on a GPU: one family keeps it quick
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"torch        {torch.__version__} (CUDA {torch.version.cuda})" in out
    assert f"JIT cache    {kernel_cache}" in out
    assert "engines      vllm " in out and "sglang " in out and "flashinfer-python " in out
    if torch.cuda.is_available():
        assert "merge_state  PASS (matches the reference" in out
    else:
        assert "GPU          no GPU" in out and "SKIPPED: no GPU" in out


def test_compile_only_builds_a_kernel_family_without_a_gpu(cuda_home, kernel_cache):
    proc = run_cli("--arch", "90a", "--compile-only", "--only", "merge_state", cache=kernel_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "target arch  sm_90a" in proc.stdout
    assert "merge_state  PASS (compiled" in proc.stdout
    progress = [line for line in proc.stderr.splitlines() if "building " in line and "/2: merge_state" in line]
    assert [line.split(":")[0] for line in progress] == ["[engine_backend] building 1/2", "[engine_backend] building 2/2"]
    assert all(line.endswith("(sm_90a) ...") for line in progress), proc.stderr
    libs = sorted(kernel_cache.glob("merge_state-*/merge_state.so"))
    assert len(libs) == 2  # fp16 and bf16
    assert all(lib.with_suffix(".so.sha256").is_file() for lib in libs)


def _fails():
    raise RuntimeError("kaput\nsecond line")


@pytest.fixture
def no_gpu_host(monkeypatch):
    """As on a CPU-only CI machine: no GPU, no arch setting (main() sets ENGINE_BACKEND_CUDA_ARCH from
    --arch; setenv first records it, so the teardown restores the original)."""
    for var in (jit.ARCH_ENV, jit.ARCH_LIST_ENV):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return monkeypatch


def _record_loads(monkeypatch) -> list:
    loaded = []
    monkeypatch.setattr(jit, "load", lambda spec, arch=None: loaded.append((spec, jit.target_arch(arch))))
    return loaded


def test_a_failing_check_prints_fail_and_exits_nonzero(no_gpu_host, capsys):
    boom = merge_state_spec(torch.float16)

    def load(spec, arch=None):
        if spec == boom:
            _fails()

    no_gpu_host.setattr(jit, "load", load)
    no_gpu_host.setattr(
        cli, "checks", lambda arch=None: [cli.Check("fine", (), lambda: None), cli.Check("boom", (boom,), None)]
    )
    assert cli.main(["--arch", "90a", "--compile-only"]) == 1
    out = capsys.readouterr().out
    assert "  fine         PASS (compiled" in out
    assert "  boom         FAIL (RuntimeError)\n    kaput\n    second line" in out


def test_all_checks_passing_exits_zero(no_gpu_host, capsys):
    _record_loads(no_gpu_host)
    no_gpu_host.setattr(cli, "checks", lambda arch=None: [cli.Check("fine", (merge_state_spec(torch.float16),), _fails)])
    assert cli.main(["--arch", "90a", "--compile-only"]) == 0  # compile-only never runs verify
    assert "FAIL" not in capsys.readouterr().out


@pytest.mark.parametrize("arch, mainloops", [("90a", {"1"}), ("80", {"0"})])
def test_compile_only_builds_the_catalog_of_the_named_arch(no_gpu_host, arch, mainloops):
    """Prefill's tile shapes are per arch (Hopper runs the wgmma mainloop): --arch must choose the
    kernels compiled, not only the target they are compiled for."""
    loaded = _record_loads(no_gpu_host)
    assert cli.main(["--arch", arch, "--compile-only"]) == 0
    assert sorted(map(repr, (spec for spec, _ in loaded))) == sorted(map(repr, catalog.default_specs(arch=arch)))
    assert {target for _, target in loaded} == {arch}
    prefill = [dict(spec.params) for spec, _ in loaded if spec.name == "prefill"]
    assert {p["WGMMA"] for p in prefill if p["HEAD_DIM"] == "128"} == mainloops
    assert {p["WGMMA"] for p in prefill if p["HEAD_DIM"] == "256"} == {"0"}  # no wgmma mainloop at 256


def test_compile_only_numbers_every_build(no_gpu_host):
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    loaded = _record_loads(no_gpu_host)
    logger().addHandler(handler)
    try:
        assert cli.main(["--arch", "90a", "--compile-only", "--only", "prefill", "--only", "merge_state"]) == 0
    finally:
        logger().removeHandler(handler)
    n = len(loaded)
    assert n == len([s for s in catalog.default_specs(arch="90a") if s.name in ("prefill", "merge_state")])
    assert [m.split(":")[0] for m in messages] == [f"building {i}/{n}" for i in range(1, n + 1)]
    assert all(m.endswith(" (sm_90a) ...") for m in messages)


def test_checks_cover_every_kernel_family():
    """The families stated independently of the catalog: one per kernel's ops file under csrc/."""
    csrc = REPO / "engine_backend" / "kernels" / "csrc"
    families = {p.name.removesuffix("_ops.cpp") for p in csrc.rglob("*_ops.cpp")}
    assert families >= {"merge_state", "decode", "prefill", "token_table"}
    for arch in ("80", "90a"):
        found = cli.checks(arch)
        assert {c.name for c in found} == families
        assert len(found) == len(families)  # one check per family
        assert {s for c in found for s in c.specs} == set(catalog.default_specs(arch=arch))  # every spec built
        assert all(s.name == c.name for c in found for s in c.specs)
    assert set(cli.VERIFY) <= families


def test_unknown_family_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--only", "nonsense", "--compile-only"])
    assert exit_.value.code == 2 and "unknown kernel families ['nonsense']" in capsys.readouterr().err


def test_console_script_points_at_main():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["engine-backend"].split(":")
    assert getattr(importlib.import_module(module), func) is cli.main


@pytest.mark.gpu
def test_gpu_self_check_passes(kernel_cache, monkeypatch):
    monkeypatch.setenv(jit.CACHE_ENV, str(kernel_cache))
    assert cli.main(["--only", "merge_state"]) == 0
