// Host-side interface of the decode kernels (plain C++, no torch): the launch parameters, the
// work plan and the layout of its buffer, and the entry points decode.cu defines for decode_ops.cpp.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "../variant_params.h"

#ifdef __CUDACC__
#define EB_HOST_DEVICE __host__ __device__
#else
#define EB_HOST_DEVICE
#endif

namespace eb {

// Fields of DecodePlan::first_seg per CTA: request (-1: none), lo, hi, kv_begin, page_ptr.
constexpr int kFirstSegFields = 5;

// Work split written by the planning kernel, read by the attention kernel (cost model: see
// decode/planner.cuh). All int32 device arrays carved out of one buffer owned by the Python
// wrapper, sized for `max_rows` requests and `ctas` CTAs per head tile (decode_plan_layout).
struct DecodePlan {
  int32_t* header;      // [4] rows, total cost T, CTAs used G, total pieces
  int32_t* cost_start;  // [max_rows + 1] start of request b in cost space
  int32_t* kv_begin;    // [max_rows] first KV token read
  int32_t* kv_len;      // [max_rows] KV tokens read
  int32_t* page_ptr;    // [max_rows] the BSR indptr entry of request b
  int32_t* cta_start;   // [ctas + 1] cost range of each CTA
  int32_t* first_row;   // [ctas] first request CTA c touches
  int32_t* first_seg;   // [ctas][kFirstSegFields] CTA c's first segment holding tokens: request, lo, hi,
                        // kv_begin, page_ptr (request -1: none), so its first K/V loads need no per-request reads
  int32_t* first_cta;   // [max_rows] CTA holding the request's first token
  int32_t* pieces;      // [max_rows] CTAs the request is cut across
  int32_t* piece_base;  // [max_rows] first partial-state slot of a request cut into pieces
  int32_t* semaphores;  // [max_rows * head_tiles_total] pieces finished, reset by the last one
};

// The one definition of the plan buffer's layout: DecodePlan's arrays one after another, in its order.
// Returns the buffer's size in int32s; with `plan` and `base` given, also points plan's arrays into the
// buffer starting at `base`.
EB_HOST_DEVICE inline int64_t decode_plan_layout(int64_t max_rows, int64_t ctas, int64_t head_tiles_total,
                                                 DecodePlan* plan = nullptr, int32_t* base = nullptr) {
  DecodePlan unused{};
  DecodePlan& p = plan ? *plan : unused;
  int64_t n = 0;
  auto take = [&](int32_t*& array, int64_t count) {
    array = base ? base + n : nullptr;
    n += count;
  };
  take(p.header, 4);
  take(p.cost_start, max_rows + 1);
  take(p.kv_begin, max_rows);
  take(p.kv_len, max_rows);
  take(p.page_ptr, max_rows);
  take(p.cta_start, ctas + 1);
  take(p.first_row, ctas);
  take(p.first_seg, kFirstSegFields * ctas);
  take(p.first_cta, max_rows);
  take(p.pieces, max_rows);
  take(p.piece_base, max_rows);
  take(p.semaphores, max_rows * head_tiles_total);
  return n;
}

// Size of the plan buffer in int32s (the op `plan_ints` reports it to the Python wrapper).
EB_HOST_DEVICE inline int64_t decode_plan_ints(int64_t max_rows, int64_t ctas, int64_t head_tiles_total) {
  return decode_plan_layout(max_rows, ctas, head_tiles_total);
}

struct DecodeParams {
  const void* q;  // [rows, Hq, D]
  int64_t q_stride_n, q_stride_h;
  const void* k;  // paged: element (page, token, head, d) at page*s_page + token*s_tok + head*s_head + d
  const void* v;
  int64_t k_stride_page, k_stride_tok, k_stride_head;
  int64_t v_stride_page, v_stride_tok, v_stride_head;
  const int32_t* indices;  // BSR page ids
  int log2_page;
  void* out;  // [rows, Hq, D]
  int64_t out_stride_n, out_stride_h;
  float* lse;  // [rows, Hq] natural log, or null
  int64_t lse_stride_n;
  float* work_o;    // [pieces, Hq, D] partial outputs (normalised)
  float* work_lse;  // [pieces, Hq] partial log2-sum-exp
  DecodePlan plan;
  int num_qo_heads, num_kv_heads, head_tiles;  // head_tiles = ceil(group / 16) per KV head
  int ctas;                                    // CTAs per head tile (grid.x)
  int overhead;                                // cost of a request beyond its tokens
  VariantParams variant;
};

// Defined by decode.cu for the element type, head dim and variant of its build.
void decode_plan_launch(const int32_t* indptr, const int32_t* kv_lens, int rows, const DecodePlan& plan, int ctas,
                        int overhead, int window_left, int semaphores, cudaStream_t stream);
void decode_run_launch(const DecodeParams& params, cudaStream_t stream);
int decode_max_ctas_per_sm();

}  // namespace eb
