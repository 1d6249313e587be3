// torch binding of the decode kernels, registered in the namespace EB_NAMESPACE (unique per build).
#include <torch/library.h>

#include <optional>

#include "decode/params.h"
#include "torch_utils.h"

namespace {

constexpr at::ScalarType kDtype = ${TORCH_DTYPE};
constexpr int kHeadDim = ${HEAD_DIM};

// The plan lives in one int32 buffer (layout: decode/params.h); this points eb::DecodePlan into it.
eb::DecodePlan carve_plan(const at::Tensor& buf, int64_t max_rows, int64_t ctas, int64_t head_tiles_total) {
  TORCH_CHECK(buf.scalar_type() == at::kInt && buf.is_contiguous(), "plan buffer must be contiguous int32");
  const int64_t need = eb::decode_plan_ints(max_rows, ctas, head_tiles_total);
  TORCH_CHECK(buf.numel() >= need, "plan buffer too small: ", buf.numel(), " < ", need);
  eb::DecodePlan plan;
  eb::decode_plan_layout(max_rows, ctas, head_tiles_total, &plan, buf.data_ptr<int32_t>());
  return plan;
}

// Size of the plan buffer, in int32s, for the sizes plan() and run() will be called with.
int64_t plan_ints(int64_t max_rows, int64_t ctas, int64_t head_tiles_total) {
  TORCH_CHECK(max_rows >= 0 && ctas >= 1 && head_tiles_total >= 1,
              "plan_ints: need max_rows >= 0, ctas >= 1, head_tiles_total >= 1");
  return eb::decode_plan_ints(max_rows, ctas, head_tiles_total);
}

void plan(const at::Tensor& indptr, const at::Tensor& kv_lens, const at::Tensor& plan_buf, int64_t max_rows,
          int64_t ctas, int64_t grid_ctas, int64_t head_tiles_total, int64_t overhead, int64_t window_left) {
  c10::cuda::CUDAGuard guard(plan_buf.device());
  eb::check_cuda(indptr, "indptr");
  eb::check_cuda(kv_lens, "kv_lens");
  const int64_t rows = kv_lens.size(0);
  TORCH_CHECK(1 <= grid_ctas && grid_ctas <= ctas, "grid_ctas must be in [1, ctas]");
  TORCH_CHECK(rows <= max_rows, "batch of ", rows, " requests exceeds max_batch_size ", max_rows);
  eb::DecodePlan p = carve_plan(plan_buf, max_rows, ctas, head_tiles_total);
  eb::decode_plan_launch(indptr.data_ptr<int32_t>(), kv_lens.data_ptr<int32_t>(), rows, p, grid_ctas, overhead,
                         window_left, rows * head_tiles_total, eb::current_stream(plan_buf));
  eb::check_launch("decode plan");
}

void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices,
         const at::Tensor& plan_buf, const at::Tensor& work_o, const at::Tensor& work_lse, const at::Tensor& out,
         const std::optional<at::Tensor>& lse, const std::optional<at::Tensor>& alibi, int64_t max_rows, int64_t ctas,
         int64_t grid_ctas, int64_t head_tiles, int64_t page_size, int64_t overhead, double sm_scale, double soft_cap,
         int64_t window_left) {
  c10::cuda::CUDAGuard guard(q.device());
  eb::DecodeParams p{};
  eb::fill_paged_io(p, q, k, v, indices, page_size, out, lse, kDtype, kHeadDim);
  p.work_o = work_o.data_ptr<float>();
  p.work_lse = work_lse.data_ptr<float>();
  p.head_tiles = head_tiles;
  TORCH_CHECK(1 <= grid_ctas && grid_ctas <= ctas, "grid_ctas must be in [1, ctas]");
  p.ctas = grid_ctas;
  p.overhead = overhead;
  p.plan = carve_plan(plan_buf, max_rows, ctas, p.num_kv_heads * head_tiles);
  p.variant = eb::variant_params(sm_scale, soft_cap, window_left, alibi);
  eb::decode_run_launch(p, eb::current_stream(q));
  eb::check_launch("decode");
}

int64_t max_ctas_per_sm() { return eb::decode_max_ctas_per_sm(); }

}  // namespace

TORCH_LIBRARY(EB_NAMESPACE, m) {
  m.def("plan(Tensor indptr, Tensor kv_lens, Tensor(a!) plan, int max_rows, int ctas, int grid_ctas, "
        "int head_tiles_total, "
        "int overhead, int window_left) -> ()",
        &plan);
  m.def("run(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor plan, Tensor(a!) work_o, Tensor(b!) work_lse, "
        "Tensor(c!) out, Tensor(d!)? lse, Tensor? alibi, int max_rows, int ctas, int grid_ctas, int head_tiles, int page_size, "
        "int overhead, float sm_scale, float soft_cap, int window_left) -> ()",
        &run);
  m.def("max_ctas_per_sm() -> int", &max_ctas_per_sm);
  m.def("plan_ints(int max_rows, int ctas, int head_tiles_total) -> int", &plan_ints);
}
