// Compile-time shape of one prefill build: from the element type, head dim, CTA shape (warps, K/V tile)
// and mainloop, every tile-size choice the kernel makes, each with its rule and the reason for it. The one
// home of these heuristics; the kernel files only read them.
#pragma once
#include <type_traits>

#include "../common.cuh"

namespace eb::prefill {

// Which tensor-core instructions run S = Q K^T and O += P V: mma.sync (sm80 and later, mainloop_sm80.cuh) or
// Hopper warpgroup MMAs (sm_90a only, mainloop_sm90.cuh).
enum class MainloopKind { kMmaSync, kWgmma };

// Shared memory one SM offers its CTAs (H100 / H200: 227 KiB).
constexpr int kSmemPerSm = 227 * 1024;

// Shared memory of a CTA: the Q tile, `stages` K and V tiles, and two slots of a K/V tile's page ids.
constexpr int smem_bytes(int rows, int head_dim, int kv_tile, int stages) {
  return rows * head_dim * 2 + stages * 2 * kv_tile * head_dim * 2 + 2 * kv_tile * 4;
}

template <typename T_, int kHeadDim, int kWarps_, int kKvTile, MainloopKind kMainloop_> struct Traits {
  using T = T_;
  static constexpr int D = kHeadDim;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr MainloopKind kMainloop = kMainloop_;
  static constexpr bool kWgmma = kMainloop == MainloopKind::kWgmma;
  static constexpr int kN = kKvTile;  // KV tokens per tile

  // Row blocks per warp: 16-row MMA tiles (mma.sync), or 64-row blocks per warpgroup, a warp holding 16 rows of
  // each (wgmma). Two where their O accumulators fit in registers beside the scores: every K and V fragment
  // read from shared memory then feeds twice the MMAs, and shared-memory bandwidth, not the tensor cores, bounds
  // an mma.sync attention loop; with wgmma each K/V tile feeds twice the rows (128 per warpgroup) and two such
  // CTAs of 4 warps still fit on an SM. One at head dim 256 (two O tiles do not fit) and on 128-key wgmma tiles
  // (two blocks' scores do not fit beside O).
  static constexpr int kMmaM = D > 128 || (kWgmma && kN > 64) ? 1 : 2;
  static constexpr int kWarpRows = 16 * kMmaM;
  static constexpr int kM = kWarpRows * kWarps;  // packed query rows per tile
  // The rows a lane holds accumulators for: rows lane / 4 and lane / 4 + 8 of each of its kMmaM blocks.
  static constexpr int kLaneRows = 2 * kMmaM;

  // mma.sync: Q fragments stay in registers where they fit beside O and S; otherwise (head dim 128 with two MMA
  // tiles) they are re-read from shared memory at each k-step. (wgmma reads Q from shared memory.)
  static constexpr bool kQInRegs = !kWgmma && (kMmaM == 1 || D <= 64);

  // K/V tiles in shared memory (stages - 1 in flight while one is computed): three if two CTAs still fit on an
  // SM, else two, since a second resident CTA hides more latency than a deeper pipeline of one. wgmma tiles of
  // 8 warps run one CTA per SM: three if they fit.
  static constexpr int kStages =
      (kWgmma && kWarps >= 8 ? 1 : 2) * smem_bytes(kM, D, kN, 3) <= kSmemPerSm ? 3 : 2;
  static constexpr int kSmemBytes = smem_bytes(kM, D, kN, kStages);
  // Two CTAs per SM for 4-warp CTAs whose shared memory allows it, so __launch_bounds__ caps registers to match.
  static constexpr int kMinBlocks = kWarps == 4 && 2 * kSmemBytes <= kSmemPerSm ? 2 : 1;

  // wgmma with three stages: tile j's P V runs on the tensor cores while the warps compute tile j + 1's softmax
  // (its S issued just before), so K/V tiles must land one iteration earlier, hence the third stage.
  static constexpr bool kOverlap = kWgmma && kStages >= 3;

  // The running max of a row moves only when a tile's max exceeds it by more than this many log2 units:
  // probabilities are then at most 2^kRescaleSlack (256: exact enough as bf16/fp16 MMA operands, far from
  // overflow in the fp32 sums), and the O rescale is skipped on most tiles, not only where the max held.
  // Softmax is shift-invariant and l and the lse use the same max, so only rounding changes.
  static constexpr float kRescaleSlack = 8;

  // mma.sync on the tile that crosses the causal diagonal: a warp skips the MMAs of 16-key chunks that lie
  // wholly past its own rows' last position. Worth it only with 8 warps and 64-key tiles, where a warp's rows
  // see a small part of the diagonal tile; with 4 warps, or 32-key tiles (two chunks on the diagonal tile),
  // the branches cost more than the MMAs they skip. A warpgroup MMA covers the whole tile: never with wgmma.
  static constexpr bool kSkipMaskedKeys = kN >= 64 && kWarps >= 8 && !kWgmma;

  // Row sums of P by a tensor-core MMA against ones (mma_rowsum), from the same 16-bit P that P V uses, instead
  // of one FP32 add per probability and a quad reduction at the end (l then holds whole rows, not a lane's
  // share): on 64-key tiles and up, whose loop would otherwise spill; 32-key tiles keep the adds, which there
  // are as fast or faster.
  static constexpr bool kMmaRowSum = kN >= 64;

  // Packed query rows -> (token, head of the group) by the hardware integer division on CTAs of 8 warps or
  // more, whose loop spills with the magic number's extra registers; by the divisor's magic number (Divisor,
  // a multiply-high) on 4-warp CTAs, where it is the faster.
  static constexpr bool kHwDivision = kWarps >= 8;

  // The epilogue stages O through shared memory (the Q tile's space) and stores whole 16-byte chunks of each
  // row, coalesced, instead of each lane's 4-byte pairs spread over 8 rows: with wgmma, where it is faster on
  // every shape (most on short requests, whose O is a large part of their traffic); mma.sync stores directly,
  // since staging is slower there on long requests.
  static constexpr bool kStagedStore = kWgmma;

  // Copies of 16-byte chunks between global and shared memory: a thread always copies the same column chunk,
  // of rows kRowStep apart; kLoads chunks of K (and of V) per thread and K/V tile.
  static constexpr int kChunks = D / 8;
  static constexpr int kRowBytes = D * 2;
  static constexpr int kTileBytes = kN * D * 2;
  static constexpr int kSmemQ = kM * D * 2;
  static constexpr int kRowStep = kThreads / kChunks;
  static constexpr int kLoads = kN * kChunks / kThreads;

  static_assert(!kWgmma || (kMmaM <= 2 && kWarps % 4 == 0 && (D == 64 || D == 128) && (kN == 64 || kN == 128)),
                "wgmma tiles: warpgroups of 64 or 128 rows, head dim 64 or 128, 64 or 128 keys");
  static_assert(kStages <= 3, "page-id slots: tiles in flight plus the next fit in two");
  static_assert(kThreads % kChunks == 0, "each thread keeps one column chunk");
  static_assert(kM % kRowStep == 0, "query rows divide evenly among threads");
  static_assert(kN * kChunks % kThreads == 0, "tile chunks must divide evenly among threads");
  static_assert(kN <= kThreads, "one thread per row reads the tile's page ids");
};

template <class Kc> struct MainloopSm80;  // mainloop_sm80.cuh
template <class Kc> struct MainloopSm90;  // mainloop_sm90.cuh

// One build of the kernel: its tile traits, its attention variant (variant.cuh) and the mainloop they select.
template <class TileTraits, class Var_> struct KernelConfig : TileTraits {
  using Var = Var_;
  using Mainloop = std::conditional_t<TileTraits::kWgmma, MainloopSm90<KernelConfig>, MainloopSm80<KernelConfig>>;
};

}  // namespace eb::prefill
