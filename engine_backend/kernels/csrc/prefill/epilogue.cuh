// Epilogue: each lane's rows of O normalised by their sums, stored to global memory (straight from the
// accumulators or staged through shared memory: Traits::kStagedStore), and their lse. Kc: a KernelConfig.
#pragma once
#include "loads.cuh"
#include "softmax.cuh"

namespace eb::prefill {

// Staged O (in the Q tile's space, free once every warp is past its last S) -> global memory: whole 16-byte
// chunks of each row, rows as issue_q reads them, one coalesced 16-byte store per chunk instead of a lane's
// 4-byte pairs spread over 8 rows.
template <class Kc>
EB_DEVICE void store_tile(const PrefillParams& p, const Tile& tl, uint8_t* sq, int kv_head, const Divisor& group) {
  using T = typename Kc::T;
  constexpr int kM = Kc::kM, kRowStep = Kc::kRowStep;
  __syncthreads();  // every lane's O is in shared memory
  const uint32_t base = smem_addr(sq);
  RowCursor<Kc> rc(tl, group);
  T* col = static_cast<T*>(p.out) + long(tl.q0) * p.out_stride_n + long(kv_head * rc.g) * p.out_stride_h + rc.c * 8;
#pragma unroll
  for (int j = 0; j < kM / kRowStep; ++j, rc.next()) {
    const int r = rc.r_first + j * kRowStep;
    if (r >= tl.rows) continue;
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(base + Kc::Mainloop::template smem_offset<kM>(r, rc.c)));
    // As PTX: a 16-byte store (the compiler split the C++ one into four 4-byte stores).
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n"
                 ::"l"(col + long(rc.token) * p.out_stride_n + long(rc.head) * p.out_stride_h),
                 "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
  }
}

// Normalise and store this lane's rows; lse in natural log. The rows' sums first, in one block, so
// their shuffles overlap; a row's token and head are re-derived here rather than kept in registers
// through the loop (where they were spilled).
template <class Kc>
EB_DEVICE void store_rows(const PrefillParams& p, const Tile& tl, const LaneRows<Kc>& lr, const OAccum<Kc>& o,
                          const RowVals<Kc>& m, const RowVals<Kc>& l, const Divisor& group, int kv_head, int warp,
                          int lane, uint8_t* sq) {
  using T = typename Kc::T;
  using Mainloop = typename Kc::Mainloop;
  constexpr int D = Kc::D, kM = Kc::kM, kLaneRows = Kc::kLaneRows;
  constexpr bool kStagedStore = Kc::kStagedStore;
  float sum[kLaneRows];
#pragma unroll
  for (int r = 0; r < kLaneRows; ++r) sum[r] = Kc::kMmaRowSum ? l[r] : quad_sum(l[r]);  // MMA sums are whole rows
  if constexpr (kStagedStore) __syncthreads();  // every warp is done reading Q
#pragma unroll
  for (int r = 0; r < kLaneRows; ++r) {
    // sum >= 1 where any key is visible (the key at the row max contributes at least 1): the fast reciprocal
    // is exact to an ulp there.
    const float inv = sum[r] > 0.f ? __fdividef(1.f, sum[r]) : 0.f;
    const int mi = r / 2, h = r % 2;
    if constexpr (kStagedStore) {
      const uint32_t row = smem_addr(sq) + 4 * (lane % 4);
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const uint32_t pair = pack2<T>(o[mi][dt][2 * h] * inv, o[mi][dt][2 * h + 1] * inv);
        asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(
                         row + Mainloop::template smem_offset<kM>(Mainloop::lane_row(warp, lane, r), dt)),
                     "r"(pair));
      }
    }
    if (!lr.valid[r]) continue;
    const int pr = tl.r0 + Mainloop::lane_row(warp, lane, r);
    const int token_in_req = div_by<Kc>(group, pr);
    const long token = tl.q0 + token_in_req;
    const int head = kv_head * int(group.d) + (pr - token_in_req * int(group.d));
    if constexpr (!kStagedStore) {
      T* dst = static_cast<T*>(p.out) + token * p.out_stride_n + long(head) * p.out_stride_h + 2 * (lane % 4);
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<typename Elem<T>::Pair*>(dst + 8 * dt) =
            Elem<T>::from_float2(o[mi][dt][2 * h] * inv, o[mi][dt][2 * h + 1] * inv);
      }
    }
    if (p.lse && lane % 4 == 0) {
      p.lse[token * p.lse_stride_n + head] =
          sum[r] > 0.f ? (m[r] * lr.unit(r) + fast_log2(sum[r])) * kLn2 : -CUDART_INF_F;
    }
  }
  if constexpr (kStagedStore) store_tile<Kc>(p, tl, sq, kv_head, group);
}

}  // namespace eb::prefill
