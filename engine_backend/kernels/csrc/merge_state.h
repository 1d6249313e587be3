// Host-side interface of the merge kernels (plain C++, no torch): the binding in
// merge_state_ops.cpp calls these; merge_state.cu implements them for one element type.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace eb {

// A batch of states: v[n, h, 0:D] (16-bit elements, D contiguous) and lse[n, h] (float, natural log).
struct StateView {
  void* v;
  float* lse;
  int64_t v_stride_n, v_stride_h;      // in elements
  int64_t lse_stride_n, lse_stride_h;  // in elements
};

// out[n] = a[n] (+) b[n] for n < num; out may alias a or b.
void merge_state_launch(StateView a, StateView b, StateView out, int num, int heads, int head_dim, cudaStream_t stream);

// out[i] = (+) of states indptr[i] .. indptr[i+1]-1 of in; (0, -inf) for an empty range.
void merge_states_launch(StateView in, const int32_t* indptr, StateView out, int num_out, int heads, int head_dim,
                         cudaStream_t stream);

}  // namespace eb
