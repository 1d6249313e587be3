// Prefill / append attention: ragged queries over a paged BSR KV (ragged K/V is the page-size-1
// case), FlashAttention-2 style on mma.sync tensor cores (sm80+), causal mask aligned to the end
// of each request's KV, GQA heads packed into the query tile.
// Template parameters: ${DTYPE}, head dim ${HEAD_DIM}, variant (${SOFT_CAP}, ${SLIDING_WINDOW}, ${ALIBI}),
// warps per CTA ${WARPS}, KV tokens per tile ${KV_TILE}, mainloop (${WGMMA}: Hopper warpgroup MMAs, else
// mma.sync); prefill.py picks them per plan and arch.
//
// One CTA computes one query tile (kM packed rows = tokens x query heads of one KV head) against
// all the KV it may see, streaming K/V tiles of kN tokens through a cp.async pipeline. Each warp
// owns kWarpRows rows (one or two 16-row MMA tiles): S and O accumulate in registers, and P is
// re-packed from the S accumulators into the A operand of P.V without touching shared memory.
#include <cub/block/block_scan.cuh>

#include "mma.cuh"
#include "wgmma.cuh"
#include "prefill.h"
#include "variant.cuh"

namespace eb {
namespace {

using T = ${DTYPE};
using Var = Variant<${SOFT_CAP}, ${SLIDING_WINDOW}, ${ALIBI}>;
constexpr int D = ${HEAD_DIM};

constexpr int kWarps = ${WARPS};
constexpr int kThreads = kWarps * 32;
// 16-row MMA tiles per warp. Two where their O accumulators fit in registers: every K and V
// fragment read from shared memory then feeds twice the MMAs, and shared-memory bandwidth,
// not the tensor cores, is what bounds an mma.sync attention loop.
// The EB_PREFILL_* macros (MMA_M, STAGES, LAZY_RESCALE, SKIP_MASKED_KEYS) override choices for
// experiments (scripts/prefill_experiment.py, which times them side by side); the defaults are the
// measured best.
// The Hopper mainloop (wgmma.cuh): each warpgroup (4 warps) runs S = Q K^T and O += P V on kMmaM blocks of 64
// rows as warpgroup MMAs from shared memory, a warp holding 16 rows of each block in the accumulator layout of
// an mma.sync tile; loads, masks, softmax and epilogue are shared with the mma.sync path.
// Two blocks (128 rows per warpgroup, FA2's rows per CTA on 4 warps) with 64-key tiles: each K/V tile then
// feeds twice the rows, and two such CTAs fit on an SM; measured against one 64-row block on the same shape,
// +15-18 % on every shape (results/prefill-h200-s17/exp-run1.log). 128-key tiles keep one block: two blocks'
// scores would not fit in registers beside O.
#ifndef EB_PREFILL_WGMMA
#define EB_PREFILL_WGMMA ${WGMMA}
#endif
constexpr bool kWgmma = EB_PREFILL_WGMMA;
constexpr int kN = ${KV_TILE};  // KV tokens per tile
#ifndef EB_PREFILL_MMA_M
#define EB_PREFILL_MMA_M (D > 128 || (kWgmma && kN > 64) ? 1 : 2)
#endif
constexpr int kMmaM = EB_PREFILL_MMA_M;
constexpr int kWarpRows = 16 * kMmaM;
constexpr int kM = kWarpRows * kWarps;  // packed query rows per tile
// Q fragments stay in registers where they fit beside O and S; otherwise (D=128 with two MMA
// tiles) they are re-read from shared memory at each k-step.
constexpr bool kQInRegs = !kWgmma && (kMmaM == 1 || D <= 64);
static_assert(!kWgmma || (kMmaM <= 2 && kWarps % 4 == 0 && (D == 64 || D == 128) && (kN == 64 || kN == 128)),
              "wgmma tiles: warpgroups of 64 or 128 rows, head dim 64 or 128, 64 or 128 keys");
#if EB_PREFILL_WGMMA && !defined(__CUDA_ARCH_FEAT_SM90_ALL) && defined(__CUDA_ARCH__)
#error "the wgmma mainloop needs sm_90a"
#endif
constexpr int kChunks = D / 8;
constexpr int kRowBytes = D * 2;
constexpr int kTileBytes = kN * D * 2;
constexpr int kSmemQ = kM * D * 2;
constexpr int kSmemPageIds = 2 * kN * 4;
constexpr int smem_bytes(int stages) { return kSmemQ + stages * 2 * kTileBytes + kSmemPageIds; }
// K/V tiles in shared memory (stages - 1 in flight while one is computed): three if two CTAs
// still fit on an SM, else two, since a second resident CTA hides more latency than a deeper
// pipeline of one. wgmma tiles of 8 warps run one CTA per SM: three if they fit.
constexpr int kSmemPerSm = 227 * 1024;
#ifndef EB_PREFILL_STAGES
#define EB_PREFILL_STAGES ((kWgmma && kWarps >= 8 ? 1 : 2) * smem_bytes(3) <= kSmemPerSm ? 3 : 2)
#endif
#ifndef EB_PREFILL_LAZY_RESCALE
#define EB_PREFILL_LAZY_RESCALE 1
#endif

constexpr int kStages = EB_PREFILL_STAGES;
// With wgmma and three stages, tile j's P V runs on the tensor cores while the warps compute tile j + 1's
// softmax (its S issued just before), K/V tiles landing one iteration earlier.
#ifndef EB_PREFILL_WG_OVERLAP
#define EB_PREFILL_WG_OVERLAP (kStages >= 3)
#endif
constexpr bool kOverlap = kWgmma && EB_PREFILL_WG_OVERLAP;
static_assert(!kOverlap || kStages >= 3, "overlapping P V with the next softmax needs a tile landed ahead");
// Skip the O rescale of a tile when no row max of the warp changed (most tiles after the first
// few): a warp vote instead of D/2 multiplies per row and lane.
constexpr bool kLazyRescale = EB_PREFILL_LAZY_RESCALE;
// The running max of a row moves only when a tile's max exceeds it by more than this many log2 units:
// probabilities are then at most 2^kRescaleSlack (256: exact enough as bf16/fp16 MMA operands, far from
// overflow in the fp32 sums), and the O rescale is skipped on most tiles, not only where the max held.
// Softmax is shift-invariant and l and the lse use the same max, so only rounding changes. 0 moves it
// on every increase.
#ifndef EB_PREFILL_RESCALE_SLACK
#define EB_PREFILL_RESCALE_SLACK 8
#endif
constexpr float kRescaleSlack = EB_PREFILL_RESCALE_SLACK;
// On the tile that crosses the causal diagonal, a warp skips the MMAs of 16-key chunks that lie
// wholly past its own rows' last position: a warp holds kWarpRows / group query positions, the tile
// kN keys, so much of the diagonal tile is invisible to most warps. Measured side by side: +2-3 % with
// 8 warps x 64 keys (results/prefill-experiment-h200.json), slower with 32-key tiles (1-3 %, their diagonal
// tile holds only two chunks) and with 4 warps x 64 keys (up to 4 %, results/prefill-h200-s14/), where the
// branches cost more than the MMAs they skip.
#ifndef EB_PREFILL_SKIP_MASKED_KEYS
#define EB_PREFILL_SKIP_MASKED_KEYS (kN >= 64 && kWarps >= 8 && !kWgmma)
#endif
constexpr bool kSkipMaskedKeys = EB_PREFILL_SKIP_MASKED_KEYS;
static_assert(!(kSkipMaskedKeys && kWgmma), "a warpgroup MMA covers the whole tile");
// Row sums of P by a tensor-core MMA against ones (mma_rowsum), from the same bf16/fp16 P that P V uses,
// instead of one FP32 add per probability and a quad reduction at the end (l[] then holds whole rows, not a
// lane's share). Measured side by side (results/prefill-h200-s15/, run1 `long-idscalar` vs `base-exp.log`,
// run6 `long` vs `long-addsum`): +1-11 % with 64-key tiles, whose loop no longer spills; with 32-key tiles
// no change in one run, 1-3 % slower on most shapes in the other, so they keep the adds.
#ifndef EB_PREFILL_MMA_ROWSUM
#define EB_PREFILL_MMA_ROWSUM (kN >= 64)
#endif
constexpr bool kMmaRowSum = EB_PREFILL_MMA_ROWSUM;
constexpr int kSmemBytes = smem_bytes(kStages);
static_assert(kStages <= 3, "page-id slots: tiles in flight plus the next fit in two");
constexpr int kMinBlocks = kWarps == 4 && 2 * kSmemBytes <= kSmemPerSm ? 2 : 1;

struct Tile {
  int q0, q_len, kv_len;     // its request's first query, query count and KV length
  int r0, rows;              // packed rows r0 .. r0+rows-1 of the request's q_len * group
  int kv_begin, kv_end;      // KV range any row of the tile may see
  const int32_t* pages;
};

// n / d and n % d for 0 <= n < 2^31: packed query rows -> (token, head of the group). By the divisor's magic
// number (see Divisor) where that measured faster: 4-warp CTAs (+3-7 % with 32-key tiles,
// results/prefill-h200-s13/; +2-4 % with 64-key tiles, results/prefill-h200-s14/); the 8-warp shape's loop
// spilled more registers with it and ran 1-4 % slower on long queries, so it keeps the integer division.
#ifndef EB_PREFILL_HW_DIVISION
#define EB_PREFILL_HW_DIVISION (kWarps >= 8)
#endif
constexpr bool kHwDivision = EB_PREFILL_HW_DIVISION;
EB_DEVICE int div_by(const Divisor& d, int n) {
  if constexpr (kHwDivision) return n / int(d.d);
  return int((__umulhi(uint32_t(n), d.magic) + uint32_t(n)) >> d.shift);
}
EB_DEVICE int mod_by(const Divisor& d, int n) { return n - div_by(d, n) * int(d.d); }

// Tile t of the plan from its two records (loaded by the caller, so the loads need not wait for the check that
// t is one of the plan's tiles: the arrays hold max_tiles >= the grid's tiles).
EB_DEVICE Tile tile_of(const PrefillParams& p, int4 req, int tile_idx, const Divisor& group) {
  Tile tl;
  tl.q0 = req.x;
  tl.q_len = req.y;
  tl.kv_len = req.z;
  tl.pages = p.indices + req.w;
  tl.r0 = tile_idx * kM;
  tl.rows = min(kM, tl.q_len * int(group.d) - tl.r0);
  const int qp_first = tl.kv_len - tl.q_len + div_by(group, tl.r0);
  const int qp_last = tl.kv_len - tl.q_len + div_by(group, tl.r0 + tl.rows - 1);
  tl.kv_end = p.causal ? min(tl.kv_len, qp_last + 1) : tl.kv_len;
  tl.kv_begin = Var::window ? max(0, qp_first - p.variant.window_left) : 0;
  tl.kv_end = max(tl.kv_end, tl.kv_begin);
  return tl;
}

// Copies of 16-byte chunks: a thread always copies the same column chunk (kThreads is a multiple of kChunks),
// of rows kRowStep apart.
constexpr int kRowStep = kThreads / kChunks;
static_assert(kThreads % kChunks == 0, "each thread keeps one column chunk");
static_assert(kM % kRowStep == 0, "query rows divide evenly among threads");

// Where chunk c of row r of a tile of kRows rows lives: the mma.sync path's rows of head_dim elements, or
// wgmma's 64-element column blocks (wgmma.cuh).
template <int kRows> EB_DEVICE int tile_offset(int r, int c) {
  if constexpr (kWgmma) return wgmma_tile_offset<kRows>(r, c);
  return swizzle<kChunks>(r, c);
}

// a * b + c as one 32 x 32 -> 64-bit multiply-add (in C++ the compiler also multiplies the zero high words).
// Byte offsets this way need non-negative indices and strides below 2^31 bytes (prefill_ops.cpp checks).
EB_DEVICE uint64_t mad_wide(uint32_t a, uint32_t b, uint64_t c) {
  uint64_t d;
  asm("mad.wide.u32 %0, %1, %2, %3;" : "=l"(d) : "r"(a), "r"(b), "l"(c));
  return d;
}

// The packed query rows a thread copies between global and shared memory (Q in, O out through shared memory):
// 16-byte chunk c of rows r_first, r_first + kRowStep, ... of the tile. Their (token, head) advance by a fixed
// step: two divisions per thread, not two per chunk.
struct RowCursor {
  int c, r_first;
  int token, head;  // of the current row: token within the request, head within the group
  int step_tok, step_head, g;

