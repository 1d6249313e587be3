// Paged decode attention: one query token per request, GQA heads of a KV head fused into one
// tensor-core tile, stream-K split of the batch's KV across a fixed grid.
//
// Grid: (ctas, num_kv_heads * head_tiles). A CTA takes one head tile (up to 16 query heads
// sharing a KV head, the MMA's rows) and one contiguous range of the batch's cost space (see
// decode/cost_space.cuh), which may span the end of one request, whole requests and the start of
// another. Each of its warps streams its own 16-token sub-tiles through a private cp.async
// pipeline, so warps only meet at the end of a request, where their softmax states are merged.
#pragma once
#include "../mma.cuh"
#include "../state.cuh"
#include "../variant.cuh"
#include "cost_space.cuh"

namespace eb::decode {

// Warps and pipeline stages of one CTA. Each warp has stages - 1 sub-tiles' loads in flight while it
// computes one. Four warps of three stages keep enough bytes in flight and leave room for two CTAs
// per SM at head dims up to 128 (their shared memory, below); at head dim 64 a stage is half the size,
// so a fourth stage fits at the same occupancy.
template <int HEAD_DIM> struct DecodeTraits {
  static constexpr int kWarps = 4;
  static constexpr int kStages = HEAD_DIM == 64 ? 4 : 3;
};

// Query heads h0 .. h0+rows-1 of one KV head: the rows of the CTA's MMA tile.
struct HeadTile {
  int kv_head, h0, rows;
};

EB_DEVICE int atomic_add_acq_rel(int* addr, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(addr), "r"(v) : "memory");
  return old;
}

