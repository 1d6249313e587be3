"""Random paged-KV batches for kernel tests: fresh random data every call, pages scattered
over a pool larger than needed, so wrong indexing reads the wrong (random, non-zero) data."""

from __future__ import annotations

import torch

from engine_backend.format import BSR


def scattered_block_table(kv_lens: list[int], page_size: int, spare_pages: int = 7, gen=None):
    """Block table [B, max_pages] over a shuffled pool; pad entries point at spare pages."""
    need = [-(-n // page_size) for n in kv_lens]
    pool = sum(need) + spare_pages
    perm = torch.randperm(pool, generator=gen)
    width = max(max(need, default=0), 1) + 1  # one padding column: rows list more pages than they use
    table = torch.full((len(kv_lens), width), pool - 1, dtype=torch.int32)
    at = 0
    for r, n in enumerate(need):
        table[r, :n] = perm[at : at + n].to(torch.int32)
        at += n
    return table, pool


def layout_kv(pool: int, page_size: int, heads: int, dim: int, dtype, layout: str, device="cuda"):
    """K and V caches as the views each engine hands us (see engine_backend.checks)."""
    shape = (pool, page_size, heads, dim)
    if layout == "vllm":  # [2, pages, P, H, D]
        kv = torch.randn(2, *shape, dtype=dtype, device=device)
        return kv[0], kv[1]
    if layout == "flashinfer":  # [pages, 2, P, H, D]
        kv = torch.randn(pool, 2, page_size, heads, dim, dtype=dtype, device=device)
        return kv[:, 0], kv[:, 1]
    if layout == "hnd":  # [pages, H, P, D] seen through a permuted view
        k = torch.randn(pool, heads, page_size, dim, dtype=dtype, device=device).transpose(1, 2)
        v = torch.randn(pool, heads, page_size, dim, dtype=dtype, device=device).transpose(1, 2)
        return k, v
    if layout == "sglang":  # per-layer [slots, H, D], one token per page
        assert page_size == 1
        return (torch.randn(pool, heads, dim, dtype=dtype, device=device).unsqueeze(1),
                torch.randn(pool, heads, dim, dtype=dtype, device=device).unsqueeze(1))
    raise ValueError(layout)


def decode_batch(kv_lens, page_size, hq, hkv, dim, dtype, layout="vllm", device="cuda"):
    table, pool = scattered_block_table(kv_lens, page_size)
    k, v = layout_kv(pool, page_size, hkv, dim, dtype, layout, device)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    bsr = BSR.from_block_table(table.to(device), lens.to(device), page_size)
    q = torch.randn(len(kv_lens), hq, dim, dtype=dtype, device=device)
    return q, k, v, bsr


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-6))


# bf16 rounds the output and the softmax probabilities (8 bits of mantissa): relative L2
# error of a few 1e-3; fp16 has 3 more bits.
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3}
