// Shared contract of the fused InfoNCE op: output type and the structural argument checks of
// both entry points. The maths lives once, in the docstring of pcl_ext.info_nce (pcl_ext/ops.py);
// `correct` uses proto_nce's tie rule (hit_tolerance in proto_nce.h).
#pragma once

#include "proto_nce.h"
#include "torch_stable.h"

#include <cmath>
#include <tuple>

namespace pcl_ext {

// losses [N], lse [N], d losses_i / d q_i [N, D] (or [0]), correct [N] (bool).
using InfoNCEOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// The dtype of losses and lse: float64 for float64 inputs, else float32.
inline ScalarType info_nce_acc_type(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// Rank, shape, dtype, device and temperature; the values of `targets` (range, exclude_self's
// targets[i] != i) need to read device memory and are the backend's (or, on CUDA, the
// wrapper's) job. Messages name the argument as the Python API spells it.
inline void check_info_nce_args(const Tensor& queries, const Tensor& keys, const Tensor& targets,
                                double temperature, bool exclude_self,
                                const char* op = "info_nce") {
  PCL_CHECK_VALUE(queries.dim() == 2, op, ": `queries` must be 2-D [N, D], got shape ",
                  shape(queries));
  const int64_t n = queries.size(0), d = queries.size(1);
  PCL_CHECK_VALUE(n >= 1 && d >= 1, op, ": `queries` must be non-empty, got shape ",
                  shape(queries));
  PCL_CHECK_VALUE(is_floating(queries.scalar_type()), op,
                  ": `queries` must be a floating tensor, got ", queries.scalar_type());
  PCL_CHECK_VALUE(keys.scalar_type() == queries.scalar_type(), op, ": `keys` must have dtype ",
                  queries.scalar_type(), " like `queries`, got ", keys.scalar_type());
  PCL_CHECK_VALUE(keys.device() == queries.device(), op, ": `keys` must be on ",
                  device_name(queries), " like `queries`, got ", device_name(keys));
  PCL_CHECK_VALUE(keys.dim() == 2 && keys.size(1) == d && keys.size(0) >= 1, op,
                  ": `keys` must be [K, D] with K >= 1 and D = ", d, ", got shape ",
                  shape(keys));
  PCL_CHECK_VALUE(targets.scalar_type() == ScalarType::Long, op,
                  ": `targets` must be int64, got ", targets.scalar_type());
  PCL_CHECK_VALUE(targets.device() == queries.device(), op, ": `targets` must be on ",
                  device_name(queries), " like `queries`, got ", device_name(targets));
  PCL_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == n, op,
                  ": `targets` must be [N] with N = ", n, ", got shape ", shape(targets));
  PCL_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                  ": `temperature` must be a positive finite number, got ", temperature);
  PCL_CHECK_VALUE(!exclude_self || n <= keys.size(0), op,
                  ": `exclude_self` needs N <= K (column i is row i's self), got N = ", n,
                  " rows of `queries` and K = ", keys.size(0), " rows of `keys`");
}

// info_nce_backward's extra arguments: grad_losses [N] and lse [N] in the accumulation dtype.
inline void check_info_nce_backward_args(const Tensor& grad_losses, const Tensor& queries,
                                         const Tensor& keys, const Tensor& targets,
                                         const Tensor& lse, double temperature,
                                         bool exclude_self) {
  constexpr const char* op = "info_nce_backward";
  check_info_nce_args(queries, keys, targets, temperature, exclude_self, op);
  const int64_t n = queries.size(0);
  const ScalarType acc = info_nce_acc_type(queries.scalar_type());
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{grad_losses, "grad_losses"},
                                std::pair<const Tensor&, const char*>{lse, "lse"}}) {
    PCL_CHECK_VALUE(t.scalar_type() == acc, op, ": `", name, "` must have dtype ", acc,
                    " (the accumulation dtype of ", queries.scalar_type(), "), got ",
                    t.scalar_type());
    PCL_CHECK_VALUE(t.device() == queries.device(), op, ": `", name, "` must be on ",
                    device_name(queries), " like `queries`, got ", device_name(t));
    PCL_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, op, ": `", name,
                    "` must be [N] with N = ", n, ", got shape ", shape(t));
  }
}

}  // namespace pcl_ext
