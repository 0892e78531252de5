// Shared contract of pcl_ext.sample_negatives: argument checks and the rank both backends sort
// by. The semantics live once, in the docstring of pcl_ext.sample_negatives (pcl_ext/ops.py).
#pragma once

#include "torch_stable.h"

#include <cstdint>
#include <cstring>
#include <limits>

namespace pcl_ext {

// Structural checks shared by every backend.
inline void check_sample_negatives_args(const Tensor& assignments, const Tensor& keys,
                                        int64_t r) {
  PCL_CHECK_VALUE(assignments.dim() == 1,
                  "sample_negatives: `assignments` must be 1-D [N], got shape ",
                  shape(assignments));
  PCL_CHECK_VALUE(assignments.scalar_type() == ScalarType::Long,
                  "sample_negatives: `assignments` must be int64, got ",
                  assignments.scalar_type());
  PCL_CHECK_VALUE(keys.dim() == 1 && keys.size(0) >= 1,
                  "sample_negatives: `keys` must be 1-D [num_clusters] and non-empty, got shape ",
                  shape(keys));
  // The CUDA kernel packs (key, id) into one int64: 32 bits each.
  PCL_CHECK_VALUE(keys.scalar_type() == ScalarType::Float,
                  "sample_negatives: `keys` must be float32, got ", keys.scalar_type());
  PCL_CHECK_VALUE(keys.size(0) <= std::numeric_limits<int32_t>::max(),
                  "sample_negatives: at most 2^31 - 1 clusters, got ", keys.size(0));
  PCL_CHECK_VALUE(keys.device() == assignments.device(), "sample_negatives: `keys` must be on ",
                  device_name(assignments), " like `assignments`, got ", device_name(keys));
  PCL_CHECK_VALUE(r >= 0 && r <= keys.size(0), "sample_negatives: `r` must be in [0, ",
                  keys.size(0), "] (the number of clusters), got ", r);
}

// The key's bits mapped so that unsigned integer order is float order (-0 is first made +0,
// which compares equal to it; NaNs land beyond the infinities instead of breaking the order).
// The CPU and CUDA kernels rank clusters by (ordered_bits(key), id), so they pick the same ids.
C10_HOST_DEVICE inline uint32_t ordered_bits(float x) {
  const float y = x + 0.0f;
#if defined(__CUDA_ARCH__)
  const uint32_t b = __float_as_uint(y);
#else
  uint32_t b;
  std::memcpy(&b, &y, sizeof b);
#endif
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

}  // namespace pcl_ext
