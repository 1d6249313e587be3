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

// Operand lists: the N / 2 accumulators of a thread, d[j][i] for 8-column block j, as read-write (EB_RW) or
// write-only (EB_WO) operands; their PTX names %0 .. %(N/2 - 1), then the names of the operands after them.
#define EB_RW(x) "+f"(x)
#define EB_WO(x) "=f"(x)
#define EB_ACC4(C, j) C(d[j][0]), C(d[j][1]), C(d[j][2]), C(d[j][3])
#define EB_ACC32(C, j) EB_ACC4(C, j), EB_ACC4(C, j + 1), EB_ACC4(C, j + 2), EB_ACC4(C, j + 3), EB_ACC4(C, j + 4), \
                       EB_ACC4(C, j + 5), EB_ACC4(C, j + 6), EB_ACC4(C, j + 7)
#define EB_ACC_64(C) EB_ACC32(C, 0)
#define EB_ACC_128(C) EB_ACC32(C, 0), EB_ACC32(C, 8)
#define EB_REGS_64 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
                   "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define EB_REGS_128 EB_REGS_64 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
                    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
// ss: descriptors A, B and the accumulate flag; rs_mn: A's four registers, B's descriptor and the flag.
#define EB_SS_ARGS_64 "%32, %33", "%34"
#define EB_SS_ARGS_128 "%64, %65", "%66"
#define EB_RS_ARGS_64 "{%32, %33, %34, %35}, %36", "%37"
#define EB_RS_ARGS_128 "{%64, %65, %66, %67}, %68", "%69"
#define EB_WGMMA_ASM(SHAPE_PTX, REGS, OPERANDS, FLAG, TAIL) \
  "{\n.reg .pred p;\nsetp.ne.b32 p, " FLAG ", 0;\nwgmma.mma_async.sync.aligned." SHAPE_PTX " {" REGS "}, " OPERANDS \
  ", p, " TAIL ";\n}\n"
#define EB_WGMMA_ASM_ARGS(SHAPE_PTX, REGS, ARGS, TAIL) EB_WGMMA_ASM(SHAPE_PTX, REGS, ARGS, TAIL)

#define EB_WGMMA_OPS(TYPE, PTX, N)                                                                              \
  template <> struct Wgmma<TYPE, N> {                                                                            \
    static EB_DEVICE void ss_first(float (&d)[N / 8][4], uint64_t a, uint64_t b) {                               \
      asm volatile(EB_WGMMA_ASM_ARGS("m64n" #N "k16.f32." PTX "." PTX, EB_REGS_##N, EB_SS_ARGS_##N, "1, 1, 0, 0") \
                   : EB_ACC_##N(EB_WO)                                                                           \
                   : "l"(a), "l"(b), "r"(0));                                                                    \
    }                                                                                                            \
    static EB_DEVICE void ss(float (&d)[N / 8][4], uint64_t a, uint64_t b) {                                     \
      asm volatile(EB_WGMMA_ASM_ARGS("m64n" #N "k16.f32." PTX "." PTX, EB_REGS_##N, EB_SS_ARGS_##N, "1, 1, 0, 0") \
                   : EB_ACC_##N(EB_RW)                                                                           \
                   : "l"(a), "l"(b), "r"(1));                                                                    \
    }                                                                                                            \
    static EB_DEVICE void rs_mn(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t b) {                      \
      asm volatile(EB_WGMMA_ASM_ARGS("m64n" #N "k16.f32." PTX "." PTX, EB_REGS_##N, EB_RS_ARGS_##N, "1, 1, 1")    \
                   : EB_ACC_##N(EB_RW)                                                                           \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                                \
    }                                                                                                            \
  };

EB_WGMMA_OPS(__nv_bfloat16, "bf16", 64)
EB_WGMMA_OPS(__nv_bfloat16, "bf16", 128)
EB_WGMMA_OPS(half, "f16", 64)
EB_WGMMA_OPS(half, "f16", 128)
#undef EB_WGMMA_OPS
#undef EB_WGMMA_ASM_ARGS
#undef EB_WGMMA_ASM
#undef EB_RS_ARGS_128
#undef EB_RS_ARGS_64
#undef EB_SS_ARGS_128
#undef EB_SS_ARGS_64
#undef EB_REGS_128
#undef EB_REGS_64
#undef EB_ACC_128
#undef EB_ACC_64
#undef EB_ACC32
#undef EB_ACC4
#undef EB_WO
#undef EB_RW

}  // namespace eb
