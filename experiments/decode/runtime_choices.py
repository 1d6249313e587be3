"""The shipped decode kernel under its runtime choices: an experiment, not a test or a benchmark of record.

    python experiments/decode/runtime_choices.py --out DIR                 # on the GPU
    python experiments/decode/runtime_choices.py --parts sweep --out DIR

``short``: the batches a serving run decodes (16-64 requests of a few hundred tokens, page size 1, SGLang's
layout) timed with each choice the Python wrapper makes at run time, against SGLang's Triton decode on the
same inputs: the planner's request overhead (``decode.REQUEST_OVERHEAD``), one CTA per SM for every batch
(``ctas_per_sm=1``), and grids that line CTAs up with requests (one CTA per request, one per two). Every
configuration is the shipped kernel binary; only the plan's inputs and the grid differ.

``sweep``: time against KV length for 1 and 16 requests, ours and FlashInfer's: the intercept is the fixed
cost of a launch, the slope the streaming rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.bench_decode import HKV, HQ, D, DTYPE, PAGE, make_batch, ragged_lens  # noqa: E402
from benchmarks.timing import time_cuda  # noqa: E402
from engine_backend import BSR, decode, reference  # noqa: E402

SHORT_SHAPES = [("16x256", [256] * 16), ("32x128", [128] * 32), ("32x256", [256] * 32), ("40x256", [256] * 40),
                ("48x192", [192] * 48), ("32 ragged 16-600", ragged_lens(32, 16, 600)),
                ("40 ragged 16-600", ragged_lens(40, 16, 600, seed=1)),
                # Where a choice that helps short requests could lose: long requests (the CTAs stream at the
                # bandwidth limit) and a wide ragged batch.
                ("40x2048", [2048] * 40), ("64 ragged 16-1200", ragged_lens(64, 16, 1200, seed=2))]

# (name, CTAs per SM, request overhead, grid per head tile as a function of the batch and the buffers' CTA
# count); None: as shipped (BatchDecode's small-batch grid switch included).
CONFIGS = [("default", None, None, None)]
CONFIGS += [(f"overhead {o}", None, o, None) for o in (0, 8, 128)]
CONFIGS += [("1 CTA/SM", 1, None, None),
            ("grid = batch", None, None, lambda b, ctas: min(ctas, b)),
            ("grid = batch/2", None, None, lambda b, ctas: min(ctas, -(-b // 2))),
            ("default again", None, None, None)]  # the drift of the run: default first and last


def graph_time_us(dec, q, k, v, bsr, write_q: bool = False) -> float:
    """Graph replay of the decode, optionally after a kernel that writes q (as rope does in a layer)."""
    dec.plan(bsr)
    source, out = q.clone(), torch.empty_like(q)
    dec.run(q, k, v, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        if write_q:
            q.copy_(source)
        dec.run(q, k, v, out=out)
    return time_cuda(graph.replay).median_ms * 1e3


def sweep(results: dict) -> None:
    from benchmarks import peers

    dec = decode.BatchDecode(HQ, HKV, D, PAGE, dtype=DTYPE)
    rows = []
    for batch in (1, 16):
        for length in (16, 256, 1024, 4096, 8192, 32768):
            q, k, v, table, seq = make_batch([length] * batch)
            ours = graph_time_us(dec, q, k, v, BSR.from_block_table(table, seq, PAGE))
            fi = peers.flashinfer_decode(q, k, v, table, seq, PAGE)[0].median_ms * 1e3
            rows.append({"B": batch, "L": length, "ours_us": ours, "fi_us": fi})
            print(f"sweep B={batch:3d} L={length:6d} ours {ours:7.1f} us  FlashInfer {fi:7.1f} us", flush=True)
    results["sweep"] = rows


def triton_times(inputs: dict) -> list[dict]:
    from benchmarks import engine_peers, peers

    rows = []
    for case, (q, k, v, table, seq) in inputs.items():
        peer = engine_peers.sglang_triton_decode_peer(q, k, v, table, seq)
        eager, _ = peers.measure(peer)
        source, times = q.clone(), []
        for write_q in (False, True):  # as SGLang replays it: no Python launch cost in the time
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                if write_q:
                    q.copy_(source)
                peer.run()
            times.append(time_cuda(graph.replay).median_ms * 1e3)
        rows.append({"config": "sglang_triton", "case": case, "us": times[0], "after_write_us": times[1],
                     "eager_us": eager.median_ms * 1e3})
        print(f"short {'sglang_triton':14s} {case:17s} {times[0]:7.1f} us ({times[1]:.1f} after a q write)", flush=True)
    return rows


def short(results: dict) -> None:
    page = 1
    inputs = {case: make_batch(lens, page) for case, lens in SHORT_SHAPES}
    rows = triton_times(inputs)
    shipped_overhead, shipped_small_batch = decode.REQUEST_OVERHEAD, decode.SMALL_BATCH
    for name, per_sm, overhead, grid in CONFIGS:
        dec = decode.BatchDecode(HQ, HKV, D, page, dtype=DTYPE, ctas_per_sm=per_sm)
        decode.REQUEST_OVERHEAD = shipped_overhead if overhead is None else overhead
        try:
            for case, (q, k, v, table, seq) in inputs.items():
                if grid is not None:  # plan() takes the small-batch grid for every batch, set to grid()
                    decode.SMALL_BATCH = 1 << 30
                    dec.small_batch_ctas = grid(q.shape[0], dec.ctas)
                bsr = BSR.from_block_table(table, seq, page)
                us = graph_time_us(dec, q, k, v, bsr)
                after = graph_time_us(dec, q, k, v, bsr, write_q=True)
                out = dec.run(q, k, v)
                ref, _ = reference.attention(q, k, v, bsr)
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                rows.append({"config": name, "case": case, "us": us, "after_write_us": after,
                             "grid": dec._grid_ctas, "rel_err": err})
                print(f"short {name:14s} {case:17s} {us:7.1f} us ({after:.1f} after a q write)  grid/head "
                      f"{dec._grid_ctas:3d} rel err {err:.1e}", flush=True)
        finally:
            decode.REQUEST_OVERHEAD, decode.SMALL_BATCH = shipped_overhead, shipped_small_batch
    results["short"] = rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--parts", default="short", help="comma-separated: short, sweep")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name()}
    parts = {"short": short, "sweep": sweep}
    for part in args.parts.split(","):
        parts[part](results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runtime_choices.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
