// Shared contract of the fused ProtoNCE op: output type, argument checks, `correct`'s tolerance.
// The maths lives once, in the docstring of pcl_ext.proto_nce (pcl_ext/ops.py).
#pragma once

#include "torch_stable.h"

#include <cmath>
#include <string>
#include <tuple>

namespace pcl_ext {

// loss, dL/dq, dL/dk, and correct [1 + M, N] (bool): the target logit is the row's maximum, up
// to the rounding between the tiled logits and the separately computed target logit.
using ProtoNCEOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// `correct`'s tolerance per unit of s_t sum_c |q_c x_tc|, for GEMM inputs rounded to unit
// roundoff u_in (0 when exact) and accumulators of unit roundoff u_acc: the rule and its
// derivation are in the docstring of pcl_ext.proto_nce_with_accuracy.
inline double hit_tolerance(double u_in, double u_acc, int64_t d) {
  return 2.0 * (2.0 * u_in + static_cast<double>(d + 2) * u_acc);
}

// Structural checks (rank, shape, dtype, device, list lengths) shared by every backend.
// Value checks that need to read device memory (phi > 0, ids in range) are the backend's job.
// Messages name the argument as the Python API spells it.
inline void check_proto_nce_args(const Tensor& q, const Tensor& k, const Tensor& queue,
                                 const TensorList& prototypes, const TensorList& phi,
                                 const TensorList& assignments, const TensorList& negatives,
                                 double temperature) {
  PCL_CHECK_VALUE(q.dim() == 2, "proto_nce: `q` must be 2-D [N, D], got shape ", shape(q));
  const int64_t n = q.size(0), d = q.size(1);
  PCL_CHECK_VALUE(n >= 1 && d >= 1, "proto_nce: `q` must be non-empty, got shape ", shape(q));
  PCL_CHECK_VALUE(is_floating(q.scalar_type()), "proto_nce: `q` must be a floating tensor, got ",
                  q.scalar_type());
  const auto device = q.device();
  const auto dtype = q.scalar_type();
  auto same_kind = [&](const Tensor& t, const std::string& name) {
    PCL_CHECK_VALUE(t.scalar_type() == dtype, "proto_nce: `", name, "` must have dtype ", dtype,
                    " like `q`, got ", t.scalar_type());
    PCL_CHECK_VALUE(t.device() == device, "proto_nce: `", name, "` must be on ", device_name(q),
                    " like `q`, got ", device_name(t));
  };
  same_kind(k, "k");
  PCL_CHECK_VALUE(k.sizes().equals(q.sizes()), "proto_nce: `k` must have the shape of `q` ",
                  shape(q), ", got ", shape(k));
  same_kind(queue, "queue");
  PCL_CHECK_VALUE(queue.dim() == 2 && queue.size(1) == d && queue.size(0) >= 1,
                  "proto_nce: `queue` must be [Q, D] with Q >= 1 and D = ", d, ", got shape ",
                  shape(queue));
  PCL_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                  "proto_nce: `temperature` must be a positive finite number, got ", temperature);

  const size_t m_count = prototypes.size();
  PCL_CHECK_VALUE(phi.size() == m_count && assignments.size() == m_count,
                  "proto_nce: `prototypes`, `phi` and `assignments` must have the same length, "
                  "got ", m_count, ", ", phi.size(), " and ", assignments.size());
  PCL_CHECK_VALUE(negatives.empty() || negatives.size() == m_count,
                  "proto_nce: `negatives` must be None (all-prototype mode) or hold one tensor "
                  "per clustering (", m_count, "), got ", negatives.size());
  for (size_t m = 0; m < m_count; ++m) {
    const std::string sfx = "[" + std::to_string(m) + "]";
    const Tensor& c = prototypes[m];
    same_kind(c, "prototypes" + sfx);
    PCL_CHECK_VALUE(c.dim() == 2 && c.size(1) == d && c.size(0) >= 1,
                    "proto_nce: `prototypes", sfx, "` must be [K, D] with K >= 1 and D = ", d,
                    ", got shape ", shape(c));
    const Tensor& p = phi[m];
    PCL_CHECK_VALUE(is_floating(p.scalar_type()), "proto_nce: `phi", sfx,
                    "` must be a floating tensor, got ", p.scalar_type());
    PCL_CHECK_VALUE(p.device() == device, "proto_nce: `phi", sfx, "` must be on ",
                    device_name(q), ", got ", device_name(p));
    PCL_CHECK_VALUE(p.dim() == 1 && p.size(0) == c.size(0), "proto_nce: `phi", sfx,
                    "` must be [K] with K = ", c.size(0), " (rows of `prototypes", sfx,
                    "`), got shape ", shape(p));
    const Tensor& a = assignments[m];
    PCL_CHECK_VALUE(a.scalar_type() == ScalarType::Long, "proto_nce: `assignments", sfx,
                    "` must be int64, got ", a.scalar_type());
    PCL_CHECK_VALUE(a.device() == device, "proto_nce: `assignments", sfx, "` must be on ",
                    device_name(q), ", got ", device_name(a));
    PCL_CHECK_VALUE(a.dim() == 1 && a.size(0) == n, "proto_nce: `assignments", sfx,
                    "` must be [N] with N = ", n, ", got shape ", shape(a));
    if (!negatives.empty()) {
      const Tensor& g = negatives[m];
      PCL_CHECK_VALUE(g.scalar_type() == ScalarType::Long, "proto_nce: `negatives", sfx,
                      "` must be int64, got ", g.scalar_type());
      PCL_CHECK_VALUE(g.device() == device, "proto_nce: `negatives", sfx, "` must be on ",
                      device_name(q), ", got ", device_name(g));
      PCL_CHECK_VALUE(g.dim() == 1, "proto_nce: `negatives", sfx,
                      "` must be 1-D [r], got shape ", shape(g));
    }
  }
}

}  // namespace pcl_ext
