// Shared contract of the ring-buffer enqueue op: argument checks.
// The semantics live once, in the docstring of pcl_ext.ring_enqueue_ (pcl_ext/ops.py).
#pragma once

#include "torch_stable.h"

namespace pcl_ext {

// Structural checks shared by every backend. The value of `ptr` lives in device memory: the
// CPU kernel checks its range, the CUDA kernel cannot without a host synchronization.
inline void check_ring_enqueue_args(const Tensor& buffer, const Tensor& ptr, const Tensor& keys) {
  PCL_CHECK_VALUE(buffer.dim() == 2 && buffer.size(0) >= 1,
                  "ring_enqueue_: `buffer` must be 2-D [size, dim] with size >= 1, got shape ",
                  shape(buffer));
  const auto dtype = buffer.scalar_type();
  PCL_CHECK_VALUE(is_floating(dtype),
                  "ring_enqueue_: `buffer` must be float32, float64, float16 or bfloat16, got ",
                  dtype);
  PCL_CHECK_VALUE(!has_repeated_elements(buffer),
                  "ring_enqueue_: `buffer` has overlapping rows (an expanded tensor?); "
                  "pass a tensor that owns its memory");
  PCL_CHECK_VALUE(ptr.scalar_type() == ScalarType::Long,
                  "ring_enqueue_: `ptr` must be int64, got ", ptr.scalar_type());
  PCL_CHECK_VALUE(ptr.numel() == 1, "ring_enqueue_: `ptr` must hold one element, got shape ",
                  shape(ptr));
  PCL_CHECK_VALUE(ptr.device() == buffer.device(), "ring_enqueue_: `ptr` must be on ",
                  device_name(buffer), " like `buffer`, got ", device_name(ptr));
  PCL_CHECK_VALUE(keys.scalar_type() == dtype, "ring_enqueue_: `keys` must have dtype ", dtype,
                  " like `buffer`, got ", keys.scalar_type());
  PCL_CHECK_VALUE(keys.device() == buffer.device(), "ring_enqueue_: `keys` must be on ",
                  device_name(buffer), " like `buffer`, got ", device_name(keys));
  PCL_CHECK_VALUE(keys.dim() == 2 && keys.size(1) == buffer.size(1),
                  "ring_enqueue_: `keys` must be [B, dim] with dim = ", buffer.size(1),
                  ", got shape ", shape(keys));
  // The kernels read keys while writing buffer: a view of the queue itself would race.
  PCL_CHECK_VALUE(!memory_overlaps(keys, buffer),
                  "ring_enqueue_: `keys` shares memory with `buffer`; pass a copy (clone())");
}

}  // namespace pcl_ext
