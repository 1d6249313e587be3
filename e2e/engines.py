"""How to serve and benchmark with each engine: the server and client command lines, and their result files.

Flags were checked against the installed vLLM 0.26.0 (its ``serve`` parser and ``bench serve --help``) and
SGLang 0.5.16 (``sglang.launch_server --help``, ``sglang.bench_serving --help``). Both clients are told the
same workload: the slice's prompts, each asking for its reference completion's length (EOS ignored; SGLang's
client ignores it by default, vLLM's needs ``--ignore-eos``), greedy sampling, one warm-up request, seed 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Workload:
    """What every backend of a run is measured on."""

    python: str
    model: Path
    dataset: Path
    num_prompts: int = 300
    request_rate: float = 16.0
    seed: int = 0
    server_args: tuple[str, ...] = field(default_factory=tuple)


class Engine:
    name: str
    backends: tuple[str, ...]  # ours first
    package: str  # distribution name, for the version in the results
    health_path = "/health"
    result_filename: str

    def server_command(self, work: Workload, backend: str, port: int) -> list[str]:
        raise NotImplementedError

    def client_command(self, work: Workload, port: int, result_path: Path) -> list[str]:
        raise NotImplementedError

    def read_result(self, result_path: Path) -> dict:
        raise NotImplementedError

    def backend_in_log(self, log_text: str) -> str | None:
        """The attention backend the server's log says it selected, if the log says."""
        raise NotImplementedError

    # Profiling (serve_bench --profile): the engine's own live profiler writes torch-profiler traces of
    # a few steps of the loaded server into trace_dir, summarised afterwards by e2e.step_profile.
    def profile_server_args(self, trace_dir: Path, steps: int) -> list[str]:
        """Extra server arguments a profiled run needs."""
        return []

    def traced_steps(self, steps: int) -> int | None:
        """Steps in the traces, if known; None: count them as attention launches / the model's layers."""
        return None

    # What the benchmark client prints when its warm-up is over and the measured load begins (vLLM's
    # `vllm bench serve` and SGLang's `bench_serving` alike); the profiler's delay counts from there.
    load_started_marker: str | None = "Starting main benchmark run"

    # Between the measured pass and the profiled pass the prefix cache is emptied, so that the profiled
    # pass prefills its prompts again instead of hitting the cache the first pass filled.
    flush_cache_path = "/flush_cache"

    def profile_server_env(self) -> dict[str, str]:
        """Extra server environment a profiled run needs (e.g. to enable the cache-flush endpoint)."""
        return {}

    def profile_command(self, work: Workload, port: int, trace_dir: Path, steps: int) -> list[str]:
        """A command that profiles `steps` steps of the running server and returns once they are written."""
        raise NotImplementedError


