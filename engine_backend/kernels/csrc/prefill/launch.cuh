// Host launches of one prefill build: the planning kernel and the attention kernel of a KernelConfig
// (traits.cuh). prefill.cu instantiates Launch for its spec's template values.
#pragma once
#include "kernel.cuh"
#include "planner.cuh"

namespace eb::prefill {

template <class Kc> struct Launch {
  static int tile_rows() { return Kc::kM; }

  static void plan(const int32_t* qo_indptr, const int32_t* indptr, const int32_t* kv_lens, int rows,
                   const PrefillPlan& plan, int group, int max_tiles, cudaStream_t stream) {
    plan_kernel<Kc::kM><<<1, kPlanThreads, 0, stream>>>(qo_indptr, indptr, kv_lens, rows, plan, group, max_tiles);
  }

  static void run(const PrefillParams& params, cudaStream_t stream) {
    static bool configured = [] {
      cudaFuncSetAttribute(attention_kernel<Kc>, cudaFuncAttributeMaxDynamicSharedMemorySize, Kc::kSmemBytes);
      return true;
    }();
    (void)configured;
    const int blocks = params.max_tiles * params.num_kv_heads;
    PrefillParams p = params;
    p.group = make_divisor(params.num_qo_heads / params.num_kv_heads);
    p.kv_heads = make_divisor(params.num_kv_heads);
    if (blocks > 0) attention_kernel<Kc><<<blocks, Kc::kThreads, Kc::kSmemBytes, stream>>>(p);
  }
};

}  // namespace eb::prefill
