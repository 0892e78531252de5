// Shared contract of the ring-buffer enqueue op: argument checks and the backend entry points.
// The semantics live once, in the docstring of pcl_ext.ring_enqueue_ (pcl_ext/ops.py).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace pcl_ext {

void ring_enqueue_cpu(const at::Tensor& buffer, const at::Tensor& ptr, const at::Tensor& keys);
void ring_enqueue_cuda(const at::Tensor& buffer, const at::Tensor& ptr, const at::Tensor& keys);

// Structural checks shared by every backend. The value of `ptr` lives in device memory: the
// CPU kernel checks its range, the CUDA kernel cannot without a host synchronization.
inline void check_ring_enqueue_args(const at::Tensor& buffer, const at::Tensor& ptr,
                                    const at::Tensor& keys) {
  TORCH_CHECK_VALUE(buffer.dim() == 2 && buffer.size(0) >= 1,
                    "ring_enqueue_: `buffer` must be 2-D [size, dim] with size >= 1, got shape ",
                    buffer.sizes());
  const auto dtype = buffer.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "ring_enqueue_: `buffer` must be float32, float64, float16 or bfloat16, got ",
                   dtype);
  TORCH_CHECK_VALUE(at::has_internal_overlap(buffer) != at::MemOverlap::Yes,
                    "ring_enqueue_: `buffer` has overlapping rows (an expanded tensor?); "
                    "pass a tensor that owns its memory");
  TORCH_CHECK_TYPE(ptr.scalar_type() == at::kLong, "ring_enqueue_: `ptr` must be int64, got ",
                   ptr.scalar_type());
  TORCH_CHECK_VALUE(ptr.numel() == 1, "ring_enqueue_: `ptr` must hold one element, got shape ",
                    ptr.sizes());
  TORCH_CHECK_VALUE(ptr.device() == buffer.device(), "ring_enqueue_: `ptr` must be on ",
                    buffer.device(), " like `buffer`, got ", ptr.device());
  TORCH_CHECK_TYPE(keys.scalar_type() == dtype, "ring_enqueue_: `keys` must have dtype ", dtype,
                   " like `buffer`, got ", keys.scalar_type());
  TORCH_CHECK_VALUE(keys.device() == buffer.device(), "ring_enqueue_: `keys` must be on ",
                    buffer.device(), " like `buffer`, got ", keys.device());
  TORCH_CHECK_VALUE(keys.dim() == 2 && keys.size(1) == buffer.size(1),
                    "ring_enqueue_: `keys` must be [B, dim] with dim = ", buffer.size(1),
                    ", got shape ", keys.sizes());
  // The kernels read keys while writing buffer: a view of the queue itself would race.
  TORCH_CHECK_VALUE(!keys.is_alias_of(buffer),
                    "ring_enqueue_: `keys` shares memory with `buffer`; pass a copy (clone())");
}

}  // namespace pcl_ext
