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


ENGINES: dict[str, Engine] = {engine.name: engine for engine in (VllmEngine(), SglangEngine())}
