"""The self-check CLI: environment report, PASS/FAIL per check, exit status."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_backend import cli
from engine_backend.kernels import catalog, jit

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, jit.CACHE_ENV: str(cache), "PYTHONPATH": str(REPO)}
    env.pop(jit.ARCH_ENV, None)
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
    libs = sorted(kernel_cache.glob("merge_state-*/merge_state.so"))
    assert len(libs) == 2  # fp16 and bf16
    assert all(lib.with_suffix(".so.sha256").is_file() for lib in libs)


def _fails():
    raise RuntimeError("kaput\nsecond line")


def test_a_failing_check_prints_fail_and_exits_nonzero(monkeypatch, capsys):
    monkeypatch.setenv(jit.ARCH_ENV, "90a")  # restored after the test; main() sets it from --arch
    monkeypatch.setattr(
        cli, "checks", lambda: [cli.Check("fine", lambda: None, lambda: None), cli.Check("boom", _fails, None)]
    )
    assert cli.main(["--arch", "90a", "--compile-only"]) == 1
    out = capsys.readouterr().out
    assert "  fine         PASS (compiled" in out
    assert "  boom         FAIL (RuntimeError)\n    kaput\n    second line" in out


def test_all_checks_passing_exits_zero(monkeypatch, capsys):
    monkeypatch.setenv(jit.ARCH_ENV, "90a")
    monkeypatch.setattr(cli, "checks", lambda: [cli.Check("fine", lambda: None, _fails)])
    assert cli.main(["--arch", "90a", "--compile-only"]) == 0  # compile-only never runs verify
    assert "FAIL" not in capsys.readouterr().out


def test_checks_cover_every_catalog_family():
    families = {spec.name for spec in catalog.default_specs()}
    assert [c.name for c in cli.checks()] == list(dict.fromkeys(s.name for s in catalog.default_specs()))
    assert "merge_state" in families and set(cli.VERIFY) <= families


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