  EB_DEVICE RowCursor(const Tile& tl, const Divisor& group)
      : c(threadIdx.x % kChunks), r_first(threadIdx.x / kChunks), g(int(group.d)) {
    step_tok = div_by(group, kRowStep), step_head = kRowStep - step_tok * g;
    token = div_by(group, tl.r0 + r_first);
    head = tl.r0 + r_first - token * g;
  }
  EB_DEVICE void next() {
    token += step_tok, head += step_head;
    if (head >= g) head -= g, ++token;
  }
};

// Packed query rows -> shared memory (zeros past the tile's rows).
EB_DEVICE void issue_q(const PrefillParams& p, const Tile& tl, uint8_t* sq, int kv_head, const Divisor& group) {
  const uint32_t base = smem_addr(sq);
  RowCursor rc(tl, group);
  const uint64_t col = reinterpret_cast<uint64_t>(p.q) +
                       uint64_t(int64_t(tl.q0) * p.q_stride_n + int64_t(kv_head * rc.g) * p.q_stride_h + rc.c * 8) *
                           sizeof(T);
  const uint32_t tok_bytes = uint32_t(p.q_stride_n) * sizeof(T), head_bytes = uint32_t(p.q_stride_h) * sizeof(T);
#pragma unroll
  for (int j = 0; j < kM / kRowStep; ++j, rc.next()) {
    const int r = rc.r_first + j * kRowStep;
    const bool valid = r < tl.rows;
    const uint64_t src = valid ? mad_wide(rc.token, tok_bytes, mad_wide(rc.head, head_bytes, col)) : col;  // a real row
    cp_async_16(base + tile_offset<kM>(r, rc.c), reinterpret_cast<const void*>(src), valid);
  }
}

// Page ids of a K/V tile's rows live in shared memory, in two slots (tile t in slot t % 2).
// Thread r < kN reads row r's id from global memory into a register a tile before it is
// needed (the read's latency hides behind a tile of MMAs) and stores it after that tile; the
// next iteration's barrier publishes it. Tokens at or past kv_end get page 0 (never read).
EB_DEVICE int page_of(const PrefillParams& p, const Tile& tl, int tok) {
  return tok < tl.kv_end ? tl.pages[tok >> p.log2_page] : 0;
}

// One K/V tile (kN tokens from `first`) -> shared memory; tokens at or past kv_end are zeros.
// Only the page and token offsets change between a thread's loads.
constexpr int kLoads = kN * kChunks / kThreads;
static_assert(kN * kChunks % kThreads == 0, "tile chunks must divide evenly among threads");
static_assert(kN <= kThreads, "one thread per row reads the tile's page ids");

// Where a thread's column chunk of K (or V) starts, and the byte strides of pages and tokens: a row's address
// is two wide multiply-adds instead of signed 64-bit element-stride arithmetic (about 27 instructions per
// load pair; the short shape's tile issue went from 155 to 110 instructions, +0.3-2.3 % measured).
struct KvColumn {
  uint64_t base;
  uint32_t page_bytes, tok_bytes;

