// Host-side interface of the prefill / append kernels (plain C++, no torch): the launch parameters, the
// work plan and the layout of its buffer, and the entry points prefill.cu defines for prefill_ops.cpp.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "../variant_params.h"

namespace eb {

// Written by the planning kernel from the BSR, read by the attention kernel; int32 device
// arrays owned by the Python wrapper. The work is one CTA per (query tile, KV head); query
// tiles pack (token, query head of the KV head's group) pairs, token-major, so every K/V tile
// loaded serves all query heads of its group. Each tile carries its request's numbers, so a CTA
// reads them in one load rather than through a tile -> request indirection.
struct PrefillPlan {
  int32_t* header;    // [2] rows, query tiles (4 ints reserved, so the int4 records start 16-byte aligned)
  int4* tile;         // [max_tiles] {first query, query count, KV length, first page index} of its request
  int32_t* tile_idx;  // [max_tiles] index of the tile within its request
};

// The one definition of the plan buffer's layout, in int32s: header, tile records, tile indices.
constexpr int64_t kPrefillPlanHeader = 4;
constexpr int64_t prefill_plan_ints(int64_t max_tiles) { return kPrefillPlanHeader + 5 * max_tiles; }

// The plan's arrays inside a buffer of at least prefill_plan_ints(max_tiles) int32s starting at `base`
// (16-byte aligned).
inline PrefillPlan prefill_plan_at(int32_t* base, int64_t max_tiles) {
  PrefillPlan plan;
  plan.header = base;
  plan.tile = reinterpret_cast<int4*>(base + kPrefillPlanHeader);
  plan.tile_idx = base + kPrefillPlanHeader + 4 * max_tiles;
  return plan;
}

// A divisor fixed per launch, with its magic number: n / d as one multiply-high, an add and a shift on the
// device (prefill/tile.cuh's div_by) instead of the ~20-instruction integer division sequence, for
// 0 <= n < 2^31. Granlund & Montgomery's round-up method: shift = ceil(log2 d),
// magic = floor(2^32 (2^shift - d) / d) + 1.
struct Divisor {
  uint32_t d, magic, shift;
};
inline Divisor make_divisor(uint32_t d) {
  uint32_t shift = 0;
  while ((uint64_t(1) << shift) < d) ++shift;
  const uint64_t magic = ((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1;
  return Divisor{d, static_cast<uint32_t>(magic), shift};
}

struct PrefillParams {
  const void* q;  // [tokens, Hq, D]
  int64_t q_stride_n, q_stride_h;
  const void* k;
  const void* v;
  int64_t k_stride_page, k_stride_tok, k_stride_head;
  int64_t v_stride_page, v_stride_tok, v_stride_head;
  const int32_t* indices;
  int log2_page;
  void* out;
  int64_t out_stride_n, out_stride_h;
  float* lse;  // [tokens, Hq] natural log, or null
  int64_t lse_stride_n;
  PrefillPlan plan;
  int num_qo_heads, num_kv_heads;
  Divisor group, kv_heads;  // query heads per KV head, and KV heads; set by prefill_run_launch
  int max_tiles;  // grid = max_tiles * num_kv_heads
  bool causal;
  VariantParams variant;
};

// Defined by each build's prefill.cu for its one specialization.
int prefill_tile_rows();  // query rows (token x head pairs) per tile
void prefill_plan_launch(const int32_t* qo_indptr, const int32_t* indptr, const int32_t* kv_lens, int rows,
                         const PrefillPlan& plan, int group, int max_tiles, cudaStream_t stream);
void prefill_run_launch(const PrefillParams& params, cudaStream_t stream);

}  // namespace eb
