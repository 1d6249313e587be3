"""Prefill tile shapes side by side, shipped or not: an experiment, not a test or a benchmark of record.

    python experiments/prefill/tile_shapes.py --prebuild --arch 90a   # without a GPU: compile the shapes
    python experiments/prefill/tile_shapes.py --out DIR               # on the GPU

Each configuration is one tile shape (``prefill.TileShape``: warps per CTA, KV tokens per tile, mainloop),
the kernel's template parameters; every other choice follows from it (kernels/csrc/prefill/traits.cuh).
Timed on bench_prefill's shapes; each output is compared with the first configuration's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.bench_prefill import APPEND, D, DTYPE, HKV, HQ, SHAPES, append_case, ragged, tflops  # noqa: E402
from benchmarks.timing import time_cuda  # noqa: E402
from engine_backend import BSR, prefill  # noqa: E402
from engine_backend.kernels import jit, specs  # noqa: E402
from engine_backend.variants import DEFAULT  # noqa: E402

SHORT, LONG = prefill.tile_shapes(D)
# name -> tile shape; the first is the reference the others' outputs are compared with
CONFIGS = {
    "short": SHORT,
    "long": LONG,
    "8w-kv64": prefill.TileShape(8, 64),  # one CTA per SM
    "short-again": SHORT,  # run-to-run noise: the same build timed again
    # The Hopper mainloop (warpgroup MMAs, sm_90a): whole warpgroups x keys per tile.
    "wg-4w-64": prefill.TileShape(4, 64, "wgmma"),
    "wg-8w-64": prefill.TileShape(8, 64, "wgmma"),
    "wg-8w-128": prefill.TileShape(8, 128, "wgmma"),
    "wg-4w-128": prefill.TileShape(4, 128, "wgmma"),
}


def make_prefill(tile: prefill.TileShape, page_size: int, rows: int, tokens: int) -> prefill.BatchPrefill:
    return prefill.BatchPrefill(HQ, HKV, D, page_size, dtype=DTYPE, max_batch_size=rows, max_num_tokens=tokens,
                                tile=tile)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def cases():
    for b, length in SHAPES:
        q, k, v, indptr = ragged(b, length)
        total = q.shape[0]
        yield f"{b}x{length}", 2 * b * HQ * D * length * length, 1, b, q, k.unsqueeze(1), v.unsqueeze(1), \
            BSR.from_ragged(indptr, total)
    q, k, v, table, seq, qo = append_case()
    b, new, cached, page = APPEND
    flops = 4 * b * HQ * D * sum(cached + i + 1 for i in range(new))
    yield f"append {b}x{new}+{cached}", flops, page, b, q, k, v, BSR.from_block_table(table, seq, page, qo)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prebuild", action="store_true")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--configs",
                        help="comma-separated names of CONFIGS to run (default: all); the first is the reference")
    args = parser.parse_args()
    configs = {name: CONFIGS[name] for name in args.configs.split(",")} if args.configs else CONFIGS
    if args.prebuild:
        for tile in dict.fromkeys(configs.values()):
            print(jit.build(specs.prefill_spec(DTYPE, D, DEFAULT, tile), args.arch))
        return
    torch.manual_seed(0)
    rows = []
    for name, flops, page, b, q, k, v, bsr in cases():
        row = {"shape": name, "flops": flops}
        ref = None
        for cfg, tile in configs.items():
            pre = make_prefill(tile, page, b, q.shape[0])
            pre.plan(bsr)
            out = torch.empty_like(q)
            us = time_cuda(lambda: pre.run(q, k, v, out=out)).median_ms * 1e3
            ref = out.clone() if ref is None else ref
            row[cfg] = {"us": us, "tflops": tflops(flops, us), "rel_vs_default": rel(out, ref)}
            print(f"{name:22s} {cfg:12s} {us:9.1f} us {tflops(flops, us):6.0f} TFLOP/s  vs first {rel(out, ref):.1e}",
                  flush=True)
        rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "prefill_tile_shapes.json").write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
