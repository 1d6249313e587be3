"""Shared test setup. Markers (declared in pyproject.toml) decide where a test can run:

* ``gpu``: needs CUDA; skipped without a GPU (``ENGINE_BACKEND_REQUIRE_GPU=1`` makes that an error).
* ``vllm`` / ``sglang``: need that engine, which lives in its own environment (see .ci/run);
  skipped where it is not installed (``ENGINE_BACKEND_REQUIRE_VLLM=1`` / ``..._SGLANG=1`` make
  that an error, so a CI step cannot pass by skipping everything).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from engine_backend.kernels import jit

TOOLKIT_CANDIDATE = Path("/usr/local/cuda-13.0")
ENGINES = {"vllm": "vllm 0.26.0", "sglang": "SGLang 0.5.16"}


def _required(what: str) -> bool:
    return os.environ.get(f"ENGINE_BACKEND_REQUIRE_{what.upper()}", "0") not in ("", "0")


def _engine_installed(name: str) -> bool:
    # find_spec, not import: importing an engine is slow and has side effects.
    return importlib.util.find_spec(name) is not None


def pytest_configure(config):
    for name in ENGINES:
        if _required(name) and not _engine_installed(name):
            raise pytest.UsageError(f"ENGINE_BACKEND_REQUIRE_{name.upper()}=1 but {name} is not installed here")
    if _required("gpu") and not torch.cuda.is_available():
        raise pytest.UsageError("ENGINE_BACKEND_REQUIRE_GPU=1 but torch.cuda.is_available() is false")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is false on this machine")
    missing = {
        name: pytest.mark.skip(
            reason=f"needs {label}, which runs in its own environment (.ci/run '{name}' step); not installed here"
        )
        for name, label in ENGINES.items()
        if not _engine_installed(name)
    }
    gpu = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(no_gpu)
        for name, skip in missing.items():
            if name in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def jit_cache(tmp_path, monkeypatch) -> Path:
    """A private, empty JIT cache for one test."""
    root = tmp_path / "jit-cache"
    monkeypatch.setenv(jit.CACHE_ENV, str(root))
    return root


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory) -> Path:
    """A JIT cache shared by the tests that build the real kernels, so each builds once per session."""
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.fixture
def cuda_home(monkeypatch) -> Path:
    """The CUDA toolkit (CUDA_HOME, defaulting to /usr/local/cuda-13.0); skips the test if there is none."""
    if not os.environ.get("CUDA_HOME") and (TOOLKIT_CANDIDATE / "bin" / "nvcc").exists():
        monkeypatch.setenv("CUDA_HOME", str(TOOLKIT_CANDIDATE))
    try:
        return jit.cuda_home()
    except jit.JitBuildError as e:
        pytest.skip(f"needs the CUDA toolkit (nvcc) to compile kernels: {e}")
