"""Turn the benchmark clients' saved results into one table per run (markdown and JSON).

vLLM's ``bench serve --save-result`` and SGLang's ``bench_serving --output-file`` use the same key names for
the numbers reported here (``mean_ttft_ms``, ``p99_itl_ms``, ``output_throughput``, ``completed``, ...; the
P99 keys exist because both clients report the 99th percentile by default). A key missing from a result is
an error, never a blank cell: a table that silently lacks a number would read as a measurement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# (column title, key in the client's JSON, unit)
METRICS: tuple[tuple[str, str, str], ...] = (
    ("TTFT mean", "mean_ttft_ms", "ms"),
    ("TTFT median", "median_ttft_ms", "ms"),
    ("TTFT P99", "p99_ttft_ms", "ms"),
    ("TPOT mean", "mean_tpot_ms", "ms"),
    ("TPOT median", "median_tpot_ms", "ms"),
    ("TPOT P99", "p99_tpot_ms", "ms"),
    ("ITL median", "median_itl_ms", "ms"),
    ("ITL P99", "p99_itl_ms", "ms"),
    ("output throughput", "output_throughput", "tok/s"),
    ("request throughput", "request_throughput", "req/s"),
)
COMPLETED_KEY = "completed"


@dataclass
class BackendResult:
    """One backend's outcome in a run: its metrics, or why there are none."""

    backend: str
    status: str  # "ok", or "failed: <reason>"
    metrics: dict[str, float]
    completed: int | None
    num_prompts: int
    server_command: str
    client_command: str
    server_start_s: float | None = None
    backend_in_log: str | None = None
    context: dict[str, str] = field(default_factory=dict)  # the run's setup when this backend ran

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> BackendResult:
        return cls(**data)


def metrics_from_client(data: dict) -> tuple[dict[str, float], int]:
    """The table's numbers from a client's result JSON; KeyError names every missing key."""
    missing = [key for _, key, _ in METRICS if key not in data] + ([COMPLETED_KEY] if COMPLETED_KEY not in data else [])
    if missing:
        raise KeyError(f"client result lacks {', '.join(missing)}")
    return {key: float(data[key]) for _, key, _ in METRICS}, int(data[COMPLETED_KEY])


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def setup_differences(table_context: dict[str, str], backend_context: dict[str, str]) -> list[str]:
    """What differed when a backend ran in an earlier invocation (the time stamp aside)."""
    return [f"{name}: {value}" for name, value in backend_context.items()
            if name != "updated" and table_context.get(name) != value]


def render_markdown(title: str, context: dict[str, str], results: list[BackendResult]) -> str:
    """A markdown report: the run's context, the metrics table, each backend's status and exact commands."""
    lines = [f"# {title}", ""]
    lines += [f"- {name}: {value}" for name, value in context.items()]
    header = ["backend"] + [f"{title} ({unit})" for title, _, unit in METRICS] + ["completed", "status"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = [_cell(result.metrics.get(key)) for _, key, _ in METRICS]
        completed = "—" if result.completed is None else f"{result.completed}/{result.num_prompts}"
        status = "ok" if result.status == "ok" else "FAILED (below)"
        lines.append("| " + " | ".join([result.backend, *cells, completed, status]) + " |")
    lines += ["", "## Backends", ""]
    for result in results:
        lines.append(f"### {result.backend}")
        lines.append(f"- status: {result.status}")
        differences = setup_differences(context, result.context)
        if differences:
            lines.append("- ran in another setup than the one above: " + "; ".join(differences))
        if result.backend_in_log is not None:
            lines.append(f"- backend named in the server log: {result.backend_in_log}")
        if result.server_start_s is not None:
            lines.append(f"- server healthy after {result.server_start_s:.0f} s")
        lines += ["- server:", "", "```", result.server_command, "```", "- client:", "", "```",
                  result.client_command, "```", ""]
    return "\n".join(lines) + "\n"


def write_tables(out_dir: Path, title: str, context: dict[str, str], results: list[BackendResult]) -> tuple[Path, Path]:
    """Write ``results.md`` and ``results.json`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / "results.md", out_dir / "results.json"
    md_path.write_text(render_markdown(title, context, results), encoding="utf-8")
    table = {"title": title, "context": context,
             "columns": [{"title": t, "key": key, "unit": unit} for t, key, unit in METRICS],
             "rows": [result.to_json() for result in results]}
    json_path.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return md_path, json_path


def read_table(json_path: Path) -> tuple[dict, list[BackendResult]]:
    table = json.loads(Path(json_path).read_text(encoding="utf-8"))
    return table, [BackendResult.from_json(row) for row in table["rows"]]
