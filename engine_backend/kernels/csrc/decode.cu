// Paged decode attention: one query token per request, GQA heads of a KV head fused into one
// tensor-core tile, stream-K split of the batch's KV across a fixed grid.
// Template parameters: ${DTYPE}, head dim ${HEAD_DIM}, variant (${SOFT_CAP}, ${SLIDING_WINDOW}, ${ALIBI}).
//
// Grid: (ctas, num_kv_heads * head_tiles). A CTA takes one head tile (up to 16 query heads
// sharing a KV head, the MMA's rows) and one contiguous range of the batch's cost space (see
// decode.h), which may span the end of one request, whole requests and the start of another.
// Each of its 4 warps streams its own 16-token sub-tiles through a private cp.async pipeline,
// so warps only meet at the end of a request, where their softmax states are merged.
#include <cub/block/block_scan.cuh>

#include "decode.h"
#include "mma.cuh"
#include "state.cuh"
#include "variant.cuh"

namespace eb {
namespace {

using T = ${DTYPE};
using Var = Variant<${SOFT_CAP}, ${SLIDING_WINDOW}, ${ALIBI}>;
constexpr int D = ${HEAD_DIM};

// Tuning knobs: an experiment build may override them with -D (scripts/decode_experiment.py).
#ifndef EB_DECODE_WARPS
#define EB_DECODE_WARPS 4
#endif
#ifndef EB_DECODE_STAGES
#define EB_DECODE_STAGES (D == 64 ? 4 : 3)
#endif
#ifndef EB_DECODE_SNAP_DIV  // planning: boundaries move onto a request boundary within share / this (>= 4)
#define EB_DECODE_SNAP_DIV 4
#endif
#ifndef EB_DECODE_SLACK_TOKENS  // planning: tokens a CTA may take beyond its share on short batches (below)
#define EB_DECODE_SLACK_TOKENS 256
#endif
#ifndef EB_DECODE_ALIGN  // planning: 1 = aligned groups first, 0 = never (with SLACK_TOKENS=0: the older planner)
#define EB_DECODE_ALIGN 1
#endif
constexpr int kWarps = EB_DECODE_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kSub = 16;                // tokens per warp sub-tile (the MMA's k for P.V)
constexpr int kRows = 16;               // query heads per tile (the MMA's m)
constexpr int kChunks = D / 8;          // 16-byte chunks per row
constexpr int kStages = EB_DECODE_STAGES;
constexpr int kSubBytes = kSub * D * 2;  // one K or V sub-tile
constexpr int kWarpBytes = kStages * 2 * kSubBytes;
constexpr int kOStride = D + 4;  // fp32 merge buffer row stride (padding spreads banks)
constexpr int kSmemKV = kWarps * kWarpBytes;
constexpr int kSmemQ = kRows * D * 2;
constexpr int kSmemO = kRows * kOStride * 4;
constexpr int kSmemML = 2 * kWarps * kRows * 4;
constexpr int kSmemMisc = 16;
constexpr int kSmemBytes = kSmemKV + kSmemQ + kSmemO + kSmemML + kSmemMisc;
constexpr int kSmemPerSm = 228 * 1024, kSmemReservedPerCta = 1024;  // sm_90
constexpr int kMinCtas = 2 * (kSmemBytes + kSmemReservedPerCta) <= kSmemPerSm ? 2 : 1;  // CTAs per SM the smem allows

// Experiment builds only (-DEB_DECODE_TIMELINE=<float offset into work_o>): thread 0 of every
// CTA stamps the global timer at each phase, so a script can see where a launch's time goes.
#ifdef EB_DECODE_TIMELINE
EB_DEVICE void stamp(const DecodeParams& p, int k) {
  if (threadIdx.x != 0) return;
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  uint64_t* out = reinterpret_cast<uint64_t*>(p.work_o + EB_DECODE_TIMELINE) + (blockIdx.y * gridDim.x + blockIdx.x) * 8;
  out[k] = t;
  if (k == 0) {
    uint32_t sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    out[7] = sm;
  }
}
#else
EB_DEVICE void stamp(const DecodeParams&, int) {}
#endif

// ------------------------------------------------------------------------- cost space
struct Range {
  long x0, x1;  // this CTA's cost range
};

// The part of request b this CTA reads, in tokens of the trimmed KV [lo, hi).
struct Segment {
  int row, lo, hi, len;
  bool owns_empty;  // request with no KV whose zero output this CTA writes
  EB_DEVICE bool has_tokens() const { return lo < hi; }
};

EB_DEVICE Segment segment_of(const DecodePlan& plan, const Range& r, int overhead, int b) {
  Segment s;
  s.row = b;
  const long start = plan.cost_start[b];
  const long tok0 = start + overhead;
  s.len = plan.kv_len[b];
  s.lo = int(max(r.x0, tok0) - tok0);
  s.hi = int(min(r.x1, tok0 + s.len) - tok0);
  s.owns_empty = s.len == 0 && r.x0 <= start && start < r.x1;
  return s;
}

// Walks this CTA's segments that hold tokens, sub-tile by sub-tile, for one warp: the
// order in which that warp issues its loads (and later consumes them).
struct SubTileCursor {
  int row, lo, hi, sub;  // sub-tile `sub` covers tokens lo + sub*16 ... of the trimmed KV
  int begin;             // the row's first KV token read (kv_begin)
  const int32_t* pages;  // the row's page ids
  int page;              // prefetched: this lane's page for token (lane & 15) of the sub-tile
  bool valid;

