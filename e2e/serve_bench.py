"""Serving benchmark: for each attention backend, start the engine's server, run its benchmark client on the
ShareGPT slice, stop the server, and tabulate TTFT / TPOT / ITL / throughput per backend.

    python -m e2e.serve_bench --engine vllm --out .out/e2e-vllm                 # all four vLLM backends
    python -m e2e.serve_bench --engine sglang --backends engine_backend,triton --out .out/e2e-sglang \\
        --python python3 --pythonpath $HOME/site

Each backend's files go to OUT/<backend>/ (server.log, client.log, the client's result, backend.json);
OUT/results.md and OUT/results.json are rewritten after every backend from all backend.json files present,
so runs of a few backends each into the same OUT add up to one table.

--time-limit S (off by default) is for hosts that end a command after S seconds: every wait is cut to what
is left of S once a server's stop is reserved, and a backend that would not get a minute is not started
(the harness then exits non-zero; run it again into the same OUT for the rest).

With --profile-steps N the server starts with the engine's profiler configured; the client runs once
unprofiled (the table's figures), then, after the prefix cache is flushed, once more while the profiler
traces N steps (OUT/<backend>/step_profile.md): one server start buys both.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from e2e import gpu, step_profile
from e2e.engines import ENGINES, HOST, Engine, Workload
from e2e.results import BackendResult, metrics_from_client, write_tables
from e2e.server import ServerError, ServerProcess, free_port, live_group_members, log_tail

E2E_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = E2E_DIR / "models" / "llama3-8b-shape"
DEFAULT_DATASET = E2E_DIR / "data" / "sharegpt_300.json"
BACKEND_FILE = "backend.json"
TRACE_DIR = "traces"
PROFILE_PASS = "profile-pass"  # file stem of the profiled pass's client log and result
PGID_FILE = "server.pgid"
LOAD_MARKER_WAIT_S = 120.0  # longest wait for the client's load-started line before profiling anyway
PROFILER_TIMEOUT_S = 600.0  # the engine's profiler client: its own start-up plus the traced steps
STOP_RESERVE_S = 45.0  # kept back from --time-limit for stopping a server (30 s SIGTERM grace) and the tables
MIN_BACKEND_S = 60.0  # under --time-limit a backend is started only with at least this much left after the reserve


class Interrupted(Exception):
    """SIGTERM / SIGINT: raised so that the running server's process group is stopped on the way out."""


def _raise_interrupted(signum, _frame):
    raise Interrupted(f"signal {signum}")


def deadline_of(time_limit_s: float | None) -> float | None:
    """The time.monotonic() by which a run under --time-limit must be done; None without a limit."""
    return None if time_limit_s is None else time.monotonic() + time_limit_s


def within_limit(deadline: float | None, seconds: float) -> float:
    """``seconds``, cut to what is left before ``deadline`` once a server's stop is reserved (never below 0)."""
    if deadline is None:
        return seconds
    return max(0.0, min(seconds, deadline - time.monotonic() - STOP_RESERVE_S))


def room_for_a_backend(deadline: float | None) -> bool:
    """Whether a backend's server start and client run still fit before ``deadline``."""
    return within_limit(deadline, float("inf")) >= MIN_BACKEND_S


