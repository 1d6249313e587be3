"""The harness's command lines against the real vLLM 0.26.0 / SGLang 0.5.16 argument parsers, and the real
clients' ShareGPT samplers on the committed slice (no server, no GPU). Each test runs in its engine's env.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from e2e.engines import ENGINES, Workload

ROOT = Path(__file__).resolve().parents[1]
WORK = Workload(python="python3", model=ROOT / "e2e" / "models" / "llama3-8b-shape",
                dataset=ROOT / "e2e" / "data" / "sharegpt_300.json")


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(WORK.model))


def _vllm_serve_parser():
    """vLLM's `serve` parser; None where it cannot be built (it infers the device and needs a GPU build)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    top = FlexibleArgumentParser()
    try:
        ServeSubcommand().subparser_init(top.add_subparsers(dest="command"))
    except RuntimeError as error:  # "Failed to infer device type" on a machine without a GPU
        if "device type" not in str(error):
            raise
        return None
    return top


@pytest.mark.vllm
@pytest.mark.parametrize("backend", ENGINES["vllm"].backends)
def test_vllm_serve_command_parses(backend):
    argv = ENGINES["vllm"].server_command(WORK, backend, 8123)[3:]  # after `python3 -m vllm.entrypoints.cli.main`
    parser = _vllm_serve_parser()
    if parser is not None:
        args = parser.parse_args(argv)
        assert (args.model_tag, args.load_format, args.port) == (str(WORK.model), "dummy", 8123)
        assert str(args.attention_backend).endswith(backend)
        return
    # Without a GPU the parser cannot be built; every flag must still name a field of the engine's config.
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.openai.cli_args import FrontendArgs

    fields = {f.name for cls in (EngineArgs, FrontendArgs) for f in dataclasses.fields(cls)}
    flags = [a[2:].replace("-", "_") for a in argv if a.startswith("--")]
    assert [f for f in flags if f not in fields] == []


@pytest.mark.vllm
def test_vllm_bench_command_parses(tmp_path):
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ENGINES["vllm"].client_command(WORK, 8123, tmp_path / "r.json")
    assert argv[3:5] == ["bench", "serve"]
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(argv[5:])
    assert (args.dataset_name, args.dataset_path, args.num_prompts, args.request_rate) == (
        "sharegpt", str(WORK.dataset), 300, 16.0)
    assert args.save_result and (args.result_dir, args.result_filename) == (str(tmp_path), "r.json")
    assert args.ignore_eos and args.seed == 0


@pytest.mark.vllm
def test_vllm_profiler_config_is_valid(tmp_path):
    import json

    from vllm.config import ProfilerConfig

    args = ENGINES["vllm"].profile_server_args(tmp_path, 30)
    assert args[0] == "--profiler-config"
    config = ProfilerConfig(**json.loads(args[1]))
    assert (config.profiler, config.torch_profiler_dir, config.max_iterations) == ("torch", str(tmp_path), 30)
    assert config.ignore_frontend and not config.torch_profiler_with_stack


@pytest.mark.vllm
def test_vllm_sampler_takes_every_slice_conversation():
    from vllm.benchmarks.datasets.datasets import ShareGPTDataset

    requests = ShareGPTDataset(dataset_path=str(WORK.dataset), random_seed=0).sample(
        tokenizer=_tokenizer(), num_requests=300, no_oversample=True)
    assert len(requests) == 300


@pytest.mark.sglang
@pytest.mark.parametrize("backend", [b for b in ENGINES["sglang"].backends if b != "engine_backend"])
def test_sglang_server_command_parses(backend):
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(ENGINES["sglang"].server_command(WORK, backend, 8124)[3:])
    assert (args.attention_backend, args.load_format, args.grammar_backend, args.port) == (backend, "dummy", "none", 8124)


@pytest.mark.sglang
def test_sglang_accepts_our_backend_once_plugins_load():
    """`sglang.launch_server` loads the sglang.srt.plugins entry points before parsing; ours must add the name."""
    import argparse

    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(ENGINES["sglang"].server_command(WORK, "engine_backend", 8124)[3:])
    assert args.attention_backend == "engine_backend"


@pytest.mark.sglang
def test_sglang_profiler_client_traces_the_fake_server(tmp_path):
    """SGLang's own `python -m sglang.profiler`, run as the harness runs it, against the stand-in server."""
    import os
    import subprocess
    import sys

    from e2e import serve_bench
    from e2e.server import ServerProcess, free_port

    port = free_port()
    server = ServerProcess([sys.executable, str(ROOT / "e2e" / "fake_server.py"), "--protocol", "sglang", "--backend",
                            "engine_backend", "--port", str(port)], dict(os.environ), tmp_path / "server.log")
    server.start()
    try:
        server.wait_healthy(f"http://127.0.0.1:{port}/health", timeout_s=30, poll_s=0.2)
        work = dataclasses.replace(WORK, python=sys.executable)
        command = ENGINES["sglang"].profile_command(work, port, tmp_path / serve_bench.TRACE_DIR, 6)
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        server.stop(grace_s=10)
    layers = 1  # the stand-in's trace: one attention kernel per step
    summary = serve_bench.summarise_traces(tmp_path, ENGINES["sglang"].traced_steps(6), layers).read_text()
    assert "decode.trace" in summary and "steps: 6" in summary  # counted as attention launches / layers


@pytest.mark.sglang
def test_sglang_bench_command_parses_and_samples_every_slice_conversation(tmp_path, monkeypatch):
    from sglang.benchmark import serving
    from sglang.benchmark.datasets.sharegpt import sample_sharegpt_requests

    seen = {}
    monkeypatch.setattr(serving, "run_benchmark", lambda args: seen.setdefault("args", args))
    monkeypatch.setattr("sys.argv", ["bench"] + ENGINES["sglang"].client_command(WORK, 8124, tmp_path / "r.jsonl")[3:])
    serving.cli_main()
    args = seen["args"]
    assert (args.backend, args.dataset_name, args.num_prompts, args.output_file) == (
        "sglang", "sharegpt", 300, str(tmp_path / "r.jsonl"))
    assert not args.disable_ignore_eos and args.temperature == 0.0
    random.seed(0)
    assert len(sample_sharegpt_requests(str(WORK.dataset), 300, _tokenizer())) == 300
