"""A stand-in for a vLLM or SGLang server, for checking the harness on a machine without a GPU.

It speaks just enough of each streaming protocol for the real benchmark clients to run against it:
vLLM's OpenAI ``/v1/completions`` (SSE chunks, then a usage chunk) and SGLang's ``/generate`` (cumulative text
with ``meta_info.completion_tokens``), plus ``/health`` and ``/v1/models``. It "generates" the requested
number of tokens at a fixed pace; its numbers measure nothing but the harness plumbing, and
``serve_bench --fake-server`` marks its tables so.

It answers the engines' live-profiler requests by writing a small synthetic torch-profiler trace: SGLang's
``/start_profile`` (folder and steps in the request, as ``python -m sglang.profiler`` sends them, plus the
``/server_info`` it reads first) and vLLM's (folder and steps from ``--profiler-config``, vLLM's flag).

It prints a backend-selection line in the named engine's log format (so the harness's log check runs), and
with ``--spawn-child`` starts a child process, as real servers do, to check that stopping stops the group.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SELECTION_LINE = {
    "vllm": "Using AttentionBackendEnum.{backend} backend.",
    "sglang": "server_args=ServerArgs(attention_backend='{backend}')",
}


def write_fake_trace(path: Path, steps: int) -> None:
    """A Chrome trace like torch.profiler's: per step a graph launch, an attention kernel and a GEMM."""
    events, t = [], 0.0
    for _ in range(steps):
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": t, "dur": 5})
        events.append({"ph": "X", "cat": "kernel", "name": "eb::(anonymous namespace)::decode_kernel", "ts": t, "dur": 30})
        events.append({"ph": "X", "cat": "kernel", "name": "nvjet_fake_gemm", "ts": t + 30, "dur": 70})
        t += 150
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": events}))


class FakeHandler(BaseHTTPRequestHandler):
    model = "fake"
    profiler_config: dict | None = None
    token_delay_s = 0.001
    healthy_after_s = 0.0
    started = time.monotonic()

    def log_message(self, *_args) -> None:  # keep the server log to what the harness reads
        pass

    def do_GET(self) -> None:
        if self.path == "/server_info":
            self._send_json({"fake": True})
        elif self.path == "/health":
            ready = time.monotonic() - self.started >= self.healthy_after_s
            self._send_json({} if ready else {"status": "starting"}, 200 if ready else 503)
        elif self.path == "/v1/models":
            self._send_json({"object": "list", "data": [{"id": self.model, "object": "model"}]})
        else:
            self._send_json({"error": "not found"}, 404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/v1/completions":
            self._stream(self._openai_chunks(body))
        elif self.path == "/generate":
            self._stream(self._sglang_chunks(body))
        elif self.path == "/start_profile" and "output_dir" in body:  # SGLang's profiler client
            write_fake_trace(Path(body["output_dir"]) / "fake-TP-0-decode.trace.json", int(body["num_steps"]))
            self._send_json({})
        elif self.path == "/start_profile" and self.profiler_config:  # vLLM
            config = self.profiler_config
            write_fake_trace(Path(config["torch_profiler_dir"]) / "fake.pt.trace.json", config["max_iterations"])
            self._send_json({})
        elif self.path == "/stop_profile" and self.profiler_config:
            self._send_json({})
        elif self.path in ("/flush_cache", "/reset_prefix_cache"):  # SGLang's, vLLM's (dev mode)
            self._send_json({})
        else:
            self._send_json({"error": "not found"}, 404)

    def _openai_chunks(self, body: dict):
        count = int(body.get("max_tokens") or 16)
        for _ in range(count):
            time.sleep(self.token_delay_s)
            yield {"id": "cmpl-fake", "object": "text_completion", "choices": [{"index": 0, "text": " tok"}]}
        prompt_tokens = len(str(body.get("prompt", "")).split())
        yield {"id": "cmpl-fake", "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                            "completion_tokens": count,
                                                            "total_tokens": prompt_tokens + count}}

    def _sglang_chunks(self, body: dict):
        count = int(body.get("sampling_params", {}).get("max_new_tokens") or 16)
        for done in range(1, count + 1):
            time.sleep(self.token_delay_s)
            yield {"text": " tok" * done, "meta_info": {"completion_tokens": done,
                                                        "prompt_tokens": len(str(body.get("text", "")).split())}}

    def _stream(self, chunks) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True

    def _send_json(self, data: dict, status: int = 200) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=sorted(SELECTION_LINE), required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default="fake")
    parser.add_argument("--token-delay", type=float, default=0.001, help="seconds per generated token")
    parser.add_argument("--healthy-after", type=float, default=0.0, help="answer 503 on /health until then")
    parser.add_argument("--exit-code", type=int, help="print an error and exit with this code at once")
    parser.add_argument("--spawn-child", action="store_true", help="start a long-sleeping child process")
    parser.add_argument("--profiler-config", type=json.loads, help="vLLM's profiler JSON (torch_profiler_dir, "
                        "max_iterations): serve /start_profile and /stop_profile")
    args = parser.parse_args(argv)
    if args.exit_code is not None:
        print(f"fake server: failing on purpose with code {args.exit_code}", flush=True)
        return args.exit_code
    if args.spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        print(f"fake server: child pid {child.pid}", flush=True)
    print(SELECTION_LINE[args.protocol].format(backend=args.backend), flush=True)
    FakeHandler.model, FakeHandler.token_delay_s = args.model, args.token_delay
    FakeHandler.profiler_config = args.profiler_config
    FakeHandler.healthy_after_s, FakeHandler.started = args.healthy_after, time.monotonic()
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer((args.host, args.port), FakeHandler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
