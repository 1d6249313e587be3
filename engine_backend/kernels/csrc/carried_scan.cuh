// Block-wide exclusive prefix sums over more values than a block has threads, as a planning CTA runs over a
// batch's requests: kThreads values per round, each round's sums offset by the total of the rounds before it
// (the carry). Shared by the planning kernels.
#pragma once
#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace eb {

template <int kThreads> struct CarriedScan {
  using Scan = cub::BlockScan<int, kThreads>;
  using TempStorage = typename Scan::TempStorage;

  TempStorage& scan;
  int& carry;  // in shared memory: the sum of the values of the rounds so far

  // Both in the caller's shared memory; the constructor is a barrier (every thread must construct it).
  EB_DEVICE CarriedScan(TempStorage& scan, int& carry) : scan(scan), carry(carry) {
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
  }
  // This round: this thread's value -> the sum of every value before it (earlier rounds included), and the
  // round's total in `total`.
  EB_DEVICE int exclusive_sum(int value, int& total) {
    int x;
    Scan(scan).ExclusiveSum(value, x, total);
    return x + carry;
  }
  // Ends the round (every thread, after its last read of the carry): the carry grows by the round's total.
  EB_DEVICE void next_round(int total) {
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
};

}  // namespace eb
