// Helpers shared by the torch bindings (*_ops.cpp): argument checks and the current stream.
// The Python wrappers validate first and raise ValueError; these checks are the last line.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <optional>

#include "variant_params.h"

#define EB_STR2(x) #x
#define EB_STR(x) EB_STR2(x)

namespace eb {

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, name, " has dtype ", t.scalar_type(), ", this kernel was built for ", want);
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// Fills the fields DecodeParams and PrefillParams share (same names in both): the query,
// output and lse tensors, the paged K/V views (any strides, contiguous head dim) and page ids.
template <class Params>
void fill_paged_io(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& indices, int64_t page_size, const at::Tensor& out,
                   const std::optional<at::Tensor>& lse, at::ScalarType dtype, int64_t head_dim) {
  for (auto* t : {&q, &k, &v, &out}) {
    check_cuda(*t, "q/k/v/out");
    check_dtype(*t, dtype, "q/k/v/out");
    check_last_dim_contiguous(*t, "q/k/v/out");
  }
  TORCH_CHECK(q.size(-1) == head_dim && k.size(-1) == head_dim, "kernel built for head dim ", head_dim);
  p.q = q.data_ptr();
  p.q_stride_n = q.stride(0), p.q_stride_h = q.stride(1);
  p.k = k.data_ptr(), p.v = v.data_ptr();
  p.k_stride_page = k.stride(0), p.k_stride_tok = k.stride(1), p.k_stride_head = k.stride(2);
  p.v_stride_page = v.stride(0), p.v_stride_tok = v.stride(1), p.v_stride_head = v.stride(2);
  p.indices = indices.data_ptr<int32_t>();
  p.log2_page = 0;
  while ((int64_t(1) << p.log2_page) < page_size) ++p.log2_page;
  p.out = out.data_ptr();
  p.out_stride_n = out.stride(0), p.out_stride_h = out.stride(1);
  p.lse = lse ? lse->data_ptr<float>() : nullptr;
  p.lse_stride_n = lse ? lse->stride(0) : 0;
  p.num_qo_heads = q.size(1);
  p.num_kv_heads = k.size(2);
}

inline VariantParams variant_params(double sm_scale, double soft_cap, int64_t window_left,
                                    const std::optional<at::Tensor>& alibi) {
  return {float(sm_scale), float(soft_cap), int(window_left), alibi ? alibi->data_ptr<float>() : nullptr};
}

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, what, " launch failed: ", cudaGetErrorString(err));
}

}  // namespace eb