  EB_DEVICE void seek(const DecodeParams& p, const Range& r, int rows, int b, int warp) {
    for (; b < rows && p.plan.cost_start[b] < r.x1; ++b) {
      Segment s = segment_of(p.plan, r, p.overhead, b);
      const int row_begin = p.plan.kv_begin[b], row_pages = p.plan.page_ptr[b];  // loaded with s's
      if (s.has_tokens() && s.lo + warp * kSub < s.hi) {  // this warp has work in the segment
        row = b, lo = s.lo, hi = s.hi, sub = warp, valid = true;
        begin = row_begin;
        pages = p.indices + row_pages;
        return;
      }
    }
    valid = false;
  }
  // From the CTA's first segment as the plan recorded it (plan.first_seg: request, lo, hi,
  // kv_begin, page_ptr), so the first loads wait for no per-request read; seek on from the next
  // request when this warp has no sub-tile in it.
  EB_DEVICE void start(const DecodeParams& p, const Range& r, int rows, const int (&seg)[5], int first_row,
                       int warp) {
#ifdef EB_DECODE_SEEK_FIRST  // experiment builds: the older path, which seeks from plan.first_row
    seek(p, r, rows, first_row, warp);
#else
    if (seg[0] >= 0 && seg[1] + warp * kSub < seg[2]) {
      row = seg[0], lo = seg[1], hi = seg[2], sub = warp, valid = true;
      begin = seg[3];
      pages = p.indices + seg[4];
      return;
    }
    seek(p, r, rows, seg[0] >= 0 ? seg[0] + 1 : rows, warp);
#endif
  }
  EB_DEVICE void advance(const DecodeParams& p, const Range& r, int rows, int warp) {
    sub += kWarps;
    if (lo + sub * kSub >= hi) seek(p, r, rows, row + 1, warp);
  }
  // Start the load of the page ids the next issue needs; its latency hides behind a compute.
  EB_DEVICE void prefetch_page(const DecodeParams& p, int lane) {
    const int tok = lo + sub * kSub + (lane & 15);
    page = valid && tok < hi ? pages[(begin + tok) >> p.log2_page] : 0;
  }
};

// ------------------------------------------------------------------------- the kernel
struct Smem {
  uint8_t* kv;  // [warps][stages][K|V][16 rows][D], swizzled
  uint8_t* q;   // [16 rows][D], swizzled
  float* o;     // [16][kOStride] merge buffer
  float* ml;    // [2][warps][16]: row max and row sum per warp
  int* flag;
  EB_DEVICE explicit Smem(uint8_t* base) {
    kv = base;
    q = kv + kSmemKV;
    o = reinterpret_cast<float*>(q + kSmemQ);
    ml = o + kRows * kOStride;
    flag = reinterpret_cast<int*>(ml + 2 * kWarps * kRows);
  }
  EB_DEVICE uint8_t* k_tile(int warp, int stage) const { return kv + warp * kWarpBytes + stage * 2 * kSubBytes; }
  EB_DEVICE uint8_t* v_tile(int warp, int stage) const { return k_tile(warp, stage) + kSubBytes; }
};

struct HeadTile {
  int kv_head, h0, rows;  // query heads h0 .. h0+rows-1
};

// Issue the cp.async loads of one warp's sub-tile (K and V) into a pipeline stage.
EB_DEVICE void issue_sub_tile(const DecodeParams& p, const Smem& sm, const SubTileCursor& cur, int stage, int warp,
                              int lane, int kv_head) {
  if (cur.valid) {
    const int first = cur.begin + cur.lo + cur.sub * kSub;  // first token of the sub-tile
    const int end = cur.begin + cur.hi;
    constexpr int kLanesPerRow = kChunks < 32 ? kChunks : 32;
    constexpr int kRowsPerPass = 32 / kLanesPerRow;
    const int chunk = lane % kLanesPerRow;
    const uint32_t k_base = smem_addr(sm.k_tile(warp, stage));
    const uint32_t v_base = smem_addr(sm.v_tile(warp, stage));
#pragma unroll
    for (int pass = 0; pass < kSub / kRowsPerPass; ++pass) {
      const int row = pass * kRowsPerPass + lane / kLanesPerRow;
      const int tok = first + row;
      const long page = __shfl_sync(0xffffffff, cur.page, row);  // lane `row` prefetched it
      const bool valid = tok < end;
      const long in_page = tok & ((1 << p.log2_page) - 1);
      const T* k = static_cast<const T*>(p.k) + page * p.k_stride_page + in_page * p.k_stride_tok +
                   kv_head * p.k_stride_head;
      const T* v = static_cast<const T*>(p.v) + page * p.v_stride_page + in_page * p.v_stride_tok +
                   kv_head * p.v_stride_head;
#pragma unroll
      for (int c = chunk; c < kChunks; c += kLanesPerRow) {
        cp_async_16(k_base + swizzle<kChunks>(row, c), k + c * 8, valid);
        cp_async_16(v_base + swizzle<kChunks>(row, c), v + c * 8, valid);
      }
    }
  }
  cp_async_commit();  // empty groups keep the wait counts uniform
}

// Issue the cursor's sub-tile, step the cursor and prefetch the page ids of its next one.
EB_DEVICE void issue_and_advance(const DecodeParams& p, const Smem& sm, SubTileCursor& cur, const Range& r, int rows,
                                 int stage, int warp, int lane, int kv_head) {
  issue_sub_tile(p, sm, cur, stage, warp, lane, kv_head);
  if (cur.valid) {
    cur.advance(p, r, rows, warp);
    cur.prefetch_page(p, lane);
  }
}

// Running softmax state of one warp: rows g and g+8 of the tile (g = lane / 4).
struct WarpState {
  float o[D / 8][4];
  float m[2], l[2];
  EB_DEVICE void init() {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    m[0] = m[1] = -CUDART_INF_F;
    l[0] = l[1] = 0.f;
  }
};

// S = Q K^T for 16 tokens, the variant's score, online softmax, O += P V.
EB_DEVICE void compute_sub_tile(const DecodeParams& p, const Smem& sm, WarpState& st, int warp, int stage, int lane,
                                int tok0, int tok_end, int q_pos, const typename Var::Row (&vrow)[2]) {
  const uint32_t q_base = smem_addr(sm.q), k_base = smem_addr(sm.k_tile(warp, stage));
  const uint32_t v_base = smem_addr(sm.v_tile(warp, stage));
  float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t qa[4], kb[4];
    ldmatrix_x4(qa, q_base + swizzle<kChunks>(lane % 16, 2 * kk + lane / 16));
    ldmatrix_x4(kb, k_base + swizzle<kChunks>((lane % 8) + 8 * (lane / 16), 2 * kk + (lane / 8) % 2));
    mma_16816<T>(s[0], qa, kb);
    mma_16816<T>(s[1], qa, kb + 2);
  }
  // Fragment element (n, i): row g + 8*(i/2), token 8n + 2*(lane%4) + i%2.
  float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
  for (int n = 0; n < 2; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tok = tok0 + 8 * n + 2 * (lane % 4) + (i % 2);
      float x = Var::score(s[n][i], vrow[i / 2], q_pos, tok);
      x = tok < tok_end ? x : -CUDART_INF_F;
      s[n][i] = x;
      row_max[i / 2] = fmaxf(row_max[i / 2], x);
    }
  }
  float rescale[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_new = fmaxf(st.m[r], quad_max(row_max[r]));
    const float base = m_new == -CUDART_INF_F ? 0.f : m_new;  // all masked so far: avoid inf - inf
    rescale[r] = fast_exp2(st.m[r] - base);
    st.m[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      s[n][2 * r] = fast_exp2(s[n][2 * r] - base);
      s[n][2 * r + 1] = fast_exp2(s[n][2 * r + 1] - base);
      sum += s[n][2 * r] + s[n][2 * r + 1];
    }
    st.l[r] = st.l[r] * rescale[r] + sum;  // per-lane partial; the quad is summed at the end
  }
  uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]), pack2<T>(s[1][0], s[1][1]),
                    pack2<T>(s[1][2], s[1][3])};
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    st.o[dt][0] *= rescale[0];
    st.o[dt][1] *= rescale[0];
    st.o[dt][2] *= rescale[1];
    st.o[dt][3] *= rescale[1];
  }
