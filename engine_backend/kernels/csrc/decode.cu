// One build of the decode kernels: the JIT spec substitutes the element type, head dim and
// variant; the kernels live in decode/ (kernel.cuh, planner.cuh, launch.cuh).
#include "decode/launch.cuh"

namespace eb {

using DecodeBuild = decode::AttentionLaunch<${DTYPE}, ${HEAD_DIM}, Variant<${SOFT_CAP}, ${SLIDING_WINDOW}, ${ALIBI}>>;

void decode_plan_launch(const int32_t* indptr, const int32_t* kv_lens, int rows, const DecodePlan& plan, int ctas,
                        int overhead, int window_left, int semaphores, cudaStream_t stream) {
  decode::launch_plan(indptr, kv_lens, rows, plan, ctas, overhead, window_left, semaphores, stream);
}

void decode_run_launch(const DecodeParams& params, cudaStream_t stream) { DecodeBuild::run(params, stream); }

int decode_max_ctas_per_sm() { return DecodeBuild::max_ctas_per_sm(); }

}  // namespace eb
