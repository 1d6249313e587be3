// Merge of attention states, pairwise and n-way. Template parameter: ${DTYPE}.
#include "merge_state.h"
#include "state.cuh"

namespace eb {
namespace {

using T = ${DTYPE};
constexpr int kThreads = 256;

struct Slot {  // one thread's 8 elements of one (row, head)
  int n, h, d;
};

EB_DEVICE bool slot_of(int num, int heads, int head_dim, Slot& s) {
  const int vecs = head_dim / 8;
  const long tid = long(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= long(num) * heads * vecs) return false;
  s.d = int(tid % vecs) * 8;
  const long row = tid / vecs;
  s.h = int(row % heads);
  s.n = int(row / heads);
  return true;
}

EB_DEVICE const T* v_at(const StateView& s, long n, int h, int d) {
  return static_cast<const T*>(s.v) + n * s.v_stride_n + h * s.v_stride_h + d;
}
EB_DEVICE float lse2_at(const StateView& s, long n, int h) {
  return s.lse[n * s.lse_stride_n + h * s.lse_stride_h] * kLog2e;
}

// Reads everything before writing, so out may alias a or b.
EB_DEVICE void store_state(const StateView& out, const MergeAcc<8>& acc, const Slot& s) {
  float o[8];
  const float lse2 = acc.finish(o);
  Vec8<T> vec;
  vec.from_float(o);
  vec.store(const_cast<T*>(v_at(out, s.n, s.h, s.d)));
  if (s.d == 0) out.lse[s.n * out.lse_stride_n + s.h * out.lse_stride_h] = lse2 * kLn2;
}

__global__ void merge_pair_kernel(StateView a, StateView b, StateView out, int num, int heads, int head_dim) {
  Slot s;
  const bool valid = slot_of(num, heads, head_dim, s);
  Vec8<T> va, vb;
  float lse_a = 0.f, lse_b = 0.f;
  if (valid) {
    va.load(v_at(a, s.n, s.h, s.d));
    vb.load(v_at(b, s.n, s.h, s.d));
    lse_a = lse2_at(a, s.n, s.h);
    lse_b = lse2_at(b, s.n, s.h);
  }
  // In place, one thread of a row overwrites the lse the row's other threads read: every
  // read of the block happens before any write (a row never spans blocks, see merge.py).
  __syncthreads();
  if (!valid) return;
  MergeAcc<8> acc;
  acc.init();
  float f[8];
  va.to_float(f);
  acc.add(f, lse_a);
  vb.to_float(f);
  acc.add(f, lse_b);
  store_state(out, acc, s);
}

__global__ void merge_many_kernel(StateView in, const int32_t* __restrict__ indptr, StateView out, int num, int heads,
                                  int head_dim) {
  Slot s;
  if (!slot_of(num, heads, head_dim, s)) return;
  MergeAcc<8> acc;
  acc.init();
  float f[8];
  Vec8<T> vec;
  for (int i = indptr[s.n], end = indptr[s.n + 1]; i < end; ++i) {
    vec.load(v_at(in, i, s.h, s.d));
    vec.to_float(f);
    acc.add(f, lse2_at(in, i, s.h));
  }
  store_state(out, acc, s);
}

int blocks_for(int num, int heads, int head_dim) {
  const long work = long(num) * heads * (head_dim / 8);
  return int((work + kThreads - 1) / kThreads);
}

}  // namespace

void merge_state_launch(StateView a, StateView b, StateView out, int num, int heads, int head_dim, cudaStream_t stream) {
  if (num == 0) return;
  merge_pair_kernel<<<blocks_for(num, heads, head_dim), kThreads, 0, stream>>>(a, b, out, num, heads, head_dim);
}

void merge_states_launch(StateView in, const int32_t* indptr, StateView out, int num_out, int heads, int head_dim,
                         cudaStream_t stream) {
  if (num_out == 0) return;
  merge_many_kernel<<<blocks_for(num_out, heads, head_dim), kThreads, 0, stream>>>(in, indptr, out, num_out, heads,
                                                                                   head_dim);
}

}  // namespace eb
