"""Hopper: mma.sync 4 warps x 64 keys vs wgmma 8 warps x 128 keys around the plan's switch point
(prefill.WGMMA_KV_TOKENS), ragged causal prefills, bf16, Hq 32, Hkv 8, D 128; TFLOP/s as bench_prefill.

    python scripts/prefill_switch_point.py      # on an sm_90a GPU
"""
import sys, os
sys.path.insert(0, os.getcwd())
import torch
from benchmarks.bench_prefill import ragged, time_ours, tflops, HQ, D
from engine_backend import BSR
from engine_backend.prefill import TileShape
torch.manual_seed(0)
for b, length in [(16, 1024), (12, 1536), (8, 2048), (6, 3072), (4, 4096)]:
    q, k, v, indptr = ragged(b, length)
    bsr = BSR.from_ragged(indptr, q.shape[0])
    flops = 2 * b * HQ * D * length * length
    row = []
    for tile in (TileShape(4, 64), TileShape(8, 128, "wgmma")):
        t, out, _ = time_ours(q, k.unsqueeze(1), v.unsqueeze(1), bsr, 1, tile)
        row.append(f"{tile.mainloop} {tile.warps}w x {tile.kv_tile}: {tflops(flops, t.median_ms * 1e3):.0f}")
    print(f"{b}x{length}: " + "; ".join(row), flush=True)
