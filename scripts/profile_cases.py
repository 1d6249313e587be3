"""Kernel launches to profile with ncu: python scripts/profile_cases.py decode | prefill [B L [WARPS KV_TILE]] | prefill-fa2 [B L].

``prefill`` plans with the batch's token count, as the engines do (so the tile shape is the plan's choice, unless
WARPS and KV_TILE name one);
``prefill-fa2`` runs FlashInfer's fa2 ragged prefill on the same shape (benchmarks/peers.py)."""
import sys, torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from engine_backend import BSR
from engine_backend.decode import BatchDecode
from engine_backend.prefill import BatchPrefill, TileShape
from bench_decode import make_batch
which = sys.argv[1]
if which == "decode":
    q, k, v, table, seq = make_batch([1024] * 16)
    dec = BatchDecode(32, 8, 128, 16, max_batch_size=256); dec.plan(BSR.from_block_table(table, seq, 16))
    for _ in range(3): dec.run(q, k, v)
else:  # prefill / prefill-fa2 [B L]: B requests of L tokens, ragged causal
    b, length = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (1, 8192)
    t = b * length
    q = torch.randn(t, 32, 128, dtype=torch.bfloat16, device="cuda"); k = torch.randn(t, 8, 128, dtype=torch.bfloat16, device="cuda"); v = torch.randn_like(k)
    indptr = torch.arange(0, t + 1, length, dtype=torch.int32, device="cuda")
    if which == "prefill-fa2":
        import peers
        peer = peers.flashinfer_ragged_prefill_peer(q, k, v, indptr, indptr, backend="fa2")
        for _ in range(3): peer.run()
    else:
        tile = TileShape(int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else None
        pre = BatchPrefill(32, 8, 128, 1, max_batch_size=b, max_num_tokens=t, tile=tile)
        pre.plan(BSR.from_ragged(indptr, t), num_tokens=t)
        for _ in range(3): pre.run(q, k.unsqueeze(1), v.unsqueeze(1))
torch.cuda.synchronize()
