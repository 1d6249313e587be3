// Global -> shared memory copies of a query tile and of K/V tiles (cp.async, 16-byte chunks), in the shared
// memory layout of the build's mainloop (Mainloop::smem_offset). Kc: a KernelConfig (traits.cuh).
#pragma once
#include "../mma.cuh"
#include "tile.cuh"

namespace eb::prefill {

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
template <class Kc> struct RowCursor {
  int c, r_first;
  int token, head;  // of the current row: token within the request, head within the group
  int step_tok, step_head, g;

  EB_DEVICE RowCursor(const Tile& tl, const Divisor& group)
      : c(threadIdx.x % Kc::kChunks), r_first(threadIdx.x / Kc::kChunks), g(int(group.d)) {
    step_tok = div_by<Kc>(group, Kc::kRowStep), step_head = Kc::kRowStep - step_tok * g;
    token = div_by<Kc>(group, tl.r0 + r_first);
    head = tl.r0 + r_first - token * g;
  }
  EB_DEVICE void next() {
    token += step_tok, head += step_head;
    if (head >= g) head -= g, ++token;
  }
};

// Packed query rows -> shared memory (zeros past the tile's rows).
template <class Kc>
EB_DEVICE void issue_q(const PrefillParams& p, const Tile& tl, uint8_t* sq, int kv_head, const Divisor& group) {
  using T = typename Kc::T;
  constexpr int kM = Kc::kM, kRowStep = Kc::kRowStep;
  const uint32_t base = smem_addr(sq);
  RowCursor<Kc> rc(tl, group);
  const uint64_t col = reinterpret_cast<uint64_t>(p.q) +
                       uint64_t(int64_t(tl.q0) * p.q_stride_n + int64_t(kv_head * rc.g) * p.q_stride_h + rc.c * 8) *
                           sizeof(T);
  const uint32_t tok_bytes = uint32_t(p.q_stride_n) * sizeof(T), head_bytes = uint32_t(p.q_stride_h) * sizeof(T);
#pragma unroll
  for (int j = 0; j < kM / kRowStep; ++j, rc.next()) {
    const int r = rc.r_first + j * kRowStep;
    const bool valid = r < tl.rows;
    const uint64_t src = valid ? mad_wide(rc.token, tok_bytes, mad_wide(rc.head, head_bytes, col)) : col;  // a real row
    cp_async_16(base + Kc::Mainloop::template smem_offset<kM>(r, rc.c), reinterpret_cast<const void*>(src), valid);
  }
}

// The page id of KV token `tok` of the tile's request; tokens at or past kv_end get page 0 (never read).
EB_DEVICE int page_of(const PrefillParams& p, const Tile& tl, int tok) {
  return tok < tl.kv_end ? tl.pages[tok >> p.log2_page] : 0;
}

// Where a thread's column chunk of K (or V) starts, and the byte strides of pages and tokens: a row's address
// is two wide multiply-adds instead of signed 64-bit element-stride arithmetic (about 27 instructions per
// load pair).
template <class Kc> struct KvColumn {
  using T = typename Kc::T;
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

// One K/V tile (kN tokens from `first`) -> shared memory; tokens at or past kv_end are zeros. page_ids: the
// tile's page id per row. Only the page and token offsets change between a thread's loads.
template <class Kc>
EB_DEVICE void issue_kv(const PrefillParams& p, const Tile& tl, const int* page_ids, uint8_t* sk, uint8_t* sv,
                        int first, int kv_head) {
  constexpr int kN = Kc::kN;
  const int c = threadIdx.x % Kc::kChunks, r0 = threadIdx.x / Kc::kChunks;
  const KvColumn<Kc> kcol(p.k, p.k_stride_page, p.k_stride_tok, p.k_stride_head, kv_head, c);
  const KvColumn<Kc> vcol(p.v, p.v_stride_page, p.v_stride_tok, p.v_stride_head, kv_head, c);
  const uint32_t kb = smem_addr(sk), vb = smem_addr(sv);
  const uint32_t page_mask = (1u << p.log2_page) - 1;
#pragma unroll
  for (int j = 0; j < Kc::kLoads; ++j) {
    const int r = r0 + j * Kc::kRowStep;
    const int tok = first + r;
    const bool valid = tok < tl.kv_end;
    const uint32_t in_page = uint32_t(tok) & page_mask;
    const uint32_t page = uint32_t(page_ids[r]);
    cp_async_16(kb + Kc::Mainloop::template smem_offset<kN>(r, c), kcol.row(page, in_page), valid);
    cp_async_16(vb + Kc::Mainloop::template smem_offset<kN>(r, c), vcol.row(page, in_page), valid);
  }
}

}  // namespace eb::prefill
