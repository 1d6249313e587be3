// The online softmax both mainloops share: per lane, the rows it holds accumulators for, the running max m
// and sum l of each, and the step that turns one K/V tile's scores S into probabilities P. The accumulator
// layout is mma.sync's m16n8 one in both mainloops (wgmma.cuh), so the same code serves both; which packed
// row a lane's row r is comes from the mainloop (Mainloop::lane_row). Kc: a KernelConfig (traits.cuh).
#pragma once
#include "../mma.cuh"
#include "../variant.cuh"
#include "tile.cuh"

namespace eb::prefill {

template <class Kc> using Scores = float[Kc::kMmaM][Kc::kN / 8][4];  // S of the warp's rows against one K/V tile
template <class Kc> using OAccum = float[Kc::kMmaM][Kc::D / 8][4];   // O of the warp's rows
template <class Kc> using RowVals = float[Kc::kLaneRows];            // one value per lane row (m, l, rescale)

// The rows a lane holds accumulators for: rows g and g+8 of each of the warp's kMmaM row blocks (g = lane / 4);
// lane row r is block r / 2, half r % 2.
template <class Kc> struct LaneRows {
  using Var = typename Kc::Var;
  int qp[Kc::kLaneRows];  // query position
  bool valid[Kc::kLaneRows];
  typename Var::Row var[Kc::kLaneRows];
  // Units of the running max: raw dot products when the variant's score is a plain scale (it
  // is then folded into the exponent's FFMA), else the variant's log2 scores.
  EB_DEVICE float unit(int r) const { return Var::linear ? var[r].scale_log2 : 1.f; }
};

// The lane's rows of a tile: position, head and the variant's per-row constants.
template <class Kc>
EB_DEVICE LaneRows<Kc> lane_rows(const PrefillParams& p, const Tile& tl, int kv_head, const Divisor& group, int warp,
                                 int lane) {
  LaneRows<Kc> lr;
#pragma unroll
  for (int r = 0; r < Kc::kLaneRows; ++r) {
    const int row = Kc::Mainloop::lane_row(warp, lane, r);
    lr.valid[r] = row < tl.rows;
    const int pr = tl.r0 + (lr.valid[r] ? row : 0);
    lr.qp[r] = tl.kv_len - tl.q_len + div_by<Kc>(group, pr);
    lr.var[r] = Kc::Var::row(p.variant, kv_head * int(group.d) + mod_by<Kc>(group, pr));
  }
  return lr;
}

template <class Kc> EB_DEVICE void zero_state(OAccum<Kc>& o, RowVals<Kc>& m, RowVals<Kc>& l) {
#pragma unroll
  for (int mi = 0; mi < Kc::kMmaM; ++mi)
#pragma unroll
    for (int i = 0; i < Kc::D / 8; ++i) o[mi][i][0] = o[mi][i][1] = o[mi][i][2] = o[mi][i][3] = 0.f;
#pragma unroll
  for (int r = 0; r < Kc::kLaneRows; ++r) m[r] = -CUDART_INF_F, l[r] = 0.f;
}

// The online softmax of one K/V tile for the warp's rows, given S: the variant's scores (masked only on
// tiles that cross the causal diagonal, the KV end or the window edge: kMask), the running max, P in s, l
// rescaled; returns whether O must be rescaled too (by `rescale`, see rescale_o): only when some row max of
// the warp moved (a warp vote), since most tiles after the first few leave every max in place and the rescale
// costs D / 2 multiplies per row and lane. Two specializations keep the mask's per-element code out of the
// common, unmasked tiles.
template <class Kc, bool kMask>
EB_DEVICE bool softmax(const PrefillParams& p, const Tile& tl, const LaneRows<Kc>& lr, Scores<Kc>& s, RowVals<Kc>& m,
                       RowVals<Kc>& l, RowVals<Kc>& rescale, int first, int lane) {
  using Var = typename Kc::Var;
  constexpr int kMmaM = Kc::kMmaM, kN = Kc::kN, kLaneRows = Kc::kLaneRows;
  float row_max[kLaneRows];
#pragma unroll
  for (int r = 0; r < kLaneRows; ++r) row_max[r] = -CUDART_INF_F;
#pragma unroll
  for (int mi = 0; mi < kMmaM; ++mi) {
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = 2 * mi + i / 2;
        const int kp = first + 8 * n + 2 * (lane % 4) + (i % 2);
        float x = Var::linear ? s[mi][n][i] : Var::score(s[mi][n][i], lr.var[r], lr.qp[r], kp);
        if (kMask && (kp >= tl.kv_len || !Var::visible(p.variant, p.causal, lr.qp[r], kp))) x = -CUDART_INF_F;
        s[mi][n][i] = x;
        row_max[r] = fmaxf(row_max[r], x);
      }
    }
  }
  bool max_moved = false;