#pragma unroll
  for (int dt2 = 0; dt2 < D / 16; ++dt2) {
    uint32_t vb[4];
    ldmatrix_x4_trans(vb, v_base + swizzle<kChunks>((lane % 8) + 8 * ((lane / 8) % 2), 2 * dt2 + lane / 16));
    mma_16816<T>(st.o[2 * dt2], pa, vb);
    mma_16816<T>(st.o[2 * dt2 + 1], pa, vb + 2);
  }
}

// The query rows of one request for this head tile, held in registers so that the next
// request's query is loaded while the current one streams (zeros past `rows`).
struct QueryRegs {
  static constexpr int kPerThread = (kRows * kChunks + kThreads - 1) / kThreads;
  uint4 val[kPerThread];
  int row = -1;  // the request held

  EB_DEVICE void fetch(const DecodeParams& p, const HeadTile& ht, int b) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int i = threadIdx.x + j * kThreads, r = i / kChunks, c = i % kChunks;
      val[j] = make_uint4(0, 0, 0, 0);
      if (r < ht.rows) val[j] = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.q) + b * p.q_stride_n +
                                                                   (ht.h0 + r) * p.q_stride_h + c * 8);
    }
    row = b;
  }
  EB_DEVICE void store(const Smem& sm) const {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int i = threadIdx.x + j * kThreads;
      if (i < kRows * kChunks) *reinterpret_cast<uint4*>(sm.q + swizzle<kChunks>(i / kChunks, i % kChunks)) = val[j];
    }
  }
};