  EB_DEVICE KvColumn(const void* t, int64_t stride_page, int64_t stride_tok, int64_t stride_head, int kv_head, int c)
      : base(reinterpret_cast<uint64_t>(t) + uint64_t(int64_t(kv_head) * stride_head + c * 8) * sizeof(T)),
        page_bytes(uint32_t(stride_page) * uint32_t(sizeof(T))),
        tok_bytes(uint32_t(stride_tok) * uint32_t(sizeof(T))) {}
  EB_DEVICE const void* row(uint32_t page, uint32_t in_page) const {
    return reinterpret_cast<const void*>(mad_wide(in_page, tok_bytes, mad_wide(page, page_bytes, base)));
  }
};

EB_DEVICE void issue_kv(const PrefillParams& p, const Tile& tl, const int* page_ids, uint8_t* sk, uint8_t* sv,
                        int first, int kv_head) {
  const int c = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
  const KvColumn kcol(p.k, p.k_stride_page, p.k_stride_tok, p.k_stride_head, kv_head, c);
  const KvColumn vcol(p.v, p.v_stride_page, p.v_stride_tok, p.v_stride_head, kv_head, c);
  const uint32_t kb = smem_addr(sk), vb = smem_addr(sv);
  const uint32_t page_mask = (1u << p.log2_page) - 1;
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const int r = r0 + j * kRowStep;
    const int tok = first + r;
    const bool valid = tok < tl.kv_end;
    const uint32_t in_page = uint32_t(tok) & page_mask;
    const uint32_t page = uint32_t(page_ids[r]);
    cp_async_16(kb + tile_offset<kN>(r, c), kcol.row(page, in_page), valid);
    cp_async_16(vb + tile_offset<kN>(r, c), vcol.row(page, in_page), valid);
  }
}

// The rows a lane holds accumulators for: rows g and g+8 of each of the warp's kMmaM 16-row
// MMA tiles (g = lane / 4); lane row r is MMA tile r / 2, half r % 2.
constexpr int kLaneRows = 2 * kMmaM;

struct LaneRows {
  int qp[kLaneRows];  // query position
  bool valid[kLaneRows];
  typename Var::Row var[kLaneRows];
  // Units of the running max: raw dot products when the variant's score is a plain scale (it
  // is then folded into the exponent's FFMA), else the variant's log2 scores.
  EB_DEVICE float unit(int r) const { return Var::linear ? var[r].scale_log2 : 1.f; }
};

// With wgmma a warpgroup's rows are kMmaM blocks of 64, warp w % 4 holding rows 16 (w % 4) .. of each.
EB_DEVICE int lane_row(int warp, int lane, int r) {
  const int in_tile = lane / 4 + 8 * (r % 2);
  if constexpr (kWgmma) return (warp / 4) * 64 * kMmaM + 64 * (r / 2) + 16 * (warp % 4) + in_tile;
  return warp * kWarpRows + 16 * (r / 2) + in_tile;
}

// The warp's Q fragments for k-step kk (16 columns of head dim), for each of its MMA tiles.
struct QFrags {
  uint32_t reg[kQInRegs ? D / 16 : 1][kMmaM][4];
  uint32_t lane_addr;  // this lane's ldmatrix address for k-step 0 of MMA tile 0

