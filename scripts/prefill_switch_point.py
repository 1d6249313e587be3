"""Hopper: the plan's two wgmma shapes (prefill.tile_shapes(128, "90a")) around its switch point
(prefill.HOPPER_LONG_KEYS_PER_QUERY): ragged causal prefills, and 512-token appends onto cached KV (pages of 16),
bf16, Hq 32, Hkv 8, D 128; TFLOP/s as bench_prefill.

    python scripts/prefill_switch_point.py      # on an sm_90a GPU
"""
import os
import sys

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402

from benchmarks.bench_prefill import D, HQ, append_case, ragged, tflops, time_ours  # noqa: E402
from engine_backend import BSR  # noqa: E402
from engine_backend.prefill import tile_shapes  # noqa: E402


def prefill_case(b, length):
    q, k, v, indptr = ragged(b, length)
    return q, k.unsqueeze(1), v.unsqueeze(1), BSR.from_ragged(indptr, q.shape[0]), 1, 2 * b * HQ * D * length * length


def paged_append(b, new, cached, page=16):
    q, k, v, table, seq, qo = append_case(b, new, cached, page)
    flops = 4 * b * HQ * D * sum(cached + i + 1 for i in range(new))
    return q, k, v, BSR.from_block_table(table, seq, page, qo), page, flops


def main():
    torch.manual_seed(0)
    cases = [(f"{b}x{n}", prefill_case, (b, n)) for b, n in [(16, 1024), (8, 2048), (6, 3072), (4, 4096), (3, 6144),
                                                               (2, 8192)]]
    cases += [(f"append 8x512+{c}", paged_append, (8, 512, c)) for c in (1536, 3584, 7680)]
    for name, make, args in cases:
        q, k, v, bsr, page, flops = make(*args)
        row = []
        for tile in tile_shapes(D, "90a"):
            t, _, _ = time_ours(q, k, v, bsr, page, tile)
            row.append(f"{tile.mainloop} {tile.warps}w x {tile.kv_tile}: {tflops(flops, t.median_ms * 1e3):.0f}")
        print(f"{name} (KV/request {int(bsr.kv_lens[0])}): " + "; ".join(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