EB_DEVICE void store_row(const DecodeParams& p, int b, int h, int c, const float* v8) {
  Vec8<T> vec;
  vec.from_float(v8);
  vec.store(static_cast<T*>(p.out) + b * p.out_stride_n + h * p.out_stride_h + c * 8);
}

// Merge the warps' states of request b into sm.o (normalised rows < `rows`) and per-row lse2
// in ml. The warps add their rows in turn: shared-memory float atomics would be compare-and-
// swap loops on sm_90 with every warp contending for every address.
EB_DEVICE void merge_warps(const Smem& sm, WarpState& st, int warp, int lane, int rows) {
  float* ml_m = sm.ml;
  float* ml_l = sm.ml + kWarps * kRows;
  const int g = lane / 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(st.l[r]);
    if (lane % 4 == 0) {
      ml_m[warp * kRows + g + 8 * r] = st.m[r];
      ml_l[warp * kRows + g + 8 * r] = l;
    }
  }
  __syncthreads();
  float scale[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;
    float m = -CUDART_INF_F;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, ml_m[w * kRows + row]);
    const float base = m == -CUDART_INF_F ? 0.f : m;
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) l += ml_l[w * kRows + row] * fast_exp2(ml_m[w * kRows + row] - base);
    scale[r] = l > 0.f ? fast_exp2(st.m[r] - base) / l : 0.f;
  }
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (g + 8 * r >= rows) continue;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          float2* dst = reinterpret_cast<float2*>(&sm.o[(g + 8 * r) * kOStride + 8 * dt + 2 * (lane % 4)]);
          float2 v = make_float2(st.o[dt][2 * r] * scale[r], st.o[dt][2 * r + 1] * scale[r]);
          if (w > 0) v.x += dst->x, v.y += dst->y;
          *dst = v;
        }
      }
    }
    __syncthreads();
  }
}

// Row log2-sum-exp after merge_warps (reads the per-warp maxima and sums it left in ml).
EB_DEVICE float merged_lse2(const Smem& sm, int row) {
  float m = -CUDART_INF_F;
  for (int w = 0; w < kWarps; ++w) m = fmaxf(m, sm.ml[w * kRows + row]);
  if (m == -CUDART_INF_F) return -CUDART_INF_F;
  float l = 0.f;
  for (int w = 0; w < kWarps; ++w) l += sm.ml[kWarps * kRows + w * kRows + row] * fast_exp2(sm.ml[w * kRows + row] - m);
  return l > 0.f ? m + fast_log2(l) : -CUDART_INF_F;
}

// Final output of a request this CTA read whole (or a zero-KV request): from sm.o.
EB_DEVICE void write_output(const DecodeParams& p, const Smem& sm, const HeadTile& ht, int b) {
  for (int i = threadIdx.x; i < ht.rows * kChunks; i += kThreads) {
    const int row = i / kChunks, c = i % kChunks;
    store_row(p, b, ht.h0 + row, c, &sm.o[row * kOStride + c * 8]);
    if (p.lse && c == 0) p.lse[b * p.lse_stride_n + ht.h0 + row] = merged_lse2(sm, row) * kLn2;
  }
}

EB_DEVICE int atomic_add_acq_rel(int* addr, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(addr), "r"(v) : "memory");
  return old;
}

