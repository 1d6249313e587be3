// A CTA's query tile: which request's rows it holds (from the plan), the KV range they may see, and where
// K/V tiles need the mask. Kc: a KernelConfig (traits.cuh).
#pragma once
#include "../common.cuh"
#include "params.h"

namespace eb::prefill {

struct Tile {
  int q0, q_len, kv_len;     // its request's first query, query count and KV length
  int r0, rows;              // packed rows r0 .. r0+rows-1 of the request's q_len * group
  int kv_begin, kv_end;      // KV range any row of the tile may see
  const int32_t* pages;
};

// n / d and n % d for 0 <= n < 2^31: packed query rows -> (token, head of the group), by the integer division
// or the divisor's magic number (Traits::kHwDivision says which, and why).
template <class Kc> EB_DEVICE int div_by(const Divisor& d, int n) {
  if constexpr (Kc::kHwDivision) return n / int(d.d);
  return int((__umulhi(uint32_t(n), d.magic) + uint32_t(n)) >> d.shift);
}
template <class Kc> EB_DEVICE int mod_by(const Divisor& d, int n) { return n - div_by<Kc>(d, n) * int(d.d); }

// Tile t of the plan from its two records (loaded by the caller, so the loads need not wait for the check that
// t is one of the plan's tiles: the arrays hold max_tiles >= the grid's tiles).
template <class Kc> EB_DEVICE Tile tile_of(const PrefillParams& p, int4 req, int tile_idx, const Divisor& group) {
  Tile tl;
  tl.q0 = req.x;
  tl.q_len = req.y;
  tl.kv_len = req.z;
  tl.pages = p.indices + req.w;
  tl.r0 = tile_idx * Kc::kM;
  tl.rows = min(Kc::kM, tl.q_len * int(group.d) - tl.r0);
  const int qp_first = tl.kv_len - tl.q_len + div_by<Kc>(group, tl.r0);
  const int qp_last = tl.kv_len - tl.q_len + div_by<Kc>(group, tl.r0 + tl.rows - 1);
  tl.kv_end = p.causal ? min(tl.kv_len, qp_last + 1) : tl.kv_len;
  tl.kv_begin = Kc::Var::window ? max(0, qp_first - p.variant.window_left) : 0;
  tl.kv_end = max(tl.kv_end, tl.kv_begin);
  return tl;
}

// Where a tile's K/V tiles need the mask, and where a warp's rows see no more keys.
template <class Kc> struct KeyBounds {
  int clean_end;     // rows of the tile see keys below it without any mask
  int last_qp;       // query position of the tile's last row (sliding window)
  int warp_key_end;  // keys past it are masked for every row of this warp (all keys, if it has no rows)

  EB_DEVICE KeyBounds(const PrefillParams& p, const Tile& tl, const Divisor& group, int warp) {
    constexpr int kWarpRows = Kc::kWarpRows;
    const int first_qp = tl.kv_len - tl.q_len + div_by<Kc>(group, tl.r0);
    clean_end = p.causal ? min(tl.kv_len, first_qp + 1) : tl.kv_len;
    last_qp = tl.kv_len - tl.q_len + div_by<Kc>(group, tl.r0 + tl.rows - 1);
    const int warp_last_row = min(tl.rows, (warp + 1) * kWarpRows) - 1;
    warp_key_end = warp_last_row < warp * kWarpRows ? 0
                   : p.causal ? min(tl.kv_end, tl.kv_len - tl.q_len + div_by<Kc>(group, tl.r0 + warp_last_row) + 1)
                              : tl.kv_end;
  }
  EB_DEVICE bool masked(const PrefillParams& p, int first) const {
    return first + Kc::kN > clean_end || (Kc::Var::window && first < last_qp - p.variant.window_left);
  }
  // 16-key chunks of a masked tile the warp computes (the rest lie wholly past its rows: Traits::kSkipMaskedKeys).
  EB_DEVICE int chunks(int first) const {
    constexpr int kN = Kc::kN;
    return Kc::kSkipMaskedKeys ? min(kN / 16, max(0, (warp_key_end - first + 15) / 16)) : kN / 16;
  }
};

}  // namespace eb::prefill
