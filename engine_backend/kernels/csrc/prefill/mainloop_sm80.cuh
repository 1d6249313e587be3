// The mma.sync mainloop (sm80 and later): each warp computes S = Q K^T and O += P V for its kMmaM 16-row
// MMA tiles with m16n8k16 MMAs, K and V fragments read from shared memory by ldmatrix. S and O accumulate in
// registers, and P is re-packed from the S accumulators into the A operand of P V without touching shared
// memory. Tiles in shared memory are rows of head_dim elements, 16-byte chunks swizzled (mma.cuh).
#pragma once
#include "pipeline.cuh"

namespace eb::prefill {

template <class Kc> struct MainloopSm80 {
  using T = typename Kc::T;
  static constexpr int D = Kc::D, kN = Kc::kN, kMmaM = Kc::kMmaM, kChunks = Kc::kChunks;
  static constexpr int kRowBytes = Kc::kRowBytes, kWarpRows = Kc::kWarpRows;

  // Where chunk c of row r of a tile lives (tiles of any row count: rows of head_dim elements).
  template <int kRows> static EB_DEVICE int smem_offset(int r, int c) { return swizzle<kChunks>(r, c); }

  // The packed row of lane row r (see LaneRows): warp w holds rows kWarpRows w .. kWarpRows (w + 1) - 1.
  static EB_DEVICE int lane_row(int warp, int lane, int r) {
    const int in_tile = lane / 4 + 8 * (r % 2);
    return warp * kWarpRows + 16 * (r / 2) + in_tile;
  }

  // cp.async writes are visible to ldmatrix after the barrier alone.
  static EB_DEVICE void fence_loaded() {}

  // The warp's Q fragments for k-step kk (16 columns of head dim), for each of its MMA tiles: in registers or
  // re-read from shared memory (Traits::kQInRegs).
  struct QOperand {
    uint32_t reg[Kc::kQInRegs ? D / 16 : 1][kMmaM][4];
    uint32_t lane_addr;  // this lane's ldmatrix address for k-step 0 of MMA tile 0

    EB_DEVICE void init(uint32_t sq, int warp, int lane) {
      lane_addr = sq + swizzle<kChunks>(warp * kWarpRows + lane % 16, lane / 16);
      if constexpr (Kc::kQInRegs) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
          for (int mi = 0; mi < kMmaM; ++mi) load(reg[kk][mi], kk, mi);
      }
    }
    EB_DEVICE void load(uint32_t (&f)[4], int kk, int mi) const {
      ldmatrix_x4(f, swizzle_step(lane_addr, kk) + mi * 16 * kRowBytes);
    }
    EB_DEVICE void get(uint32_t (&f)[kMmaM][4], int kk) const {
#pragma unroll
      for (int mi = 0; mi < kMmaM; ++mi) {
        if constexpr (Kc::kQInRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) f[mi][i] = reg[kk][mi][i];
        } else {
          load(f[mi], kk, mi);
        }
      }
    }
  };

  // S = Q K^T for the first `chunks` 16-key chunks of one K tile (the rest of S stays 0: those keys
  // are masked). (Computing the next tile's S in the same basic block as this tile's softmax, for the
  // scheduler to interleave them, is slower with mma.sync: kept out.)
  static EB_DEVICE void qk(Scores<Kc>& s, const QOperand& qf, uint32_t kbase, int lane, int chunks) {
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
      for (int n = 0; n < kN / 8; ++n) s[mi][n][0] = s[mi][n][1] = s[mi][n][2] = s[mi][n][3] = 0.f;
    const uint32_t k_lane = kbase + swizzle<kChunks>((lane % 8) + 8 * (lane / 16), (lane / 8) % 2);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[kMmaM][4];
      qf.get(qa, kk);
      const uint32_t k_kk = swizzle_step(k_lane, kk);
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        if (np >= chunks) break;  // warp-uniform
        uint32_t kb[4];
        ldmatrix_x4(kb, k_kk + np * 16 * kRowBytes);
#pragma unroll
        for (int mi = 0; mi < kMmaM; ++mi) {
          mma_16816<T>(s[mi][2 * np], qa[mi], kb);
          mma_16816<T>(s[mi][2 * np + 1], qa[mi], kb + 2);
        }
      }
    }
  }

  // O += P V over the tile's first `chunks` 16-key chunks (P is 0 past them: masked for every row of the warp).
  static EB_DEVICE void pv(const Scores<Kc>& s, OAccum<Kc>& o, RowVals<Kc>& l, uint32_t vbase, int lane, int chunks) {
    const uint32_t v_lane = vbase + swizzle<kChunks>((lane % 8) + 8 * ((lane / 8) % 2), lane / 16);
#pragma unroll
    for (int kt = 0; kt < kN / 16; ++kt) {
      if (kt >= chunks) break;
      uint32_t pa[kMmaM][4];
#pragma unroll
      for (int mi = 0; mi < kMmaM; ++mi) pack_p<Kc>(pa[mi], s[mi], kt, l[2 * mi], l[2 * mi + 1]);
#pragma unroll
      for (int dt2 = 0; dt2 < D / 16; ++dt2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, swizzle_step(v_lane, dt2) + kt * 16 * kRowBytes);
#pragma unroll
        for (int mi = 0; mi < kMmaM; ++mi) {
          mma_16816<T>(o[mi][2 * dt2], pa[mi], vb);
          mma_16816<T>(o[mi][2 * dt2 + 1], pa[mi], vb + 2);
        }
      }
    }
  }

  // One K/V tile: its S, then the softmax and P V, over its first `chunks` 16-key chunks.
  template <bool kMask>
  static EB_DEVICE void attend_tile(const PrefillParams& p, const Tile& tl, const LaneRows<Kc>& lr, const QOperand& qf,
                                    OAccum<Kc>& o, RowVals<Kc>& m, RowVals<Kc>& l, uint32_t kbase, uint32_t vbase,
                                    int first, int lane, int chunks = kN / 16) {
    Scores<Kc> s;
    float rescale[Kc::kLaneRows];
    qk(s, qf, kbase, lane, chunks);
    if (softmax<Kc, kMask>(p, tl, lr, s, m, l, rescale, first, lane)) rescale_o<Kc>(o, rescale);
    pv(s, o, l, vbase, lane, chunks);
  }

  static EB_DEVICE void run(KvPipeline<Kc>& kv, const PrefillParams& p, const Tile& tl, const LaneRows<Kc>& lr,
                            const KeyBounds<Kc>& kb, const QOperand& qf, OAccum<Kc>& o, RowVals<Kc>& m,
                            RowVals<Kc>& l, int lane) {
    attend_serially<Kc>(kv, p, tl, lr, kb, qf, o, m, l, lane);
  }
};

}  // namespace eb::prefill