def child_environment(pythonpath: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(full environment for servers and clients, the variables this harness sets, for the report)."""
    overrides = {
        # The model and its tokenizer are local files: no server or client asks a hub for anything.
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if pythonpath:
        existing = os.environ.get("PYTHONPATH")
        overrides["PYTHONPATH"] = pythonpath + (os.pathsep + existing if existing else "")
    return {**os.environ, **overrides}, overrides


def shown(command: list[str], overrides: dict[str, str]) -> str:
    """The exact command line, with the environment this harness sets, as one copy-pasteable string."""
    prefix = " ".join(f"{name}={shlex.quote(value)}" for name, value in overrides.items())
    return f"{prefix} {shlex.join(command)}" if prefix else shlex.join(command)


def package_version(python: str, env: dict[str, str], distribution: str) -> str:
    """Installed version of ``distribution`` as seen by ``python`` (metadata only, nothing imported)."""
    code = f"import importlib.metadata as m; print(m.version({distribution!r}))"
    try:
        done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False)
    except (subprocess.SubprocessError, OSError) as error:
        return f"unknown ({error})"
    return done.stdout.strip() if done.returncode == 0 else "not installed"


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def fake_server_command(engine: Engine, work: Workload, backend: str, port: int) -> list[str]:
    """The stand-in server (e2e/fake_server.py) in place of the engine's, to check the harness without a GPU."""
    return [sys.executable, str(E2E_DIR / "fake_server.py"), "--protocol", engine.name, "--backend", backend,
            "--port", str(port), "--model", str(work.model), "--spawn-child"]


def run_client(command: list[str], env: dict[str, str], log_path: Path, timeout_s: float,
               while_running: Callable[[subprocess.Popen], None] | None = None) -> int:
    """Run the benchmark client in its own process group (killed whole on time-out); returns its exit code.
    `while_running(client)`, if given, runs once the client has started (the profiler, under load)."""
    with open(log_path, "wb") as log:
        client = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            if while_running:
                while_running(client)
            return client.wait(timeout=timeout_s)
        except (subprocess.TimeoutExpired, Interrupted, RuntimeError):
            try:
                os.killpg(client.pid, signal.SIGKILL)
            except ProcessLookupError:  # it had ended already (a profile hook's failure)
                pass
            client.wait()
            raise


def run_client_checked(command: list[str], env: dict[str, str], log_path: Path, timeout_s: float,
                       while_running: Callable[[subprocess.Popen], None] | None = None) -> None:
    code = run_client(command, env, log_path, timeout_s, while_running)
    if code != 0:
        raise RuntimeError(f"client exited with code {code}; log {log_path}:\n{log_tail(log_path)}")


def flush_prefix_cache(engine: Engine, port: int) -> None:
    request = urllib.request.Request(f"http://{HOST}:{port}{engine.flush_cache_path}", method="POST")
    try:
        urllib.request.urlopen(request, timeout=60).read()
    except OSError as error:
        raise RuntimeError(f"flushing the prefix cache ({engine.flush_cache_path}) failed: {error}") from error


def profile_pass(engine: Engine, work: Workload, port: int, backend_dir: Path, env: dict[str, str],
                 args: argparse.Namespace) -> None:
    """The same workload again on the same server, its prefix cache flushed, with the profiler tracing."""
    flush_prefix_cache(engine, port)
    print(f"[e2e] {engine.name}: prefix cache flushed; profiled pass", flush=True)
    result_path = backend_dir / (PROFILE_PASS + Path(engine.result_filename).suffix)
    result_path.unlink(missing_ok=True)
    log_path = backend_dir / f"{PROFILE_PASS}.log"
    hook = profiler(engine, work, port, backend_dir, env, args, log_path)
    run_client_checked(engine.client_command(work, port, result_path), env, log_path,
                       within_limit(args.deadline, args.client_timeout), hook)


def wait_for_load(client: subprocess.Popen, log_path: Path, marker: str | None, timeout_s: float) -> bool:
    """Wait until the client's log shows `marker` (its load has begun: the client's own start-up, its
    tokenizer and dataset, takes seconds, and its warm-up request is no load); False if the marker
    did not appear within `timeout_s` or there is none to wait for. Raises if the client ends first."""
    deadline = time.monotonic() + timeout_s
    while marker is not None and time.monotonic() < deadline:
        ended = client.poll() is not None  # before the log is read: an ended client's log is complete
        if log_path.is_file() and marker in log_path.read_text(errors="replace"):
            return True
        if ended:
            raise RuntimeError(f"client finished before its load began ({marker!r} not in its log): nothing traced")
        time.sleep(0.2)
    return False


def profiler(engine: Engine, work: Workload, port: int, backend_dir: Path, env: dict[str, str],
             args: argparse.Namespace, log_path: Path) -> Callable[[subprocess.Popen], None]:
    """Under load: once the client's load has begun, wait --profile-delay seconds, then trace
    --profile-steps steps with the engine's profiler."""
    def run(client: subprocess.Popen) -> None:
        if wait_for_load(client, log_path, engine.load_started_marker, LOAD_MARKER_WAIT_S):
            print(f"[e2e] {engine.name}: the client's load began; profiling in {args.profile_delay} s", flush=True)
        else:
            seen = f"no {engine.load_started_marker!r} in the client's log" if engine.load_started_marker else "no marker"
            print(f"[e2e] {engine.name}: {seen}; counting the {args.profile_delay} s profile delay from the client's "
                  "start", flush=True)
        deadline = time.monotonic() + args.profile_delay
        while time.monotonic() < deadline and client.poll() is None:
            time.sleep(0.5)
        if client.poll() is not None:
            raise RuntimeError(f"client finished within the {args.profile_delay} s profile delay: nothing traced")
        command = engine.profile_command(work, port, backend_dir / TRACE_DIR, args.profile_steps)
        print(f"[e2e] {engine.name}: profiling {args.profile_steps} steps", flush=True)
        with open(backend_dir / "profile.log", "wb") as log:
            code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=within_limit(args.deadline, PROFILER_TIMEOUT_S)).returncode
        if code != 0:
            raise RuntimeError(f"profiler exited with code {code}:\n{log_tail(backend_dir / 'profile.log')}")
    return run


