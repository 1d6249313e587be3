// Runtime values of the attention variants, shared by host bindings and device code.
#pragma once

namespace eb {

struct VariantParams {
  float sm_scale;      // softmax scale applied to q.k
  float soft_cap;      // logits soft-cap (used when the variant has it)
  int window_left;     // sliding window (used when the variant has it)
  const float* alibi;  // per query head slopes (used when the variant has it)
};

}  // namespace eb
