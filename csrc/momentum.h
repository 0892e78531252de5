// Shared contract of the momentum (EMA) op: argument checks and the flat-array view the
// backends run on. The maths lives once, in the docstring of pcl_ext.momentum_update_.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

namespace pcl_ext {

// Messages name the argument as the Python API spells it (`key[i]`, `query[i]`).
inline void check_momentum_args(at::TensorList key, at::TensorList query, double momentum,
                                c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(std::isfinite(momentum) && momentum >= 0.0 && momentum <= 1.0,
                    "momentum_update_: `m` must be a finite number in [0, 1], got ", momentum);
  TORCH_CHECK_VALUE(key.size() == query.size(), "momentum_update_: `key` and `query` must hold "
                    "the same number of tensors, got ", key.size(), " and ", query.size());
  for (size_t i = 0; i < key.size(); ++i) {
    const at::Tensor& k = key[i];
    const at::Tensor& q = query[i];
    TORCH_CHECK_TYPE(at::isFloatingType(k.scalar_type()), "momentum_update_: `key[", i,
                     "]` must be a floating tensor, got ", k.scalar_type());
    TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type(), "momentum_update_: `query[", i,
                     "]` must have the dtype of `key[", i, "]` (", k.scalar_type(), "), got ",
                     q.scalar_type());
    TORCH_CHECK_VALUE(k.device().type() == device_type, "momentum_update_: `key[", i,
                      "]` is on ", k.device(), ", but the other tensors are on ", device_type);
    TORCH_CHECK_VALUE(q.device() == k.device(), "momentum_update_: `query[", i, "]` must be on ",
                      k.device(), " like `key[", i, "]`, got ", q.device());
    TORCH_CHECK_VALUE(q.sizes() == k.sizes(), "momentum_update_: `query[", i,
                      "]` must have the shape of `key[", i, "]` ", k.sizes(), ", got ",
                      q.sizes());
  }
}

// The pairs as flat arrays of the same layout. A key that is dense (contiguous or any other
// permutation, e.g. channels_last) is updated where it lies; any other key is updated in a
// contiguous copy that write_back() copies into it. A query whose strides differ from its
// key's is copied into the key's layout.
struct MomentumPairs {
  std::vector<at::Tensor> key, query;
  std::vector<size_t> copied;  // positions whose key[i] is a copy of the caller's tensor

  MomentumPairs(at::TensorList keys, at::TensorList queries) {
    key.reserve(keys.size());
    query.reserve(keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      at::Tensor k = keys[i];
      if (!k.is_non_overlapping_and_dense()) {
        k = k.contiguous();
        copied.push_back(i);
      }
      at::Tensor q = queries[i];
      if (q.strides() != k.strides()) {
        q = at::empty_like(k).copy_(q);  // empty_like keeps a dense tensor's strides
      }
      key.push_back(std::move(k));
      query.push_back(std::move(q));
    }
  }

  // Call after the kernels are queued (on CUDA: on the same stream).
  void write_back(at::TensorList keys) const {
    for (size_t i : copied) keys[i].copy_(key[i]);
  }
};

}  // namespace pcl_ext