def model_layers(model: Path) -> int | None:
    try:
        return int(json.loads((model / "config.json").read_text())["num_hidden_layers"])
    except (OSError, KeyError, ValueError):
        return None


def summarise_traces(backend_dir: Path, steps: int | None, layers: int | None = None) -> Path:
    """step_profile.md from the traces: the decode-stage ones where the engine splits by stage."""
    files = step_profile.trace_files([backend_dir / TRACE_DIR])
    decode = [f for f in files if "decode" in f.name.lower()]
    chosen = decode or files
    events = [event for path in chosen for event in step_profile.read_trace(path)]
    by_batch = step_profile.decode_attention_by_batch(events)
    out = backend_dir / "step_profile.md"
    out.write_text(f"Traces: {', '.join(str(f.relative_to(backend_dir)) for f in chosen)}\n\n"
                   + step_profile.report(step_profile.profile(events, steps, layers)) + "\n"
                   + ("\n" + step_profile.batch_report(by_batch) + "\n" if by_batch else ""), encoding="utf-8")
    return out


def reap_stale_server(backend_dir: Path) -> None:
    """Kill a server group left by an interrupted earlier run into the same folder (it would hold the GPU)."""
    pgid_file = backend_dir / PGID_FILE
    if not pgid_file.is_file():
        return
    group = int(pgid_file.read_text().strip())
    if live_group_members(group):
        print(f"[e2e] killing server group {group} left by an interrupted run", flush=True)
        os.killpg(group, signal.SIGKILL)
    pgid_file.unlink()


