"""Decode-step latency at fixed batch sizes: SGLang's one-batch benchmark, per attention backend.

    python -m e2e.sglang_one_batch --backends engine_backend,triton --out DIR -- \
        --model-path e2e/models/llama3-8b-shape --load-format dummy \
        --batch-size 1 16 32 64 --input-len 512 --output-len 64

A serving run mixes batch sizes, lengths, prefills and the scheduler's overlap, so two backends
are never traced at the same batch. SGLang's ``sglang.benchmark.one_batch`` runs one batch of
synthetic prompts through the model runner (CUDA graphs as in serving) and times every decode
step with a synchronize, so the figures are the step's GPU time plus the host time to launch it.

``one_batch`` parses ``--attention-backend`` before any plugin is loaded, so our name would be
rejected: each backend runs in a fresh interpreter that loads SGLang's plugins first. The
median decode latency of every (batch, input length) goes into DIR/one_batch.md and .json,
one column per backend; arguments after ``--`` go to ``one_batch`` unchanged (with ``--profile``,
each backend's traces are named after it, in ``$SGLANG_TORCH_PROFILER_DIR``, for e2e.step_profile).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RUNNER = (
    "import sys; from sglang.srt.plugins import load_plugins; load_plugins(); "
    "from sglang.benchmark.one_batch import cli_main; sys.argv[0] = 'one_batch'; cli_main()"
)


def run_backend(backend: str, one_batch_args: list[str], out: Path) -> list[dict]:
    """Runs one_batch for one backend; returns its result rows (one per batch and length)."""
    result = out / f"{backend}.jsonl"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", RUNNER, *one_batch_args, "--attention-backend", backend,
           "--run-name", backend, "--result-filename", str(result), "--profile-prefix", backend]
    with open(out / f"{backend}.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0 or not result.exists():
        tail = (out / f"{backend}.log").read_text().splitlines()[-5:]
        raise RuntimeError(f"{backend}: one_batch exited {code}; log tail:\n" + "\n".join(tail))
    return [json.loads(line) for line in result.read_text().splitlines() if line.strip()]


def table(rows: dict[str, list[dict]]) -> str:
    """Markdown: median decode-step latency per (batch, input length), and each backend over the first."""
    backends = list(rows)
    by_key = {b: {(r["batch_size"], r["input_len"]): r for r in rows[b]} for b in backends}
    keys = sorted(set().union(*(set(k) for k in by_key.values())))
    head = ["batch", "input len", *(f"{b} ms" for b in backends), *(f"{b} / {backends[0]}" for b in backends[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        ms = [by_key[b].get(key, {}).get("median_decode_latency") for b in backends]
        ms = [None if m is None else m * 1e3 for m in ms]
        cells = [str(key[0]), str(key[1]), *("-" if m is None else f"{m:.3f}" for m in ms)]
        cells += ["-" if m is None or ms[0] is None else f"{m / ms[0]:.3f}" for m in ms[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="engine_backend,triton")
    parser.add_argument("--out", type=Path, required=True)
    args, rest = parser.parse_known_args()
    one_batch_args = rest[1:] if rest[:1] == ["--"] else rest
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failures = {}, []
    for backend in args.backends.split(","):
        try:
            rows[backend] = run_backend(backend, one_batch_args, args.out)
        except RuntimeError as error:
            failures.append(str(error))
            print(error, file=sys.stderr)
    if rows:
        text = table(rows)
        (args.out / "one_batch.md").write_text(f"one_batch args: {' '.join(one_batch_args)}\n\n{text}\n")
        (args.out / "one_batch.json").write_text(json.dumps(rows, indent=1))
        print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
