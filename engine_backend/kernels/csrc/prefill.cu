// Prefill / append attention: ragged queries over a paged BSR KV (ragged K/V is the page-size-1
// case), FlashAttention-2 style on mma.sync tensor cores (sm80+), causal mask aligned to the end
// of each request's KV, GQA heads packed into the query tile.
// Template parameters: ${DTYPE}, head dim ${HEAD_DIM}, variant (${SOFT_CAP}, ${SLIDING_WINDOW}, ${ALIBI}),
// warps per CTA ${WARPS} (16 query rows each).
//
// One CTA computes one query tile (kM packed rows = tokens x query heads of one KV head) against
// all the KV it may see, streaming K/V tiles of kN tokens through a two-stage cp.async pipeline.
// Each warp owns 16 rows: Q fragments stay in registers, S and O accumulate in registers, P is
// re-packed from the S accumulators into the A operand of P.V without touching shared memory.
#include <cub/block/block_scan.cuh>

#include "mma.cuh"
#include "prefill.h"
#include "variant.cuh"

namespace eb {
namespace {

using T = ${DTYPE};
using Var = Variant<${SOFT_CAP}, ${SLIDING_WINDOW}, ${ALIBI}>;
constexpr int D = ${HEAD_DIM};

constexpr int kWarps = ${WARPS};
constexpr int kThreads = kWarps * 32;
constexpr int kM = 16 * kWarps;   // packed query rows per tile
constexpr int kN = D == 256 ? 32 : 64;  // KV tokens per tile
constexpr int kChunks = D / 8;
constexpr int kStages = 3;  // K/V tiles in shared memory: two in flight while one is computed
constexpr int kTileBytes = kN * D * 2;
constexpr int kSmemQ = kM * D * 2;
constexpr int kSmemBytes = kSmemQ + kStages * 2 * kTileBytes;

struct Tile {
  int row;                   // request
  int q0, q_len, kv_len;     // its queries' start and count, its KV length
  int r0, rows;              // packed rows r0 .. r0+rows-1 of the request's q_len * group
  int kv_begin, kv_end;      // KV range any row of the tile may see
  const int32_t* pages;
};

EB_DEVICE Tile tile_of(const PrefillParams& p, int t, int group) {
  Tile tl;
  tl.row = p.plan.tile_row[t];
  tl.q0 = p.plan.qo_start[tl.row];
  tl.q_len = p.plan.qo_start[tl.row + 1] - tl.q0;
  tl.kv_len = p.plan.kv_len[tl.row];
  tl.r0 = p.plan.tile_idx[t] * kM;
  tl.rows = min(kM, tl.q_len * group - tl.r0);
  const int qp_first = tl.kv_len - tl.q_len + tl.r0 / group;
  const int qp_last = tl.kv_len - tl.q_len + (tl.r0 + tl.rows - 1) / group;
  tl.kv_end = p.causal ? min(tl.kv_len, qp_last + 1) : tl.kv_len;
  tl.kv_begin = Var::window ? max(0, qp_first - p.variant.window_left) : 0;
  tl.kv_end = max(tl.kv_end, tl.kv_begin);
  tl.pages = p.indices + p.plan.page_ptr[tl.row];
  return tl;
}

// Packed query rows -> shared memory (zeros past the tile's rows).
EB_DEVICE void issue_q(const PrefillParams& p, const Tile& tl, uint8_t* sq, int kv_head, int group) {
  const uint32_t base = smem_addr(sq);
  for (int i = threadIdx.x; i < kM * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const bool valid = r < tl.rows;
    const int pr = tl.r0 + (valid ? r : 0);
    const T* src = static_cast<const T*>(p.q) + long(tl.q0 + pr / group) * p.q_stride_n +
                   long(kv_head * group + pr % group) * p.q_stride_h + c * 8;
    cp_async_16(base + swizzle<kChunks>(r, c), src, valid);
  }
}

// Each thread copies kLoads 16-byte chunks of a K (and of a V) tile: chunk i of the tile is
// row i / kChunks, column i % kChunks, for i = threadIdx.x + j * kThreads.
constexpr int kLoads = kN * kChunks / kThreads;
static_assert(kN * kChunks % kThreads == 0, "tile chunks must divide evenly among threads");

// Page ids of the rows this thread copies in the tile starting at `first`: loaded one tile
// ahead, so the lookup's latency hides behind a tile of MMAs instead of stalling the copy.
struct TilePages {
  int page[kLoads];
  EB_DEVICE void load(const PrefillParams& p, const Tile& tl, int first) {
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int tok = first + threadIdx.x / kChunks + j * (kThreads / kChunks);
      page[j] = tok < tl.kv_end ? tl.pages[tok >> p.log2_page] : 0;
    }
  }
};

// One K/V tile (kN tokens from `first`) -> shared memory; tokens at or past kv_end are zeros.
// A thread always copies the same column chunk (kThreads is a multiple of kChunks), of rows
// kRowStep apart, so only the page and token offsets change per load.
constexpr int kRowStep = kThreads / kChunks;
static_assert(kThreads % kChunks == 0, "each thread keeps one column chunk");

EB_DEVICE void issue_kv(const PrefillParams& p, const Tile& tl, const TilePages& pg, uint8_t* sk, uint8_t* sv,
                        int first, int kv_head) {
  const int c = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
  const T* kcol = static_cast<const T*>(p.k) + long(kv_head) * p.k_stride_head + c * 8;
  const T* vcol = static_cast<const T*>(p.v) + long(kv_head) * p.v_stride_head + c * 8;
  const uint32_t kb = smem_addr(sk), vb = smem_addr(sv);
  const int page_mask = (1 << p.log2_page) - 1;
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const int r = r0 + j * kRowStep;
    const int tok = first + r;
    const bool valid = tok < tl.kv_end;
    const int in_page = tok & page_mask;
    const T* k = kcol + pg.page[j] * p.k_stride_page + in_page * int(p.k_stride_tok);
    const T* v = vcol + pg.page[j] * p.v_stride_page + in_page * int(p.v_stride_tok);
    cp_async_16(kb + swizzle<kChunks>(r, c), k, valid);
    cp_async_16(vb + swizzle<kChunks>(r, c), v, valid);
  }
}

