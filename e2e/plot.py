"""Bar plots of TTFT, TPOT and ITL per backend from serve_bench's results.json tables.

    python -m e2e.plot .out/e2e-vllm/results.json [.out/e2e-sglang/results.json ...] [--out DIR]

One PNG per table (``<table folder name>-latency.png``, next to the table unless --out is given). Backends
that failed have no bar. Without matplotlib it says so and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from e2e.results import BackendResult, read_table

# (panel title, [(bar label, key in BackendResult.metrics)])
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("TTFT (ms)", (("mean", "mean_ttft_ms"), ("median", "median_ttft_ms"), ("P99", "p99_ttft_ms"))),
    ("TPOT (ms)", (("mean", "mean_tpot_ms"), ("median", "median_tpot_ms"), ("P99", "p99_tpot_ms"))),
    ("ITL (ms)", (("median", "median_itl_ms"), ("P99", "p99_itl_ms"))),
)


def plot_table(title: str, results: list[BackendResult], out_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on the GPU host
    import matplotlib.pyplot as plt

    measured = [r for r in results if r.status == "ok"]
    if not measured:
        raise ValueError(f"no backend of '{title}' has results to plot")
    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.5))
    width = 0.8 / max(len(bars) for _, bars in PANELS)
    positions = range(len(measured))
    for axis, (panel_title, bars) in zip(axes, PANELS):
        for index, (label, key) in enumerate(bars):
            values = [r.metrics[key] for r in measured]
            axis.bar([p + index * width for p in positions], values, width, label=label)
        axis.set_title(panel_title)
        axis.set_xticks([p + width * (len(bars) - 1) / 2 for p in positions])
        axis.set_xticklabels([r.backend for r in measured], rotation=20)
        axis.legend(fontsize="small")
    figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="+", help="results.json files written by e2e.serve_bench")
    parser.add_argument("--out", help="folder for the PNGs (default: next to each table)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plots written (pip install matplotlib)")
        return 0
    for table_path in map(Path, args.tables):
        table, results = read_table(table_path)
        folder = Path(args.out) if args.out else table_path.parent
        png = plot_table(table["title"], results, folder / f"{table_path.parent.name}-latency.png")
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
