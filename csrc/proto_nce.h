// Shared contract of the fused ProtoNCE op: argument checks and the backend entry points.
// The maths lives once, in the docstring of pcl_ext.proto_nce (pcl_ext/ops.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <tuple>

namespace pcl_ext {

// loss, dL/dq, dL/dk, and correct [1 + M, N] (bool): the target logit is the row's maximum, up
// to the rounding between the tiled logits and the separately computed target logit.
using ProtoNCEOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// `correct`'s tolerance per unit of s_t sum_c |q_c x_tc|, for GEMM inputs rounded to unit
// roundoff u_in (0 when exact) and accumulators of unit roundoff u_acc: the rule and its
// derivation are in the docstring of pcl_ext.proto_nce_with_accuracy.
inline double hit_tolerance(double u_in, double u_acc, int64_t d) {
  return 2.0 * (2.0 * u_in + static_cast<double>(d + 2) * u_acc);
}

ProtoNCEOut proto_nce_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue,
                          at::TensorList prototypes, at::TensorList phi,
                          at::TensorList assignments, at::TensorList negatives,
                          double temperature);

ProtoNCEOut proto_nce_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue,
                           at::TensorList prototypes, at::TensorList phi,
                           at::TensorList assignments, at::TensorList negatives,
                           double temperature);

// Structural checks (rank, shape, dtype, device, list lengths) shared by every backend.
// Value checks that need to read device memory (phi > 0, ids in range) are the backend's job.
// Messages name the argument as the Python API spells it.
inline void check_proto_nce_args(const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& queue, at::TensorList prototypes,
                                 at::TensorList phi, at::TensorList assignments,
                                 at::TensorList negatives, double temperature) {
  TORCH_CHECK_VALUE(q.dim() == 2, "proto_nce: `q` must be 2-D [N, D], got shape ", q.sizes());
  const int64_t n = q.size(0), d = q.size(1);
  TORCH_CHECK_VALUE(n >= 1 && d >= 1, "proto_nce: `q` must be non-empty, got shape ", q.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()),
                   "proto_nce: `q` must be a floating tensor, got ", q.scalar_type());
  const auto device = q.device();
  const auto dtype = q.scalar_type();
  auto same_kind = [&](const at::Tensor& t, const std::string& name) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, "proto_nce: `", name, "` must have dtype ", dtype,
                     " like `q`, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == device, "proto_nce: `", name, "` must be on ", device,
                      " like `q`, got ", t.device());
  };
  same_kind(k, "k");
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "proto_nce: `k` must have the shape of `q` ",
                    q.sizes(), ", got ", k.sizes());
  same_kind(queue, "queue");
  TORCH_CHECK_VALUE(queue.dim() == 2 && queue.size(1) == d && queue.size(0) >= 1,
                    "proto_nce: `queue` must be [Q, D] with Q >= 1 and D = ", d, ", got shape ",
                    queue.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "proto_nce: `temperature` must be a positive finite number, got ", temperature);

  const size_t m_count = prototypes.size();
  TORCH_CHECK_VALUE(phi.size() == m_count && assignments.size() == m_count,
                    "proto_nce: `prototypes`, `phi` and `assignments` must have the same length, "
                    "got ", m_count, ", ", phi.size(), " and ", assignments.size());
  TORCH_CHECK_VALUE(negatives.empty() || negatives.size() == m_count,
                    "proto_nce: `negatives` must be None (all-prototype mode) or hold one tensor "
                    "per clustering (", m_count, "), got ", negatives.size());
  for (size_t m = 0; m < m_count; ++m) {
    const std::string sfx = "[" + std::to_string(m) + "]";
    const at::Tensor& c = prototypes[m];
    same_kind(c, "prototypes" + sfx);
    TORCH_CHECK_VALUE(c.dim() == 2 && c.size(1) == d && c.size(0) >= 1,
                      "proto_nce: `prototypes", sfx, "` must be [K, D] with K >= 1 and D = ", d,
                      ", got shape ", c.sizes());
    const at::Tensor& p = phi[m];
    TORCH_CHECK_TYPE(at::isFloatingType(p.scalar_type()), "proto_nce: `phi", sfx,
                     "` must be a floating tensor, got ", p.scalar_type());
    TORCH_CHECK_VALUE(p.device() == device, "proto_nce: `phi", sfx, "` must be on ", device,
                      ", got ", p.device());
    TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == c.size(0), "proto_nce: `phi", sfx,
                      "` must be [K] with K = ", c.size(0), " (rows of `prototypes", sfx,
                      "`), got shape ", p.sizes());
    const at::Tensor& a = assignments[m];
    TORCH_CHECK_TYPE(a.scalar_type() == at::kLong, "proto_nce: `assignments", sfx,
                     "` must be int64, got ", a.scalar_type());
    TORCH_CHECK_VALUE(a.device() == device, "proto_nce: `assignments", sfx, "` must be on ",
                      device, ", got ", a.device());
    TORCH_CHECK_VALUE(a.dim() == 1 && a.size(0) == n, "proto_nce: `assignments", sfx,
                      "` must be [N] with N = ", n, ", got shape ", a.sizes());
    if (!negatives.empty()) {
      const at::Tensor& g = negatives[m];
      TORCH_CHECK_TYPE(g.scalar_type() == at::kLong, "proto_nce: `negatives", sfx,
                       "` must be int64, got ", g.scalar_type());
      TORCH_CHECK_VALUE(g.device() == device, "proto_nce: `negatives", sfx, "` must be on ",
                        device, ", got ", g.device());
      TORCH_CHECK_VALUE(g.dim() == 1, "proto_nce: `negatives", sfx, "` must be 1-D [r], got shape ",
                        g.sizes());
    }
  }
}

}  // namespace pcl_ext
