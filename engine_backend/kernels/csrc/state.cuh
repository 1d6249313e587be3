// Attention states (V, lse) and their merge, the operation that composes partial results.
//
// A state over a key set K is V = sum_k softmax_k * v_k and lse = log sum_k exp(s_k).
// Internally lse is kept in base 2 (log2), the kernels' native unit; the public ops take and
// return natural-log lse and convert at the edges. The state with lse = -inf (no keys) is the
// identity of the merge.
#pragma once
#include "common.cuh"

namespace eb {

// Running merge of states into an accumulator of N floats per thread.
template <int N> struct MergeAcc {
  float o[N];
  float m;    // max log2-sum-exp seen so far (-inf while empty)
  float sum;  // sum of 2^(lse_i - m)

  EB_DEVICE void init() {
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = 0.f;
    m = -CUDART_INF_F;
    sum = 0.f;
  }
  // Add a state with values v (already normalised) and log2-sum-exp lse2.
  EB_DEVICE void add(const float* v, float lse2) {
    if (lse2 == -CUDART_INF_F) return;  // empty state: identity
    float m_new = fmaxf(m, lse2);
    float scale_old = fast_exp2(m - m_new);  // 0 when m was -inf
    float w = fast_exp2(lse2 - m_new);
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = o[i] * scale_old + v[i] * w;
    sum = sum * scale_old + w;
    m = m_new;
  }
  // Normalised output and its log2-sum-exp; (0, -inf) when nothing was added.
  EB_DEVICE float finish(float* out) const {
    float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = o[i] * inv;
    return sum > 0.f ? m + fast_log2(sum) : -CUDART_INF_F;
  }
};

}  // namespace eb