  EB_DEVICE void init(uint32_t sq, int warp, int lane) {
    lane_addr = sq + swizzle<kChunks>(warp * kWarpRows + lane % 16, lane / 16);
    if constexpr (kQInRegs) {
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
      if constexpr (kQInRegs) {
#pragma unroll
        for (int i = 0; i < 4; ++i) f[mi][i] = reg[kk][mi][i];
      } else {
        load(f[mi], kk, mi);
      }
    }
  }
};

using Scores = float[kMmaM][kN / 8][4];  // S of the warp's rows against one K/V tile

// S = Q K^T for the first `chunks` 16-key chunks of one K tile (the rest of S stays 0: those keys
// are masked). (A loop that computed the next tile's S in the same basic block as this tile's
// softmax, for the scheduler to interleave them, measured 5-10 % slower: kept out.)
EB_DEVICE void qk(Scores& s, const QFrags& qf, uint32_t kbase, int lane, int chunks) {
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

// S = Q K^T for the warpgroup's kMmaM blocks of 64 rows, D / 16 warpgroup MMAs each; q_rows: the warpgroup's
// first row of the Q tile (each of its 64-column blocks holds kM rows of 128 bytes), kbase: the K tile.
// (Templates, so the mma.sync builds never instantiate them.)
template <int kKeys>
EB_DEVICE void qk_wgmma_issue(float (&s)[kMmaM][kKeys / 8][4], uint32_t q_rows, uint32_t kbase) {
#pragma unroll
  for (int mi = 0; mi < kMmaM; ++mi) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t col = (kk / 4) * 128, step = (kk % 4) * 32;  // 64-column block, 16-column step in it
      const uint64_t a = wgmma_desc(q_rows + mi * 64 * 128 + col * kM + step, 16, 1024);
      const uint64_t b = wgmma_desc(kbase + col * kKeys + step, 16, 1024);
      if (kk == 0) {
        Wgmma<T, kKeys>::ss_first(s[mi], a, b);
      } else {
        Wgmma<T, kKeys>::ss(s[mi], a, b);
      }
    }
  }
  wgmma_commit();
}
template <int kRows, int kCols> EB_DEVICE void fence_all(float (&d)[kRows][kCols][4]) {
#pragma unroll
  for (int mi = 0; mi < kRows; ++mi) fence_accumulators(d[mi]);
}
template <int kKeys>
EB_DEVICE void qk_wgmma(float (&s)[kMmaM][kKeys / 8][4], uint32_t q_rows, uint32_t kbase) {
  wgmma_fence();
  qk_wgmma_issue<kKeys>(s, q_rows, kbase);
  wgmma_wait<0>();
  fence_all(s);
}