// One piece of a request cut across CTAs: store it, and if it is the last piece to finish,
// merge all pieces into the output. Classic threadfence pattern: pieces are published before
// the counter increment, and the last CTA reads them from L2.
EB_DEVICE void write_piece(const DecodeParams& p, const Smem& sm, const HeadTile& ht, int b, int piece, int pieces,
                           int head_tile_id) {
  const int slot0 = p.plan.piece_base[b];
  const int hq = p.num_qo_heads;
  for (int i = threadIdx.x; i < ht.rows * (D / 4); i += kThreads) {
    const int row = i / (D / 4), c = i % (D / 4);
    const float4 val = *reinterpret_cast<const float4*>(&sm.o[row * kOStride + c * 4]);
    __stcg(reinterpret_cast<float4*>(p.work_o + (long(slot0 + piece) * hq + ht.h0 + row) * D + c * 4), val);
    if (c == 0) __stcg(p.work_lse + long(slot0 + piece) * hq + ht.h0 + row, merged_lse2(sm, row));
  }
  // The barrier orders every thread's stores before thread 0's release (it is cumulative);
  // the last CTA's acquire and the barrier after it order them before its loads.
  __syncthreads();
  int* sem = p.plan.semaphores + long(b) * p.num_kv_heads * p.head_tiles + head_tile_id;
  if (threadIdx.x == 0) *sm.flag = atomic_add_acq_rel(sem, 1) == pieces - 1;
  __syncthreads();
  if (!*sm.flag) return;
  // Four floats per thread so that all 128 threads take part and many pieces' loads (they
  // are independent; only the accumulation is a chain) are in flight at once.
  for (int i = threadIdx.x; i < ht.rows * (D / 4); i += kThreads) {
    const int row = i / (D / 4), c = i % (D / 4);
    MergeAcc<4> acc;
    acc.init();
#pragma unroll 16
    for (int k = 0; k < pieces; ++k) {
      const long slot = long(slot0 + k) * hq + ht.h0 + row;
      float v[4];
      *reinterpret_cast<float4*>(v) = __ldcg(reinterpret_cast<const float4*>(p.work_o + slot * D + c * 4));
      acc.add(v, __ldcg(p.work_lse + slot));
    }
    float v[4];
    const float lse2 = acc.finish(v);
    const typename Elem<T>::Pair pair[2] = {Elem<T>::from_float2(v[0], v[1]), Elem<T>::from_float2(v[2], v[3])};
    *reinterpret_cast<uint2*>(static_cast<T*>(p.out) + b * p.out_stride_n + (ht.h0 + row) * p.out_stride_h + c * 4) =
        *reinterpret_cast<const uint2*>(pair);
    if (p.lse && c == 0) p.lse[b * p.lse_stride_n + ht.h0 + row] = lse2 * kLn2;
  }
  if (threadIdx.x == 0) *sem = 0;  // ready for the next launch (the next layer, a graph replay)
}

