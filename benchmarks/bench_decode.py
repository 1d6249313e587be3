"""Decode benchmark: ours vs peers on the same inputs, in one run, plus the device's copy bandwidth.

    python benchmarks/bench_decode.py [--no-peer] [--peers flashinfer,vllm_fa3,sglang_triton]
                                      [--serving-shapes] [--page-size 16] [--pool-tokens 750000] [--out results.json]

Shapes (issue #2): Hq=32, Hkv=8, D=128, page 16, bf16; uniform (B, L) batches, one skewed
batch (one 32768-token request and 127 of 512), and plan() time at B=128. `--page-size 1` is
SGLang's default layout (one token per page, pages scattered). `--pool-tokens N` scatters the pages over
a pool of N tokens instead of a pool of just the batch, as in a serving engine whose pool spans gigabytes.

Peers: `flashinfer` (BatchDecodeWithPagedKVCacheWrapper, use_tensor_cores=True; the default), and the
engines' own decode kernels where that engine is installed (benchmarks/engine_peers.py): `vllm_fa3`
(vLLM's FLASH_ATTN backend on Hopper) and `sglang_triton` (SGLang's triton backend, page size 1 only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ceilings import copy_bandwidth  # noqa: E402
from benchmarks.timing import time_cuda  # noqa: E402
from engine_backend import BSR, reference  # noqa: E402
from engine_backend.decode import BatchDecode  # noqa: E402

HQ, HKV, D, PAGE, DTYPE = 32, 8, 128, 16, torch.bfloat16
SHAPES = [("1x32768", [32768]), ("16x1024", [1024] * 16), ("16x8192", [8192] * 16), ("64x2048", [2048] * 64),
          ("128x1024", [1024] * 128), ("128x4096", [4096] * 128), ("256x2048", [2048] * 256),
          ("skewed 1x32768+127x512", [32768] + [512] * 127)]
# Decode batches as a serving run sees them (ShareGPT at 16 req/s: up to ~50 requests, a few hundred
# to a few thousand tokens each, 20-30 on average): here the fixed cost of a launch, not bandwidth,
# sets the time. Below 32 requests SGLang's Triton decode kernel was ahead at the one batch measured
# (8 x 256, RESULTS.md), so the small batches of a serving run are covered too.
def ragged_lens(count: int, low: int, high: int, seed: int = 0) -> list[int]:
    """``count`` lengths uniform in [low, high], the same on every run."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=gen).tolist()


SERVING_SHAPES = [("1x512", [512]), ("8x256", [256] * 8), ("16x512", [512] * 16),
                  ("24 ragged 64-2048", ragged_lens(24, 64, 2048)), ("32x512", [512] * 32),
                  ("40 ragged 64-2048", ragged_lens(40, 64, 2048)), ("48x512", [512] * 48),
                  ("48x1024", [1024] * 48), ("56 ragged 64-2048", ragged_lens(56, 64, 2048))]


