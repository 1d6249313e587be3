// Prefill planning: one CTA reads the batch's query and KV lengths on the device and writes the PrefillPlan
// the attention kernel follows (so planning never waits for the device and a CUDA graph can replay it): each
// request's query tiles of kTileRows packed rows, every tile with its request's numbers.
#pragma once
#include "../carried_scan.cuh"
#include "params.h"

namespace eb::prefill {

// Threads of the one planning CTA: requests are scanned kPlanThreads at a time.
constexpr int kPlanThreads = 1024;
using PlanScan = CarriedScan<kPlanThreads>;

template <int kTileRows>
__global__ void __launch_bounds__(kPlanThreads) plan_kernel(const int32_t* __restrict__ qo_indptr,
                                                            const int32_t* __restrict__ indptr,
                                                            const int32_t* __restrict__ kv_lens, int rows,
                                                            PrefillPlan plan, int group, int max_tiles) {
  __shared__ typename PlanScan::TempStorage scan;
  __shared__ int carry;
  PlanScan tiles_before(scan, carry);
  const int tid = threadIdx.x;
  for (int base = 0; base < rows; base += kPlanThreads) {
    const int b = base + tid;
    int tiles = 0;
    int4 req;
    if (b < rows) {
      req = make_int4(qo_indptr[b], qo_indptr[b + 1] - qo_indptr[b], kv_lens[b], indptr[b]);
      tiles = (req.y * group + kTileRows - 1) / kTileRows;
    }
    int total;
    const int first = tiles_before.exclusive_sum(tiles, total);
    // The last tile of a request sees the most KV under a causal mask: schedule it first.
    for (int i = 0; i < tiles && first + i < max_tiles; ++i) {
      plan.tile[first + i] = req;
      plan.tile_idx[first + i] = tiles - 1 - i;
    }
    tiles_before.next_round(total);
  }
  if (tid == 0) {
    plan.header[0] = rows;
    plan.header[1] = min(carry, max_tiles);
  }
}

}  // namespace eb::prefill