__global__ void __launch_bounds__(kThreads, kMinCtas) decode_kernel(const DecodeParams p) {
  extern __shared__ __align__(128) uint8_t smem_raw[];
  const Smem sm(smem_raw);
#ifdef EB_DECODE_PDL
  // Launched as a programmatic dependent (see decode_run_launch): wait here for the previous
  // kernel's writes (the query, the step's K/V) before the first global read.
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  stamp(p, 0);
  // Loads with no dependence on each other, all issued before the first use: the plan's
  // arrays are read as a chain of round trips before the first K/V byte, keep it short.
  const int c = blockIdx.x, tile_id = blockIdx.y;
  const int rows = p.plan.header[0], used = p.plan.header[2];
  Range r;
  r.x0 = p.plan.cta_start[c];
  r.x1 = p.plan.cta_start[c + 1];  // the array has ctas + 1 entries
  const int first = p.plan.first_row[c];
  int first_seg[5];
#pragma unroll
  for (int i = 0; i < 5; ++i) first_seg[i] = p.plan.first_seg[5 * c + i];
  if (c >= used) return;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = p.num_qo_heads / p.num_kv_heads;
  HeadTile ht;
  ht.kv_head = tile_id / p.head_tiles;
  const int tile = tile_id % p.head_tiles;
  ht.h0 = ht.kv_head * group + tile * kRows;
  ht.rows = min(kRows, group - tile * kRows);

  SubTileCursor issue;
  issue.start(p, r, rows, first_seg, first, warp);
  issue.prefetch_page(p, lane);
  for (int s = 0; s < kStages - 1; ++s) issue_and_advance(p, sm, issue, r, rows, s, warp, lane, ht.kv_head);
  int stage = 0;
  stamp(p, 1);
  bool first_wait = true;

  typename Var::Row vrow[2];
  QueryRegs qr;
  for (int b = first; b < rows && p.plan.cost_start[b] < r.x1; ++b) {
    const Segment seg = segment_of(p.plan, r, p.overhead, b);
    if (!seg.has_tokens() && !seg.owns_empty) continue;
    if (qr.row != b) qr.fetch(p, ht, b);  // the first request (or a zero-KV one was skipped)
    qr.store(sm);  // the previous request's barriers ended every read of sm.q
    if (b + 1 < rows && p.plan.cost_start[b + 1] < r.x1) qr.fetch(p, ht, b + 1);
    __syncthreads();
    const int begin = p.plan.kv_begin[b];
    const int q_pos = begin + seg.len - 1;  // the query is the newest token
#pragma unroll
    for (int i = 0; i < 2; ++i) vrow[i] = Var::row(p.variant, ht.h0 + min(lane / 4 + 8 * i, ht.rows - 1));
    WarpState st;
    st.init();
    const int subs = (seg.hi - seg.lo + kSub - 1) / kSub;
    for (int j = warp; j < subs && seg.has_tokens(); j += kWarps) {
      // Sub-tile i is in stage i % kStages; the loads of sub-tile i + kStages - 1 go into
      // the stage consumed by the previous iteration, before computing, to keep them in flight.
      cp_async_wait<kStages - 2>();
      __syncwarp();
      if (first_wait) stamp(p, 2), first_wait = false;
      issue_and_advance(p, sm, issue, r, rows, (stage + kStages - 1) % kStages, warp, lane, ht.kv_head);
      const int tok0 = begin + seg.lo + j * kSub;
      compute_sub_tile(p, sm, st, warp, stage, lane, tok0, begin + seg.hi, q_pos, vrow);
      stage = (stage + 1) % kStages;
    }
    stamp(p, 3);
    merge_warps(sm, st, warp, lane, ht.rows);
    stamp(p, 6);
    const int pieces = p.plan.pieces[b];
    if (pieces == 1) {
      write_output(p, sm, ht, b);
    } else {
      write_piece(p, sm, ht, b, c - p.plan.first_cta[b], pieces, tile_id);
    }
    stamp(p, 4);
  }
  cp_async_wait<0>();
  stamp(p, 5);
}

// ---------------------------------------------------------------------- planning kernel
constexpr int kPlanThreads = 1024;
using PlanScan = cub::BlockScan<int, kPlanThreads>;

// plan.first_seg of CTA c: its first segment that holds tokens, starting the search at request b.
EB_DEVICE void record_first_segment(const DecodePlan& plan, int c, int b, int rows, int overhead) {
  Range r;
  r.x0 = plan.cta_start[c];
  r.x1 = plan.cta_start[c + 1];
  int32_t* out = plan.first_seg + 5 * c;
  for (; b < rows && plan.cost_start[b] < r.x1; ++b) {
    const Segment s = segment_of(plan, r, overhead, b);
    if (s.has_tokens()) {
      out[0] = b, out[1] = s.lo, out[2] = s.hi, out[3] = plan.kv_begin[b], out[4] = plan.page_ptr[b];
      return;
    }
  }
  out[0] = -1;
}

// How far a CTA boundary may move onto a request boundary (rather than cut the request): a quarter share, or on
// short batches up to EB_DECODE_SLACK_TOKENS (never a whole share). Why: a cut request costs its second CTA
// a segment (page-id reads, first K/V arrival) and a merge, about the time of a few hundred tokens of streaming
// (decode_experiment.py: 32 x 256 took 25 us cut, 18 us uncut), so moving a boundary by fewer tokens is cheaper.
EB_DEVICE long share_slack(long share) {
  return max(share / EB_DECODE_SNAP_DIV, min(long(EB_DECODE_SLACK_TOKENS), share));
}

// Whole requests per CTA: k consecutive ones each (the fewest k that fits the grid), when no such group costs
// more than EB_DECODE_SLACK_TOKENS beyond a share; returns k, or 0 for the stream-K split. Measured on an H200
// at page size 1 (RESULTS.md, decode): 32 x 256 tokens 18.1 us instead of 25.1 and 40 x 256 24.1 instead of
// 26.1, because stream-K cuts nearly every request of a batch whose requests are about a share long. Tokens,
// not a fraction of the share: 128 x 4096 in groups of 4 (32 CTAs of 33, 3 % over a share) was 1.3 % slower.
EB_DEVICE int aligned_group(const DecodePlan& plan, int rows, int used, int total, int overhead) {
  __shared__ int worst;
  if (threadIdx.x == 0) worst = 0;
  __syncthreads();
  const int k = used > 0 ? (rows + used - 1) / used : 1;
  const int groups = (rows + k - 1) / k;
  int local = 0;
  for (int g = threadIdx.x; g < groups; g += kPlanThreads) {
    const int end = min((g + 1) * k, rows);  // cost_start[rows] is written later: use the total
    local = max(local, (end == rows ? total : plan.cost_start[end]) - plan.cost_start[g * k]);
  }
  atomicMax(&worst, local);
  __syncthreads();
  const long share = used > 0 ? long(total) / used : 0;
  // Groups are never empty (so neither are the CTAs' ranges) while every request costs at least the overhead.
  return EB_DECODE_ALIGN && overhead > 0 && used > 0 && worst - share <= EB_DECODE_SLACK_TOKENS ? k : 0;
}

