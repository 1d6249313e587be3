// Hopper (sm_90a) warpgroup MMA: wgmma.mma_async with operands in shared memory described by matrix
// descriptors, the accumulators (and optionally A) in the registers of a warpgroup's 128 threads.
//
// Operand tiles use the 128-byte swizzle: a tile of `rows` rows x head_dim 16-bit elements is stored as
// head_dim / 64 column blocks of rows x 128 bytes, 16-byte chunk c of row r at chunk c ^ (r % 8) of its
// block (wgmma_tile_offset). That is the canonical layout wgmma reads both as a K-major operand (rows along M
// or N: Q, K) and as an MN-major one (rows along K: V). Tiles start at multiples of 1024 bytes (the swizzle
// pattern repeats every 8 rows) so a k-step's descriptor is the tile's plus a byte offset.
//
// Accumulator layout: warp w of the warpgroup holds rows 16 w .. 16 w + 15 of the 64, and within them the
// m16n8 layout of mma.sync repeated along N (d[j] = columns 8 j .. 8 j + 7); the register A operand has the
// m16n8k16 A layout. So the softmax code of the mma.sync path works on wgmma accumulators unchanged.
#pragma once
#include "common.cuh"

namespace eb {

template <int kRows> EB_DEVICE int wgmma_tile_offset(int row, int chunk) {
  return (chunk / 8) * kRows * 128 + row * 128 + ((chunk % 8) ^ (row % 8)) * 16;
}

// Descriptor of an operand at shared address `addr`: `lead_bytes` apart along the leading dimension's
// 64-element blocks (MN-major operands; ignored for K-major ones), `stride_bytes` between 8-row groups,
// 128-byte swizzle (mode 1 in bits 62-63). Addresses and offsets are stored in 16-byte units.
EB_DEVICE uint64_t wgmma_desc(uint32_t addr, uint32_t lead_bytes, uint32_t stride_bytes) {
  return uint64_t((addr & 0x3FFFF) >> 4) | uint64_t(lead_bytes >> 4) << 16 | uint64_t(stride_bytes >> 4) << 32 |
         uint64_t(1) << 62;
}

// Orders register writes before the next wgmma reads them (accumulators rescaled, A packed).
EB_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
EB_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending> EB_DEVICE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Shared memory written by this thread's cp.async (the generic proxy) -> visible to wgmma (the async proxy);
// a barrier after it publishes everyone's.
EB_DEVICE void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving reads of accumulators above the wait for the MMAs that write them.
template <int kN> EB_DEVICE void fence_accumulators(float (&d)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+f"(d[j][i])::"memory");
}

// One m64nNk16 step per call: ss (S += Q K^T: A and B in shared memory, K-major), ss_first (S = Q K^T: its
// accumulators are outputs only, so no instruction before it has to define them) and rs_mn (O += P V: A in
// registers, B MN-major in shared memory).
template <typename T, int kN> struct Wgmma;
#define EB_WGMMA_OPS(TYPE, PTX) \
  template <> struct Wgmma<TYPE, 64> {                                                                    \
    static EB_DEVICE void ss_first(float (&d)[8][4], uint64_t a, uint64_t b) {                               \
      asm volatile(                                                                                             \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                        \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {"                                           \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "  \
        "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31 "  \
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                               \
        : "=f"(d[0][0]), "=f"(d[0][1]), "=f"(d[0][2]), "=f"(d[0][3]), "=f"(d[1][0]), "=f"(d[1][1]), "=f"(d[1][2]), "=f"(d[1][3]),  \
          "=f"(d[2][0]), "=f"(d[2][1]), "=f"(d[2][2]), "=f"(d[2][3]), "=f"(d[3][0]), "=f"(d[3][1]), "=f"(d[3][2]), "=f"(d[3][3]),  \
          "=f"(d[4][0]), "=f"(d[4][1]), "=f"(d[4][2]), "=f"(d[4][3]), "=f"(d[5][0]), "=f"(d[5][1]), "=f"(d[5][2]), "=f"(d[5][3]),  \
          "=f"(d[6][0]), "=f"(d[6][1]), "=f"(d[6][2]), "=f"(d[6][3]), "=f"(d[7][0]), "=f"(d[7][1]), "=f"(d[7][2]), "=f"(d[7][3])  \
        : "l"(a), "l"(b), "r"(0));                                                                              \
    }                                                                                                           \
    static EB_DEVICE void ss(float (&d)[8][4], uint64_t a, uint64_t b) {                                     \
      asm volatile(                                                                                             \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                        \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {"                                           \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "  \
        "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31 "  \
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                               \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),  \
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),  \
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),  \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])  \
        : "l"(a), "l"(b), "r"(1));                                                                              \
    }                                                                                                           \
    static EB_DEVICE void rs_mn(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b) {                     \
      asm volatile(                                                                                             \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                        \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {"                                           \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "  \
        "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31 "  \
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                                        \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),  \
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),  \
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),  \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])  \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                                      \
    }                                                                                                           \
  }; \
  template <> struct Wgmma<TYPE, 128> {                                                                    \
    static EB_DEVICE void ss_first(float (&d)[16][4], uint64_t a, uint64_t b) {                               \
      asm volatile(                                                                                             \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                        \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " {"                                           \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "  \
        "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
        "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63 "  \
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                                               \
        : "=f"(d[0][0]), "=f"(d[0][1]), "=f"(d[0][2]), "=f"(d[0][3]), "=f"(d[1][0]), "=f"(d[1][1]), "=f"(d[1][2]), "=f"(d[1][3]),  \
          "=f"(d[2][0]), "=f"(d[2][1]), "=f"(d[2][2]), "=f"(d[2][3]), "=f"(d[3][0]), "=f"(d[3][1]), "=f"(d[3][2]), "=f"(d[3][3]),  \
          "=f"(d[4][0]), "=f"(d[4][1]), "=f"(d[4][2]), "=f"(d[4][3]), "=f"(d[5][0]), "=f"(d[5][1]), "=f"(d[5][2]), "=f"(d[5][3]),  \
          "=f"(d[6][0]), "=f"(d[6][1]), "=f"(d[6][2]), "=f"(d[6][3]), "=f"(d[7][0]), "=f"(d[7][1]), "=f"(d[7][2]), "=f"(d[7][3]),  \
          "=f"(d[8][0]), "=f"(d[8][1]), "=f"(d[8][2]), "=f"(d[8][3]), "=f"(d[9][0]), "=f"(d[9][1]), "=f"(d[9][2]), "=f"(d[9][3]),  \
          "=f"(d[10][0]), "=f"(d[10][1]), "=f"(d[10][2]), "=f"(d[10][3]), "=f"(d[11][0]), "=f"(d[11][1]), "=f"(d[11][2]), "=f"(d[11][3]),  \
          "=f"(d[12][0]), "=f"(d[12][1]), "=f"(d[12][2]), "=f"(d[12][3]), "=f"(d[13][0]), "=f"(d[13][1]), "=f"(d[13][2]), "=f"(d[13][3]),  \
          "=f"(d[14][0]), "=f"(d[14][1]), "=f"(d[14][2]), "=f"(d[14][3]), "=f"(d[15][0]), "=f"(d[15][1]), "=f"(d[15][2]), "=f"(d[15][3])  \
        : "l"(a), "l"(b), "r"(0));                                                                              \
    }                                                                                                           \
    static EB_DEVICE void ss(float (&d)[16][4], uint64_t a, uint64_t b) {                                     \
      asm volatile(                                                                                             \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                        \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " {"                                           \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "  \
        "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
        "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63 "  \
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                                               \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),  \
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),  \
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),  \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),  \
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),  \
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),  \
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),  \
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])  \
        : "l"(a), "l"(b), "r"(1));                                                                              \
    }                                                                                                           \
    static EB_DEVICE void rs_mn(float (&d)[16][4], const uint32_t (&a)[4], uint64_t b) {                     \
      asm volatile(                                                                                             \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                        \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " {"                                           \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "  \
        "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
        "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63 "  \
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                                        \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),  \
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),  \
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),  \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),  \
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),  \
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),  \
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),  \
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])  \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                                      \
    }                                                                                                           \
  };

EB_WGMMA_OPS(__nv_bfloat16, "bf16")
EB_WGMMA_OPS(half, "f16")
#undef EB_WGMMA_OPS

}  // namespace eb
