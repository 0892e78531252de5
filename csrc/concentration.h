// Shared contract of the per-cluster statistics op behind pcl_ext.concentration: argument checks.
// The semantics live once, in the docstring of pcl_ext.concentration (pcl_ext/ops.py).
#pragma once

#include "torch_stable.h"

#include <cmath>
#include <cstdint>

namespace pcl_ext {

// Structural checks shared by every backend. Value checks (ids in range, distances finite and
// >= 0) read the data: the CPU kernel does them while summing, pcl_ext.concentration does them
// on CUDA in one synchronization.
inline void check_cluster_stats_args(const Tensor& sq_dist, const Tensor& im2cluster,
                                     int64_t num_clusters, double alpha) {
  // faiss's index.search returns [n, 1] distances and labels: accept them as they come.
  auto is_column = [](const Tensor& t) {
    return t.dim() == 1 || (t.dim() == 2 && t.size(1) == 1);
  };
  PCL_CHECK_VALUE(is_column(sq_dist),
                  "concentration: `sq_dist` must be [n] or [n, 1], got shape ", shape(sq_dist));
  PCL_CHECK_VALUE(is_floating(sq_dist.scalar_type()),
                  "concentration: `sq_dist` must be a floating tensor, got ",
                  sq_dist.scalar_type());
  PCL_CHECK_VALUE(is_column(im2cluster),
                  "concentration: `im2cluster` must be [n] or [n, 1], got shape ",
                  shape(im2cluster));
  PCL_CHECK_VALUE(im2cluster.scalar_type() == ScalarType::Long,
                  "concentration: `im2cluster` must be int64, got ", im2cluster.scalar_type());
  PCL_CHECK_VALUE(im2cluster.size(0) == sq_dist.size(0),
                  "concentration: `im2cluster` and `sq_dist` must have the same length, got ",
                  im2cluster.size(0), " and ", sq_dist.size(0));
  PCL_CHECK_VALUE(im2cluster.device() == sq_dist.device(),
                  "concentration: `im2cluster` must be on ", device_name(sq_dist),
                  " like `sq_dist`, got ", device_name(im2cluster));
  PCL_CHECK_VALUE(num_clusters >= 1, "concentration: `num_clusters` must be >= 1, got ",
                  num_clusters);
  // log(count + alpha) > 0 for every count >= 2.
  PCL_CHECK_VALUE(std::isfinite(alpha) && alpha > -1.0,
                  "concentration: `alpha` must be finite and > -1, got ", alpha);
}

}  // namespace pcl_ext
