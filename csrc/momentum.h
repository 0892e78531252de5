// Shared contract of the momentum (EMA) op: argument checks and the flat-array view the
// backends run on. The maths lives once, in the docstring of pcl_ext.momentum_update_.
#pragma once

#include "torch_stable.h"

#include <cmath>
#include <vector>

namespace pcl_ext {

// Messages name the argument as the Python API spells it (`key[i]`, `query[i]`).
inline void check_momentum_args(const TensorList& key, const TensorList& query, double momentum,
                                torch::headeronly::DeviceType device_type) {
  PCL_CHECK_VALUE(std::isfinite(momentum) && momentum >= 0.0 && momentum <= 1.0,
                  "momentum_update_: `m` must be a finite number in [0, 1], got ", momentum);
  PCL_CHECK_VALUE(key.size() == query.size(), "momentum_update_: `key` and `query` must hold "
                  "the same number of tensors, got ", key.size(), " and ", query.size());
  for (size_t i = 0; i < key.size(); ++i) {
    const Tensor& k = key[i];
    const Tensor& q = query[i];
    const ScalarType dtype = k.scalar_type();
    PCL_CHECK_VALUE(is_floating(dtype), "momentum_update_: `key[", i,
                    "]` must be a floating tensor, got ", dtype);
    PCL_CHECK_VALUE(q.scalar_type() == dtype, "momentum_update_: `query[", i,
                    "]` must have the dtype of `key[", i, "]` (", dtype, "), got ",
                    q.scalar_type());
    const torch::stable::Device device = k.device();
    PCL_CHECK_VALUE(device.type() == device_type, "momentum_update_: `key[", i, "]` is on ",
                    DeviceName{device}, ", but the other tensors are on ",
                    DeviceName{torch::stable::Device(device_type)});
    PCL_CHECK_VALUE(q.device() == device, "momentum_update_: `query[", i, "]` must be on ",
                    DeviceName{device}, " like `key[", i, "]`, got ", device_name(q));
    PCL_CHECK_VALUE(q.sizes().equals(k.sizes()), "momentum_update_: `query[", i,
                    "]` must have the shape of `key[", i, "]` ", shape(k), ", got ", shape(q));
  }
}

// The pairs as flat arrays of the same layout. A key that is dense (contiguous or any other
// permutation, e.g. channels_last) is updated where it lies; any other key is updated in a
// contiguous copy that write_back() copies into it. A query whose strides differ from its
// key's is copied into the key's layout.
struct MomentumPairs {
  TensorList key, query;
  std::vector<size_t> copied;  // positions whose key[i] is a copy of the caller's tensor

  MomentumPairs(const TensorList& keys, const TensorList& queries) {
    key.reserve(keys.size());
    query.reserve(keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      Tensor k = keys[i];
      if (!is_non_overlapping_and_dense(k)) {
        k = torch::stable::contiguous(k);
        copied.push_back(i);
      }
      Tensor q = queries[i];
      if (!q.strides().equals(k.strides())) {
        Tensor like_k = torch::stable::empty_like(k);  // keeps a dense tensor's strides
        torch::stable::copy_(like_k, q);
        q = like_k;
      }
      key.push_back(std::move(k));
      query.push_back(std::move(q));
    }
  }

  // Call after the kernels are queued (on CUDA: on the same stream).
  void write_back(const TensorList& keys) const {
    for (size_t i : copied) {
      Tensor k = keys[i];
      torch::stable::copy_(k, key[i]);
    }
  }
};

}  // namespace pcl_ext