class VllmEngine(Engine):
    name = "vllm"
    backends = ("CUSTOM", "FLASH_ATTN", "TRITON_ATTN", "FLASHINFER")
    package = "vllm"
    result_filename = "client_result.json"
    # The platform logs "Using AttentionBackendEnum.X backend." for an explicitly selected backend.
    _selected = re.compile(r"Using (?:AttentionBackendEnum\.)?([A-Z0-9_]+) (?:attention )?backend")

    def _cli(self, work: Workload) -> list[str]:
        # No console scripts on the GPU host: the CLI's module is run directly.
        return [work.python, "-m", "vllm.entrypoints.cli.main"]

    def server_command(self, work: Workload, backend: str, port: int) -> list[str]:
        return [*self._cli(work), "serve", str(work.model),
                "--load-format", "dummy", "--attention-backend", backend,
                "--host", HOST, "--port", str(port), "--seed", str(work.seed),
                "--disable-uvicorn-access-log", *work.server_args]

    def client_command(self, work: Workload, port: int, result_path: Path) -> list[str]:
        return [*self._cli(work), "bench", "serve", "--backend", "vllm",
                "--host", HOST, "--port", str(port),
                "--model", str(work.model), "--tokenizer", str(work.model),
                "--dataset-name", "sharegpt", "--dataset-path", str(work.dataset),
                "--num-prompts", str(work.num_prompts), "--request-rate", str(work.request_rate),
                "--ignore-eos", "--temperature", "0", "--num-warmups", "1", "--seed", str(work.seed),
                "--disable-tqdm", "--save-result",
                "--result-dir", str(result_path.parent), "--result-filename", result_path.name]

    def read_result(self, result_path: Path) -> dict:
        # --save-result writes one JSON object (without --append-result).
        return json.loads(result_path.read_text(encoding="utf-8"))

    def backend_in_log(self, log_text: str) -> str | None:
        match = self._selected.search(log_text)
        return match.group(1) if match else None

    def profile_server_args(self, trace_dir: Path, steps: int) -> list[str]:
        # The worker's torch profiler, stopped by the engine after `steps` iterations; frontend left out.
        config = {"profiler": "torch", "torch_profiler_dir": str(trace_dir), "torch_profiler_with_stack": False,
                  "ignore_frontend": True, "max_iterations": steps}
        return ["--profiler-config", json.dumps(config)]

    flush_cache_path = "/reset_prefix_cache"

    def profile_server_env(self) -> dict[str, str]:
        return {"VLLM_SERVER_DEV_MODE": "1"}  # serves /reset_prefix_cache (and vLLM's other dev endpoints)

    def traced_steps(self, steps: int) -> int | None:
        # Mixed steps replay several piecewise graphs, so launches do not count steps; max_iterations does.
        return steps

    def profile_command(self, work: Workload, port: int, trace_dir: Path, steps: int) -> list[str]:
        # /start_profile, then /stop_profile once the engine has stopped by itself (max_iterations);
        # stop waits for the traces to be written.
        script = ("import sys, time, urllib.request as u\n"
                  "url = sys.argv[1]\n"
                  "u.urlopen(u.Request(url + '/start_profile', method='POST'), timeout=120).read()\n"
                  "time.sleep(float(sys.argv[2]))\n"
                  "u.urlopen(u.Request(url + '/stop_profile', method='POST'), timeout=600).read()\n")
        # The engine stops itself after `steps`; the wait only has to outlast them (steps of a few ms each, plus
        # the profiler's start-up), and a longer one costs nothing: stop is then a no-op that flushes the trace.
        return [work.python, "-c", script, f"http://{HOST}:{port}", str(max(10.0, steps * 0.25))]


class SglangEngine(Engine):
    name = "sglang"
    backends = ("engine_backend", "flashinfer", "triton", "fa3")
    package = "sglang"
    result_filename = "client_result.jsonl"
    _selected = re.compile(r"\battention_backend='([^']+)'")

    def server_command(self, work: Workload, backend: str, port: int) -> list[str]:
        # launch_server loads the sglang.srt.plugins entry points before parsing, so our backend's name
        # is a valid --attention-backend choice once engine_backend is installed.
        return [work.python, "-m", "sglang.launch_server", "--model-path", str(work.model),
                "--load-format", "dummy", "--attention-backend", backend, "--grammar-backend", "none",
                "--host", HOST, "--port", str(port), "--random-seed", str(work.seed), *work.server_args]

    def client_command(self, work: Workload, port: int, result_path: Path) -> list[str]:
        return [work.python, "-m", "sglang.bench_serving", "--backend", "sglang",
                "--host", HOST, "--port", str(port),
                "--model", str(work.model), "--tokenizer", str(work.model),
                "--dataset-name", "sharegpt", "--dataset-path", str(work.dataset),
                "--num-prompts", str(work.num_prompts), "--request-rate", str(work.request_rate),
                "--temperature", "0", "--warmup-requests", "1", "--seed", str(work.seed),
                "--disable-tqdm", "--output-file", str(result_path)]

    def read_result(self, result_path: Path) -> dict:
        # --output-file appends one JSON line per run; the harness removes the file first, the last line is ours.
        lines = [line for line in result_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{result_path} is empty")
        return json.loads(lines[-1])

    def backend_in_log(self, log_text: str) -> str | None:
        match = self._selected.search(log_text)
        return match.group(1) if match else None

    def profile_command(self, work: Workload, port: int, trace_dir: Path, steps: int) -> list[str]:
        # One trace per stage (prefill / decode); the command returns when the server has written them.
        return [work.python, "-m", "sglang.profiler", "--url", f"http://{HOST}:{port}", "--num-steps", str(steps),
                "--profile-by-stage", "--output-dir", str(trace_dir)]


ENGINES: dict[str, Engine] = {engine.name: engine for engine in (VllmEngine(), SglangEngine())}
