"""Decode step time by batch size, from SGLang server logs, for backends side by side.

    python -m e2e.decode_steps OUT/engine_backend/server.log OUT/triton/server.log [--bucket 8] [--out table.md]
        [--kv-bucket 2000] [--plot steps.png]          # logs may be gzipped (.gz)

Start the servers with ``--decode-log-interval 1`` (``serve_bench --server-arg=--decode-log-interval=1``):
SGLang then logs every decode step with its batch (``#running-req``), the KV tokens it holds
(``#token``) and ``gen throughput``, the tokens generated since the previous decode log over the
wall time since then. For a decode step that follows another decode step that is one token per
request, so ``#running-req / gen throughput`` is the step's wall time as the scheduler's loop saw
it, under the real load and its overlap of host and GPU work. Steps after a prefill batch are left
out (their interval holds the prefill too), and so is the first line (it has no interval).
Logging every step adds host work to every step, so these runs' latencies are not the
benchmark's; the table compares backends under the same added work.
"""

from __future__ import annotations

import argparse
import gzip
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

DECODE = re.compile(
    r"Decode batch.*?#running-req:\s*(?P<reqs>\d+),\s*#token:\s*(?P<tokens>\d+),.*?"
    r"gen throughput \(token/s\):\s*(?P<tput>[0-9.]+)"
)
PREFILL = re.compile(r"Prefill batch")


@dataclass(frozen=True)
class DecodeStep:
    requests: int
    kv_tokens: int
    ms: float


def decode_steps(lines) -> list[DecodeStep]:
    """Decode steps whose interval since the previous log line held only that step."""
    steps, previous = [], None
    for line in lines:
        if PREFILL.search(line):
            previous = "prefill"
            continue
        m = DECODE.search(line)
        if not m:
            continue
        reqs, tput = int(m["reqs"]), float(m["tput"])
        if previous == "decode" and tput > 0:
            steps.append(DecodeStep(reqs, int(m["tokens"]), 1e3 * reqs / tput))
        previous = "decode"
    return steps


