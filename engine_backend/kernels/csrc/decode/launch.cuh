// Host launchers of the decode kernels; decode.cu instantiates them for the element type, head dim
// and variant of its build.
#pragma once
#include "kernel.cuh"
#include "planner.cuh"

namespace eb::decode {

inline void launch_plan(const int32_t* indptr, const int32_t* kv_lens, int rows, const DecodePlan& plan, int ctas,
                        int overhead, int window_left, int semaphores, cudaStream_t stream) {
  decode_plan_kernel<kPlanThreads><<<1, kPlanThreads, 0, stream>>>(indptr, kv_lens, rows, plan, ctas, overhead,
                                                                   window_left, semaphores);
}

template <typename T, int HEAD_DIM, class Var, class Traits = DecodeTraits<HEAD_DIM>> struct AttentionLaunch {
  using Attention = DecodeAttention<T, HEAD_DIM, Var, Traits>;

  // A kernel may take more than 48 KB of dynamic shared memory only once allowed to.
  static void allow_smem() {
    cudaFuncSetAttribute(decode_kernel<T, HEAD_DIM, Var, Traits>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         Attention::kSmemBytes);
  }

  // CTAs of the attention kernel that fit on one SM (the Python wrapper sizes the grid from it).
  static int max_ctas_per_sm() {
    int n = 0;
    allow_smem();
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_kernel<T, HEAD_DIM, Var, Traits>,
                                                  Attention::kThreads, Attention::kSmemBytes);
    return n;
  }

  static void run(const DecodeParams& params, cudaStream_t stream) {
    static bool allowed = (allow_smem(), true);
    (void)allowed;
    const dim3 grid(params.ctas, params.num_kv_heads * params.head_tiles);
    decode_kernel<T, HEAD_DIM, Var, Traits><<<grid, Attention::kThreads, Attention::kSmemBytes, stream>>>(params);
  }
};

}  // namespace eb::decode