// The online softmax of one K/V tile for the warp's rows, given S: the variant's scores (masked only on
// tiles that cross the causal diagonal, the KV end or the window edge: kMask), the running max, P in s, l
// rescaled; returns whether O must be rescaled too (by `rescale`, see rescale_o). Two specializations keep
// the mask's per-element code out of the common, unmasked tiles.
template <bool kMask>
EB_DEVICE bool softmax(const PrefillParams& p, const Tile& tl, const LaneRows& lr, Scores& s, float (&m)[kLaneRows],
                       float (&l)[kLaneRows], float (&rescale)[kLaneRows], int first, int lane) {
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
    // only past the slack (see kRescaleSlack).
    const bool first_keys = m_old == -CUDART_INF_F;
    const bool moves = !first_keys && (row_m - m_old) * unit > kRescaleSlack;
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
      if constexpr (!kMmaRowSum) sum += s[mi][n][2 * h] + s[mi][n][2 * h + 1];
    }
    l[r] = l[r] * rescale[r] + sum;  // with kMmaRowSum, P V's MMAs add the tile's sum
  }
  return !kLazyRescale || __any_sync(0xffffffff, max_moved);
}

EB_DEVICE void rescale_o(float (&o)[kMmaM][D / 8][4], const float (&rescale)[kLaneRows]) {
#pragma unroll
  for (int mi = 0; mi < kMmaM; ++mi) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[mi][dt][0] *= rescale[2 * mi];
      o[mi][dt][1] *= rescale[2 * mi];
      o[mi][dt][2] *= rescale[2 * mi + 1];
      o[mi][dt][3] *= rescale[2 * mi + 1];
    }
  }
}

// P of 16-key chunk kt as an MMA A operand (bf16/fp16 pairs), its row sums added to l when the MMA sums them.
EB_DEVICE void pack_p(uint32_t (&pa)[4], const float (&s)[kN / 8][4], int kt, float& l_lo, float& l_hi) {
  pa[0] = pack2<T>(s[2 * kt][0], s[2 * kt][1]);
  pa[1] = pack2<T>(s[2 * kt][2], s[2 * kt][3]);
  pa[2] = pack2<T>(s[2 * kt + 1][0], s[2 * kt + 1][1]);
  pa[3] = pack2<T>(s[2 * kt + 1][2], s[2 * kt + 1][3]);
  if constexpr (kMmaRowSum) mma_rowsum<T>(l_lo, l_hi, pa);
}

// O += P V over the tile's first `chunks` 16-key chunks (P is 0 past them: masked for every row of the warp).
EB_DEVICE void pv(const Scores& s, float (&o)[kMmaM][D / 8][4], float (&l)[kLaneRows], uint32_t vbase, int lane,
                  int chunks) {
  const uint32_t v_lane = vbase + swizzle<kChunks>((lane % 8) + 8 * ((lane / 8) % 2), lane / 16);
#pragma unroll
  for (int kt = 0; kt < kN / 16; ++kt) {
    if (kt >= chunks) break;
    uint32_t pa[kMmaM][4];
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi) pack_p(pa[mi], s[mi], kt, l[2 * mi], l[2 * mi + 1]);
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

// O += P V for the warpgroup's rows as kN / 16 warpgroup MMAs per 64-row block, P from registers, V (MN-major)
// from shared memory.
using PFrags = uint32_t[kMmaM][kN / 16][4];  // P of a tile as wgmma A operands

EB_DEVICE void pack_p_all(PFrags& pa, const Scores& s, float (&l)[kLaneRows]) {
#pragma unroll
  for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
    for (int kt = 0; kt < kN / 16; ++kt) pack_p(pa[mi][kt], s[mi], kt, l[2 * mi], l[2 * mi + 1]);
}
template <int kDim>
EB_DEVICE void pv_wgmma_issue(float (&o)[kMmaM][kDim / 8][4], const PFrags& pa, uint32_t vbase) {
#pragma unroll
  for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
    for (int kt = 0; kt < kN / 16; ++kt) {
      Wgmma<T, kDim>::rs_mn(o[mi], pa[mi][kt], wgmma_desc(vbase + kt * 16 * 128, kN * 128, 1024));
    }
  wgmma_commit();
}
// The A registers of an in-flight wgmma must keep their values until its wait: kept live past it.
EB_DEVICE void fence_p(PFrags& pa) {
#pragma unroll
  for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
    for (int kt = 0; kt < kN / 16; ++kt)
#pragma unroll
      for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(pa[mi][kt][i])::"memory");
}
template <int kDim>
EB_DEVICE void pv_wgmma(const Scores& s, float (&o)[kMmaM][kDim / 8][4], float (&l)[kLaneRows], uint32_t vbase) {
  PFrags pa;
  pack_p_all(pa, s, l);
  wgmma_fence();
  pv_wgmma_issue<kDim>(o, pa, vbase);
  wgmma_wait<0>();
  fence_all(o);
  fence_p(pa);
}

