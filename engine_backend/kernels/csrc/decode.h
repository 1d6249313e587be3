// Host-side interface of the decode kernels (plain C++, no torch). decode_ops.cpp binds it.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "variant_params.h"

namespace eb {

// Work split written by the planning kernel, read by the attention kernel. All int32 device
// arrays owned by the Python wrapper, sized for `max_rows` requests and `ctas` CTAs per head tile.
//
// Cost model: request b costs kv_len'[b] + overhead "token units" (kv_len' = tokens actually
// read; a sliding window trims the rest). Requests are laid end to end in cost space, overhead
// first, and CTA c of every head tile takes the range [cta_start[c], cta_start[c+1]), about
// T/G each: long and short requests alike are cut so that every CTA streams the same amount of
// KV. A boundary that falls within a quarter share (on short shares, up to 256 tokens and under
// half a share) of a request boundary moves onto it, so a uniform batch is cut into equal pieces
// instead of leaving slivers of the next request. When k consecutive whole requests per CTA fit
// the grid with no group more than 256 tokens over a share, the CTAs take those groups instead
// and no request is cut (decode.cu, aligned_group). A request cut into several pieces has their
// partial states merged by the CTA that finishes last.
struct DecodePlan {
  int32_t* header;      // [4] rows, total cost T, CTAs used G, total pieces
  int32_t* cost_start;  // [max_rows + 1] start of request b in cost space
  int32_t* kv_begin;    // [max_rows] first KV token read
  int32_t* kv_len;      // [max_rows] KV tokens read
  int32_t* page_ptr;    // [max_rows] the BSR indptr entry of request b
  int32_t* cta_start;   // [ctas + 1] cost range of each CTA
  int32_t* first_row;   // [ctas] first request CTA c touches
  int32_t* first_seg;   // [ctas][5] CTA c's first segment holding tokens: request, lo, hi, kv_begin, page_ptr
                        // (request -1: none), so its first K/V loads need no per-request reads
  int32_t* first_cta;   // [max_rows] CTA holding the request's first token
  int32_t* pieces;      // [max_rows] CTAs the request is cut across
  int32_t* piece_base;  // [max_rows] first partial-state slot of a request cut into pieces
  int32_t* semaphores;  // [max_rows * head_tiles_total] pieces finished, reset by the last one
};

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

void decode_plan_launch(const int32_t* indptr, const int32_t* kv_lens, int rows, const DecodePlan& plan, int ctas,
                        int overhead, int window_left, int semaphores, cudaStream_t stream);
void decode_run_launch(const DecodeParams& params, cudaStream_t stream);
int decode_max_ctas_per_sm();

}  // namespace eb
