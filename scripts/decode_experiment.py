"""Where does a decode launch's time go? An experiment, not a test or a benchmark of record.

    python scripts/decode_experiment.py --prebuild --arch 90a   # here: compile the variants
    python scripts/decode_experiment.py --out DIR               # on the GPU

1. Length sweep (ours and FlashInfer, same inputs): time vs KV length for B = 1 and 16; the
   intercept is the fixed cost of a launch, the slope the streaming rate.
2. Phase timeline: a build with -DEB_DECODE_TIMELINE stamps %globaltimer per CTA (entry, loads
   issued, first K/V arrived, stream done, output written, exit).
3. Tuning knobs: warps per CTA, pipeline stages, CTAs per SM (grid size).
4. Short requests (``--parts short``): the batches SGLang's ShareGPT serving run decodes (16-48
   requests of a few hundred tokens, page size 1; its server logs put 6-12k KV tokens in a batch of
   25-40), where the per-step serving times came out 1-3 % above ``triton``'s: each knob above plus
   the planner's request overhead, against SGLang's Triton decode kernel on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_decode import HKV, HQ, D, DTYPE, PAGE, make_batch, ragged_lens  # noqa: E402
from benchmarks.timing import time_cuda  # noqa: E402
from engine_backend import BSR, decode, reference  # noqa: E402
from engine_backend.kernels import jit  # noqa: E402
from engine_backend.variants import DEFAULT  # noqa: E402

TIMELINE_OFFSET = 512 * HQ * D  # floats into work_o: past every partial-state slot of a small batch
KNOBS = {"w4s3": (), "w8s3": ("-DEB_DECODE_WARPS=8",), "w4s4": ("-DEB_DECODE_STAGES=4",),
         "w4s2": ("-DEB_DECODE_STAGES=2",), "timeline": (f"-DEB_DECODE_TIMELINE={TIMELINE_OFFSET}",),
         "w2s3": ("-DEB_DECODE_WARPS=2",), "w2s2": ("-DEB_DECODE_WARPS=2", "-DEB_DECODE_STAGES=2"),
         "pdl": ("-DEB_DECODE_PDL",), "snap/8": ("-DEB_DECODE_SNAP_DIV=8",), "snap/16": ("-DEB_DECODE_SNAP_DIV=16",),
         "seek": ("-DEB_DECODE_SEEK_FIRST",),
         "stream-K": ("-DEB_DECODE_ALIGN=0", "-DEB_DECODE_SLACK_TOKENS=0"),  # the eleventh session's planner
         "slack 0": ("-DEB_DECODE_SLACK_TOKENS=0",), "slack 128": ("-DEB_DECODE_SLACK_TOKENS=128",),
         "slack 512": ("-DEB_DECODE_SLACK_TOKENS=512",),
         "pack": ("-DEB_DECODE_PACK=128",),  # greedy whole-request ranges for batches of up to 128 requests
         "timeline seek": (f"-DEB_DECODE_TIMELINE={TIMELINE_OFFSET}", "-DEB_DECODE_SEEK_FIRST")}


_default_spec = decode.kernel_spec


def spec(flags) -> jit.KernelSpec:
    base = _default_spec(DTYPE, D, DEFAULT)
    return jit.KernelSpec.make(base.name, base.sources, dict(base.params), cuda_flags=flags)


def make_decoder(flags=(), ctas_per_sm: int | None = None, max_batch: int = 256,
                 page: int = PAGE) -> decode.BatchDecode:
    original = decode.kernel_spec
    decode.kernel_spec = lambda dtype, dim, variant: spec(flags)
    try:
        return decode.BatchDecode(HQ, HKV, D, page, dtype=DTYPE, max_batch_size=max_batch, ctas_per_sm=ctas_per_sm)
    finally:
        decode.kernel_spec = original


def graph_time_after_write_us(dec, q, k, v, bsr) -> float:
    """Graph replay of [a kernel that writes q, then the decode], as in a model's layer (rope
    writes the query just before attention): what a programmatic dependent launch can save."""
    dec.plan(bsr)
    source, out = q.clone(), torch.empty_like(q)
    q.copy_(source)
    dec.run(q, k, v, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q.copy_(source)
        dec.run(q, k, v, out=out)
    return time_cuda(graph.replay).median_ms * 1e3


def graph_time_us(dec, q, k, v, bsr) -> float:
    dec.plan(bsr)
    out = torch.empty_like(q)
    dec.run(q, k, v, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec.run(q, k, v, out=out)
    return time_cuda(graph.replay).median_ms * 1e3


def sweep(results: dict) -> None:
    from benchmarks import peers

    dec = make_decoder()
    rows = []
    for batch in (1, 16):
        for length in (16, 256, 1024, 4096, 8192, 32768):
            q, k, v, table, seq = make_batch([length] * batch)
            bsr = BSR.from_block_table(table, seq, PAGE)
            ours = graph_time_us(dec, q, k, v, bsr)
            fi = peers.flashinfer_decode(q, k, v, table, seq, PAGE)[0].median_ms * 1e3
            rows.append({"B": batch, "L": length, "ours_us": ours, "fi_us": fi})
            print(f"sweep B={batch:3d} L={length:6d} ours {ours:7.1f} us  FlashInfer {fi:7.1f} us", flush=True)
    results["sweep"] = rows


TIMELINE_SHAPES = (("1x32768", [32768]), ("16x1024", [1024] * 16), ("16x8192", [8192] * 16), ("48x512", [512] * 48))


def timeline(results: dict, shapes=TIMELINE_SHAPES, page: int = PAGE, key: str = "timeline",
             flags=KNOBS["timeline"]) -> None:
    dec = make_decoder(flags, max_batch=1024, page=page)
    out = {}
    for name, lens in shapes:
        q, k, v, table, seq = make_batch(lens, page)
        bsr = BSR.from_block_table(table, seq, page)
        dec.plan(bsr)
        stamps = dec._work_o.view(-1)[TIMELINE_OFFSET:].view(torch.int64)
        runs = []
        for _ in range(5):
            stamps[: dec.ctas * HKV * 8].fill_(0)
            from benchmarks.timing import flush_l2

            flush_l2()
            dec.run(q, k, v)
            torch.cuda.synchronize()
            t = stamps[: dec.ctas * HKV * 8].view(-1, 8).cpu()
            t0 = int(t[:, 0].min())
            rel = lambda col: [(int(x) - t0) / 1e3 for x in t[:, col] if int(x) > 0]  # noqa: E731
            runs.append({f"s{i}": rel(i) for i in range(7)})
        summary = {}
        for i in range(7):
            vals = [x for r in runs for x in r[f"s{i}"]]
            if vals:
                summary[f"s{i}"] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
        # per-CTA durations
        last = runs[-1]
        summary["first_data_latency_median"] = statistics.median(b - a for a, b in zip(last["s1"], last["s2"]))
        out[name] = summary
        print(f"{key} {name}: " + json.dumps(summary), flush=True)
    results[key] = out


def knobs(results: dict) -> None:
    rows = []
    from benchmarks.bench_decode import SHAPES

    # Fixed grids: as many CTAs per SM as fit (2 for w4s3), or one; not BatchDecode's small-batch switch
    # (until the eleventh session only w4s3 had it off, so batches of up to 16 ran other grids elsewhere).
    configs = [(name, flags, None) for name, flags in KNOBS.items()
               if not name.startswith("timeline") and name != "w4s2"]
    configs += [("w4s3 1 CTA/SM", (), 1)]
    for name, flags, per_sm in configs:
        dec = make_decoder(flags, per_sm)
        dec.small_batch_ctas = dec.ctas  # the same grid for every batch
        for case, lens in SHAPES:
            q, k, v, table, seq = make_batch(lens)
            bsr = BSR.from_block_table(table, seq, PAGE)
            us = graph_time_us(dec, q, k, v, bsr)
            out = dec.run(q, k, v)
            ref, _ = reference.attention(q, k, v, bsr) if len(lens) <= 16 else (out, None)
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            rows.append({"config": name, "case": case, "us": us, "ctas": dec.ctas, "rel_err": err})
            print(f"knobs {name:16s} ctas/head {dec.ctas:3d} {case:9s} {us:7.1f} us  rel err {err:.1e}", flush=True)
    results["knobs"] = rows


SHORT_SHAPES = [("16x256", [256] * 16), ("32x128", [128] * 32), ("32x256", [256] * 32), ("40x256", [256] * 40),
                ("48x192", [192] * 48), ("32 ragged 16-600", ragged_lens(32, 16, 600)),
                ("40 ragged 16-600", ragged_lens(40, 16, 600, seed=1)),
                # Where a generous planner could lose: long requests (the CTAs stream at the bandwidth limit)
                # and a wide ragged batch.
                ("40x2048", [2048] * 40), ("64 ragged 16-1200", ragged_lens(64, 16, 1200, seed=2))]


def short_case(dec, name, case, q, k, v, table, seq, grid, page) -> dict:
    """One knob on one batch: graph times alone and after a q write, and the error vs the reference."""
    if grid is not None:  # plan() takes the small-batch grid for every batch, set to grid()
        decode.SMALL_BATCH = 1 << 30
        dec.small_batch_ctas = grid(q.shape[0], dec.ctas)
    bsr = BSR.from_block_table(table, seq, page)
    us = graph_time_us(dec, q, k, v, bsr)
    after = graph_time_after_write_us(dec, q, k, v, bsr)
    out = dec.run(q, k, v)
    ref, _ = reference.attention(q, k, v, bsr)
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    grid_ctas = dec._grid_ctas  # the grid this plan launched, per head tile
    print(f"short {name:14s} {case:17s} {us:7.1f} us ({after:.1f} after a q write)  grid/head "
          f"{grid_ctas:3d} rel err {err:.1e}", flush=True)
    return {"config": name, "case": case, "us": us, "after_write_us": after, "grid": grid_ctas, "rel_err": err}


def short(results: dict) -> None:
    """Knobs on short-request batches at page size 1, with SGLang's Triton decode as the yardstick."""
    from benchmarks import engine_peers, peers

    page, rows = 1, []
    # (name, build flags, CTAs per SM, request overhead, grid per head tile as a function of the batch
    # and the buffers' CTA count). None: as shipped (BatchDecode's small-batch grid switch included).
    configs = [("default", (), None, None, None)]
    # Greedy whole-request ranges (experiment-only), the planner before the twelfth session (stream-K split,
    # quarter-share snap) and the slack a CTA may take beyond its share (default 256 tokens; 0: a quarter share).
    configs += [(name, KNOBS[name], None, None, None) for name in ("pack", "stream-K", "slack 0", "slack 128", "slack 512")]
    configs += [(f"overhead {o}", (), None, o, None) for o in (0, 8, 128)]
    configs += [("1 CTA/SM", (), 1, None, None)]
    # Grids that line CTAs up with requests: one per request, or one per two (no request is cut when
    # the batch is uniform), instead of equal shares of a 2-per-SM grid that cut every other request.
    configs += [("grid = batch", (), None, None, lambda b, ctas: min(ctas, b)),
                ("grid = batch/2", (), None, None, lambda b, ctas: min(ctas, -(-b // 2)))]
    # Planner snap: a CTA boundary moves onto a request boundary within a quarter share, which spares
    # slivers but can leave a CTA 1.25 shares; requests about a share long make that the makespan.
    configs += [(name, KNOBS[name], None, None, None)
                for name in ("seek", "snap/8", "snap/16", "w4s2", "w2s3", "w2s2", "w8s3", "pdl")]
    configs += [("default again", (), None, None, None)]  # the drift of the run: default first and last
    # Where a short batch's launch goes: the phase stamps of the timeline build, at page size 1 (first,
    # so that a knob's failure below cannot cost it).
    # Also the timeline of the older issue path ("seek": the first segment sought through the
    # per-request arrays instead of read from plan.first_seg).
    timeline_shapes = [(c, lens) for c, lens in SHORT_SHAPES if c in ("32x256", "40 ragged 16-600")]
    timeline(results, timeline_shapes, page, key="short_timeline")
    timeline(results, timeline_shapes, page, key="short_timeline_seek", flags=KNOBS["timeline seek"])
    inputs = {case: make_batch(lens, page) for case, lens in SHORT_SHAPES}
    for case, (q, k, v, table, seq) in inputs.items():
        peer = engine_peers.sglang_triton_decode_peer(q, k, v, table, seq)
        eager, _ = peers.measure(peer)
        source = q.clone()
        times = []
        for write_q in (False, True):  # as SGLang replays it: no Python launch cost in the time
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                if write_q:
                    q.copy_(source)
                peer.run()
            times.append(time_cuda(graph.replay).median_ms * 1e3)
        rows.append({"config": "sglang_triton", "case": case, "us": times[0], "after_write_us": times[1],
                     "eager_us": eager.median_ms * 1e3})
        print(f"short {'sglang_triton':14s} {case:17s} {times[0]:7.1f} us ({times[1]:.1f} after a q write; "
              f"{rows[-1]['eager_us']:.1f} eager)", flush=True)
    shipped_overhead, shipped_small_batch = decode.REQUEST_OVERHEAD, decode.SMALL_BATCH
    for name, flags, per_sm, overhead, grid in configs:
        try:
            dec = make_decoder(flags, per_sm, page=page)
        except Exception as e:  # noqa: BLE001 - a knob that does not build or fit is a result too
            print(f"short {name:14s} unavailable: {type(e).__name__}: {e}"[:200], flush=True)
            continue
        decode.REQUEST_OVERHEAD = shipped_overhead if overhead is None else overhead
        try:
            for case, (q, k, v, table, seq) in inputs.items():
                try:
                    rows.append(short_case(dec, name, case, q, k, v, table, seq, grid, page))
                except Exception as e:  # noqa: BLE001 - a knob's failure (a launch it cannot make) is a result
                    rows.append({"config": name, "case": case, "error": f"{type(e).__name__}: {e}"[:200]})
                    print(f"short {name:14s} {case:17s} error: {rows[-1]['error']}", flush=True)
        finally:
            decode.REQUEST_OVERHEAD, decode.SMALL_BATCH = shipped_overhead, shipped_small_batch
    results["short"] = rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prebuild", action="store_true")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--parts", default="sweep,timeline,knobs")
    args = parser.parse_args()
    if args.prebuild:
        for flags in KNOBS.values():
            print(jit.build(spec(flags), args.arch))
        return
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name()}
    for part in args.parts.split(","):
        globals()[part](results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_experiment.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
