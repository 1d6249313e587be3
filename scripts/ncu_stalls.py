"""Where a kernel's warps wait, from Nsight Compute's per-instruction source view.

    ncu --set full --import-source yes -k regex:KERNEL -c 1 -o REPORT python3 ...   # on the GPU
    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > REPORT.csv
    python scripts/ncu_stalls.py REPORT.csv [--top N]                                # anywhere

Prints the warp-stall samples by reason, then split into before / inside / after the loop that holds the
most tensor-core MMAs (the main loop: prologue, loop and epilogue), each with its instructions executed,
then the N instructions with the most samples. Samples are proportional to the time warps spend at an
instruction, so comparing two kernels' regions (ours and a peer's, same shape) shows where the time goes.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
import sys

_SAMPLES = "Warp Stall Sampling (All Samples)"
_EXECUTED = "Instructions Executed"


def load(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """The header (second line) and one dict per SASS instruction."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    header = lines[1]
    return header, [dict(zip(header, line)) for line in lines[2:] if len(line) >= len(header)]


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def stall_reasons(header: list[str]) -> list[str]:
    return [h for h in header if h.startswith("stall_") and "Not Issued" not in h]


def main_loop(rows: list[dict[str, str]]) -> tuple[int, int]:
    """First and last row of the backward branch's body with the most HMMA instructions."""
    address = [int(r["Address"], 16) for r in rows]
    index = {a: i for i, a in enumerate(address)}
    best = (-1, 0, -1)
    for i, row in enumerate(rows):
        target = re.search(r"BRA 0x([0-9a-f]+)", row["Source"])
        if target and int(target.group(1), 16) < address[i] and int(target.group(1), 16) in index:
            start = index[int(target.group(1), 16)]
            mmas = sum("HMMA" in rows[k]["Source"] for k in range(start, i + 1))
            best = max(best, (mmas, start, i))
    return best[1], best[2]


def summarize(rows: list[dict[str, str]], reasons: list[str]) -> tuple[float, float, collections.Counter]:
    by_reason = collections.Counter()
    for row in rows:
        for reason in reasons:
            by_reason[reason[len("stall_"):]] += number(row[reason])
    return sum(number(r[_SAMPLES]) for r in rows), sum(number(r[_EXECUTED]) for r in rows), by_reason


def report(path: str, top: int = 20) -> str:
    header, rows = load(path)
    reasons = stall_reasons(header)
    total, executed, by_reason = summarize(rows, reasons)
    out = [f"{path}: {total:.0f} samples, {executed / 1e6:.2f} M instructions executed"]
    out += [f"  {reason:20s} {n:8.0f} {100 * n / max(total, 1):5.1f} %" for reason, n in by_reason.most_common(10)]
    first, last = main_loop(rows)
    if last >= 0:
        for name, part in (("before loop", rows[:first]), ("loop", rows[first:last + 1]), ("after loop", rows[last + 1:])):
            samples, ins, why = summarize(part, reasons)
            out.append(f"  {name:11s} {samples:7.0f} samples ({100 * samples / max(total, 1):4.1f} %), "
                       f"{ins / 1e6:6.2f} M instructions; " + ", ".join(f"{k} {v:.0f}" for k, v in why.most_common(5)))
    hottest = sorted(range(len(rows)), key=lambda i: -number(rows[i][_SAMPLES]))[:top]
    for i in sorted(hottest):
        row = rows[i]
        reason = max(reasons, key=lambda h: number(row[h]))
        out.append(f"  #{i:<5d} {number(row[_SAMPLES]):6.0f} {reason[len('stall_'):]:14s} {row['Source'].strip()[:80]}")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="+", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=20, help="instructions with the most samples to list")
    args = parser.parse_args(argv)
    for path in args.csv:
        print(report(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
