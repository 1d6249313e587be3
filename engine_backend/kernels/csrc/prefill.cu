// One build of the prefill kernels: the JIT spec (engine_backend/kernels/specs.py) substitutes the element
// type, head dim, attention variant and CTA shape (warps, K/V tile, mainloop: WGMMA 1 for Hopper warpgroup
// MMAs, else mma.sync); the kernels live in prefill/ (traits.cuh holds every tile-size choice).
#include "prefill/launch.cuh"

namespace eb {

using PrefillBuild = prefill::Launch<prefill::KernelConfig<
    prefill::Traits<${DTYPE}, ${HEAD_DIM}, ${WARPS}, ${KV_TILE},
                    (${WGMMA} ? prefill::MainloopKind::kWgmma : prefill::MainloopKind::kMmaSync)>,
    Variant<${SOFT_CAP}, ${SLIDING_WINDOW}, ${ALIBI}>>>;

int prefill_tile_rows() { return PrefillBuild::tile_rows(); }

void prefill_plan_launch(const int32_t* qo_indptr, const int32_t* indptr, const int32_t* kv_lens, int rows,
                         const PrefillPlan& plan, int group, int max_tiles, cudaStream_t stream) {
  PrefillBuild::plan(qo_indptr, indptr, kv_lens, rows, plan, group, max_tiles, stream);
}

void prefill_run_launch(const PrefillParams& params, cudaStream_t stream) { PrefillBuild::run(params, stream); }

}  // namespace eb