// One K/V tile: its S, then the softmax and P V, over its first `chunks` 16-key chunks. q_rows: the
// warpgroup's Q rows (wgmma).
template <bool kMask>
EB_DEVICE void attend_tile(const PrefillParams& p, const Tile& tl, const LaneRows& lr, const QFrags& qf,
                           uint32_t q_rows, float (&o)[kMmaM][D / 8][4], float (&m)[kLaneRows],
                           float (&l)[kLaneRows], uint32_t kbase, uint32_t vbase, int first, int lane,
                           int chunks = kN / 16) {
  Scores s;
  float rescale[kLaneRows];
  if constexpr (kWgmma) {
    qk_wgmma<kN>(s, q_rows, kbase);
  } else {
    qk(s, qf, kbase, lane, chunks);
  }
  if (softmax<kMask>(p, tl, lr, s, m, l, rescale, first, lane)) rescale_o(o, rescale);
  if constexpr (kWgmma) {
    pv_wgmma<D>(s, o, l, vbase);
  } else {
    pv(s, o, l, vbase, lane, chunks);
  }
}

// The lane's rows of a tile: position, head and the variant's per-row constants.
EB_DEVICE LaneRows lane_rows(const PrefillParams& p, const Tile& tl, int kv_head, const Divisor& group, int warp,
                             int lane) {
  LaneRows lr;
#pragma unroll
  for (int r = 0; r < kLaneRows; ++r) {
    const int row = lane_row(warp, lane, r);
    lr.valid[r] = row < tl.rows;
    const int pr = tl.r0 + (lr.valid[r] ? row : 0);
    lr.qp[r] = tl.kv_len - tl.q_len + div_by(group, pr);
    lr.var[r] = Var::row(p.variant, kv_head * int(group.d) + mod_by(group, pr));
  }
  return lr;
}

// Where a tile's K/V tiles need the mask, and where a warp's rows see no more keys.
struct KeyBounds {
  int clean_end;     // rows of the tile see keys below it without any mask
  int last_qp;       // query position of the tile's last row (sliding window)
  int warp_key_end;  // keys past it are masked for every row of this warp (all keys, if it has no rows)

  EB_DEVICE KeyBounds(const PrefillParams& p, const Tile& tl, const Divisor& group, int warp) {
    const int first_qp = tl.kv_len - tl.q_len + div_by(group, tl.r0);
    clean_end = p.causal ? min(tl.kv_len, first_qp + 1) : tl.kv_len;
    last_qp = tl.kv_len - tl.q_len + div_by(group, tl.r0 + tl.rows - 1);
    const int warp_last_row = min(tl.rows, (warp + 1) * kWarpRows) - 1;
    warp_key_end = warp_last_row < warp * kWarpRows ? 0
                   : p.causal ? min(tl.kv_end, tl.kv_len - tl.q_len + div_by(group, tl.r0 + warp_last_row) + 1)
                              : tl.kv_end;
  }
  EB_DEVICE bool masked(const PrefillParams& p, int first) const {
    return first + kN > clean_end || (Var::window && first < last_qp - p.variant.window_left);
  }
  // 16-key chunks of a masked tile the warp computes (the rest lie wholly past its rows).
  EB_DEVICE int chunks(int first) const {
    return kSkipMaskedKeys ? min(kN / 16, max(0, (warp_key_end - first + 15) / 16)) : kN / 16;
  }
};

// Epilogue through shared memory (kStagedStore): the normalised O of every lane into the Q tile's space (free once
// every warp is past its last S), then whole 16-byte chunks of each row to global memory, rows as issue_q reads
// them: one coalesced 16-byte store per chunk instead of a lane's 4-byte pairs spread over 8 rows. Measured side
// by side (results/prefill-h200-s17/exp-run2.log): wgmma +2-16 % (most on short requests, whose O is a large part
// of their traffic; -1 % on the 512-token append with 4 warps); mma.sync 4 warps x 64 keys +3-4 % on 16 x 1024
// and 64 x 256 but -3 % on 4 x 4096, so it keeps the direct stores.
#ifndef EB_PREFILL_STAGED_STORE
#define EB_PREFILL_STAGED_STORE kWgmma
#endif
constexpr bool kStagedStore = EB_PREFILL_STAGED_STORE;

