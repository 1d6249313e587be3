"""Where a decode step's GPU time goes, from torch-profiler traces of a serving engine.

    python -m e2e.step_profile TRACE_OR_DIR [...] [--steps N] [--top 15]

Input: the Chrome-trace files (``*.json`` or ``*.json.gz``) that the engines' own live profilers
write: SGLang's ``python -m sglang.profiler --url URL --num-steps N --profile-by-stage`` (one
file per stage; pass the decode one) and vLLM's ``/start_profile`` + ``/stop_profile`` with
the server started with ``--profiler-config`` (torch profiler). ``serve_bench --profile-steps N`` runs both
under load and calls this; docs/e2e.md has the whole procedure.

Output: GPU kernel time per step by category (attention of each backend, our planning kernel,
GEMMs, the rest), the GPU's idle time between the first and last kernel, and the kernels that
take the most time, so a category that is wrong for some kernel is visible. Steps: ``--steps`` if
known; else ``--layers`` (steps = launches of the attention kernel / layers: SGLang's decode step
replays several graphs, so graph launches over-count it); else CUDA-graph launches.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# First match wins: the planning kernels (and the token table -> BSR one) before the attention kernels whose
# names they share.
CATEGORIES: tuple[tuple[str, re.Pattern], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("engine_backend plan", r"eb::.*(plan|token_table)_kernel|decode_plan_kernel|prefill_plan_kernel"),
        ("engine_backend attention", r"eb::|decode_kernel|prefill_kernel|merge_(pair|many)_kernel"),
        ("flashinfer attention", r"BatchDecodeWith|BatchPrefillWith|MergeStates|flashinfer::.*(Prefill|Decode|Attention)"),
        ("triton attention", r"_fwd_(grouped_)?kernel_stage[12]|_fwd_kernel\b|unified_attention|kernel_unified"),
        ("flash-attention", r"flash_fwd|flash::"),
        ("GEMM", r"(?i)gemm|nvjet|xmma|cutlass|cublas"),
    )
)
OTHER = "other"


def category(kernel_name: str) -> str:
    for name, pattern in CATEGORIES:
        if pattern.search(kernel_name):
            return name
    return OTHER


def read_trace(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def trace_files(inputs: list[Path]) -> list[Path]:
    files = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.name.endswith((".json", ".json.gz")) and "trace" in p.name)
        else:
            files.append(item)
    if not files:
        raise FileNotFoundError(f"no trace files (*trace*.json[.gz]) under {', '.join(map(str, inputs))}")
    return files


@dataclass
class StepProfile:
    steps: int
    kernel_us: dict[str, float] = field(default_factory=dict)  # category -> total over the trace
    by_kernel: dict[str, float] = field(default_factory=dict)  # kernel name -> total
    span_us: float = 0.0  # first kernel start to last kernel end
    busy_us: float = 0.0  # union of kernel intervals
    pause_us: float = 0.0  # idle gaps of PAUSE_US or more (no work, or the profiler itself), left out of idle
    pauses: int = 0

    def per_step(self, value: float) -> float:
        return value / self.steps

    @property
    def idle_us(self) -> float:
        """GPU idle between kernels within the traced work: the time the GPU waited for the CPU."""
        return self.span_us - self.busy_us - self.pause_us


PAUSE_US = 2000.0  # longer than any CPU-side gap within or between decode steps


def _busy_and_pauses(intervals: list[tuple[float, float]]) -> tuple[float, float, int]:
    busy, end, pause_us, pauses = 0.0, None, 0.0, 0
    for start, stop in sorted(intervals):
        if end is None or start > end:
            if end is not None and start - end >= PAUSE_US:
                pause_us, pauses = pause_us + start - end, pauses + 1
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy, pause_us, pauses


def attention_launches(kernels: list[dict]) -> int:
    """Launches of the attention kernel launched most often (one per layer and step for every backend
    here: our decode kernel, Triton's stage-1 kernel, FlashAttention's forward)."""
    counts: dict[str, int] = defaultdict(int)
    for e in kernels:
        if category(e["name"]).endswith("attention"):  # every attention category, flash-attention too
            counts[e["name"]] += 1
    return max(counts.values(), default=0)


def profile(events: list[dict], steps: int | None = None, layers: int | None = None) -> StepProfile:
    """Totals over the trace; `steps` if known, else attention launches / `layers`, else graph launches."""
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    if not kernels:
        raise ValueError("the trace has no GPU kernel events (was the GPU activity recorded?)")
    if not steps and layers:
        steps = round(attention_launches(kernels) / layers)
    if not steps:
        steps = sum(1 for e in events if e.get("ph") == "X" and e.get("name") == "cudaGraphLaunch")
    if not steps:
        raise ValueError("no cudaGraphLaunch in the trace to count steps by: pass --steps or --layers")
    result = StepProfile(steps=steps)
    per_cat: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    intervals = []
    for e in kernels:
        start, dur = float(e["ts"]), float(e["dur"])
        per_cat[category(e["name"])] += dur
        per_kernel[e["name"]] += dur
        intervals.append((start, start + dur))
    result.kernel_us, result.by_kernel = dict(per_cat), dict(per_kernel)
    result.span_us = max(stop for _, stop in intervals) - min(start for start, _ in intervals)
    result.busy_us, result.pause_us, result.pauses = _busy_and_pauses(intervals)
    return result


# Decode attention of one layer: a first kernel, then any continuation kernels (split-KV reductions).
DECODE_LAYER_FIRST = re.compile(r"decode_kernel|_fwd_grouped_kernel_stage1|BatchDecodeWith|flash_fwd_splitkv_kernel")
DECODE_LAYER_REST = re.compile(r"_fwd_kernel_stage2|MergeStates|merge_(pair|many)_kernel|splitkv_combine")
BATCH_KERNEL = re.compile(r"RMSNorm")  # one CTA per token: its grid is the step's (padded) batch


def decode_attention_by_batch(events: list[dict]) -> dict[int, list[float]]:
    """Decode attention time per layer (us), keyed by the batch of its step, read from the grid of the last
    norm kernel before it (torch.profiler records each kernel's grid). Backends are then compared at equal
    batch: a trace's steps mix batch sizes, and decode attention grows with the batch."""
    by_batch: dict[int, list[float]] = defaultdict(list)
    batch = None
    for e in sorted((e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"), key=lambda e: e["ts"]):
        name = e["name"]
        if BATCH_KERNEL.search(name):
            grid = (e.get("args") or {}).get("grid")
            batch = int(grid[0]) if grid else None
        elif batch is not None and DECODE_LAYER_FIRST.search(name):
            by_batch[batch].append(float(e["dur"]))
        elif batch is not None and DECODE_LAYER_REST.search(name) and by_batch[batch]:
            by_batch[batch][-1] += float(e["dur"])
    return dict(by_batch)


def batch_report(by_batch: dict[int, list[float]]) -> str:
    lines = ["| batch (norm grid) | decode attention layers | median us per layer | mean us per layer |",
             "| --- | --- | --- | --- |"]
    for batch, times in sorted(by_batch.items()):
        ordered = sorted(times)
        lines.append(f"| {batch} | {len(times)} | {ordered[len(ordered) // 2]:.1f} | {sum(times) / len(times):.1f} |")
    return "\n".join(lines)


def report(p: StepProfile, top: int = 15) -> str:
    total = sum(p.kernel_us.values())
    lines = [f"steps: {p.steps}; per step: GPU span {p.per_step(p.span_us):.1f} us, kernels {p.per_step(total):.1f} us, "
             f"GPU idle {p.per_step(p.idle_us):.1f} us"
             + (f" (plus {p.pauses} pauses of {PAUSE_US / 1000:g} ms or more, {p.pause_us / 1000:.1f} ms in all, "
                "left out)" if p.pauses else ""),
             "", "| category | us per step | share of kernel time |", "| --- | --- | --- |"]
    for name, us in sorted(p.kernel_us.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {p.per_step(us):.1f} | {100 * us / total:.1f} % |")
    lines += ["", f"| top kernels | category | us per step |", "| --- | --- | --- |"]
    for name, us in sorted(p.by_kernel.items(), key=lambda kv: -kv[1])[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short}` | {category(name)} | {p.per_step(us):.1f} |")
    return "\n".join(lines)


HOST_CATEGORIES = ("cpu_op", "cuda_runtime", "cuda_driver", "user_annotation")


def host_report(events: list[dict], steps: int, top: int = 25) -> str:
    """Host-side time per step by operator (torch ops, CUDA runtime calls, annotated ranges), inclusive
    of what each calls: where one backend's step spends host time that another's does not. A step whose
    host work outlasts the GPU's leaves the GPU idle, which the kernel table above cannot show."""
    total: dict[tuple[str, str], float] = defaultdict(float)
    calls: dict[tuple[str, str], int] = defaultdict(int)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in HOST_CATEGORIES:
            key = (e["cat"], e["name"])
            total[key] += float(e.get("dur", 0.0))
            calls[key] += 1
    lines = ["| host operator | kind | us per step | calls per step |", "| --- | --- | --- | --- |"]
    for (cat, name), us in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        short = name if len(name) <= 80 else name[:77] + "..."
        lines.append(f"| `{short}` | {cat} | {us / steps:.1f} | {calls[(cat, name)] / steps:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", type=Path, help="trace files or folders holding them")
    parser.add_argument("--steps", type=int, help="steps in the trace (default: see --layers)")
    parser.add_argument("--layers", type=int, help="attention layers of the model: steps = launches of the "
                        "attention kernel / layers (default: the trace's cudaGraphLaunch count, right only where "
                        "one graph runs one step)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--host", action="store_true", help="also the host-side operators per step")
    args = parser.parse_args(argv)
    events = [e for path in trace_files(args.traces) for e in read_trace(path)]
    result = profile(events, args.steps, args.layers)
    print(report(result, args.top))
    if args.host:
        print("\n" + host_report(events, result.steps, max(args.top, 25)))
    by_batch = decode_attention_by_batch(events)
    if by_batch:
        print("\n" + batch_report(by_batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