// Per-lane rows g and g+8 of the warp's 16: query position, head, validity.
struct LaneRows {
  int qp[2];
  int head[2];
  bool valid[2];
  typename Var::Row var[2];
};

// One K/V tile against the warp's 16 query rows: S = Q K^T, the variant's scores (masked only
// on tiles that cross the causal diagonal, the KV end or the window edge: kMask), online
// softmax, O += P V. Two specializations keep the mask's per-element code out of the
// common, unmasked tiles.
template <bool kMask>
EB_DEVICE void attend_tile(const PrefillParams& p, const Tile& tl, const LaneRows& lr, const uint32_t (&qa)[D / 16][4],
                           float (&o)[D / 8][4], float (&m)[2], float (&l)[2], uint32_t kbase, uint32_t vbase,
                           int first, int lane) {
  float s[kN / 8][4];
#pragma unroll
  for (int n = 0; n < kN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t kb[4];
      ldmatrix_x4(kb, kbase + swizzle<kChunks>(np * 16 + (lane % 8) + 8 * (lane / 16), 2 * kk + (lane / 8) % 2));
      mma_16816<T>(s[2 * np], qa[kk], kb);
      mma_16816<T>(s[2 * np + 1], qa[kk], kb + 2);
    }
  }
  float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
  for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = i / 2;
      const int kp = first + 8 * n + 2 * (lane % 4) + (i % 2);
      float x = Var::score(s[n][i], lr.var[r], lr.qp[r], kp);
      if (kMask && (kp >= tl.kv_len || !Var::visible(p.variant, p.causal, lr.qp[r], kp))) x = -CUDART_INF_F;
      s[n][i] = x;
      row_max[r] = fmaxf(row_max[r], x);
    }
  }
  float rescale[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_new = fmaxf(m[r], quad_max(row_max[r]));
    const float base = m_new == -CUDART_INF_F ? 0.f : m_new;
    rescale[r] = fast_exp2(m[r] - base);
    m[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) {
      s[n][2 * r] = fast_exp2(s[n][2 * r] - base);
      s[n][2 * r + 1] = fast_exp2(s[n][2 * r + 1] - base);
      sum += s[n][2 * r] + s[n][2 * r + 1];
    }
    l[r] = l[r] * rescale[r] + sum;
  }
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    o[dt][0] *= rescale[0];
    o[dt][1] *= rescale[0];
    o[dt][2] *= rescale[1];
    o[dt][3] *= rescale[1];
  }
