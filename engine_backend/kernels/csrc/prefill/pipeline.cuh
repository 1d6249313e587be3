// The K/V pipeline of a CTA: kStages K/V tiles in shared memory behind the Q tile, kStages - 1 in flight
// while one is computed (cp.async groups), and the page ids of the tiles' rows. Kc: a KernelConfig.
//
// Page ids of a K/V tile's rows live in shared memory, in two slots (tile t in slot t % 2). Thread r < kN
// reads row r's id from global memory into a register a tile before it is needed (the read's latency hides
// behind a tile of MMAs) and stores it after that tile; the next iteration's barrier publishes it.
#pragma once
#include "loads.cuh"
#include "softmax.cuh"

namespace eb::prefill {

template <class Kc> struct KvPipeline {
  static constexpr int kN = Kc::kN, kStages = Kc::kStages, kSmemQ = Kc::kSmemQ, kTileBytes = Kc::kTileBytes;
  const PrefillParams& p;
  const Tile& tl;
  uint8_t* smem;
  int* page_ids;  // [2][kN]
  int kv_head, tid, n_tiles;
  int next_page;  // the page id of this thread's row of the next tile to issue

  EB_DEVICE KvPipeline(const PrefillParams& p, const Tile& tl, uint8_t* smem, int kv_head)
      : p(p), tl(tl), smem(smem), page_ids(reinterpret_cast<int*>(smem + kSmemQ + kStages * 2 * kTileBytes)),
        kv_head(kv_head), tid(threadIdx.x), n_tiles((tl.kv_end - tl.kv_begin + kN - 1) / kN), next_page(0) {}

  EB_DEVICE uint8_t* sk(int s) const { return smem + kSmemQ + s * 2 * kTileBytes; }
  EB_DEVICE uint8_t* sv(int s) const { return smem + kSmemQ + s * 2 * kTileBytes + kTileBytes; }
  EB_DEVICE int* slot(int tile) const { return page_ids + (tile % 2) * kN; }
  EB_DEVICE int first(int tile) const { return tl.kv_begin + tile * kN; }  // the tile's first KV token
  EB_DEVICE uint32_t kaddr(int j) const { return smem_addr(sk(j % kStages)); }
  EB_DEVICE uint32_t vaddr(int j) const { return smem_addr(sv(j % kStages)); }

  // Prologue, in three steps around the Q load: read the page ids of tiles 0 .. kStages - 1 into registers
  // (before Q is issued, so their latency hides behind it: first_pages, a local array of the kernel, and
  // next_page); then publish those of tiles 0 .. kStages - 2 and issue those tiles; once Q has landed and a
  // barrier passed, store_page_ids(kStages - 2).
  EB_DEVICE void read_first_page_ids(int (&first_pages)[kStages - 1]) {
    if (tid < kN) {
#pragma unroll
      for (int s = 0; s < kStages - 1; ++s) first_pages[s] = page_of(p, tl, first(s) + tid);
      next_page = page_of(p, tl, first(kStages - 1) + tid);
    }
  }
  EB_DEVICE void issue_first_tiles(const int (&first_pages)[kStages - 1]) {
    if (tid < kN) {
#pragma unroll
      for (int s = 0; s < kStages - 1; ++s) slot(s)[tid] = first_pages[s];
    }
    __syncthreads();
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < n_tiles) issue_kv<Kc>(p, tl, slot(s), sk(s), sv(s), first(s), kv_head);
      cp_async_commit();
    }
  }

  // Tile `ahead` into the stage tile ahead - kStages used, and the next tile's page ids into a register.
  EB_DEVICE void issue_ahead(int ahead) {
    if (ahead < n_tiles) {
      issue_kv<Kc>(p, tl, slot(ahead), sk(ahead % kStages), sv(ahead % kStages), first(ahead), kv_head);
    }
    cp_async_commit();
    if (tid < kN && ahead + 1 < n_tiles) next_page = page_of(p, tl, first(ahead + 1) + tid);
  }
  // Slot (ahead + 1) % 2 was last read issuing tile ahead - 1, before this iteration's barrier.
  EB_DEVICE void store_page_ids(int ahead) {
    if (tid < kN) slot(ahead + 1)[tid] = next_page;
  }
};

// The serial schedule of the K/V tiles: wait for tile j (and make it visible to the mainloop's MMAs), issue
// tile j + kStages - 1 into the stage tile j - 1 freed, then S, softmax and P V of tile j. The mask's code
// runs only on tiles that need it (KeyBounds::masked).
template <class Kc, class Q>
EB_DEVICE void attend_serially(KvPipeline<Kc>& kv, const PrefillParams& p, const Tile& tl, const LaneRows<Kc>& lr,
                               const KeyBounds<Kc>& kb, const Q& q, OAccum<Kc>& o, RowVals<Kc>& m, RowVals<Kc>& l,
                               int lane) {
  using Mainloop = typename Kc::Mainloop;
  constexpr int kStages = Kc::kStages;
  for (int j = 0; j < kv.n_tiles; ++j) {
    const int first = kv.first(j);
    cp_async_wait<kStages - 2>();
    Mainloop::fence_loaded();
    __syncthreads();  // tile j and the page ids of tile `ahead` are visible; tile j-1's stage is free
    kv.issue_ahead(j + kStages - 1);
    if (kb.masked(p, first)) {
      Mainloop::template attend_tile<true>(p, tl, lr, q, o, m, l, kv.kaddr(j), kv.vaddr(j), first, lane,
                                           kb.chunks(first));
    } else {
      Mainloop::template attend_tile<false>(p, tl, lr, q, o, m, l, kv.kaddr(j), kv.vaddr(j), first, lane);
    }
    kv.store_page_ids(j + kStages - 1);
  }
}

}  // namespace eb::prefill
