// Attention variants as compile-time switches of one kernel (see engine_backend/variants.py
// for the order of operations). Scores leave here in log2 units, ready for exp2.
#pragma once
#include "common.cuh"
#include "variant_params.h"

namespace eb {


template <bool kSoftCap, bool kWindow, bool kAlibi> struct Variant {
  static constexpr bool soft_cap = kSoftCap, window = kWindow, alibi = kAlibi;
  // The score is the raw dot product times a positive per-row constant, so a kernel may take
  // its running max on raw dot products and fold the scale into the exponent.
  static constexpr bool linear = !kSoftCap && !kAlibi;

  // Per-(query head) constants, computed once per tile row.
  struct Row {
    float scale_log2;  // multiplies the raw dot product
    float cap_log2;    // soft-cap output scale in log2 units
    float slope_log2;  // ALiBi slope in log2 units
  };

  static EB_DEVICE Row row(const VariantParams& p, int qo_head) {
    Row r;
    if constexpr (kSoftCap) {
      r.scale_log2 = p.sm_scale / p.soft_cap;
      r.cap_log2 = p.soft_cap * kLog2e;
    } else {
      r.scale_log2 = p.sm_scale * kLog2e;
      r.cap_log2 = 0.f;
    }
    r.slope_log2 = kAlibi ? p.alibi[qo_head] * kLog2e : 0.f;
    return r;
  }

  // Score in log2 units of a raw q.k between query position qp and key position kp.
  static EB_DEVICE float score(float raw, const Row& r, int qp, int kp) {
    float s;
    if constexpr (kSoftCap) {
      s = r.cap_log2 * tanhf(raw * r.scale_log2);
    } else {
      s = raw * r.scale_log2;
    }
    if constexpr (kAlibi) s += r.slope_log2 * float(kp - qp);
    return s;
  }

  // Whether the key is visible. `causal` is a runtime flag of the prefill kernel.
  static EB_DEVICE bool visible(const VariantParams& p, bool causal, int qp, int kp) {
    if (causal && kp > qp) return false;
    if constexpr (kWindow) {
      if (qp - kp > p.window_left) return false;
    }
    return true;
  }
};

}  // namespace eb
