// Decode planning: one CTA reads the batch's lengths on the device and writes the DecodePlan the
// attention kernel follows (so planning never waits for the device and a CUDA graph can replay it).
//
// Cost model: request b costs kv_len'[b] + overhead "token units" (kv_len' = tokens actually read; a
// sliding window trims the rest). Requests are laid end to end in cost space, overhead first (see
// decode/cost_space.cuh), and CTA c of every head tile takes the range [cta_start[c], cta_start[c+1]),
// about T/G each: long and short requests alike are cut so that every CTA streams the same amount of
// KV (stream-K). A boundary that falls within share_slack() of a request boundary moves onto it, so a
// uniform batch is cut into equal pieces instead of leaving slivers of the next request. When k
// consecutive whole requests per CTA fit the grid with no group more than kSlackTokens over a share, the
// CTAs take those groups instead and no request is cut (aligned_group). A request cut into several
// pieces has their partial states merged by the CTA that finishes last.
#pragma once
#include <cub/block/block_scan.cuh>

#include "cost_space.cuh"

namespace eb::decode {

// Threads of the one planning CTA: requests are scanned kPlanThreads at a time.
constexpr int kPlanThreads = 1024;

// A CTA boundary moves onto a request boundary within share / kSnapDivisor (at least): a cut request
// costs its second CTA a segment start (page-id reads, the first K/V arrival) and a merge, which
// outweighs a CTA streaming a quarter share more than the others on a uniform batch.
constexpr int kSnapDivisor = 4;

// Tokens a CTA may take beyond its share to keep requests whole: the snap distance on short shares
// (never a whole share) and the most an aligned group may exceed a share. A cut request costs about
// the time of a few hundred tokens of streaming, so moving a boundary by fewer tokens is cheaper. In
// tokens, not a fraction of the share: on long requests every CTA streams at the bandwidth limit, and
// a group even a few percent over a share lengthens the whole launch.
constexpr int kSlackTokens = 256;

// How far a CTA boundary may move onto a request boundary (rather than cut the request).
EB_DEVICE long share_slack(long share) { return max(share / kSnapDivisor, min(long(kSlackTokens), share)); }

// Whole requests per CTA: k consecutive ones each (the fewest k that fits the grid), when no such group
// costs more than kSlackTokens beyond a share; returns k, or 0 for the stream-K split. Why: stream-K cuts
// nearly every request of a batch whose requests are about a share long, each cut costing a segment start
// and a merge.
template <int kThreads>
EB_DEVICE int aligned_group(const DecodePlan& plan, int rows, int used, int total, int overhead) {
  __shared__ int worst;
  if (threadIdx.x == 0) worst = 0;
  __syncthreads();
  const int k = used > 0 ? (rows + used - 1) / used : 1;
  const int groups = (rows + k - 1) / k;
  int local = 0;
  for (int g = threadIdx.x; g < groups; g += kThreads) {
    const int end = min((g + 1) * k, rows);  // cost_start[rows] is written later: use the total
    local = max(local, (end == rows ? total : plan.cost_start[end]) - plan.cost_start[g * k]);
  }
  atomicMax(&worst, local);
  __syncthreads();
  const long share = used > 0 ? long(total) / used : 0;
  // Groups are never empty (so neither are the CTAs' ranges) while every request costs at least the overhead.
  return overhead > 0 && used > 0 && worst - share <= kSlackTokens ? k : 0;
}

// plan.first_seg of CTA c: its first segment that holds tokens, starting the search at request b.
EB_DEVICE void record_first_segment(const DecodePlan& plan, int c, int b, int rows, int overhead) {
  const Range r = cta_range(plan, c);
  int32_t* out = plan.first_seg + kFirstSegFields * c;
  for (; b < rows && plan.cost_start[b] < r.x1; ++b) {
    const Segment s = segment_of(plan, r, overhead, b);
    if (s.has_tokens()) {
      out[0] = b, out[1] = s.lo, out[2] = s.hi, out[3] = plan.kv_begin[b], out[4] = plan.page_ptr[b];
      return;
    }
  }
  out[0] = -1;
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    decode_plan_kernel(const int32_t* __restrict__ indptr, const int32_t* __restrict__ kv_lens, int rows,
                       DecodePlan plan, int ctas, int overhead, int window_left, int semaphores) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int carry;
  const int tid = threadIdx.x;
  if (tid == 0) carry = 0;
  __syncthreads();
  // 1. Cost of every request and its start in cost space.
  for (int base = 0; base < rows; base += kThreads) {
    const int b = base + tid;
    int len = 0, begin = 0;
    if (b < rows) {
      len = kv_lens[b];
      if (window_left >= 0) begin = max(0, len - 1 - window_left);  // keys the query can see
      plan.kv_begin[b] = begin;
      plan.kv_len[b] = len - begin;
      plan.page_ptr[b] = indptr[b];
    }
    int x, total;
    Scan(scan).ExclusiveSum(b < rows ? len - begin + overhead : 0, x, total);
    if (b < rows) plan.cost_start[b] = carry + x;
    __syncthreads();
    if (tid == 0) carry += total;
    __syncthreads();
  }
  const int total = carry;
  const int align_k = aligned_group<kThreads>(plan, rows, rows == 0 ? 0 : min(ctas, total), total, overhead);
  const int used = align_k > 0 ? (rows + align_k - 1) / align_k : rows == 0 ? 0 : min(ctas, total);
  if (tid == 0) {
    plan.cost_start[rows] = total;
    plan.header[0] = rows;
    plan.header[1] = total;
    plan.header[2] = used;
  }
  __syncthreads();
  // 2. CTA boundaries: after aligned groups of requests, or equal shares of T, each moved onto a
  //    request boundary within the share's slack, capped just under half a share so that the
  //    boundaries stay strictly increasing (a boundary moves by less than half the gap to either
  //    neighbour's equal-share position).
  const long share = used > 0 ? long(total) / used : 0;
  const long snap = min(share_slack(share), share > 0 ? (share - 1) / 2 : 0);
  for (int c = tid; used > 0 && c <= used; c += kThreads) {
    long x = long(c) * total / used;  // used > 0 here: the loop is empty otherwise
    if (align_k > 0) x = c * align_k >= rows ? total : plan.cost_start[c * align_k];
    else if (c > 0 && c < used && snap > 0) {
      int lo = 0, hi = rows;  // first b with cost_start[b] >= x
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (plan.cost_start[mid] >= x) hi = mid; else lo = mid + 1;
      }
      const long above = plan.cost_start[lo], below = lo > 0 ? plan.cost_start[lo - 1] : -snap - 1;
      if (above - x <= snap && above - x <= x - below) x = above;
      else if (x - below <= snap) x = below;
    }
    plan.cta_start[c] = int(x);
  }
  __syncthreads();
  // 3. First request each CTA touches: the first b whose cost range ends after the CTA's start.
  for (int c = tid; c < used; c += kThreads) {
    const long x0 = plan.cta_start[c];
    int lo = 0, hi = rows - 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (plan.cost_start[mid + 1] > x0) hi = mid; else lo = mid + 1;
    }
    plan.first_row[c] = lo;
    record_first_segment(plan, c, lo, rows, overhead);
  }
  // 4. Pieces of every request and partial-state slots of those cut into several.
  auto cta_of = [&](long pos) {  // the CTA whose range holds cost position pos
    int lo = 0, hi = used - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (plan.cta_start[mid] <= pos) lo = mid; else hi = mid - 1;
    }
    return lo;
  };
  if (tid == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < rows; base += kThreads) {
    const int b = base + tid;
    int pieces = 0;
    if (b < rows && used > 0) {
      const long tok0 = long(plan.cost_start[b]) + overhead;
      const int len = plan.kv_len[b];
      const int first = cta_of(len == 0 ? plan.cost_start[b] : tok0);
      pieces = len == 0 ? 1 : cta_of(tok0 + len - 1) - first + 1;
      plan.first_cta[b] = first;
      plan.pieces[b] = pieces;
    }
    int x, sum;
    Scan(scan).ExclusiveSum(pieces > 1 ? pieces : 0, x, sum);
    if (b < rows) plan.piece_base[b] = carry + x;
    __syncthreads();
    if (tid == 0) carry += sum;
    __syncthreads();
  }
  if (tid == 0) plan.header[3] = carry;
  for (int i = tid; i < semaphores; i += kThreads) plan.semaphores[i] = 0;
}

}  // namespace eb::decode