#pragma unroll
  for (int kt = 0; kt < kN / 16; ++kt) {
    const uint32_t pa[4] = {pack2<T>(s[2 * kt][0], s[2 * kt][1]), pack2<T>(s[2 * kt][2], s[2 * kt][3]),
                            pack2<T>(s[2 * kt + 1][0], s[2 * kt + 1][1]),
                            pack2<T>(s[2 * kt + 1][2], s[2 * kt + 1][3])};
#pragma unroll
    for (int dt2 = 0; dt2 < D / 16; ++dt2) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, vbase + swizzle<kChunks>(kt * 16 + (lane % 8) + 8 * ((lane / 8) % 2), 2 * dt2 + lane / 16));
      mma_16816<T>(o[2 * dt2], pa, vb);
      mma_16816<T>(o[2 * dt2 + 1], pa, vb + 2);
    }
  }
}

__global__ void __launch_bounds__(kThreads, kWarps == 4 && D <= 128 ? 2 : 1) prefill_kernel(const PrefillParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int hkv = p.num_kv_heads;
  const int kv_head = blockIdx.x % hkv;
  const int t = blockIdx.x / hkv;
  if (t >= p.plan.header[1]) return;
  const int group = p.num_qo_heads / hkv;
  const Tile tl = tile_of(p, t, group);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint8_t* sq = smem;
  auto sk = [&](int s) { return smem + kSmemQ + s * 2 * kTileBytes; };
  auto sv = [&](int s) { return smem + kSmemQ + s * 2 * kTileBytes + kTileBytes; };

  const int n_tiles = (tl.kv_end - tl.kv_begin + kN - 1) / kN;
  issue_q(p, tl, sq, kv_head, group);
  cp_async_commit();
  TilePages pages;
  for (int s = 0; s < kStages - 1; ++s) {  // prologue: tiles 0 .. kStages-2
    pages.load(p, tl, tl.kv_begin + s * kN);
    if (s < n_tiles) issue_kv(p, tl, pages, sk(s), sv(s), tl.kv_begin + s * kN, kv_head);
    cp_async_commit();
  }
  pages.load(p, tl, tl.kv_begin + (kStages - 1) * kN);

  LaneRows lr;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + lane / 4 + 8 * i;
    lr.valid[i] = r < tl.rows;
    const int pr = tl.r0 + (lr.valid[i] ? r : 0);
    lr.qp[i] = tl.kv_len - tl.q_len + pr / group;
    lr.head[i] = kv_head * group + pr % group;
    lr.var[i] = Var::row(p.variant, lr.head[i]);
  }

  cp_async_wait<kStages - 1>();  // Q has landed
  __syncthreads();
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldmatrix_x4(qa[kk], smem_addr(sq) + swizzle<kChunks>(warp * 16 + lane % 16, 2 * kk + lane / 16));

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-CUDART_INF_F, -CUDART_INF_F}, l[2] = {0.f, 0.f};
  // Rows of this tile see keys up to min_visible_end without any mask.
  const int first_qp = tl.kv_len - tl.q_len + tl.r0 / group;
  const int clean_end = p.causal ? min(tl.kv_len, first_qp + 1) : tl.kv_len;
  const int last_qp = tl.kv_len - tl.q_len + (tl.r0 + tl.rows - 1) / group;

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j % kStages;
    const int first = tl.kv_begin + j * kN;
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile j is visible to all; everyone is done with tile j-1's stage
    const int ahead = j + kStages - 1;  // the tile loaded into the stage tile j-1 used
    if (ahead < n_tiles) issue_kv(p, tl, pages, sk(ahead % kStages), sv(ahead % kStages), first + (kStages - 1) * kN, kv_head);
    cp_async_commit();
    if (ahead + 1 < n_tiles) pages.load(p, tl, first + kStages * kN);

    const uint32_t kbase = smem_addr(sk(stage)), vbase = smem_addr(sv(stage));
    const bool masked = first + kN > clean_end || (Var::window && first < last_qp - p.variant.window_left);
    if (masked) {
      attend_tile<true>(p, tl, lr, qa, o, m, l, kbase, vbase, first, lane);
    } else {
      attend_tile<false>(p, tl, lr, qa, o, m, l, kbase, vbase, first, lane);
    }
}
  cp_async_wait<0>();

  // Epilogue: normalise and store this lane's two rows; lse in natural log.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(l[r]);
    if (!lr.valid[r]) continue;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int pr = tl.r0 + warp * 16 + lane / 4 + 8 * r;
    const long token = tl.q0 + pr / group;
    T* dst = static_cast<T*>(p.out) + token * p.out_stride_n + long(lr.head[r]) * p.out_stride_h + 2 * (lane % 4);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<typename Elem<T>::Pair*>(dst + 8 * dt) =
          Elem<T>::from_float2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
    if (p.lse && lane % 4 == 0) {
      p.lse[token * p.lse_stride_n + lr.head[r]] = sum > 0.f ? (m[r] + fast_log2(sum)) * kLn2 : -CUDART_INF_F;
    }
  }
}

