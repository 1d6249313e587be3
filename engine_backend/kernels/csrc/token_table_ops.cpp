// torch binding of the token-table kernel, registered in the namespace EB_NAMESPACE (unique per build).
#include <torch/library.h>

#include "token_table.h"
#include "torch_utils.h"

namespace {

eb::IndexArray index_array(const at::Tensor& t, int64_t rows, const char* name) {
  eb::check_cuda(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.is_contiguous(), name, " must be a contiguous [", rows, "]");
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name, " must be int32 or int64");
  return {t.data_ptr(), t.scalar_type() == at::kLong};
}

void build(const at::Tensor& table, const at::Tensor& req, const at::Tensor& lens, int64_t page_size,
           const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& kv_lens) {
  c10::cuda::CUDAGuard guard(table.device());
  eb::check_cuda(table, "req_to_token");
  eb::check_dtype(table, at::kInt, "req_to_token");
  TORCH_CHECK(table.dim() == 2 && table.stride(1) == 1 && table.size(1) > 0,
              "req_to_token must be 2-D, non-empty and contiguous in its token dimension");
  TORCH_CHECK(page_size > 0, "page_size must be positive");
  const int64_t rows = req.size(0);
  for (auto* t : {&indptr, &indices, &kv_lens}) {
    eb::check_cuda(*t, "outputs");
    eb::check_dtype(*t, at::kInt, "outputs");
    TORCH_CHECK(t->dim() == 1 && t->is_contiguous(), "outputs must be contiguous 1-D");
  }
  TORCH_CHECK(indptr.size(0) == rows + 1 && kv_lens.size(0) == rows, "indptr / kv_lens sizes");
  eb::TokenTableParams p;
  p.table = table.data_ptr<int32_t>();
  p.table_stride = table.stride(0);
  p.width = static_cast<int>(table.size(1));
  p.req = index_array(req, rows, "req_indices");
  p.lens = index_array(lens, rows, "seq_lens");
  p.rows = static_cast<int>(rows);
  p.page_size = static_cast<int>(page_size);
  p.capacity = static_cast<int>(indices.size(0));
  p.indptr = indptr.data_ptr<int32_t>();
  p.indices = indices.data_ptr<int32_t>();
  p.kv_lens = kv_lens.data_ptr<int32_t>();
  eb::token_table_launch(p, eb::current_stream(table));
  eb::check_launch("token table");
}

}  // namespace

TORCH_LIBRARY(EB_NAMESPACE, m) {
  m.def("build(Tensor req_to_token, Tensor req_indices, Tensor seq_lens, int page_size, Tensor(a!) indptr, "
        "Tensor(b!) indices, Tensor(c!) kv_lens) -> ()",
        &build);
}