def by_bucket(steps: list[DecodeStep], width: int, kv_width: int = 0) -> dict[tuple[int, int], list[DecodeStep]]:
    """Steps grouped by batch size (``b .. b + width - 1``) and, if ``kv_width``, by the batch's
    KV tokens too (``t .. t + kv_width - 1``), so that backends compare at the same load."""
    out: dict[tuple[int, int], list[DecodeStep]] = {}
    for s in steps:
        kv = s.kv_tokens // kv_width * kv_width if kv_width else 0
        out.setdefault(((s.requests - 1) // width * width + 1, kv), []).append(s)
    return dict(sorted(out.items()))


def _label(key: tuple[int, int], width: int, kv_width: int) -> str:
    batch, kv = key
    text = f"{batch}-{batch + width - 1}"
    return text + (f" | {kv}-{kv + kv_width - 1}" if kv_width else "")


def table(runs: dict[str, list[DecodeStep]], width: int, kv_width: int = 0, min_steps: int = 5) -> str:
    names = list(runs)
    groups = {n: by_bucket(steps, width, kv_width) for n, steps in runs.items()}
    keys = sorted({k for g in groups.values() for k in g})
    pair = len(names) == 2
    head = "| batch | " + ("KV tokens | " if kv_width else "")
    head += " | ".join(f"{n}: steps, median KV tokens, median ms" for n in names)
    head += f" | {names[0]} / {names[1]}" if pair else ""
    columns = 1 + bool(kv_width) + len(names) + pair
    lines = [head + " |", "|---" * columns + "|"]
    for key in keys:
        cells, medians = [], []
        for n in names:
            group = groups[n].get(key, [])
            if len(group) < min_steps:
                cells.append(f"{len(group)}, -, -")
                medians.append(None)
                continue
            ms = statistics.median(s.ms for s in group)
            tokens = statistics.median(s.kv_tokens for s in group)
            cells.append(f"{len(group)}, {tokens:.0f}, {ms:.3f}")
            medians.append(ms)
        if kv_width and None in medians:
            continue  # a cell only one backend reached compares nothing
        row = f"| {_label(key, width, kv_width)} | " + " | ".join(cells)
        if pair:
            row += " | " + (f"{medians[0] / medians[1]:.3f}" if None not in medians else "-")
        lines.append(row + " |")
    overall = ", ".join(
        f"{n}: {len(s)} steps, median {statistics.median(x.ms for x in s):.3f} ms" for n, s in runs.items() if s
    )
    return "\n".join(lines) + f"\n\nall decode steps: {overall}\n"


@dataclass(frozen=True)
class StepModel:
    """Least-squares step time: ``base + per_request * requests + per_1k_tokens * kv_tokens / 1000`` (ms)."""

    base: float
    per_request: float
    per_1k_tokens: float
    steps: int

    def predict(self, requests: int, kv_tokens: int) -> float:
        return self.base + self.per_request * requests + self.per_1k_tokens * kv_tokens / 1000


def fit(steps: list[DecodeStep], rounds: int = 3) -> StepModel:
    """Fit ``StepModel``, dropping steps more than 3 median absolute residuals off after each
    round (steps that waited on something else: a prefill's host work, a GC pause), or more than
    10 µs where the fit is that close."""
    import torch

    x = torch.tensor([[1.0, s.requests, s.kv_tokens / 1000] for s in steps], dtype=torch.float64)
    y = torch.tensor([s.ms for s in steps], dtype=torch.float64)
    keep = torch.ones_like(y, dtype=torch.bool)
    for _ in range(rounds):  # each round judges every step against the fit of the last round's kept ones
        coef = torch.linalg.lstsq(x[keep], y[keep, None]).solution[:, 0]
        residual = (y - x @ coef).abs()
        keep = residual <= max(3 * float(residual[keep].median()), 0.01)
    coef = torch.linalg.lstsq(x[keep], y[keep, None]).solution[:, 0]
    return StepModel(*coef.tolist(), steps=int(keep.sum()))


def fit_table(runs: dict[str, list[DecodeStep]], points=((8, 2000), (32, 8000), (40, 10000))) -> str:
    lines = ["| backend | steps kept | base (ms) | per request (µs) | per 1k KV tokens (µs) | "
             + " | ".join(f"{r} req, {t} tok (ms)" for r, t in points) + " |",
             "|---" * (5 + len(points)) + "|"]
    for name, steps in runs.items():
        m = fit(steps)
        lines.append(f"| {name} | {m.steps} | {m.base:.3f} | {1e3 * m.per_request:.1f} | {1e3 * m.per_1k_tokens:.1f} | "
                     + " | ".join(f"{m.predict(r, t):.3f}" for r, t in points) + " |")
    return "\n".join(lines) + "\n"


def read_log(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", errors="replace") as f:
        return f.read().splitlines()


def plot(runs: dict[str, list[DecodeStep]], width: int, path: Path) -> None:
    """Median step time per batch bucket, one line per backend (matplotlib, if installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, steps in runs.items():
        groups = {b: g for (b, _), g in by_bucket(steps, width).items() if len(g) >= 5}
        ax.plot([b + (width - 1) / 2 for b in groups], [statistics.median(s.ms for s in g) for g in groups.values()],
                marker="o", label=name)
    ax.set_xlabel("requests in the decode batch")
    ax.set_ylabel("median decode step (ms)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path, help="server logs; the backend is the log's folder name")
    parser.add_argument("--bucket", type=int, default=8, help="batch sizes per row")
    parser.add_argument("--kv-bucket", type=int, default=0,
                        help="also split rows by the batch's KV tokens, this many per row (0: no split); "
                        "rows only one backend reached are left out")
    parser.add_argument("--names", help="comma-separated names instead of the folder names")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    names = args.names.split(",") if args.names else [p.parent.name for p in args.logs]
    if len(names) != len(args.logs):
        parser.error(f"{len(args.logs)} logs but {len(names)} names")
    runs = {n: decode_steps(read_log(p)) for n, p in zip(names, args.logs)}
    for n, steps in runs.items():
        if not steps:
            parser.error(f"{n}: no decode steps with an interval of their own; was --decode-log-interval 1 set?")
    text = table(runs, args.bucket, args.kv_bucket) + "\n" + fit_table(runs)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.plot:
        plot(runs, args.bucket, args.plot)


if __name__ == "__main__":
    main()