EB_DEVICE void store_tile(const PrefillParams& p, const Tile& tl, uint8_t* sq, int kv_head, const Divisor& group) {
  __syncthreads();  // every lane's O is in shared memory
  const uint32_t base = smem_addr(sq);
  RowCursor rc(tl, group);
  T* col = static_cast<T*>(p.out) + long(tl.q0) * p.out_stride_n + long(kv_head * rc.g) * p.out_stride_h + rc.c * 8;
#pragma unroll
  for (int j = 0; j < kM / kRowStep; ++j, rc.next()) {
    const int r = rc.r_first + j * kRowStep;
    if (r >= tl.rows) continue;
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(base + tile_offset<kM>(r, rc.c)));
    // As PTX: a 16-byte store (the compiler split the C++ one into four 4-byte stores).
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n"
                 ::"l"(col + long(rc.token) * p.out_stride_n + long(rc.head) * p.out_stride_h),
                 "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
  }
}

// Epilogue: normalise and store this lane's rows; lse in natural log. The rows' sums first, in one block, so
// their shuffles overlap; a row's token and head are re-derived here rather than kept in registers
// through the loop (where they were spilled).
EB_DEVICE void store_rows(const PrefillParams& p, const Tile& tl, const LaneRows& lr, const float (&o)[kMmaM][D / 8][4],
                          const float (&m)[kLaneRows], const float (&l)[kLaneRows], const Divisor& group, int kv_head,
                          int warp, int lane, uint8_t* sq) {
  float sum[kLaneRows];
#pragma unroll
  for (int r = 0; r < kLaneRows; ++r) sum[r] = kMmaRowSum ? l[r] : quad_sum(l[r]);  // MMA sums are whole rows
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
        asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(row + tile_offset<kM>(lane_row(warp, lane, r), dt)), "r"(pair));
      }
    }
    if (!lr.valid[r]) continue;
    const int pr = tl.r0 + lane_row(warp, lane, r);
    const int token_in_req = div_by(group, pr);
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
      p.lse[token * p.lse_stride_n + head] = sum[r] > 0.f ? (m[r] * lr.unit(r) + fast_log2(sum[r])) * kLn2 : -CUDART_INF_F;
    }
  }
  if constexpr (kStagedStore) store_tile(p, tl, sq, kv_head, group);
}

EB_DEVICE void zero_state(float (&o)[kMmaM][D / 8][4], float (&m)[kLaneRows], float (&l)[kLaneRows]) {
#pragma unroll
  for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[mi][i][0] = o[mi][i][1] = o[mi][i][2] = o[mi][i][3] = 0.f;
#pragma unroll
  for (int r = 0; r < kLaneRows; ++r) m[r] = -CUDART_INF_F, l[r] = 0.f;
}

