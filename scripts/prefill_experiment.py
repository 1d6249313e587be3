"""Prefill tile shapes side by side: an experiment, not a test or a benchmark of record.

    python scripts/prefill_experiment.py --prebuild --arch 90a   # here: compile the variants
    python scripts/prefill_experiment.py --out DIR               # on the GPU

Each configuration is the same kernel source built with other compile-time choices
(EB_PREFILL_MMA_M: 16-row MMA tiles per warp; EB_PREFILL_SKIP_MASKED_KEYS: skip a warp's wholly
masked key chunks on diagonal tiles; EB_PREFILL_STAGES: K/V tiles in shared memory;
EB_PREFILL_RESCALE_SLACK: how far a row's max must grow before O is rescaled; EB_PREFILL_HW_DIVISION:
integer division by the group size, or multiply-high by its magic number; EB_PREFILL_STAGED_STORE: O through
shared memory) and tile shapes
(warps per CTA, KV tokens per tile), timed on bench_prefill's shapes; its output is compared with the
first configuration's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_prefill import APPEND, D, DTYPE, HKV, HQ, SHAPES, append_case, ragged, tflops  # noqa: E402
from benchmarks.timing import time_cuda  # noqa: E402
from engine_backend import BSR, prefill  # noqa: E402
from engine_backend.kernels import jit  # noqa: E402
from engine_backend.variants import DEFAULT  # noqa: E402

# name -> (tile shape, extra nvcc flags); the first is the reference the others' outputs are compared with
SHORT, LONG = prefill.tile_shapes(D)
CONFIGS = {
    "short": (SHORT, ()),
    "short-skip": (SHORT, ("-DEB_PREFILL_SKIP_MASKED_KEYS=1",)),
    "long": (LONG, ()),
    "long-skip": (LONG, ("-DEB_PREFILL_SKIP_MASKED_KEYS=1",)),
    "long-s3": (LONG, ("-DEB_PREFILL_STAGES=3",)),  # a third K/V stage, at one CTA per SM
    # 8 warps x 64 keys, the long-query shape until the fourteenth session (one CTA per SM).
    "8w-kv64": (prefill.TileShape(8, 64), ()),
    # The running max moves on every increase (the twelfth session's kernel) instead of past a slack of 8.
    "short-slack0": (SHORT, ("-DEB_PREFILL_RESCALE_SLACK=0",)),
    "long-slack0": (LONG, ("-DEB_PREFILL_RESCALE_SLACK=0",)),
    # Integer division by the group size instead of multiply-high by its magic number.
    "short-div": (SHORT, ("-DEB_PREFILL_HW_DIVISION=1",)),
    "long-div": (LONG, ("-DEB_PREFILL_HW_DIVISION=1",)),
    # Row sums by an MMA against ones on 32-key tiles too; by FP32 adds (the fourteenth session's kernel) on
    # 64-key tiles.
    "short-mmasum": (SHORT, ("-DEB_PREFILL_MMA_ROWSUM=1",)),
    "long-addsum": (LONG, ("-DEB_PREFILL_MMA_ROWSUM=0",)),
    "short-again": (SHORT, ()),  # run-to-run noise: the same build timed again
    # The Hopper mainloop (warpgroup MMAs, sm_90a): warps (whole warpgroups) x keys per tile; three stages and
    # tile j's P V overlapping tile j + 1's softmax where they fit, or serial (one tile's S, softmax, P V).
    "wg-4w-64": (prefill.TileShape(4, 64, "wgmma"), ()),
    "wg-8w-64": (prefill.TileShape(8, 64, "wgmma"), ()),
    "wg-8w-128": (prefill.TileShape(8, 128, "wgmma"), ()),
    "wg-4w-128": (prefill.TileShape(4, 128, "wgmma"), ()),  # two stages: serial
    "wg-8w-128-serial": (prefill.TileShape(8, 128, "wgmma"), ("-DEB_PREFILL_WG_OVERLAP=0",)),
    "wg-8w-128-s2": (prefill.TileShape(8, 128, "wgmma"), ("-DEB_PREFILL_STAGES=2",)),
    # One 64-row block per warpgroup on 64-key tiles (the sixteenth session's shape; two blocks since).
    "wg-4w-64-m1": (prefill.TileShape(4, 64, "wgmma"), ("-DEB_PREFILL_MMA_M=1",)),
    # Two blocks with three stages and the overlap, one CTA per SM (spills).
    "wg-4w-64-s3": (prefill.TileShape(4, 64, "wgmma"), ("-DEB_PREFILL_STAGES=3",)),
    # O through shared memory as whole 16-byte chunks per row (EB_PREFILL_STAGED_STORE, wgmma's default) or stored
    # straight from the accumulators as 4-byte pairs (mma.sync's default).
    "long-staged": (LONG, ("-DEB_PREFILL_STAGED_STORE=1",)),
    "wg-4w-64-direct": (prefill.TileShape(4, 64, "wgmma"), ("-DEB_PREFILL_STAGED_STORE=0",)),
    "wg-8w-128-direct": (prefill.TileShape(8, 128, "wgmma"), ("-DEB_PREFILL_STAGED_STORE=0",)),
}
_default_spec = prefill.kernel_spec


def spec(tile: prefill.TileShape, flags) -> jit.KernelSpec:
    base = _default_spec(DTYPE, D, DEFAULT, tile)
    return jit.KernelSpec.make(base.name, base.sources, dict(base.params), cuda_flags=flags)


def make_prefill(tile: prefill.TileShape, flags, page_size: int, rows: int, tokens: int) -> prefill.BatchPrefill:
    original = prefill.kernel_spec
    prefill.kernel_spec = lambda dtype, dim, variant, _tile=None: spec(tile, flags)
    try:
        return prefill.BatchPrefill(HQ, HKV, D, page_size, dtype=DTYPE, max_batch_size=rows, max_num_tokens=tokens,
                                    tile=tile)
    finally:
        prefill.kernel_spec = original


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
    parser.add_argument("--configs", help="comma-separated names of CONFIGS to run (default: all); the first is the reference")
    args = parser.parse_args()
    configs = {name: CONFIGS[name] for name in args.configs.split(",")} if args.configs else CONFIGS
    if args.prebuild:
        for tile, flags in configs.values():
            print(jit.build(spec(tile, flags), args.arch))
        return
    torch.manual_seed(0)
    rows = []
    for name, flops, page, b, q, k, v, bsr in cases():
        row = {"shape": name, "flops": flops}
        ref = None
        for cfg, (tile, flags) in configs.items():
            pre = make_prefill(tile, flags, page, b, q.shape[0])
            pre.plan(bsr)
            out = torch.empty_like(q)
            us = time_cuda(lambda: pre.run(q, k, v, out=out)).median_ms * 1e3
            ref = out.clone() if ref is None else ref
            row[cfg] = {"us": us, "tflops": tflops(flops, us), "rel_vs_default": rel(out, ref)}
            print(f"{name:22s} {cfg:8s} {us:9.1f} us {tflops(flops, us):6.0f} TFLOP/s  vs default {rel(out, ref):.1e}",
                  flush=True)
        rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "prefill_experiment.json").write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
