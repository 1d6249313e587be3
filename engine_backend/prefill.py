"""Batch prefill / append attention: ragged queries over a paged BSR KV (or ragged new K/V).

Usage::

    pre = BatchPrefill(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16)
    pre.plan(BSR.from_block_table(block_table, seq_lens, 16, qo_indptr=query_start_loc))
    out = pre.run(q, k_cache, v_cache)

Query ``i`` of a request with ``q_len`` queries and ``kv_len`` keys sits at position
``kv_len - q_len + i``; with ``causal`` it sees keys up to that position (prefill when
``q_len == kv_len``, append/chunked prefill when the KV already holds a cached prefix).
Ragged K/V ``[tokens, H, D]``: ``BSR.from_ragged`` with ``k.unsqueeze(1)`` as the cache.

``plan`` launches a one-CTA kernel that lays out the query tiles (longest-running first), each
with its request's numbers, in a buffer this object owns; ``run`` launches one CTA per
(query tile, KV head) on a grid sized from the host-known token count, so it can be captured
in a CUDA graph and replayed for any batch of at most that many tokens.

Tile shape per plan: batches of long queries run on 64-key K/V tiles (fewer softmax steps per
key), short ones on 32-key tiles (less of each tile lies past the causal diagonal), both on CTAs
of 4 warps, two per SM. Two mainloops share the planner, loads, masks, softmax and epilogue: mma.sync
(sm80 and later) and, on Hopper (sm_90a), warpgroup MMAs (wgmma: S and P V of 64 rows per instruction,
operands straight from shared memory); ``TileShape.mainloop`` names it. Hopper plans run wgmma on
4 warps x 64 keys (two CTAs per SM) and, for long KV, 8 warps x 128 keys (one CTA per SM, P V of one
tile overlapping the next tile's softmax). ``plan(kv, num_tokens=..., num_kv_tokens=...)`` picks from
the host-known counts (the long shape if they are not given); both kernels are loaded when the
wrapper is made, so the first long batch does not wait for a JIT build. A CUDA graph replays the
kernel of the plan it was captured after, so plans before its replays must pick the same shape
(pass the same kind of count, or fix ``tile``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_plan_input, check_run_inputs, cuda_device, wrapper_args
from .format import BSR
from .kernels import jit, specs
from .support import check_supported
from .variants import DEFAULT, Variant


MAINLOOPS = ("mma", "wgmma")


@dataclass(frozen=True)
class TileShape:
    """A CTA's shape: ``warps`` of 32 packed query rows each (16 at head dim 256) against K/V tiles
    of ``kv_tile`` tokens, on the ``mainloop`` "mma" (mma.sync tensor cores, sm80 and later), or
    "wgmma" (Hopper warpgroup MMAs, sm_90a only: head dim 64 or 128, 64- or 128-key tiles; a group of
    4 warps owns 128 rows on 64-key tiles, 64 rows on 128-key tiles, whose scores take twice the registers)."""

    warps: int
    kv_tile: int
    mainloop: str = "mma"

    def __post_init__(self):
        if self.mainloop not in MAINLOOPS:
            raise ValueError(f"mainloop must be one of {MAINLOOPS}, got {self.mainloop!r}")
        if self.mainloop == "wgmma" and (self.warps % 4 or self.kv_tile not in (64, 128)):
            raise ValueError(f"a wgmma tile needs whole warpgroups and 64 or 128 keys, got {self}")


# The mma.sync shapes at head dim 128: long queries (and appends onto long caches) on 4 warps x 64 keys, two
# CTAs per SM, where fewer softmax steps per key pay; short ones on 4 warps x 32 keys, where less of each K/V
# tile lies past the causal diagonal. Other head dims keep the one shape tuned for them (tile_shapes).
_SHAPES = {128: (TileShape(4, 32), TileShape(4, 64))}
LONG_QUERY_TOKENS = 512  # mean query tokens per request from which a plan takes the long shape


# Hopper (sm_90a) at head dim 128 runs wgmma, ahead of the mma.sync shapes on every shape: 4 warps x 64 keys
# (128 rows per warpgroup, two CTAs per SM) by default; 8 warps x 128 keys (64 rows per warpgroup, three stages
# with P V overlapping the next softmax, one CTA per SM) where queries see long KV, which it streams faster;
# it loses on short requests.
_HOPPER_SHAPES = {128: (TileShape(4, 64, "wgmma"), TileShape(8, 128, "wgmma"))}
# Mean keys a query sees (KV per request less half its queries) from which a Hopper plan takes its long shape:
# where the long shape stops losing (scripts/prefill_switch_point.py times both around it). Prefills run as
# fast on either shape from 4096 tokens per request (2048 keys per query) up and faster on the short one
# below; 512-token appends run faster on the long shape from about 1536 cached tokens (1792) up.
HOPPER_LONG_KEYS_PER_QUERY = 1792


def tile_shapes(head_dim: int, arch: str | None = None) -> tuple[TileShape, TileShape]:
    """(short-query, long-query) tile shapes for ``head_dim`` on target ``arch`` (e.g. "90a"; None:
    the mma.sync shapes every sm80+ GPU runs); the same one twice where only one is tuned."""
    if arch == "90a" and head_dim in _HOPPER_SHAPES:
        return _HOPPER_SHAPES[head_dim]
    one = TileShape(4, 32 if head_dim == 256 else 64)
    return _SHAPES.get(head_dim, (one, one))


def check_tile(tile: TileShape, head_dim: int, arch: str) -> None:
    """Refuse, before any build, a tile shape the target cannot run."""
    if tile.mainloop != "wgmma":
        return
    if arch != "90a":
        raise ValueError(f"{tile} runs on Hopper only (target sm_90a), not on sm_{arch}")
    if head_dim not in (64, 128):
        raise ValueError(f"{tile} supports head dims 64 and 128, not {head_dim}")


def pick_tile(short: TileShape, long: TileShape, num_tokens: int | None, rows: int,
              num_kv_tokens: int | None = None) -> TileShape:
    """The tile shape a plan of ``num_tokens`` queries over ``rows`` requests (holding ``num_kv_tokens``
    keys, if known) runs. Unknown counts take the long shape, which loses less on short queries than the
    short shape loses on long ones. The Hopper pair goes by the keys a query sees (a prefill's query count
    stands in for its unknown KV count)."""
    if num_tokens is None:
        return long
    if short.mainloop == long.mainloop == "wgmma":
        kv = num_kv_tokens if num_kv_tokens is not None else num_tokens
        return long if kv - num_tokens / 2 >= HOPPER_LONG_KEYS_PER_QUERY * max(1, rows) else short
    return long if num_tokens >= LONG_QUERY_TOKENS * max(1, rows) else short


class BatchPrefill:
    def __init__(
        self,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        kv_dtype: torch.dtype | None = None,
        max_batch_size: int = 256,
        max_num_tokens: int = 16384,
        causal: bool = True,
        variant: Variant = DEFAULT,
        sm_scale: float | None = None,
        device: torch.device | str | None = None,
        tile: TileShape | None = None,
    ):
        """``tile`` fixes the CTA shape; by default each plan picks from ``tile_shapes(head_dim)``."""
        check_supported(
            num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
            kv_dtype=kv_dtype, page_size=page_size, variant=variant,
        )
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.page_size, self.dtype, self.variant, self.causal = page_size, dtype, variant, causal
        self.max_batch_size, self.max_num_tokens = max_batch_size, max_num_tokens
        self.sm_scale = wrapper_args(sm_scale=sm_scale, head_dim=head_dim, max_batch_size=max_batch_size,
                                     max_num_tokens=max_num_tokens)
        self.device = cuda_device(device)
        arch = jit.target_arch()
        self.short_tile, self.long_tile = (tile, tile) if tile else tile_shapes(head_dim, arch)
        for shape in (self.short_tile, self.long_tile):
            check_tile(shape, head_dim, arch)
        self._kernels = {shape: jit.load(specs.prefill_spec(dtype, head_dim, variant, shape))
                         for shape in (self.short_tile, self.long_tile)}
        self._tile_rows = {shape: int(ops.tile_rows()) for shape, ops in self._kernels.items()}
        self.group = num_qo_heads // num_kv_heads
        self.tile = self.short_tile  # the shape of the last plan
        self.max_tiles = max(self._tiles_bound(max_num_tokens, max_batch_size, shape) for shape in self._kernels)
        # The kernels' plan layout (prefill/params.h), the same for every tile shape.
        plan_ints = max(int(ops.plan_ints(self.max_tiles)) for ops in self._kernels.values())
        self._plan = torch.zeros(plan_ints, dtype=torch.int32, device=self.device)
        self._indices: torch.Tensor | None = None
        self._rows = 0

    def _tiles_bound(self, tokens: int, rows: int, shape: TileShape) -> int:
        """Most query tiles ``tokens`` queries over ``rows`` requests can need (each request
        rounds its own last tile up)."""
        return -(-tokens * self.group // self._tile_rows[shape]) + rows

    def plan(self, kv: BSR, *, num_tokens: int | None = None, num_kv_tokens: int | None = None) -> None:
        """Lay out the batch's query tiles. ``num_tokens``, the batch's query count as the caller
        knows it on the host (and ``num_kv_tokens``, its KV count), picks the tile shape (short
        queries: the short-query shape); without it the long-query shape runs."""
        check_plan_input(kv, max_batch_size=self.max_batch_size, page_size=self.page_size, device=self.device)
        self.tile = pick_tile(self.short_tile, self.long_tile, num_tokens, kv.num_rows, num_kv_tokens)
        self._kernels[self.tile].plan(kv.qo_indptr, kv.indptr, kv.kv_lens, self._plan, self.max_batch_size,
                                      self.max_tiles, self.group)
        self._indices, self._rows = kv.indices, kv.num_rows

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        out: torch.Tensor | None = None,
        *,
        return_lse: bool = False,
        alibi_slopes: torch.Tensor | None = None,
    ):
        """Attention of the packed queries ``q [tokens, Hq, D]``; returns ``out`` (and ``lse``)."""
        if self._indices is None:
            raise RuntimeError("BatchPrefill.run() called before plan()")
        hq, d = self.num_qo_heads, self.head_dim
        tokens = q.shape[0]
        if tokens > self.max_num_tokens:
            raise ValueError(f"{tokens} query tokens exceed max_num_tokens={self.max_num_tokens}")
        out, alibi = check_run_inputs(
            q, k_cache, v_cache, out, rows=tokens, heads=hq, kv_heads=self.num_kv_heads, head_dim=d,
            page_size=self.page_size, dtype=self.dtype, alibi=self.variant.alibi, alibi_slopes=alibi_slopes,
            device=self.device,
        )
        lse = torch.empty(tokens, hq, dtype=torch.float32, device=q.device) if return_lse else None
        launch_tiles = min(self._tiles_bound(tokens, self._rows, self.tile), self.max_tiles)
        self._kernels[self.tile].run(
            q, k_cache, v_cache, self._indices, self._plan, out, lse, alibi,
            self.max_tiles, launch_tiles, self.page_size, self.causal, self.sm_scale,
            self.variant.logits_soft_cap, self.variant.window_left,
        )
        return (out, lse) if return_lse else out
