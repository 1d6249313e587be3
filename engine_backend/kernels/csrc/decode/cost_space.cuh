// The cost space a decode plan lays out (decode/planner.cuh writes it, decode/kernel.cuh reads it):
// request b occupies [cost_start[b], cost_start[b + 1]), its overhead first and then one unit per KV
// token read; CTA c owns [cta_start[c], cta_start[c + 1]). A CTA's part of a request is a Segment.
#pragma once
#include "../common.cuh"
#include "params.h"

namespace eb::decode {

struct Range {
  long x0, x1;  // this CTA's cost range
};

// The part of request b this CTA reads, in tokens of the trimmed KV [lo, hi).
struct Segment {
  int row, lo, hi, len;
  bool owns_empty;  // request with no KV whose zero output this CTA writes
  EB_DEVICE bool has_tokens() const { return lo < hi; }
};

EB_DEVICE Segment segment_of(const DecodePlan& plan, const Range& r, int overhead, int b) {
  Segment s;
  s.row = b;
  const long start = plan.cost_start[b];
  const long tok0 = start + overhead;
  s.len = plan.kv_len[b];
  s.lo = int(max(r.x0, tok0) - tok0);
  s.hi = int(min(r.x1, tok0 + s.len) - tok0);
  s.owns_empty = s.len == 0 && r.x0 <= start && start < r.x1;
  return s;
}

// CTA c's cost range.
EB_DEVICE Range cta_range(const DecodePlan& plan, int c) {
  Range r;
  r.x0 = plan.cta_start[c];
  r.x1 = plan.cta_start[c + 1];  // the array has ctas + 1 entries
  return r;
}

}  // namespace eb::decode
