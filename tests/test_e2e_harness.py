"""The serving harness's process handling and bookkeeping, run against e2e/fake_server.py (CPU only).

The engines' servers need a GPU; the stand-in server exercises what the harness itself does: start in a new
process group, wait for health, run the client, stop the whole group, and record results or the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e import serve_bench
from e2e.engines import ENGINES, SglangEngine, VllmEngine, Workload
from e2e.server import ServerProcess, free_port, live_group_members

FAKE_SERVER = Path(serve_bench.__file__).resolve().parent / "fake_server.py"
NUM_PROMPTS = 3

# A stand-in client: it says its load has begun as the real clients do, sends one real streamed
# request to the server, then writes a result file shaped like vLLM's.
FAKE_CLIENT = r"""
import json, sys, urllib.request
print("Warmup completed. Starting main benchmark run...", flush=True)
port, result_path, completed = sys.argv[1], sys.argv[2], int(sys.argv[3])
request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                 data=json.dumps({"prompt": "hi there", "max_tokens": 4}).encode())
chunks = [line for line in urllib.request.urlopen(request, timeout=30).read().decode().splitlines() if line]
assert chunks[-1] == "data: [DONE]", chunks
metrics = {k: float(i + 1) for i, k in enumerate(["mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
           "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "output_throughput", "request_throughput"])}
json.dump({"completed": completed, "failed": 0, **metrics}, open(result_path, "w"))
"""


class FakeVllm(VllmEngine):
    """vLLM's bookkeeping (result file, log check) with the stand-in server and client."""

    def __init__(self, server_flags: tuple[str, ...] = (), log_backend: str | None = None,
                 completed: int = NUM_PROMPTS, client_code: str = FAKE_CLIENT) -> None:
        self.server_flags, self.log_backend = server_flags, log_backend
        self.completed, self.client_code = completed, client_code

    def server_command(self, work, backend, port):
        return [sys.executable, str(FAKE_SERVER), "--protocol", "vllm", "--backend", self.log_backend or backend,
                "--port", str(port), "--spawn-child", *self.server_flags]

    def client_command(self, work, port, result_path):
        return [sys.executable, "-c", self.client_code, str(port), str(result_path), str(self.completed)]


def harness_args(**overrides) -> argparse.Namespace:
    values = {"gpu_free_mib": 10**9, "gpu_free_timeout": 5.0, "server_timeout": 30.0, "client_timeout": 60.0,
              "fake_server": False, "profile_steps": 0, "profile_delay": 0.0, "deadline": None}
    values.update(overrides)
    return argparse.Namespace(**values)


def workload(tmp_path: Path) -> Workload:
    return Workload(python=sys.executable, model=tmp_path, dataset=tmp_path / "slice.json", num_prompts=NUM_PROMPTS)


def run(tmp_path: Path, engine, backend: str = "CUSTOM", **args):
    env, overrides = serve_bench.child_environment(None)
    return serve_bench.run_backend(engine, workload(tmp_path), backend, tmp_path / backend, env, overrides,
                                   harness_args(**args))


def child_pid(log_path: Path) -> int:
    return int(re.search(r"child pid (\d+)", log_path.read_text()).group(1))


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_server_process_group_is_stopped_with_its_children(tmp_path):
    port = free_port()
    command = [sys.executable, str(FAKE_SERVER), "--protocol", "vllm", "--backend", "X", "--port", str(port),
               "--spawn-child", "--healthy-after", "1.5"]
    server = ServerProcess(command, dict(os.environ), tmp_path / "server.log")
    server.start()
    group = server.process.pid
    try:
        assert server.wait_healthy(f"http://127.0.0.1:{port}/health", timeout_s=30, poll_s=0.2) >= 1.5
        child = child_pid(tmp_path / "server.log")
        assert alive(child) and child in live_group_members(group)
    finally:
        server.stop(grace_s=10)
    assert live_group_members(group) == [] and not alive(child)


def test_backend_run_records_metrics_and_stops_everything(tmp_path):
    result = run(tmp_path, FakeVllm())
    assert result.status == "ok", result.status
    assert result.completed == NUM_PROMPTS and result.metrics["p99_itl_ms"] == 8.0
    assert result.backend_in_log == "CUSTOM" and result.server_start_s is not None
    assert "--spawn-child" in result.server_command and "HF_HUB_OFFLINE=1" in result.client_command
    assert not alive(child_pid(tmp_path / "CUSTOM" / "server.log"))
    assert not (tmp_path / "CUSTOM" / serve_bench.PGID_FILE).exists()
    saved = json.loads((tmp_path / "CUSTOM" / serve_bench.BACKEND_FILE).read_text())
    assert saved["status"] == "ok" and saved["metrics"] == result.metrics


def test_server_that_dies_fails_with_its_log_tail(tmp_path):
    result = run(tmp_path, FakeVllm(server_flags=("--exit-code", "3")))
    assert result.status.startswith("failed: server exited with code 3")
    assert "failing on purpose" in result.status  # the log tail is part of the reason
    assert result.metrics == {} and result.completed is None


def test_server_that_never_gets_healthy_times_out_and_is_stopped(tmp_path):
    started = time.monotonic()
    result = run(tmp_path, FakeVllm(server_flags=("--healthy-after", "3600")), server_timeout=3.0)
    assert "not healthy" in result.status and time.monotonic() - started < 60
    assert not alive(child_pid(tmp_path / "CUSTOM" / "server.log"))


def test_a_time_limit_cuts_the_server_wait_to_what_is_left(tmp_path):
    started = time.monotonic()
    deadline = started + serve_bench.STOP_RESERVE_S + 2.0  # 2 s left once a server's stop is reserved
    result = run(tmp_path, FakeVllm(server_flags=("--healthy-after", "3600")), server_timeout=60.0, deadline=deadline)
    assert "not healthy" in result.status and "cut short by --time-limit" in result.status, result.status
    assert time.monotonic() - started < 30  # not the 60 s --server-timeout
    assert not alive(child_pid(tmp_path / "CUSTOM" / "server.log"))


def test_without_a_time_limit_waits_are_not_cut():
    assert serve_bench.deadline_of(None) is None
    assert serve_bench.within_limit(None, 900.0) == 900.0 and serve_bench.room_for_a_backend(None)
    soon = serve_bench.deadline_of(serve_bench.STOP_RESERVE_S + 10.0)
    assert 0.0 < serve_bench.within_limit(soon, 900.0) <= 10.0 and not serve_bench.room_for_a_backend(soon)


def test_server_log_naming_another_backend_fails_the_run(tmp_path):
    result = run(tmp_path, FakeVllm(log_backend="TRITON_ATTN"))
    assert result.status == "failed: asked for CUSTOM, the server log says TRITON_ATTN ran"


def test_incomplete_requests_fail_the_run(tmp_path):
    result = run(tmp_path, FakeVllm(completed=NUM_PROMPTS - 1))
    assert result.status == f"failed: {NUM_PROMPTS - 1} of {NUM_PROMPTS} requests completed"
    assert result.metrics  # the numbers are still recorded


def test_client_failure_fails_the_run_with_its_log(tmp_path):
    result = run(tmp_path, FakeVllm(client_code="import sys; print('client broke'); sys.exit(2)"))
    assert result.status.startswith("failed: client exited with code 2") and "client broke" in result.status


SLOW_CLIENT = FAKE_CLIENT.replace("run...\", flush=True)\n", "run...\", flush=True)\nimport time; time.sleep(3)\n")


def test_profiled_run_traces_under_load_and_summarises_the_steps(tmp_path):
    result = run(tmp_path, FakeVllm(client_code=SLOW_CLIENT), profile_steps=4, profile_delay=0.5)
    assert result.status == "ok", result.status
    assert "--profiler-config" in result.server_command  # the engine's profiler is switched on at start
    # The figures come from the first, unprofiled pass; the profiled pass has its own log and result.
    assert result.metrics and (tmp_path / "CUSTOM" / "client.log").is_file()
    assert (tmp_path / "CUSTOM" / "profile-pass.log").is_file()
    summary = (tmp_path / "CUSTOM" / "step_profile.md").read_text()
    # The fake server's trace: per step 30 us of our attention and 70 us of GEMM, 50 us idle between steps.
    assert "steps: 4" in summary and "kernels 100.0 us" in summary
    assert re.search(r"engine_backend attention \| 30\.0", summary), summary


def test_profiling_a_client_that_ends_too_soon_fails_with_the_reason(tmp_path):
    result = run(tmp_path, FakeVllm(), profile_steps=4, profile_delay=20.0)
    assert result.status.startswith("failed: client finished within the 20.0 s profile delay"), result.status


def test_profiling_a_client_that_ends_before_its_load_fails_with_the_reason(tmp_path):
    result = run(tmp_path, FakeVllm(client_code=FAKE_CLIENT.replace("Starting main benchmark run", "nothing")),
                 profile_steps=4, profile_delay=0.0)
    assert result.status.startswith("failed: client finished before its load began"), result.status


def _client(tmp_path: Path, code: str):
    log_path = tmp_path / "client.log"
    log = open(log_path, "wb")
    client = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    return client, log_path, log


def test_the_profile_delay_counts_from_the_clients_load_not_its_start(tmp_path):
    """A client that starts up for 1.5 s before its load: the wait ends at its load-started line."""
    code = "import time; time.sleep(1.5); print('Starting main benchmark run...', flush=True); time.sleep(5)"
    client, log_path, log = _client(tmp_path, code)
    try:
        t0 = time.monotonic()
        assert serve_bench.wait_for_load(client, log_path, "Starting main benchmark run", timeout_s=30)
        assert 1.4 <= time.monotonic() - t0 < 10
        assert client.poll() is None  # returned while the load runs, not at the client's end
    finally:
        client.kill(), client.wait(), log.close()


def test_waiting_for_a_load_line_that_never_comes_gives_up(tmp_path):
    client, log_path, log = _client(tmp_path, "import time; print('other output', flush=True); time.sleep(30)")
    try:
        t0 = time.monotonic()
        assert not serve_bench.wait_for_load(client, log_path, "Starting main benchmark run", timeout_s=1.0)
        assert 0.9 <= time.monotonic() - t0 < 10
        assert not serve_bench.wait_for_load(client, log_path, None, timeout_s=30)  # no marker: no wait
    finally:
        client.kill(), client.wait(), log.close()


def test_results_collect_in_engine_order_across_runs(tmp_path):
    engine = FakeVllm()
    for backend in ("TRITON_ATTN", "CUSTOM", "MY_EXTRA"):
        run(tmp_path, engine, backend=backend)
    assert [r.backend for r in serve_bench.collected_results(engine, tmp_path)] == ["CUSTOM", "TRITON_ATTN", "MY_EXTRA"]


def test_pythonpath_is_prepended(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/already")
    env, overrides = serve_bench.child_environment("/site")
    assert env["PYTHONPATH"] == f"/site{os.pathsep}/already" == overrides["PYTHONPATH"]
    assert env["HF_HUB_OFFLINE"] == "1"


def test_commands_use_the_flags_checked_against_the_engines(tmp_path):
    work = Workload(python="python3", model=Path("/m"), dataset=Path("/d.json"))
    vllm, sglang = ENGINES["vllm"], ENGINES["sglang"]
    assert vllm.server_command(work, "CUSTOM", 8001)[:5] == ["python3", "-m", "vllm.entrypoints.cli.main", "serve", "/m"]
    client = vllm.client_command(work, 8001, tmp_path / "r.json")
    for flag in ("--dataset-name", "--dataset-path", "--num-prompts", "--request-rate", "--save-result",
                 "--result-dir", "--result-filename", "--seed", "--ignore-eos"):
        assert flag in client
    assert client[client.index("--num-prompts") + 1] == "300" and client[client.index("--request-rate") + 1] == "16.0"
    server = sglang.server_command(work, "engine_backend", 8002)
    assert server[:3] == ["python3", "-m", "sglang.launch_server"]
    assert server[server.index("--grammar-backend") + 1] == "none"
    assert server[server.index("--load-format") + 1] == "dummy"
    client = sglang.client_command(work, 8002, tmp_path / "r.jsonl")
    assert client[:3] == ["python3", "-m", "sglang.bench_serving"]
    assert client[client.index("--output-file") + 1] == str(tmp_path / "r.jsonl")


@pytest.mark.parametrize("engine", [VllmEngine(), SglangEngine()])
def test_log_check_finds_the_selected_backend(engine):
    lines = {"vllm": "INFO 11-23 [cuda.py:422] Using AttentionBackendEnum.FLASHINFER backend.",
             "sglang": "INFO server_args=ServerArgs(model_path='/m', attention_backend='fa3', "
                       "decode_attention_backend=None)"}
    assert engine.backend_in_log("noise\n" + lines[engine.name] + "\nmore") == {"vllm": "FLASHINFER",
                                                                                 "sglang": "fa3"}[engine.name]
    assert engine.backend_in_log("nothing about it") is None


def test_server_left_by_an_interrupted_run_is_killed_before_the_next(tmp_path):
    port = free_port()
    server = ServerProcess([sys.executable, str(FAKE_SERVER), "--protocol", "vllm", "--backend", "X",
                            "--port", str(port), "--spawn-child"], dict(os.environ), tmp_path / "server.log")
    server.start()  # and never stopped by its harness, as after a SIGKILL
    group = server.process.pid
    (tmp_path / serve_bench.PGID_FILE).write_text(str(group))
    deadline = time.monotonic() + 30
    while len(live_group_members(group)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # wait for the child to exist
    serve_bench.reap_stale_server(tmp_path)
    server.process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while live_group_members(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_group_members(group) == [] and not (tmp_path / serve_bench.PGID_FILE).exists()


def test_dry_run_shows_the_profiled_commands(tmp_path, capsys):
    assert serve_bench.main(["--engine", "vllm", "--backends", "CUSTOM", "--out", str(tmp_path), "--dry-run",
                             "--profile-steps", "30"]) == 0
    out = capsys.readouterr().out
    server = out.splitlines()[0]
    assert "--profiler-config" in server and '"max_iterations": 30' in server
    assert "bench serve" in out and "/start_profile" in out and "/stop_profile" in out
    assert serve_bench.main(["--engine", "sglang", "--backends", "triton", "--out", str(tmp_path), "--dry-run",
                             "--profile-steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "--profiler-config" not in out and "-m sglang.profiler" in out and "--num-steps 30" in out


@pytest.mark.parametrize("engine,ours,other", [("sglang", "engine_backend", "triton"), ("vllm", "CUSTOM", "FLASH_ATTN")])
def test_our_backend_without_the_package_is_refused_before_any_server_starts(tmp_path, monkeypatch, engine, ours,
                                                                              other):
    installed = {"engine-backend": "not installed"}
    monkeypatch.setattr(serve_bench, "package_version", lambda python, env, dist: installed.get(dist, "1.0"))
    started = []

    def run_backend(engine, work, backend, *rest):  # stands in for a server start and a client run
        started.append(backend)
        return argparse.Namespace(status="ok")

    monkeypatch.setattr(serve_bench, "run_backend", run_backend)
    argv = ["--engine", engine, "--backends", f"{other},{ours}", "--out", str(tmp_path), "--pythonpath", "/site"]
    with pytest.raises(SystemExit, match=f"names {ours}.*not installed.*--target /site"):
        serve_bench.main(argv)
    assert started == []
    installed["engine-backend"] = "0.1.0"  # installed: both backends run
    assert serve_bench.main(argv) == 0
    assert started == [other, ours]


def test_backends_a_time_limit_leaves_no_room_for_are_not_started(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serve_bench, "package_version", lambda python, env, dist: "1.0")
    started = []

    def run_backend(engine, work, backend, *rest):  # a backend run that takes 1.5 s
        started.append(backend)
        time.sleep(1.5)
        return argparse.Namespace(status="ok")

    monkeypatch.setattr(serve_bench, "run_backend", run_backend)
    limit = serve_bench.STOP_RESERVE_S + serve_bench.MIN_BACKEND_S + 1.0  # room for one backend start, not two
    argv = ["--engine", "vllm", "--backends", "FLASH_ATTN,CUSTOM,TRITON_ATTN", "--out", str(tmp_path),
            "--time-limit", str(limit)]
    assert serve_bench.main(argv) == 1  # not everything asked for ran
    assert started == ["FLASH_ATTN"]
    assert "run again with --backends CUSTOM,TRITON_ATTN and the same --out" in capsys.readouterr().out
    started.clear()
    assert serve_bench.main(argv[:-2]) == 0  # no limit: every backend runs
    assert started == ["FLASH_ATTN", "CUSTOM", "TRITON_ATTN"]


STAGE = Path(serve_bench.__file__).resolve().parent / "stage.sh"
# Stand-ins for the bundle builder (it downloads the engine's wheels) and for `python -m pip wheel`: the
# builder cuts a known 10-byte bundle into two parts in two folders, as the real one does at 60 MB.
FAKE_BUILD_BUNDLE = """#!/usr/bin/env bash
set -e
engine=$1; out=$2; shift 2
echo "$engine $*" > "$(dirname "$0")/called-with"
rm -rf "$out"; mkdir -p "$out/p1" "$out/p2"
printf '%s' bundle > "$out/p1/part.00"; printf '%s' -tar > "$out/p2/part.01"
"""
FAKE_PYTHON = """#!/usr/bin/env bash
# only `-m pip wheel -q --no-deps ROOT -w DIR` is expected
[[ $1 == -m && $2 == pip && $3 == wheel ]] || exit 9
while (($#)); do [[ $1 == -w ]] && { mkdir -p "$2"; touch "$2/engine_backend-0.1.0-py3-none-any.whl"; }; shift; done
"""


def _stage(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    for name, text in (("build-bundle.sh", FAKE_BUILD_BUNDLE), ("install-bundle.sh", "# installs\n"),
                       ("python", FAKE_PYTHON)):
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    env = {**os.environ, "GPU_STAGE_DIR": str(tools), "PYTHON": str(tools / "python")}
    return subprocess.run(["bash", str(STAGE), *args], env=env, capture_output=True, text=True, timeout=60)


def test_stage_writes_one_bundle_by_default(tmp_path):
    out = tmp_path / "out"
    done = _stage(tmp_path, "vllm", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["install-bundle.sh", "part.00"]
    assert (out / "part.00").read_bytes() == b"bundle-tar"  # the builder's parts joined in order
    called = (tmp_path / "tools" / "called-with").read_text().split()
    assert called[0] == "vllm" and called[1].endswith("engine_backend-0.1.0-py3-none-any.whl")
    assert called[2].endswith("e2e/models/llama3-8b-shape") and called[3].endswith("e2e/data/sharegpt_300.json")


def test_stage_cuts_the_bundle_into_parts_of_at_most_max_part_bytes(tmp_path):
    out = tmp_path / "out"
    done = _stage(tmp_path, "--max-part-bytes", "4", "sglang", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["p1", "p2", "p3"]
    parts = [next((out / f"p{i}").glob("part.*")) for i in (1, 2, 3)]
    assert [p.name for p in parts] == ["part.00", "part.01", "part.02"]  # install-bundle.sh joins part.?? in order
    assert [p.stat().st_size for p in parts] == [4, 4, 2]
    assert b"".join(p.read_bytes() for p in parts) == b"bundle-tar"
    assert all((out / f"p{i}" / "install-bundle.sh").is_file() for i in (1, 2, 3))
    assert _stage(tmp_path, "--max-part-bytes", "0", "vllm", str(out)).returncode == 2