// ---------------------------------------------------------------------- planning kernel
constexpr int kPlanThreads = 1024;
using PlanScan = cub::BlockScan<int, kPlanThreads>;

__global__ void __launch_bounds__(kPlanThreads) prefill_plan_kernel(const int32_t* __restrict__ qo_indptr,
                                                                   const int32_t* __restrict__ indptr,
                                                                   const int32_t* __restrict__ kv_lens, int rows,
                                                                   PrefillPlan plan, int group, int max_tiles) {
  __shared__ typename PlanScan::TempStorage scan;
  __shared__ int carry;
  const int tid = threadIdx.x;
  if (tid == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < rows; base += kPlanThreads) {
    const int b = base + tid;
    int tiles = 0;
    if (b < rows) {
      const int q_len = qo_indptr[b + 1] - qo_indptr[b];
      tiles = (q_len * group + kM - 1) / kM;
      plan.qo_start[b] = qo_indptr[b];
      plan.kv_len[b] = kv_lens[b];
      plan.page_ptr[b] = indptr[b];
      if (b == rows - 1) plan.qo_start[rows] = qo_indptr[rows];
    }
    int first, total;
    PlanScan(scan).ExclusiveSum(tiles, first, total);
    first += carry;
    // The last tile of a request sees the most KV under a causal mask: schedule it first.
    for (int i = 0; i < tiles && first + i < max_tiles; ++i) {
      plan.tile_row[first + i] = b;
      plan.tile_idx[first + i] = tiles - 1 - i;
    }
    __syncthreads();
    if (tid == 0) carry += total;
    __syncthreads();
  }
  if (tid == 0) {
    plan.header[0] = rows;
    plan.header[1] = min(carry, max_tiles);
  }
}

}  // namespace

int prefill_tile_rows() { return kM; }

void prefill_plan_launch(const int32_t* qo_indptr, const int32_t* indptr, const int32_t* kv_lens, int rows,
                         const PrefillPlan& plan, int group, int max_tiles, cudaStream_t stream) {
  prefill_plan_kernel<<<1, kPlanThreads, 0, stream>>>(qo_indptr, indptr, kv_lens, rows, plan, group, max_tiles);
}

void prefill_run_launch(const PrefillParams& params, cudaStream_t stream) {
  static bool configured = [] {
    cudaFuncSetAttribute(prefill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    return true;
  }();
  (void)configured;
  const int blocks = params.max_tiles * params.num_kv_heads;
  if (blocks > 0) prefill_kernel<<<blocks, kThreads, kSmemBytes, stream>>>(params);
}

}  // namespace eb