#ifdef EB_DECODE_PACK
// Experiment builds (-DEB_DECODE_PACK=R: batches of up to R requests; scripts/decode_experiment.py, knob `pack`):
// one thread walks the requests in order and closes a CTA's range at the last request boundary that keeps it
// within a share plus EB_DECODE_SLACK_TOKENS (a request longer than that alone is cut in pieces of that size).
// Writes cta_start[0..n] and returns the n ranges, or 0 when more than `limit` would be needed. Why: ragged
// batches of 33-40 short requests (SGLang serving) rarely fit the aligned groups, and stream-K cuts most of
// their requests; this keeps nearly all of them whole with every CTA at most 256 tokens over a share.
// cost: the requests' cost starts in shared memory, cost[rows] = total.
EB_DEVICE int pack_requests(const DecodePlan& plan, const int* cost, int rows, int total, int limit) {
  const long cap = long(total) / limit + EB_DECODE_SLACK_TOKENS;
  int n = 0;
  long s = 0;
  plan.cta_start[0] = 0;
  for (int b = 0; b < rows; ++b) {
    const long end = cost[b + 1];
    if (end - s <= cap) continue;
    if (cost[b] > s) {  // close the range before request b
      if (++n >= limit) return 0;
      s = cost[b];
      plan.cta_start[n] = int(s);
    }
    while (end - s > cap) {  // request b is still too long for one range: cut it
      if (++n >= limit) return 0;
      s += cap;
      plan.cta_start[n] = int(s);
    }
  }
  plan.cta_start[n + 1] = total;
  return n + 1;
}
#endif

