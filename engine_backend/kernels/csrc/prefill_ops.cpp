// torch binding of the prefill kernels, registered in the namespace EB_NAMESPACE (unique per build).
#include <torch/library.h>

#include <optional>

#include "prefill/params.h"
#include "torch_utils.h"

namespace {

constexpr at::ScalarType kDtype = ${TORCH_DTYPE};
constexpr int kHeadDim = ${HEAD_DIM};

// The plan lives in one int32 buffer (layout: prefill/params.h); this points eb::PrefillPlan into it.
eb::PrefillPlan carve_plan(const at::Tensor& buf, int64_t max_tiles) {
  TORCH_CHECK(buf.scalar_type() == at::kInt && buf.is_contiguous(), "plan buffer must be contiguous int32");
  const int64_t need = eb::prefill_plan_ints(max_tiles);
  TORCH_CHECK(buf.numel() >= need, "plan buffer too small: ", buf.numel(), " < ", need);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(buf.data_ptr()) % 16 == 0, "plan buffer must be 16-byte aligned");
  return eb::prefill_plan_at(buf.data_ptr<int32_t>(), max_tiles);
}

// Size of the plan buffer, in int32s, for plans of at most max_tiles query tiles.
int64_t plan_ints(int64_t max_tiles) {
  TORCH_CHECK(max_tiles >= 0, "plan_ints: need max_tiles >= 0, got ", max_tiles);
  return eb::prefill_plan_ints(max_tiles);
}

void plan(const at::Tensor& qo_indptr, const at::Tensor& indptr, const at::Tensor& kv_lens, const at::Tensor& plan_buf,
          int64_t max_rows, int64_t max_tiles, int64_t group) {
  c10::cuda::CUDAGuard guard(plan_buf.device());
  for (auto* t : {&qo_indptr, &indptr, &kv_lens}) eb::check_cuda(*t, "BSR arrays");
  const int64_t rows = kv_lens.size(0);
  TORCH_CHECK(rows <= max_rows, "batch of ", rows, " requests exceeds max_batch_size ", max_rows);
  eb::prefill_plan_launch(qo_indptr.data_ptr<int32_t>(), indptr.data_ptr<int32_t>(), kv_lens.data_ptr<int32_t>(),
                          rows, carve_plan(plan_buf, max_tiles), group, max_tiles,
                          eb::current_stream(plan_buf));
  eb::check_launch("prefill plan");
}

void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices,
         const at::Tensor& plan_buf, const at::Tensor& out, const std::optional<at::Tensor>& lse,
         const std::optional<at::Tensor>& alibi, int64_t max_tiles, int64_t launch_tiles,
         int64_t page_size, bool causal, double sm_scale, double soft_cap, int64_t window_left) {
  c10::cuda::CUDAGuard guard(q.device());
  eb::PrefillParams p{};
  eb::fill_paged_io(p, q, k, v, indices, page_size, out, lse, kDtype, kHeadDim);
  // The kernel addresses Q, K and V rows with 32-bit byte strides (prefill/loads.cuh's mad_wide).
  for (int64_t stride : {p.q_stride_n, p.q_stride_h, p.k_stride_page, p.k_stride_tok, p.v_stride_page, p.v_stride_tok}) {
    TORCH_CHECK(stride >= 0 && stride * q.element_size() < (int64_t(1) << 31),
                "Q token/head and K/V page/token strides must be below 2^31 bytes, got a stride of ", stride,
                " elements");
  }
  p.plan = carve_plan(plan_buf, max_tiles);
  p.max_tiles = launch_tiles;
  p.causal = causal;
  p.variant = eb::variant_params(sm_scale, soft_cap, window_left, alibi);
  eb::prefill_run_launch(p, eb::current_stream(q));
  eb::check_launch("prefill");
}

int64_t tile_rows() { return eb::prefill_tile_rows(); }

}  // namespace

TORCH_LIBRARY(EB_NAMESPACE, m) {
  m.def("plan(Tensor qo_indptr, Tensor indptr, Tensor kv_lens, Tensor(a!) plan, int max_rows, int max_tiles, "
        "int group) -> ()",
        &plan);
  m.def("run(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor plan, Tensor(a!) out, Tensor(b!)? lse, "
        "Tensor? alibi, int max_tiles, int launch_tiles, int page_size, bool causal, float sm_scale, "
        "float soft_cap, int window_left) -> ()",
        &run);
  m.def("tile_rows() -> int", &tile_rows);
  m.def("plan_ints(int max_tiles) -> int", &plan_ints);
}
