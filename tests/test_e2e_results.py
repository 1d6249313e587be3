"""Results tables from the benchmark clients' saved JSON (CPU only, no engine needed).

The sample results carry the keys vLLM 0.26.0's ``bench serve --save-result`` and SGLang 0.5.16's
``bench_serving --output-file`` write (read from vllm/benchmarks/serve.py and sglang/benchmark/serving.py).
"""

from __future__ import annotations

import importlib.util
import json
import random

import pytest

from e2e.engines import ENGINES
from e2e.results import METRICS, BackendResult, metrics_from_client, read_table, render_markdown, write_tables

METRIC_KEYS = [key for _, key, _ in METRICS]


def random_metrics(seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    return {key: round(rng.uniform(1, 5000), 3) for key in METRIC_KEYS}


def vllm_client_result(metrics: dict[str, float], completed: int = 300) -> dict:
    """Shaped like vLLM's saved result (without --save-detailed), percentiles at the default '99'."""
    result = {"date": "20261123-120000", "endpoint_type": "vllm", "backend": "vllm", "label": None,
              "model_id": "llama3-8b-shape", "tokenizer_id": "llama3-8b-shape", "num_prompts": 300,
              "request_rate": 16.0, "burstiness": 1.0, "max_concurrency": None, "duration": 21.5,
              "completed": completed, "failed": 300 - completed, "total_input_tokens": 28742,
              "total_output_tokens": 83260, "request_goodput": None, "total_token_throughput": 5210.4,
              "max_output_tokens_per_s": 4100.0, "max_concurrent_requests": 120, "rtfx": 0.0}
    for metric in ("ttft", "tpot", "itl", "e2el"):
        result.update({f"mean_{metric}_ms": 1.0, f"median_{metric}_ms": 1.0, f"std_{metric}_ms": 0.5,
                       f"p99_{metric}_ms": 2.0})
    result.update(metrics)
    return result


def sglang_client_result(metrics: dict[str, float], completed: int = 300) -> dict:
    """Shaped like one line of SGLang's --output-file JSONL (p90/p95/p99 for each latency)."""
    result = {"tag": None, "backend": "sglang", "dataset_name": "sharegpt", "request_rate": 16.0,
              "max_concurrency": None, "sharegpt_output_len": None, "random_input_len": 1024,
              "random_output_len": 1024, "random_range_ratio": 0.0, "server_info": {"attention_backend": "triton"},
              "duration": 22.1, "completed": completed, "total_input_tokens": 28742, "total_input_text_tokens": 28742,
              "total_input_vision_tokens": 0, "total_output_tokens": 83260, "total_output_tokens_retokenized": 83001,
              "input_throughput": 1300.5, "total_throughput": 5100.2, "concurrency": 95.3, "accept_length": None,
              "max_output_tokens_per_s": 4000.0, "max_concurrent_requests": 118}
    for metric in ("e2e_latency", "ttft", "tpot", "itl"):
        for stat in ("mean", "median", "std", "p90", "p95", "p99"):
            result[f"{stat}_{metric}_ms"] = 1.0
    result.update(metrics)
    return result


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The metrics table as {backend: {column header: cell}}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def result_from(backend: str, client_json: dict, num_prompts: int = 300) -> BackendResult:
    metrics, completed = metrics_from_client(client_json)
    return BackendResult(backend=backend, status="ok", metrics=metrics, completed=completed, num_prompts=num_prompts,
                         server_command=f"serve {backend}", client_command=f"bench {backend}", server_start_s=95.0,
                         backend_in_log=backend)


@pytest.mark.parametrize("make_client_json", [vllm_client_result, sglang_client_result])
def test_table_shows_the_clients_numbers_in_their_columns(make_client_json):
    samples = {"ours": random_metrics(1), "peer": random_metrics(2)}
    results = [result_from(name, make_client_json(values, completed=300 - index))
               for index, (name, values) in enumerate(samples.items())]
    rows = table_rows(render_markdown("t", {"device": "NVIDIA H100"}, results))
    assert set(rows) == set(samples)
    for index, (name, values) in enumerate(samples.items()):
        for title, key, unit in METRICS:
            assert rows[name][f"{title} ({unit})"] == f"{values[key]:.2f}"
        assert rows[name]["completed"] == f"{300 - index}/300" and rows[name]["status"] == "ok"


def test_missing_key_is_an_error_naming_it():
    broken = vllm_client_result(random_metrics(3))
    del broken["p99_itl_ms"], broken["completed"]
    with pytest.raises(KeyError, match="p99_itl_ms, completed"):
        metrics_from_client(broken)


def test_failed_backend_has_dashes_and_its_reason():
    failed = BackendResult(backend="FLASHINFER", status="failed: server exited with code 1", metrics={},
                           completed=None, num_prompts=300, server_command="serve", client_command="bench")
    markdown = render_markdown("t", {}, [result_from("CUSTOM", vllm_client_result(random_metrics(4))), failed])
    row = table_rows(markdown)["FLASHINFER"]
    assert all(row[f"{title} ({unit})"] == "—" for title, _, unit in METRICS) and row["completed"] == "—"
    assert row["status"] == "FAILED (below)"
    assert "- status: failed: server exited with code 1" in markdown


def test_report_carries_context_and_exact_commands(tmp_path):
    result = result_from("CUSTOM", vllm_client_result(random_metrics(5)))
    md_path, json_path = write_tables(tmp_path, "title", {"device": "NVIDIA H100 80GB HBM3"}, [result])
    markdown = md_path.read_text()
    assert "- device: NVIDIA H100 80GB HBM3" in markdown
    assert "serve CUSTOM" in markdown and "bench CUSTOM" in markdown
    table, rows = read_table(json_path)
    assert table["context"]["device"] == "NVIDIA H100 80GB HBM3"
    assert [column["key"] for column in table["columns"]] == METRIC_KEYS
    assert rows == [result]


def test_engines_read_their_clients_result_files(tmp_path):
    first, second = random_metrics(6), random_metrics(7)
    vllm_file = tmp_path / ENGINES["vllm"].result_filename
    vllm_file.write_text(json.dumps(vllm_client_result(first)))
    assert metrics_from_client(ENGINES["vllm"].read_result(vllm_file))[0] == first
    # SGLang's client appends a line per run: the last one is the run's.
    sglang_file = tmp_path / ENGINES["sglang"].result_filename
    sglang_file.write_text(json.dumps(sglang_client_result(first)) + "\n" + json.dumps(sglang_client_result(second)) + "\n")
    assert metrics_from_client(ENGINES["sglang"].read_result(sglang_file))[0] == second


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib for the plots")
def test_plot_writes_one_png_per_table(tmp_path):
    from e2e import plot

    run = tmp_path / "e2e-vllm"
    failed = BackendResult(backend="FLASHINFER", status="failed: x", metrics={}, completed=None, num_prompts=300,
                           server_command="s", client_command="c")
    results = [result_from(b, vllm_client_result(random_metrics(i))) for i, b in enumerate(["CUSTOM", "FLASH_ATTN"])]
    _, json_path = write_tables(run, "title", {}, results + [failed])
    assert plot.main([str(json_path)]) == 0
    png = run / "e2e-vllm-latency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_backend_from_an_earlier_setup_is_flagged():
    same = result_from("CUSTOM", vllm_client_result(random_metrics(8)))
    same.context = {"device": "NVIDIA H100", "updated": "yesterday"}
    other = result_from("FLASH_ATTN", vllm_client_result(random_metrics(9)))
    other.context = {"device": "NVIDIA H200", "updated": "yesterday"}
    markdown = render_markdown("t", {"device": "NVIDIA H100", "updated": "today"}, [same, other])
    flagged = [line for line in markdown.splitlines() if line.startswith("- ran in another setup")]
    assert flagged == ["- ran in another setup than the one above: device: NVIDIA H200"]