__global__ void __launch_bounds__(kPlanThreads) decode_plan_kernel(const int32_t* __restrict__ indptr,
                                                                  const int32_t* __restrict__ kv_lens, int rows,
                                                                  DecodePlan plan, int ctas, int overhead,
                                                                  int window_left, int semaphores) {
  __shared__ typename PlanScan::TempStorage scan;
  __shared__ int carry;
#ifdef EB_DECODE_PACK
  __shared__ int pack_cost[EB_DECODE_PACK + 1];
  __shared__ int packed;
#endif
  const int tid = threadIdx.x;
  if (tid == 0) carry = 0;
  __syncthreads();
  // 1. Cost of every request and its start in cost space.
  for (int base = 0; base < rows; base += kPlanThreads) {
    const int b = base + tid;
    int len = 0, begin = 0;
    if (b < rows) {
      len = kv_lens[b];
      if (window_left >= 0) begin = max(0, len - 1 - window_left);  // keys the query can see
      plan.kv_begin[b] = begin;
      plan.kv_len[b] = len - begin;
      plan.page_ptr[b] = indptr[b];
    }
    int x, total;
    PlanScan(scan).ExclusiveSum(b < rows ? len - begin + overhead : 0, x, total);
    if (b < rows) plan.cost_start[b] = carry + x;
#ifdef EB_DECODE_PACK
    if (b < rows && b < EB_DECODE_PACK) pack_cost[b] = carry + x;
#endif
    __syncthreads();
    if (tid == 0) carry += total;
    __syncthreads();
  }
  const int total = carry;
  const int align_k = aligned_group(plan, rows, rows == 0 ? 0 : min(ctas, total), total, overhead);
#ifdef EB_DECODE_PACK
  if (tid == 0) {
    packed = 0;
    if (align_k == 0 && rows > 0 && rows <= EB_DECODE_PACK) {
      pack_cost[rows] = total;
      packed = pack_requests(plan, pack_cost, rows, total, min(ctas, total));
    }
  }
  __syncthreads();
  const int used = packed > 0 ? packed
                 : align_k > 0 ? (rows + align_k - 1) / align_k : rows == 0 ? 0 : min(ctas, total);
#else
  const int used = align_k > 0 ? (rows + align_k - 1) / align_k : rows == 0 ? 0 : min(ctas, total);
#endif
  if (tid == 0) {
    plan.cost_start[rows] = total;
    plan.header[0] = rows;
    plan.header[1] = total;
    plan.header[2] = used;
  }
  __syncthreads();
  // 2. CTA boundaries: after aligned groups of requests, or equal shares of T, each moved onto a
  //    request boundary within the share's slack, capped just under half a share so that the
  //    boundaries stay strictly increasing (a boundary moves by less than half the gap to either
  //    neighbour's equal-share position).
  const long share = used > 0 ? long(total) / used : 0;
  const long snap = min(share_slack(share), share > 0 ? (share - 1) / 2 : 0);
#ifdef EB_DECODE_PACK
  for (int c = tid; packed == 0 && used > 0 && c <= used; c += kPlanThreads) {
#else
  for (int c = tid; used > 0 && c <= used; c += kPlanThreads) {
#endif
    long x = long(c) * total / used;  // used > 0 here: the loop is empty otherwise
    if (align_k > 0) x = c * align_k >= rows ? total : plan.cost_start[c * align_k];
    else if (c > 0 && c < used && snap > 0) {
      int lo = 0, hi = rows;  // first b with cost_start[b] >= x
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (plan.cost_start[mid] >= x) hi = mid; else lo = mid + 1;
      }
      const long above = plan.cost_start[lo], below = lo > 0 ? plan.cost_start[lo - 1] : -snap - 1;
      if (above - x <= snap && above - x <= x - below) x = above;
      else if (x - below <= snap) x = below;
    }
    plan.cta_start[c] = int(x);
  }
  __syncthreads();
  // 3. First request each CTA touches: the first b whose cost range ends after the CTA's start.
  for (int c = tid; c < used; c += kPlanThreads) {
    const long x0 = plan.cta_start[c];
    int lo = 0, hi = rows - 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (plan.cost_start[mid + 1] > x0) hi = mid; else lo = mid + 1;
    }
    plan.first_row[c] = lo;
    record_first_segment(plan, c, lo, rows, overhead);
  }
  // 4. Pieces of every request and partial-state slots of those cut into several.
  auto cta_of = [&](long pos) {  // the CTA whose range holds cost position pos
    int lo = 0, hi = used - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (plan.cta_start[mid] <= pos) lo = mid; else hi = mid - 1;
    }
    return lo;
  };
  if (tid == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < rows; base += kPlanThreads) {
    const int b = base + tid;
    int pieces = 0;
    if (b < rows && used > 0) {
      const long tok0 = long(plan.cost_start[b]) + overhead;
      const int len = plan.kv_len[b];
      const int first = cta_of(len == 0 ? plan.cost_start[b] : tok0);
      pieces = len == 0 ? 1 : cta_of(tok0 + len - 1) - first + 1;
      plan.first_cta[b] = first;
      plan.pieces[b] = pieces;
    }
    int x, sum;
    PlanScan(scan).ExclusiveSum(pieces > 1 ? pieces : 0, x, sum);
    if (b < rows) plan.piece_base[b] = carry + x;
    __syncthreads();
    if (tid == 0) carry += sum;
    __syncthreads();
  }
  if (tid == 0) plan.header[3] = carry;
  for (int i = tid; i < semaphores; i += kPlanThreads) plan.semaphores[i] = 0;
}

}  // namespace

int decode_max_ctas_per_sm() {
  int n = 0;
  cudaFuncSetAttribute(decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_kernel, kThreads, kSmemBytes);
  return n;
}

void decode_plan_launch(const int32_t* indptr, const int32_t* kv_lens, int rows, const DecodePlan& plan, int ctas,
                        int overhead, int window_left, int semaphores, cudaStream_t stream) {
  decode_plan_kernel<<<1, kPlanThreads, 0, stream>>>(indptr, kv_lens, rows, plan, ctas, overhead, window_left,
                                                     semaphores);
}

void decode_run_launch(const DecodeParams& params, cudaStream_t stream) {
  static bool configured = [] {
    cudaFuncSetAttribute(decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    return true;
  }();
  (void)configured;
  const dim3 grid(params.ctas, params.num_kv_heads * params.head_tiles);
#ifdef EB_DECODE_PDL
  // Experiment builds only (-DEB_DECODE_PDL, sm_90+): programmatic dependent launch, so this
  // grid's launch overlaps the end of the previous kernel on the stream (as SGLang launches
  // its Triton decode); the kernel waits for that kernel's memory before reading anything.
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kSmemBytes;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  cudaLaunchKernelEx(&config, decode_kernel, params);
#else
  decode_kernel<<<grid, kThreads, kSmemBytes, stream>>>(params);
#endif
}

}  // namespace eb