// One CTA per (query tile, KV head).
__global__ void __launch_bounds__(kThreads, kMinBlocks) prefill_kernel(const PrefillParams p) {
  extern __shared__ __align__(1024) uint8_t smem[];  // tiles start at multiples of their row size (swizzle_step)
  const int t = div_by(p.kv_heads, blockIdx.x);
  const int kv_head = blockIdx.x - t * p.num_kv_heads;
  const int4 req = p.plan.tile[t];
  const int tile_idx = p.plan.tile_idx[t];
  if (t >= p.plan.header[1]) return;
  const Divisor& group = p.group;
  const Tile tl = tile_of(p, req, tile_idx, group);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint8_t* sq = smem;
  auto sk = [&](int s) { return smem + kSmemQ + s * 2 * kTileBytes; };
  auto sv = [&](int s) { return smem + kSmemQ + s * 2 * kTileBytes + kTileBytes; };

  int* page_ids = reinterpret_cast<int*>(smem + kSmemQ + kStages * 2 * kTileBytes);  // [2][kN]
  auto slot = [&](int tile) { return page_ids + (tile % 2) * kN; };
  auto tile_first = [&](int tile) { return tl.kv_begin + tile * kN; };
  const int tid = threadIdx.x;

  const int n_tiles = (tl.kv_end - tl.kv_begin + kN - 1) / kN;
  // Prologue: tiles 0 .. kStages-2 in flight, the page ids of tile kStages-1 in a register. The page ids are
  // read before Q is issued, so their latency hides behind it.
  int first_pages[kStages - 1];
  int next_page = 0;
  if (tid < kN) {
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) first_pages[s] = page_of(p, tl, tile_first(s) + tid);
    next_page = page_of(p, tl, tile_first(kStages - 1) + tid);
  }
  issue_q(p, tl, sq, kv_head, group);
  cp_async_commit();
  if (tid < kN) {
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) slot(s)[tid] = first_pages[s];
  }
  __syncthreads();
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) issue_kv(p, tl, slot(s), sk(s), sv(s), tile_first(s), kv_head);
    cp_async_commit();
  }

  const LaneRows lr = lane_rows(p, tl, kv_head, group, warp, lane);

  cp_async_wait<kStages - 1>();  // Q has landed
  __syncthreads();  // ... and every thread is done reading the prologue's page-id slots
  if (tid < kN) slot(kStages - 1)[tid] = next_page;
  QFrags qf;
  if constexpr (!kWgmma) qf.init(smem_addr(sq), warp, lane);
  const uint32_t q_rows = smem_addr(sq) + (warp / 4) * 64 * kMmaM * 128;  // wgmma: the warpgroup's rows

  float o[kMmaM][D / 8][4], m[kLaneRows], l[kLaneRows];
  zero_state(o, m, l);
  const KeyBounds kb(p, tl, group, warp);

  // Tile `ahead` into the stage tile ahead - kStages used, and the next tile's page ids into a register.
  auto issue_ahead = [&](int ahead) {
    if (ahead < n_tiles) issue_kv(p, tl, slot(ahead), sk(ahead % kStages), sv(ahead % kStages), tile_first(ahead), kv_head);
    cp_async_commit();
    if (tid < kN && ahead + 1 < n_tiles) next_page = page_of(p, tl, tile_first(ahead + 1) + tid);
  };
  // Slot (ahead + 1) % 2 was last read issuing tile ahead - 1, before this iteration's barrier.
  auto store_page_ids = [&](int ahead) {
    if (tid < kN) slot(ahead + 1)[tid] = next_page;
  };
  auto kaddr = [&](int j) { return smem_addr(sk(j % kStages)); };
  auto vaddr = [&](int j) { return smem_addr(sv(j % kStages)); };

  if constexpr (kOverlap) {
    // Tile 0's S and softmax first; then each iteration issues S of tile j + 1 and P V of tile j, and runs tile
    // j + 1's softmax while the P V MMAs execute.
    Scores s;
    PFrags pa;
    float rescale[kLaneRows];
    auto softmax_of = [&](int j) {  // whether O must be rescaled
      const int first = tile_first(j);
      return kb.masked(p, first) ? softmax<true>(p, tl, lr, s, m, l, rescale, first, lane)
                                 : softmax<false>(p, tl, lr, s, m, l, rescale, first, lane);
    };
    if (n_tiles > 0) {
      cp_async_wait<kStages - 2>();
      fence_proxy_async();
      __syncthreads();
      qk_wgmma<kN>(s, q_rows, kaddr(0));
      softmax_of(0);
      pack_p_all(pa, s, l);  // O is still 0: no rescale
    }
    for (int j = 0; j + 1 < n_tiles; ++j) {
      cp_async_wait<kStages - 3>();
      fence_proxy_async();
      __syncthreads();  // tile j + 1 is visible; tile j - 1's stage is free
      issue_ahead(j + kStages - 1);
      wgmma_fence();
      qk_wgmma_issue<kN>(s, q_rows, kaddr(j + 1));
      pv_wgmma_issue<D>(o, pa, vaddr(j));
      wgmma_wait<1>();
      fence_all(s);
      const bool moved = softmax_of(j + 1);
      wgmma_wait<0>();
      fence_all(o);
      fence_p(pa);
      if (moved) rescale_o(o, rescale);
      pack_p_all(pa, s, l);
      store_page_ids(j + kStages - 1);
    }
    if (n_tiles > 0) {  // the last tile's P V (its V landed before the last iteration)
      wgmma_fence();
      pv_wgmma_issue<D>(o, pa, vaddr(n_tiles - 1));
      wgmma_wait<0>();
      fence_all(o);
      fence_p(pa);
    }
  } else {
    for (int j = 0; j < n_tiles; ++j) {
      const int first = tile_first(j);
      cp_async_wait<kStages - 2>();
      if constexpr (kWgmma) fence_proxy_async();
      __syncthreads();  // tile j and the page ids of tile `ahead` are visible; tile j-1's stage is free
      issue_ahead(j + kStages - 1);
      if (kb.masked(p, first)) {
        attend_tile<true>(p, tl, lr, qf, q_rows, o, m, l, kaddr(j), vaddr(j), first, lane, kb.chunks(first));
      } else {
        attend_tile<false>(p, tl, lr, qf, q_rows, o, m, l, kaddr(j), vaddr(j), first, lane);
      }
      store_page_ids(j + kStages - 1);
    }
  }
  cp_async_wait<0>();
  store_rows(p, tl, lr, o, m, l, group, kv_head, warp, lane, sq);
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
    int4 req;
    if (b < rows) {
      req = make_int4(qo_indptr[b], qo_indptr[b + 1] - qo_indptr[b], kv_lens[b], indptr[b]);
      tiles = (req.y * group + kM - 1) / kM;
    }
    int first, total;
    PlanScan(scan).ExclusiveSum(tiles, first, total);
    first += carry;
    // The last tile of a request sees the most KV under a causal mask: schedule it first.
    for (int i = 0; i < tiles && first + i < max_tiles; ++i) {
      plan.tile[first + i] = req;
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
  PrefillParams p = params;
  p.group = make_divisor(params.num_qo_heads / params.num_kv_heads);
  p.kv_heads = make_divisor(params.num_kv_heads);
  if (blocks > 0) prefill_kernel<<<blocks, kThreads, kSmemBytes, stream>>>(p);
}

}  // namespace eb
