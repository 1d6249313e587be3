// Warp-level building blocks for sm80+ tensor-core attention: cp.async copies into shared
// memory, ldmatrix fragment loads and the m16n8k16 MMA with fp32 accumulation.
//
// Shared-memory tiles are rows of head_dim 16-bit elements (head_dim/8 chunks of 16 bytes).
// Chunk c of row r is stored at chunk (c ^ (r % 8)): eight consecutive rows read by one
// ldmatrix then hit eight different bank groups instead of one.
#pragma once
#include "common.cuh"

namespace eb {

EB_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// Byte offset of (row, chunk) in a swizzled tile with `chunks` 16-byte chunks per row.
template <int kChunks> EB_DEVICE int swizzle(int row, int chunk) {
  static_assert(kChunks % 8 == 0, "rows must hold a multiple of 8 chunks");
  return (row * kChunks + (chunk ^ (row & 7))) * 16;
}

// The ldmatrix address of 16-column k-step kk from that of k-step 0 (chunk 2 kk + h, h < 2):
// (2 kk + h) ^ x == 2 kk ^ (h ^ x), so within a row the step is an XOR of 32 kk bytes, which
// stays inside the row when the tile starts at a multiple of the row size. One LOP3 per step
// instead of a register per (lane, step) address.
EB_DEVICE uint32_t swizzle_step(uint32_t addr_step0, int kk) { return addr_step0 ^ (kk * 32); }

// 16-byte global->shared copy; when !valid the destination is zero-filled and src not read.
EB_DEVICE void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
EB_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending> EB_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending)); }

EB_DEVICE void ldmatrix_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
EB_DEVICE void ldmatrix_x4_trans(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D[16x8] += A[16x16] * B[16x8], fp32 accumulators. a: 4 regs, b: 2 regs, d: 4 floats.
template <typename T> EB_DEVICE void mma_16816(float* d, const uint32_t* a, const uint32_t* b);
template <> EB_DEVICE void mma_16816<__nv_bfloat16>(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> EB_DEVICE void mma_16816<half>(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Row sums of a 16x16 A operand (16-bit values), added to this lane's two rows: lo (row lane / 4) and hi (row
// lane / 4 + 8). One MMA against a matrix of ones, whose product holds the sum of a row in every column, instead
// of 8 adds per lane and a quad reduction; the other two outputs are scratch. one_pair: 1.0 twice, as T pairs.
template <typename T> EB_DEVICE void mma_rowsum(float& lo, float& hi, const uint32_t* a);
#define EB_MMA_ROWSUM(TYPE, PTX_TYPE, ONE_PAIR)                                                                  \
  template <> EB_DEVICE void mma_rowsum<TYPE>(float& lo, float& hi, const uint32_t* a) {                          \
    asm volatile(                                                                                                 \
        "{\n.reg .f32 scratch0, scratch1;\n"                                                                     \
        "mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE ".f32 {%0, scratch0, %1, scratch1}, "      \
        "{%2, %3, %4, %5}, {%6, %6}, {%0, %0, %1, %1};\n}\n"                                                     \
        : "+f"(lo), "+f"(hi)                                                                                      \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(ONE_PAIR));                                            \
  }
EB_MMA_ROWSUM(__nv_bfloat16, "bf16", 0x3F803F80u)
EB_MMA_ROWSUM(half, "f16", 0x3C003C00u)
#undef EB_MMA_ROWSUM

// Two floats packed as one 32-bit register of T pairs (an MMA operand).
template <typename T> EB_DEVICE uint32_t pack2(float lo, float hi) {
  typename Elem<T>::Pair p = Elem<T>::from_float2(lo, hi);
  return *reinterpret_cast<uint32_t*>(&p);
}

// Reductions over the four lanes of a quad (the lanes sharing one accumulator row).
EB_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
EB_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

}  // namespace eb
