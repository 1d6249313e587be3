// torch binding of the merge kernels, registered in the namespace EB_NAMESPACE (unique per build).
#include <torch/library.h>

#include "merge_state.h"
#include "torch_utils.h"

namespace {

constexpr at::ScalarType kDtype = ${TORCH_DTYPE};

eb::StateView view(const at::Tensor& v, const at::Tensor& lse, const char* name) {
  eb::check_cuda(v, name);
  eb::check_cuda(lse, name);
  eb::check_dtype(v, kDtype, name);
  eb::check_dtype(lse, at::kFloat, "lse");
  eb::check_last_dim_contiguous(v, name);
  TORCH_CHECK(v.dim() == 3 && lse.dim() == 2, name, ": expected v [N, H, D] and lse [N, H]");
  return {v.data_ptr(), lse.data_ptr<float>(), v.stride(0), v.stride(1), lse.stride(0), lse.stride(1)};
}

void merge_state(const at::Tensor& v_a, const at::Tensor& lse_a, const at::Tensor& v_b, const at::Tensor& lse_b,
                 const at::Tensor& v_out, const at::Tensor& lse_out) {
  c10::cuda::CUDAGuard guard(v_a.device());
  const int n = v_a.size(0), h = v_a.size(1), d = v_a.size(2);
  TORCH_CHECK(d % 8 == 0, "head_dim must be a multiple of 8");
  eb::merge_state_launch(view(v_a, lse_a, "v_a"), view(v_b, lse_b, "v_b"), view(v_out, lse_out, "v_out"), n, h, d,
                         eb::current_stream(v_a));
  eb::check_launch("merge_state");
}

void merge_states(const at::Tensor& v, const at::Tensor& lse, const at::Tensor& indptr, const at::Tensor& v_out,
                  const at::Tensor& lse_out) {
  c10::cuda::CUDAGuard guard(v.device());
  eb::check_cuda(indptr, "indptr");
  eb::check_dtype(indptr, at::kInt, "indptr");
  const int n = v_out.size(0), h = v_out.size(1), d = v_out.size(2);
  TORCH_CHECK(d % 8 == 0, "head_dim must be a multiple of 8");
  eb::merge_states_launch(view(v, lse, "v"), indptr.data_ptr<int32_t>(), view(v_out, lse_out, "v_out"), n, h, d,
                          eb::current_stream(v));
  eb::check_launch("merge_states");
}

}  // namespace

TORCH_LIBRARY(EB_NAMESPACE, m) {
  m.def("merge_state(Tensor v_a, Tensor lse_a, Tensor v_b, Tensor lse_b, Tensor(a!) v_out, Tensor(b!) lse_out) -> ()",
        &merge_state);
  m.def("merge_states(Tensor v, Tensor lse, Tensor indptr, Tensor(a!) v_out, Tensor(b!) lse_out) -> ()", &merge_states);
}