def make_batch(lens, page=PAGE, pool_tokens=0):
    """The batch's pages at random places in a KV pool of ``pool_tokens`` tokens (at least the
    batch's own): a serving engine's pool spans gigabytes, so its reads miss the TLB a packed
    pool of just the batch never does."""
    pages = [-(-n // page) for n in lens]
    needed = sum(pages)
    pool = max(needed, -(-pool_tokens // page))
    perm = torch.randperm(pool, device="cuda", dtype=torch.int64)[:needed].to(torch.int32)
    width = max(pages)
    table = torch.zeros(len(lens), width, dtype=torch.int32, device="cuda")
    at = 0
    for r, n in enumerate(pages):
        table[r, :n] = perm[at : at + n]
        at += n
    kv = torch.randn(2, pool, page, HKV, D, dtype=DTYPE, device="cuda")
    seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), HQ, D, dtype=DTYPE, device="cuda")
    return q, kv[0], kv[1], table, seq


def kv_bytes(lens) -> int:
    return sum(lens) * HKV * D * 2 * 2


def bench_ours(q, k, v, table, seq, page=PAGE):
    dec = BatchDecode(HQ, HKV, D, page, dtype=DTYPE, max_batch_size=max(256, q.shape[0]))
    bsr = BSR.from_block_table(table, seq, page)
    dec.plan(bsr)
    out = torch.empty_like(q)
    t = time_cuda(lambda: dec.run(q, k, v, out=out))
    graph = torch.cuda.CUDAGraph()  # the same call replayed from a graph: no host overhead
    with torch.cuda.graph(graph):
        dec.run(q, k, v, out=out)
    t_graph = time_cuda(graph.replay)
    return t, t_graph, out, dec, bsr


def bench_peer(name, q, k, v, table, seq, page=PAGE):
    """(timing, output) of one peer on the batch."""
    from benchmarks import engine_peers, peers

    if name == "flashinfer":
        return peers.flashinfer_decode(q, k, v, table, seq, page)
    if name == "vllm_fa3":
        return peers.measure(engine_peers.vllm_fa3_decode_peer(q, k, v, table, seq))
    if name == "sglang_triton":
        return peers.measure(engine_peers.sglang_triton_decode_peer(q, k, v, table, seq))
    raise ValueError(f"unknown peer {name!r}; known: {list(PEERS)}")


PEERS = ("flashinfer", "vllm_fa3", "sglang_triton")


def plan_time(dec: BatchDecode, bsr: BSR, reps: int = 200) -> float:
    """Host wall time of plan() (it only launches; the device work is timed separately)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        dec.plan(bsr)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / reps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serving-shapes", action="store_true", help="the small batches of a serving run instead")
    parser.add_argument("--page-size", type=int, default=PAGE, help="tokens per KV page (1: SGLang's default)")
    parser.add_argument("--peers", default="flashinfer", help=f"comma-separated, of {', '.join(PEERS)}")
    parser.add_argument("--pool-tokens", type=int, default=0,
                        help="scatter each batch's pages over a KV pool this large (0: a pool of just the batch)")
    args = parser.parse_args()
    page = args.page_size
    peer_names = [] if args.no_peer else [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peer_names) - set(PEERS))
    if unknown:
        parser.error(f"unknown peers {unknown}; known: {list(PEERS)}")
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()  # bytes/s, read + write
    rows = []
    for name, lens in SERVING_SHAPES if args.serving_shapes else SHAPES:
        q, k, v, table, seq = make_batch(lens, page, args.pool_tokens)
        t, t_graph, out, dec, bsr = bench_ours(q, k, v, table, seq, page)
        row = {"shape": name, "ours_us": t.median_ms * 1e3, "ours_graph_us": t_graph.median_ms * 1e3,
               "bytes": kv_bytes(lens)}
        if len(lens) <= 16:  # spot-check the timed output against the reference
            ref, _ = reference.attention(q, k, v, bsr)
            row["ours_rel_err"] = float((out.float() - ref.float()).norm() / ref.float().norm())
        row["peers"] = {}
        for peer in peer_names:
            try:
                pt, pout = bench_peer(peer, q, k, v, table, seq, page)
                row["peers"][peer] = {"us": pt.median_ms * 1e3,
                                      "agree_rel_err": float((out.float() - pout.float()).norm() / pout.float().norm())}
            except Exception as e:  # noqa: BLE001 - report and keep measuring ours and the others
                row["peers"][peer] = {"error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(row)
        del q, k, v, table, seq, out
        torch.cuda.empty_cache()
    q, k, v, table, seq = make_batch([1024] * 128, page)
    _, _, _, dec, bsr = bench_ours(q, k, v, table, seq, page)
    plan_us = plan_time(dec, bsr)
    plan_gpu = time_cuda(lambda: dec.plan(bsr), flush=False).median_ms * 1e3
    peer_plan_us = None
    if "flashinfer" in peer_names:
        try:
            from benchmarks import peers

            peer_plan_us = peers.flashinfer_decode_plan_us(table, seq, page, HQ, HKV, D)
        except Exception as e:  # noqa: BLE001
            peer_plan_us = f"error: {e}"[:120]
    print_table(rows, copy_bw, plan_us, plan_gpu, peer_plan_us, page, peer_names, args.pool_tokens)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "page_size": page,
                                        "pool_tokens": args.pool_tokens,
                                        "copy_bw": copy_bw, "rows": rows, "peers": peer_names,
                                        "plan_host_us": plan_us, "plan_gpu_us": plan_gpu,
                                        "flashinfer_plan_us": peer_plan_us}, indent=2))


def percent_of_copy(nbytes: int, us: float, copy_bw: float) -> float:
    return 100 * nbytes / (us * 1e-6) / copy_bw


def print_table(rows, copy_bw, plan_us, plan_gpu, peer_plan_us, page, peer_names, pool_tokens=0) -> None:
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth (read+write): {copy_bw / 1e12:.2f} TB/s  "
          f"page size: {page}  KV pool: {pool_tokens or 'the batch'} tokens")
    peer_heads = "".join(f" {p} µs (% copy) | ours / {p} |" for p in peer_names)
    print(f"| shape | ours µs | ours % copy |{peer_heads} ours in a graph µs (% copy) | max rel err |")
    print("|---|---|---|" + "---|---|" * len(peer_names) + "---|---|")
    for r in rows:
        nbytes, ours = r["bytes"], r["ours_us"]
        cols, errs = [], [r.get("ours_rel_err", 0.0)]
        for p in peer_names:
            result = r["peers"][p]
            if "us" in result:
                cols.append(f"{result['us']:.1f} ({percent_of_copy(nbytes, result['us'], copy_bw):.0f} %) | "
                            f"{ours / result['us']:.2f}")
                errs.append(result["agree_rel_err"])
            else:
                cols.append(f"{result['error']} | ")
        g = r["ours_graph_us"]
        print(f"| {r['shape']} | {ours:.1f} | {percent_of_copy(nbytes, ours, copy_bw):.0f} % | "
              + "".join(c + " | " for c in cols)
              + f"{g:.1f} ({percent_of_copy(nbytes, g, copy_bw):.0f} %) | {max(errs):.1e} |")
    shown = peer_plan_us if isinstance(peer_plan_us, str) or peer_plan_us is None else f"{peer_plan_us:.1f} µs"
    print(f"plan() at B=128: host {plan_us:.1f} µs per call (one kernel launch; device time {plan_gpu:.1f} µs); "
          f"FlashInfer plan(): {shown}")

if __name__ == "__main__":
    main()
