// The Hopper mainloop (sm_90a): each warpgroup (4 warps) runs S = Q K^T and O += P V on its kMmaM blocks of
// 64 rows as warpgroup MMAs (wgmma.cuh), Q and K (and V) straight from shared memory, P from registers; a warp
// holds 16 rows of each block in the accumulator layout of an mma.sync tile, so the loads, masks, softmax and
// epilogue are the mma.sync mainloop's. Tiles in shared memory use wgmma's 128-byte swizzle, in 64-column
// blocks (wgmma_tile_offset).
#pragma once
#include "../wgmma.cuh"
#include "pipeline.cuh"

namespace eb::prefill {

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr bool kWgmmaTarget = false;  // device code for an arch without wgmma
#else
constexpr bool kWgmmaTarget = true;
#endif

template <class Kc> struct MainloopSm90 {
  static_assert(kWgmmaTarget || !Kc::kWgmma, "the wgmma mainloop needs sm_90a");
  using T = typename Kc::T;
  static constexpr int D = Kc::D, kN = Kc::kN, kM = Kc::kM, kMmaM = Kc::kMmaM, kStages = Kc::kStages;
  using PFrags = uint32_t[kMmaM][kN / 16][4];  // P of a tile as wgmma A operands

  template <int kRows> static EB_DEVICE int smem_offset(int r, int c) { return wgmma_tile_offset<kRows>(r, c); }

  // The packed row of lane row r (see LaneRows): a warpgroup's rows are kMmaM blocks of 64, warp w % 4 holding
  // rows 16 (w % 4) .. of each.
  static EB_DEVICE int lane_row(int warp, int lane, int r) {
    const int in_tile = lane / 4 + 8 * (r % 2);
    return (warp / 4) * 64 * kMmaM + 64 * (r / 2) + 16 * (warp % 4) + in_tile;
  }

  // cp.async writes (the generic proxy) -> visible to wgmma (the async proxy), before the barrier.
  static EB_DEVICE void fence_loaded() { fence_proxy_async(); }

  // The warpgroup's first row of the Q tile (each of its 64-column blocks holds kM rows of 128 bytes). Its
  // warpgroup is read from threadIdx rather than from `warp` (the same value): this form compiles to the
  // instruction schedule the kernel was tuned with.
  struct QOperand {
    uint32_t rows;
    EB_DEVICE void init(uint32_t sq, int /*warp*/, int /*lane*/) {
      const int warpgroup = int(threadIdx.x / 32) / 4;
      rows = sq + warpgroup * 64 * kMmaM * 128;
    }
  };

  // S = Q K^T for the warpgroup's kMmaM blocks of 64 rows, D / 16 warpgroup MMAs each; kbase: the K tile.
  static EB_DEVICE void qk_issue(Scores<Kc>& s, uint32_t q_rows, uint32_t kbase) {
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t col = (kk / 4) * 128, step = (kk % 4) * 32;  // 64-column block, 16-column step in it
        const uint64_t a = wgmma_desc(q_rows + mi * 64 * 128 + col * kM + step, 16, 1024);
        const uint64_t b = wgmma_desc(kbase + col * kN + step, 16, 1024);
        if (kk == 0) {
          Wgmma<T, kN>::ss_first(s[mi], a, b);
        } else {
          Wgmma<T, kN>::ss(s[mi], a, b);
        }
      }
    }
    wgmma_commit();
  }
  template <int kRows, int kCols> static EB_DEVICE void fence_all(float (&d)[kRows][kCols][4]) {
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) fence_accumulators(d[mi]);
  }
  static EB_DEVICE void qk(Scores<Kc>& s, uint32_t q_rows, uint32_t kbase) {
    wgmma_fence();
    qk_issue(s, q_rows, kbase);
    wgmma_wait<0>();
    fence_all(s);
  }

  // O += P V for the warpgroup's rows as kN / 16 warpgroup MMAs per 64-row block, P from registers, V (MN-major)
  // from shared memory.
  static EB_DEVICE void pack_p_all(PFrags& pa, const Scores<Kc>& s, RowVals<Kc>& l) {
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
      for (int kt = 0; kt < kN / 16; ++kt) pack_p<Kc>(pa[mi][kt], s[mi], kt, l[2 * mi], l[2 * mi + 1]);
  }
  static EB_DEVICE void pv_issue(OAccum<Kc>& o, const PFrags& pa, uint32_t vbase) {
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
      for (int kt = 0; kt < kN / 16; ++kt) {
        Wgmma<T, D>::rs_mn(o[mi], pa[mi][kt], wgmma_desc(vbase + kt * 16 * 128, kN * 128, 1024));
      }
    wgmma_commit();
  }
  // The A registers of an in-flight wgmma must keep their values until its wait: kept live past it.
  static EB_DEVICE void fence_p(PFrags& pa) {
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
      for (int kt = 0; kt < kN / 16; ++kt)
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(pa[mi][kt][i])::"memory");
  }
  static EB_DEVICE void pv(const Scores<Kc>& s, OAccum<Kc>& o, RowVals<Kc>& l, uint32_t vbase) {
    PFrags pa;
    pack_p_all(pa, s, l);
    wgmma_fence();
    pv_issue(o, pa, vbase);
    wgmma_wait<0>();
    fence_all(o);
    fence_p(pa);
  }

  // One K/V tile: its S, then the softmax and P V (a warpgroup MMA covers the whole tile: `chunks` unused).
  template <bool kMask>
  static EB_DEVICE void attend_tile(const PrefillParams& p, const Tile& tl, const LaneRows<Kc>& lr, const QOperand& q,
                                    OAccum<Kc>& o, RowVals<Kc>& m, RowVals<Kc>& l, uint32_t kbase, uint32_t vbase,
                                    int first, int lane, int /*chunks*/ = kN / 16) {
    Scores<Kc> s;
    float rescale[Kc::kLaneRows];
    qk(s, q.rows, kbase);
    if (softmax<Kc, kMask>(p, tl, lr, s, m, l, rescale, first, lane)) rescale_o<Kc>(o, rescale);
    pv(s, o, l, vbase);
  }

  // Tile 0's S and softmax first; then each iteration issues S of tile j + 1 and P V of tile j, and runs tile
  // j + 1's softmax while the P V MMAs execute (Traits::kOverlap: K/V tiles land one iteration earlier).
  static EB_DEVICE void attend_overlapped(KvPipeline<Kc>& kv, const PrefillParams& p, const Tile& tl,
                                          const LaneRows<Kc>& lr, const KeyBounds<Kc>& kb, const QOperand& q,
                                          OAccum<Kc>& o, RowVals<Kc>& m, RowVals<Kc>& l, int lane) {
    Scores<Kc> s;
    PFrags pa;
    float rescale[Kc::kLaneRows];
    auto softmax_of = [&](int j) {  // whether O must be rescaled
      const int first = kv.first(j);
      return kb.masked(p, first) ? softmax<Kc, true>(p, tl, lr, s, m, l, rescale, first, lane)
                                 : softmax<Kc, false>(p, tl, lr, s, m, l, rescale, first, lane);
    };
    if (kv.n_tiles > 0) {
      cp_async_wait<kStages - 2>();
      fence_proxy_async();
      __syncthreads();
      qk(s, q.rows, kv.kaddr(0));
      softmax_of(0);
      pack_p_all(pa, s, l);  // O is still 0: no rescale
    }
    for (int j = 0; j + 1 < kv.n_tiles; ++j) {
      cp_async_wait<kStages - 3>();
      fence_proxy_async();
      __syncthreads();  // tile j + 1 is visible; tile j - 1's stage is free
      kv.issue_ahead(j + kStages - 1);
      wgmma_fence();
      qk_issue(s, q.rows, kv.kaddr(j + 1));
      pv_issue(o, pa, kv.vaddr(j));
      wgmma_wait<1>();
      fence_all(s);
      const bool moved = softmax_of(j + 1);
      wgmma_wait<0>();
      fence_all(o);
      fence_p(pa);
      if (moved) rescale_o<Kc>(o, rescale);
      pack_p_all(pa, s, l);
      kv.store_page_ids(j + kStages - 1);
    }
    if (kv.n_tiles > 0) {  // the last tile's P V (its V landed before the last iteration)
      wgmma_fence();
      pv_issue(o, pa, kv.vaddr(kv.n_tiles - 1));
      wgmma_wait<0>();
      fence_all(o);
      fence_p(pa);
    }
  }

  static EB_DEVICE void run(KvPipeline<Kc>& kv, const PrefillParams& p, const Tile& tl, const LaneRows<Kc>& lr,
                            const KeyBounds<Kc>& kb, const QOperand& q, OAccum<Kc>& o, RowVals<Kc>& m,
                            RowVals<Kc>& l, int lane) {
    if constexpr (Kc::kOverlap) {
      attend_overlapped(kv, p, tl, lr, kb, q, o, m, l, lane);
    } else {
      attend_serially<Kc>(kv, p, tl, lr, kb, q, o, m, l, lane);
    }
  }
};

}  // namespace eb::prefill
