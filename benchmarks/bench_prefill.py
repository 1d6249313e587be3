"""Prefill benchmark: ours vs FlashInfer's BatchPrefillWithRaggedKVCacheWrapper (fa2, fa3) and torch
SDPA (flash, cuDNN) on the same inputs, in one run, plus the measured bf16 GEMM rate; and an
append case (8 requests x 512 new tokens onto 8192 cached, paged) vs FlashInfer's paged prefill.

    python benchmarks/bench_prefill.py [--no-peer] [--tiles] [--out results.json]

"ours" is BatchPrefill as the engines run it: the plan picks its tile shape from the query count.
``--tiles`` also times the short- and long-query shapes fixed, on every case (on Hopper those of both
mainloops: "short"/"long" are the arch's, "mma_short"/"mma_long" the mma.sync ones every sm80+ GPU runs).

Causal FLOPs (issue #3 convention): 2 * B * Hq * D * L^2 for a batch of B requests of L tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ceilings import gemm_rate  # noqa: E402
from benchmarks.timing import time_cuda  # noqa: E402
from engine_backend import BSR  # noqa: E402
from engine_backend.kernels import jit  # noqa: E402
from engine_backend.prefill import BatchPrefill, tile_shapes  # noqa: E402

HQ, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16
SHAPES = [(1, 8192), (4, 4096), (16, 1024), (64, 256)]
APPEND = (8, 512, 8192, 16)  # requests, new tokens, cached tokens, page size


def ragged(b, length):
    total = b * length
    q = torch.randn(total, HQ, D, dtype=DTYPE, device="cuda")
    k = torch.randn(total, HKV, D, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    indptr = torch.arange(0, total + 1, length, dtype=torch.int32, device="cuda")
    return q, k, v, indptr


def time_ours(q, k, v, bsr, page, tile=None):
    """(timing, output, tile shape the plan ran) of our prefill; ``tile`` fixes the shape."""
    pre = BatchPrefill(HQ, HKV, D, page, dtype=DTYPE, max_batch_size=bsr.num_rows, max_num_tokens=q.shape[0],
                       tile=tile)
    pre.plan(bsr, num_tokens=q.shape[0], num_kv_tokens=int(bsr.kv_lens.sum()))  # both known on the host
    out = torch.empty_like(q)
    return time_cuda(lambda: pre.run(q, k, v, out=out)), out, pre.tile


def ours_variants(q, k, v, bsr, page, with_tiles: bool) -> tuple[dict, torch.Tensor]:
    """Microseconds of ours (the plan's choice) and, with_tiles, of each fixed shape; and our output."""
    t, out, tile = time_ours(q, k, v, bsr, page)
    result = {"ours_us": t.median_ms * 1e3, "ours_tile": f"{tile.warps} warps x {tile.kv_tile} keys, {tile.mainloop}"}
    if with_tiles:
        arch = jit.target_arch()
        shapes = dict(zip(("short", "long"), tile_shapes(D, arch)))
        if tile_shapes(D, arch) != tile_shapes(D):
            shapes.update(zip(("mma_short", "mma_long"), tile_shapes(D)))
        for name, shape in shapes.items():
            result[f"ours_{name}_us"] = time_ours(q, k, v, bsr, page, shape)[0].median_ms * 1e3
    return result, out


def append_case(b=APPEND[0], new=APPEND[1], cached=APPEND[2], page=APPEND[3]):
    """Paged K/V of ``b`` requests with ``cached`` tokens each plus ``new`` (already written), pages scattered;
    their queries: (q, k_cache, v_cache, block table, seq lens, qo_indptr)."""
    kv_len = cached + new
    pages = b * (-(-kv_len // page))
    kv = torch.randn(2, pages, page, HKV, D, dtype=DTYPE, device="cuda")
    table = torch.randperm(pages, device="cuda").to(torch.int32).view(b, -1)
    seq = torch.full((b,), kv_len, dtype=torch.int32, device="cuda")
    qo = torch.arange(0, b * new + 1, new, dtype=torch.int32, device="cuda")
    q = torch.randn(b * new, HQ, D, dtype=DTYPE, device="cuda")
    return q, kv[0], kv[1], table, seq, qo


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--tiles", action="store_true", help="also time each tile shape fixed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    gemm = gemm_rate()
    rows = []
    for b, length in SHAPES:
        q, k, v, indptr = ragged(b, length)
        flops = 2 * b * HQ * D * length * length
        row = {"shape": f"{b}x{length}", "flops": flops}
        ours, ref = ours_variants(q, k.unsqueeze(1), v.unsqueeze(1), BSR.from_ragged(indptr, q.shape[0]), 1, args.tiles)
        row.update(ours)
        if not args.no_peer:
            from benchmarks import peers

            for name, fn in peers.prefill_peers().items():
                try:
                    t, out = fn(q, k, v, indptr)
                    row[f"{name}_us"] = t.median_ms * 1e3
                    row[f"{name}_rel_diff"] = float((out.float() - ref.float()).norm() / out.float().norm())
                except Exception as e:  # noqa: BLE001 - a missing peer must not hide our numbers
                    row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:160]
        rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    q, k, v, table, seq, qo = append_case()
    b, new, cached, page = APPEND
    flops = 4 * b * HQ * D * sum(cached + i + 1 for i in range(new))  # each query sees its causal prefix
    append = {"shape": f"append {b}x{new} onto {cached}", "flops": flops}
    ours, out = ours_variants(q, k, v, BSR.from_block_table(table, seq, page, qo), page, args.tiles)
    append.update(ours)
    if not args.no_peer:
        from benchmarks import peers

        for backend in peers.FLASHINFER_BACKENDS:
            try:
                pt, pout = peers.flashinfer_paged_prefill(q, k, v, table, seq, qo, page, backend=backend)
                append[f"flashinfer_{backend}_us"] = pt.median_ms * 1e3
                append[f"flashinfer_{backend}_rel_diff"] = float((out.float() - pout.float()).norm() / pout.float().norm())
            except Exception as e:  # noqa: BLE001
                append[f"flashinfer_{backend}_error"] = f"{type(e).__name__}: {e}"[:160]
    print_tables(rows, append, gemm)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "gemm_flops": gemm, "rows": rows,
                                        "append": append}, indent=2))


def tflops(flops, us):
    return flops / (us * 1e-6) / 1e12


def print_tables(rows, append, gemm) -> None:
    print(f"device: {torch.cuda.get_device_name()}  bf16 GEMM: {gemm / 1e12:.0f} TFLOP/s")
    cols = [c[:-3] for c in rows[0] if c.endswith("_us")]
    print("| shape | " + " | ".join(f"{c} TFLOP/s" for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            us = r.get(f"{c}_us")
            cells.append(f"{tflops(r['flops'], us):.0f} ({100 * tflops(r['flops'], us) * 1e12 / gemm:.0f} %)" if us else "n/a")
        print(f"| {r['shape']} | " + " | ".join(cells) + " |")
    for r in rows:
        for key, val in r.items():
            if key.endswith(("_error", "_rel_diff", "_tile")):
                print(f"  {r['shape']} {key}: {val}")
    print(f"append: {append}")
    timed = [(key[:-3], us) for key, us in append.items() if key.endswith("_us")]
    print("append (µs, TFLOP/s): " + "; ".join(f"{name} {us:.1f} ({tflops(append['flops'], us):.0f})" for name, us in timed))


if __name__ == "__main__":
    main()