#pragma unroll
  for (int r = 0; r < kLaneRows; ++r) {
    const int mi = r / 2, h = r % 2;
    const float m_old = m[r], row_m = quad_max(row_max[r]);
    const float unit = lr.unit(r);
    // A row's first visible keys set its max with no rescale (O and l are still 0); later the max moves
    // only past the slack (Traits::kRescaleSlack).
    const bool first_keys = m_old == -CUDART_INF_F;
    const bool moves = !first_keys && (row_m - m_old) * unit > Kc::kRescaleSlack;
    if (first_keys || moves) m[r] = fmaxf(m_old, row_m);
    const float base = (m[r] == -CUDART_INF_F ? 0.f : m[r]) * unit;
    // Exactly 1 where the max held (not exp2 of a rounding residue), so skipping is exact.
    max_moved |= moves;
    rescale[r] = moves ? fast_exp2(fmaf(m_old, unit, -base)) : 1.f;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) {
      s[mi][n][2 * h] = fast_exp2(fmaf(s[mi][n][2 * h], unit, -base));
      s[mi][n][2 * h + 1] = fast_exp2(fmaf(s[mi][n][2 * h + 1], unit, -base));
      if constexpr (!Kc::kMmaRowSum) sum += s[mi][n][2 * h] + s[mi][n][2 * h + 1];
    }
    l[r] = l[r] * rescale[r] + sum;  // with kMmaRowSum, P V's MMAs add the tile's sum
  }
  return __any_sync(0xffffffff, max_moved);
}

template <class Kc> EB_DEVICE void rescale_o(OAccum<Kc>& o, const RowVals<Kc>& rescale) {
#pragma unroll
  for (int mi = 0; mi < Kc::kMmaM; ++mi) {
#pragma unroll
    for (int dt = 0; dt < Kc::D / 8; ++dt) {
      o[mi][dt][0] *= rescale[2 * mi];
      o[mi][dt][1] *= rescale[2 * mi];
      o[mi][dt][2] *= rescale[2 * mi + 1];
      o[mi][dt][3] *= rescale[2 * mi + 1];
    }
  }
}

// P of 16-key chunk kt as an MMA A operand (bf16/fp16 pairs), its row sums added to l when the MMA sums them.
template <class Kc>
EB_DEVICE void pack_p(uint32_t (&pa)[4], const float (&s)[Kc::kN / 8][4], int kt, float& l_lo, float& l_hi) {
  using T = typename Kc::T;
  pa[0] = pack2<T>(s[2 * kt][0], s[2 * kt][1]);
  pa[1] = pack2<T>(s[2 * kt][2], s[2 * kt][3]);
  pa[2] = pack2<T>(s[2 * kt + 1][0], s[2 * kt + 1][1]);
  pa[3] = pack2<T>(s[2 * kt + 1][2], s[2 * kt + 1][3]);
  if constexpr (Kc::kMmaRowSum) mma_rowsum<T>(l_lo, l_hi, pa);
}

}  // namespace eb::prefill
