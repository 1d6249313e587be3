// SGLang's token table -> BSR in one launch (BSR.from_token_table's device path). The same result
// as the torch formulation in format.py, which takes some 35 small ops: each is a launch plus
// dispatcher time on the host, paid every step before a decode graph replay.
//
// Every CTA scans the page counts of all rows (cheap: one int per request) in chunks of kThreads
// with a carry, so no second launch or grid-wide sync is needed; then it copies the page ids of
// its own rows (round-robin over CTAs), all its threads on one row at a time.
#include <cub/block/block_scan.cuh>

#include "token_table.h"

namespace eb {
namespace {

constexpr int kThreads = 1024;
using Scan = cub::BlockScan<int, kThreads>;

__device__ __forceinline__ int64_t load(const IndexArray& a, int i) {
  return a.is_int64 ? static_cast<const int64_t*>(a.data)[i] : static_cast<const int32_t*>(a.data)[i];
}

__global__ void __launch_bounds__(kThreads) token_table_kernel(const TokenTableParams p) {
  __shared__ typename Scan::TempStorage scan;
  __shared__ int first_page[kThreads], num_pages[kThreads];
  __shared__ int carry;
  const int tid = threadIdx.x;
  if (tid == 0) carry = 0;
  __syncthreads();
  const int max_pages = (p.width + p.page_size - 1) / p.page_size;
  for (int base = 0; base < p.rows; base += kThreads) {
    const int r = base + tid;
    const int len = r < p.rows ? static_cast<int>(load(p.lens, r)) : 0;
    const int pages = (max(len, 0) + p.page_size - 1) / p.page_size;  // a negative length lists no pages
    int first, total;
    Scan(scan).ExclusiveSum(pages, first, total);
    first += carry;
    first_page[tid] = first;
    num_pages[tid] = pages;
    if (blockIdx.x == 0 && r < p.rows) {
      p.indptr[r] = first;
      p.kv_lens[r] = len;
    }
    __syncthreads();
    const int chunk_end = min(base + kThreads, p.rows);
    for (int row = base + blockIdx.x; row < chunk_end; row += gridDim.x) {
      const int out0 = first_page[row - base], n = num_pages[row - base];
      const int32_t* slots = p.table + load(p.req, row) * p.table_stride;
      for (int j = tid; j < n && out0 + j < p.capacity; j += kThreads) {
        // Column of the page's first token, clamped as the torch path clamps (only lengths past
        // the table's width reach the clamps).
        const int col = min(min(j, max_pages - 1) * p.page_size, p.width - 1);
        p.indices[out0 + j] = slots[col] / p.page_size;
      }
    }
    __syncthreads();  // first_page / num_pages / scan storage are rewritten by the next chunk
    if (tid == 0) carry += total;
    __syncthreads();
  }
  if (blockIdx.x == 0 && tid == 0) p.indptr[p.rows] = carry;
  const int used = min(carry, p.capacity);
  for (int i = used + blockIdx.x * kThreads + tid; i < p.capacity; i += gridDim.x * kThreads) p.indices[i] = 0;
}

}  // namespace

void token_table_launch(const TokenTableParams& p, cudaStream_t stream) {
  // One CTA per request up to a few per SM: the scan each CTA repeats is small next to the copies.
  const int blocks = max(1, min(p.rows, 512));
  token_table_kernel<<<blocks, kThreads, 0, stream>>>(p);
}

}  // namespace eb