template <typename T, int HEAD_DIM, class Var, class Traits = DecodeTraits<HEAD_DIM>> struct DecodeAttention {
  static constexpr int D = HEAD_DIM;
  static constexpr int kWarps = Traits::kWarps;
  static constexpr int kStages = Traits::kStages;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kSub = 16;                          // tokens per warp sub-tile (the MMA's k for P.V)
  static constexpr int kRows = 16;                         // query heads per tile (the MMA's m)
  static constexpr int kChunks = D / 8;                    // 16-byte chunks per row
  static constexpr int kSubBytes = kSub * D * sizeof(T);   // one K or V sub-tile
  static constexpr int kWarpBytes = kStages * 2 * kSubBytes;
  static constexpr int kOStride = D + 4;  // fp32 merge buffer row stride (padding spreads banks)
  static constexpr int kSmemKV = kWarps * kWarpBytes;
  static constexpr int kSmemQ = kRows * D * sizeof(T);
  static constexpr int kSmemO = kRows * kOStride * 4;
  static constexpr int kSmemML = 2 * kWarps * kRows * 4;
  static constexpr int kSmemMisc = 16;
  static constexpr int kSmemBytes = kSmemKV + kSmemQ + kSmemO + kSmemML + kSmemMisc;
  static constexpr int kSmemPerSm = 228 * 1024, kSmemReservedPerCta = 1024;  // sm_90
  // CTAs per SM the shared memory allows (the kernel's launch bounds ask the registers to allow as many).
  static constexpr int kMinCtas = 2 * (kSmemBytes + kSmemReservedPerCta) <= kSmemPerSm ? 2 : 1;
  using Row = typename Var::Row;

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
    EB_DEVICE void start(const DecodeParams& p, const Range& r, int rows, const int (&seg)[kFirstSegFields],
                         int warp) {
      if (seg[0] >= 0 && seg[1] + warp * kSub < seg[2]) {
        row = seg[0], lo = seg[1], hi = seg[2], sub = warp, valid = true;
        begin = seg[3];
        pages = p.indices + seg[4];
        return;
      }
      seek(p, r, rows, seg[0] >= 0 ? seg[0] + 1 : rows, warp);
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

  // Issue the cp.async loads of one warp's sub-tile (K and V) into a pipeline stage.
  static EB_DEVICE void issue_sub_tile(const DecodeParams& p, const Smem& sm, const SubTileCursor& cur, int stage,
                                       int warp, int lane, int kv_head) {
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
  static EB_DEVICE void issue_and_advance(const DecodeParams& p, const Smem& sm, SubTileCursor& cur, const Range& r,
                                          int rows, int stage, int warp, int lane, int kv_head) {
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
  static EB_DEVICE void compute_sub_tile(const DecodeParams& p, const Smem& sm, WarpState& st, int warp, int stage,
                                         int lane, int tok0, int tok_end, int q_pos, const Row (&vrow)[2]) {
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

  static EB_DEVICE void store_row(const DecodeParams& p, int b, int h, int c, const float* v8) {
    Vec8<T> vec;
    vec.from_float(v8);
    vec.store(static_cast<T*>(p.out) + b * p.out_stride_n + h * p.out_stride_h + c * 8);
  }

  // Merge the warps' states of request b into sm.o (normalised rows < `rows`) and per-row lse2
  // in ml. The warps add their rows in turn: shared-memory float atomics would be compare-and-
  // swap loops on sm_90 with every warp contending for every address.
  static EB_DEVICE void merge_warps(const Smem& sm, WarpState& st, int warp, int lane, int rows) {
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
  static EB_DEVICE float merged_lse2(const Smem& sm, int row) {
    float m = -CUDART_INF_F;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, sm.ml[w * kRows + row]);
    if (m == -CUDART_INF_F) return -CUDART_INF_F;
    float l = 0.f;
    for (int w = 0; w < kWarps; ++w)
      l += sm.ml[kWarps * kRows + w * kRows + row] * fast_exp2(sm.ml[w * kRows + row] - m);
    return l > 0.f ? m + fast_log2(l) : -CUDART_INF_F;
  }

  // Final output of a request this CTA read whole (or a zero-KV request): from sm.o.
  static EB_DEVICE void write_output(const DecodeParams& p, const Smem& sm, const HeadTile& ht, int b) {
    for (int i = threadIdx.x; i < ht.rows * kChunks; i += kThreads) {
      const int row = i / kChunks, c = i % kChunks;
      store_row(p, b, ht.h0 + row, c, &sm.o[row * kOStride + c * 8]);
      if (p.lse && c == 0) p.lse[b * p.lse_stride_n + ht.h0 + row] = merged_lse2(sm, row) * kLn2;
    }
  }

  // One piece of a request cut across CTAs: store it, and if it is the last piece to finish,
  // merge all pieces into the output. Classic threadfence pattern: pieces are published before
  // the counter increment, and the last CTA reads them from L2.
  static EB_DEVICE void write_piece(const DecodeParams& p, const Smem& sm, const HeadTile& ht, int b, int piece,
                                    int pieces, int head_tile_id) {
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
    // Four floats per thread so that all threads take part and many pieces' loads (they
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
      *reinterpret_cast<uint2*>(static_cast<T*>(p.out) + b * p.out_stride_n + (ht.h0 + row) * p.out_stride_h +
                                c * 4) = *reinterpret_cast<const uint2*>(pair);
      if (p.lse && c == 0) p.lse[b * p.lse_stride_n + ht.h0 + row] = lse2 * kLn2;
    }
    if (threadIdx.x == 0) *sem = 0;  // ready for the next launch (the next layer, a graph replay)
  }

  // The body of one CTA: its head tile over its cost range, request by request.
  static EB_DEVICE void run(const DecodeParams& p, uint8_t* smem) {
    const Smem sm(smem);
    // Loads with no dependence on each other, all issued before the first use: the plan's
    // arrays are read as a chain of round trips before the first K/V byte, keep it short.
    const int c = blockIdx.x, tile_id = blockIdx.y;
    const int rows = p.plan.header[0], used = p.plan.header[2];
    const Range r = cta_range(p.plan, c);
    const int first = p.plan.first_row[c];
    int first_seg[kFirstSegFields];
#pragma unroll
    for (int i = 0; i < kFirstSegFields; ++i) first_seg[i] = p.plan.first_seg[kFirstSegFields * c + i];
    if (c >= used) return;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int group = p.num_qo_heads / p.num_kv_heads;
    HeadTile ht;
    ht.kv_head = tile_id / p.head_tiles;
    const int tile = tile_id % p.head_tiles;
    ht.h0 = ht.kv_head * group + tile * kRows;
    ht.rows = min(kRows, group - tile * kRows);

    SubTileCursor issue;
    issue.start(p, r, rows, first_seg, warp);
    issue.prefetch_page(p, lane);
    for (int s = 0; s < kStages - 1; ++s) issue_and_advance(p, sm, issue, r, rows, s, warp, lane, ht.kv_head);
    int stage = 0;

    Row vrow[2];
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
        issue_and_advance(p, sm, issue, r, rows, (stage + kStages - 1) % kStages, warp, lane, ht.kv_head);
        const int tok0 = begin + seg.lo + j * kSub;
        compute_sub_tile(p, sm, st, warp, stage, lane, tok0, begin + seg.hi, q_pos, vrow);
        stage = (stage + 1) % kStages;
      }
      merge_warps(sm, st, warp, lane, ht.rows);
      const int pieces = p.plan.pieces[b];
      if (pieces == 1) {
        write_output(p, sm, ht, b);
      } else {
        write_piece(p, sm, ht, b, c - p.plan.first_cta[b], pieces, tile_id);
      }
    }
    cp_async_wait<0>();
  }
};

// Profiles find the kernels by name (e2e/step_profile.py): decode_kernel, decode_plan_kernel.
template <typename T, int HEAD_DIM, class Var, class Traits>
__global__ void __launch_bounds__(DecodeAttention<T, HEAD_DIM, Var, Traits>::kThreads,
                                  DecodeAttention<T, HEAD_DIM, Var, Traits>::kMinCtas)
    decode_kernel(const DecodeParams p) {
  extern __shared__ __align__(128) uint8_t smem_raw[];
  DecodeAttention<T, HEAD_DIM, Var, Traits>::run(p, smem_raw);
}

}  // namespace eb::decode
