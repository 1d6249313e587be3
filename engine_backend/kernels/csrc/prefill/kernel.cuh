// Prefill / append attention: ragged queries over a paged BSR KV (ragged K/V is the page-size-1 case),
// FlashAttention-2 style on tensor cores, causal mask aligned to the end of each request's KV, GQA heads
// packed into the query tile.
//
// One CTA computes one query tile (kM packed rows = tokens x query heads of one KV head) against all the KV
// it may see, streaming K/V tiles of kN tokens through a cp.async pipeline (pipeline.cuh). This skeleton owns
// the tile scheduling (tile.cuh), the loads, the masks, the online softmax (softmax.cuh) and the epilogue
// (epilogue.cuh); the mainloop (Kc::Mainloop: mainloop_sm80.cuh or mainloop_sm90.cuh) owns the shared-memory
// and accumulator layouts and the MMAs over the K/V tiles. A mainloop provides:
//   smem_offset<kRows>(r, c)  byte offset of 16-byte chunk c of row r in a tile of kRows rows
//   lane_row(warp, lane, r)   the tile row of the lane's accumulator row r
//   QOperand                  what the warp's MMAs read Q from (init(shared address of the Q tile, warp, lane))
//   fence_loaded()            makes landed cp.async data visible to its MMAs (before the barrier)
//   attend_tile<kMask>(...)   S, softmax and P V of one K/V tile
//   run(kv, ...)              the loop over the K/V tiles (attend_serially, or its own schedule)
// Kc: a KernelConfig (traits.cuh).
#pragma once
#include "epilogue.cuh"
#include "mainloop_sm80.cuh"
#include "mainloop_sm90.cuh"
#include "pipeline.cuh"
#include "traits.cuh"

namespace eb::prefill {

// One CTA per (query tile, KV head).
template <class Kc>
__global__ void __launch_bounds__(Kc::kThreads, Kc::kMinBlocks) attention_kernel(const PrefillParams p) {
  using Mainloop = typename Kc::Mainloop;
  constexpr int kStages = Kc::kStages;
  extern __shared__ __align__(1024) uint8_t smem[];  // tiles start at multiples of their row size (swizzle_step)
  const int t = div_by<Kc>(p.kv_heads, blockIdx.x);
  const int kv_head = blockIdx.x - t * p.num_kv_heads;
  const int4 req = p.plan.tile[t];
  const int tile_idx = p.plan.tile_idx[t];
  if (t >= p.plan.header[1]) return;
  const Divisor& group = p.group;
  const Tile tl = tile_of<Kc>(p, req, tile_idx, group);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint8_t* sq = smem;
  KvPipeline<Kc> kv(p, tl, smem, kv_head);

  // Prologue: tiles 0 .. kStages-2 in flight, the page ids of tile kStages-1 in a register.
  int first_pages[kStages - 1];
  kv.read_first_page_ids(first_pages);
  issue_q<Kc>(p, tl, sq, kv_head, group);
  cp_async_commit();
  kv.issue_first_tiles(first_pages);

  const LaneRows<Kc> lr = lane_rows<Kc>(p, tl, kv_head, group, warp, lane);

  cp_async_wait<kStages - 1>();  // Q has landed
  __syncthreads();  // ... and every thread is done reading the prologue's page-id slots
  kv.store_page_ids(kStages - 2);
  typename Mainloop::QOperand q;
  q.init(smem_addr(sq), warp, lane);

  OAccum<Kc> o;
  RowVals<Kc> m, l;
  zero_state<Kc>(o, m, l);
  const KeyBounds<Kc> kb(p, tl, group, warp);
  Mainloop::run(kv, p, tl, lr, kb, q, o, m, l, lane);
  cp_async_wait<0>();
  store_rows<Kc>(p, tl, lr, o, m, l, group, kv_head, warp, lane, sq);
}

}  // namespace eb::prefill