def run_backend(engine: Engine, work: Workload, backend: str, backend_dir: Path, env: dict[str, str],
                overrides: dict[str, str], args: argparse.Namespace, context: dict[str, str] | None = None
                ) -> BackendResult:
    backend_dir.mkdir(parents=True, exist_ok=True)
    port = free_port(HOST)
    result_path = backend_dir / engine.result_filename
    result_path.unlink(missing_ok=True)  # SGLang's client appends; a stale result must never be read back
    server_cmd = (fake_server_command(engine, work, backend, port) if args.fake_server
                  else engine.server_command(work, backend, port))
    server_env = env
    if args.profile_steps:
        server_cmd += engine.profile_server_args(backend_dir / TRACE_DIR, args.profile_steps)
        server_env = {**env, **engine.profile_server_env()}
    client_cmd = engine.client_command(work, port, result_path)
    result = BackendResult(backend=backend, status="failed: not run", metrics={}, completed=None,
                           num_prompts=work.num_prompts, server_command=shown(server_cmd, overrides),
                           client_command=shown(client_cmd, overrides), context=dict(context or {}))
    server = ServerProcess(server_cmd, server_env, backend_dir / "server.log")
    try:
        gpu.wait_until_memory_at_most(args.gpu_free_mib, within_limit(args.deadline, args.gpu_free_timeout))
        print(f"[e2e] {engine.name}/{backend}: starting server on port {port}", flush=True)
        server.start()
        (backend_dir / PGID_FILE).write_text(str(server.process.pid))
        result.server_start_s = server.wait_healthy(f"http://{HOST}:{port}{engine.health_path}",
                                                    within_limit(args.deadline, args.server_timeout))
        result.backend_in_log = engine.backend_in_log(server.log_path.read_text(encoding="utf-8", errors="replace"))
        print(f"[e2e] {engine.name}/{backend}: healthy after {result.server_start_s:.0f} s; running client",
              flush=True)
        run_client_checked(client_cmd, env, backend_dir / "client.log",
                           within_limit(args.deadline, args.client_timeout))
        result.metrics, result.completed = metrics_from_client(engine.read_result(result_path))
        result.status = backend_status(backend, result)
        if args.profile_steps and result.status == "ok":
            profile_pass(engine, work, port, backend_dir, env, args)
            summary = summarise_traces(backend_dir, engine.traced_steps(args.profile_steps), model_layers(work.model))
            print(f"[e2e] {engine.name}/{backend}: {summary}", flush=True)
    except (ServerError, RuntimeError, TimeoutError, subprocess.TimeoutExpired, KeyError, ValueError, OSError) as error:
        cut = args.deadline is not None and within_limit(args.deadline, float("inf")) == 0.0
        result.status = f"failed: {error}" + (" (cut short by --time-limit)" if cut else "")
    except Interrupted as error:
        result.status = f"failed: interrupted ({error})"
        raise
    finally:
        server.stop()
        (backend_dir / PGID_FILE).unlink(missing_ok=True)
        (backend_dir / BACKEND_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n")
        wait_gpu_released(args)
    print(f"[e2e] {engine.name}/{backend}: {result.status.splitlines()[0]}", flush=True)
    return result


def wait_gpu_released(args: argparse.Namespace) -> None:
    """After a stop: the next server needs the memory back (the next start checks again and fails if not)."""
    try:
        gpu.wait_until_memory_at_most(args.gpu_free_mib, within_limit(args.deadline, args.gpu_free_timeout))
    except TimeoutError as error:
        print(f"[e2e] warning: {error}", flush=True)


def backend_status(requested: str, result: BackendResult) -> str:
    """'ok' only if every prompt completed and the server's log does not name another backend."""
    if result.backend_in_log is not None and result.backend_in_log.lower() != requested.lower():
        return f"failed: asked for {requested}, the server log says {result.backend_in_log} ran"
    if result.completed != result.num_prompts:
        return f"failed: {result.completed} of {result.num_prompts} requests completed"
    return "ok"


def collected_results(engine: Engine, out_dir: Path) -> list[BackendResult]:
    """Every backend.json under ``out_dir``, the engine's own backends first in its order, then any others."""
    found = {path.parent.name: BackendResult.from_json(json.loads(path.read_text()))
             for path in out_dir.glob(f"*/{BACKEND_FILE}")}
    order = [b for b in engine.backends if b in found] + sorted(b for b in found if b not in engine.backends)
    return [found[b] for b in order]


def run_context(engine: Engine, work: Workload, env: dict[str, str], args: argparse.Namespace) -> dict[str, str]:
    devices = gpu.device_names()
    return {
        "engine": f"{engine.name} {package_version(work.python, env, engine.package)}",
        "engine-backend": package_version(work.python, env, "engine-backend"),
        "device": "; ".join(devices) if devices else "no GPU found by nvidia-smi",
        "model": f"{work.model} (dummy weights)",
        "dataset": f"{work.dataset} (sha256 {file_digest(work.dataset)})",
        "workload": f"{work.num_prompts} prompts at {work.request_rate:g} req/s, seed {work.seed}",
        "python": work.python,
        "PYTHONPATH": args.pythonpath or "(inherited)",
        "updated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def check_ours_installed(engine: Engine, backends: list[str], context: dict[str, str],
                         args: argparse.Namespace) -> None:
    """Refuse before any server starts when our backend is asked for but the engine's Python cannot see the
    package: its entry point is what registers the backend, so the server would only fail after minutes of
    start-up (SGLang: an argparse error naming every choice but ours), and after the other backends' runs."""
    ours = engine.backends[0]
    if ours in backends and not args.fake_server and context["engine-backend"] == "not installed":
        raise SystemExit(
            f"--backends names {ours}, but engine-backend is not installed for {args.python} "
            f"(PYTHONPATH {args.pythonpath or 'inherited'}): its entry point registers the backend with "
            f"{engine.name}. Install it there first, e.g. `{args.python} -m pip install --no-deps "
            f"{'--target ' + args.pythonpath.split(os.pathsep)[0] + ' ' if args.pythonpath else ''}.`"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, choices=sorted(ENGINES))
    parser.add_argument("--backends", help="comma-separated attention backends (default: all of the engine's)")
    parser.add_argument("--out", required=True, help="run folder: per-backend files and results.md/json")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET), help="ShareGPT slice (python -m e2e.sharegpt)")
    parser.add_argument("--num-prompts", type=int, default=300)
    parser.add_argument("--request-rate", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the engines")
    parser.add_argument("--pythonpath", help="prepended to PYTHONPATH for servers and clients (the engines' site dir)")
    parser.add_argument("--server-arg", action="append", default=[], dest="server_args",
                        help="extra server argument, repeatable (e.g. --server-arg=--enforce-eager)")
    parser.add_argument("--server-timeout", type=float, default=900.0, help="seconds to wait for health")
    parser.add_argument("--client-timeout", type=float, default=900.0, help="seconds the client may run")
    parser.add_argument("--gpu-free-mib", type=int, default=2048,
                        help="GPU 0 counts as free at or below this many MiB in use")
    parser.add_argument("--gpu-free-timeout", type=float, default=120.0)
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="finish within this many seconds (for hosts that end a command after a set time): "
                             "waits are cut to what is left, and backends without a minute left are not started "
                             "(exit code 1); default: no limit")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after the measured pass, run the client again on the same server (prefix cache "
                             "flushed) and trace this many engine steps with the engine's profiler; summary in "
                             "<backend>/step_profile.md")
    parser.add_argument("--profile-delay", type=float, default=2.0,
                        help="seconds of load before profiling, counted from the client's 'Starting main benchmark "
                             "run' line (its start-up and warm-up before it take some 25 s with SGLang's client); "
                             "300 prompts at 16 req/s arrive over ~19 s and a later start traces only the drain. "
                             "SGLang's profiler client adds its own start-up, ~13 s, before it starts the trace")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--fake-server", action="store_true",
                        help="serve with e2e/fake_server.py instead of the engine (checks the harness and the real "
                             "clients without a GPU; the numbers measure nothing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = ENGINES[args.engine]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else list(engine.backends)
    if not backends:
        raise SystemExit("--backends names no backend")
    work = Workload(python=args.python, model=Path(args.model).resolve(), dataset=Path(args.dataset).resolve(),
                    num_prompts=args.num_prompts, request_rate=args.request_rate, seed=args.seed,
                    server_args=tuple(args.server_args))
    for path in (work.model, work.dataset):
        if not path.exists():
            raise SystemExit(f"missing {path}: run `python -m e2e.make_model` / `python -m e2e.sharegpt` first")
    env, overrides = child_environment(args.pythonpath)
    out_dir = Path(args.out).resolve()
    if args.dry_run:
        for backend in backends:
            traces = out_dir / backend / TRACE_DIR
            extra = engine.profile_server_args(traces, args.profile_steps) if args.profile_steps else []
            print(shown(engine.server_command(work, backend, 8000) + extra, overrides))
            print(shown(engine.client_command(work, 8000, out_dir / backend / engine.result_filename), overrides))
            if args.profile_steps:
                print(shown(engine.profile_command(work, 8000, traces, args.profile_steps), overrides))
        return 0

    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    context = run_context(engine, work, env, args)
    check_ours_installed(engine, backends, context, args)
    title = f"Serving benchmark: {engine.name}, ShareGPT, {work.num_prompts} prompts at {work.request_rate:g} req/s"
    if args.profile_steps:
        context["profiled"] = (f"server started with the profiler configured; the figures are from an unprofiled "
                               f"pass; then, prefix cache flushed, a second pass traced {args.profile_steps} steps "
                               f"from {args.profile_delay:g} s after the client's load began, plus the profiler's "
                               f"own start-up (<backend>/step_profile.md)")
    if args.fake_server:
        title = "[FAKE SERVER: harness check, not a measurement] " + title
        context["server"] = "e2e/fake_server.py stand-in; these numbers measure nothing"
    failures = 0
    args.deadline = deadline_of(args.time_limit)
    not_started: list[str] = []
    try:
        for backend in backends:
            if not room_for_a_backend(args.deadline):
                not_started.append(backend)
                continue
            reap_stale_server(out_dir / backend)
            result = run_backend(engine, work, backend, out_dir / backend, env, overrides, args, context)
            failures += result.status != "ok"
            write_tables(out_dir, title, context, collected_results(engine, out_dir))
    except Interrupted as error:
        write_tables(out_dir, title, context, collected_results(engine, out_dir))
        print(f"[e2e] interrupted by {error}; the server was stopped; partial results in {out_dir}", flush=True)
        return 128 + signal.SIGTERM
    md_path = out_dir / "results.md"
    if md_path.is_file():
        print(f"[e2e] results: {md_path}", flush=True)
        print(md_path.read_text(), flush=True)
    if not_started:
        print(f"[e2e] not started, the --time-limit of {args.time_limit:g} s left too little time: "
              f"{','.join(not_started)} (run again with --backends {','.join(not_started)} and the same --out)",
              flush=True)
    return 1 if failures or not_started else 0


if __name__ == "__main__":
    sys.exit(main())
