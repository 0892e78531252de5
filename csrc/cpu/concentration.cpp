// Per-cluster sums of PCL's concentration estimate (pcl_ext.concentration), on the CPU.
//
// One sequential pass in float64: each cluster's sum runs over its points in index order, so the
// result does not depend on the thread count. It is a scatter into K accumulators (~3 ns a
// point: ~4 ms at 1.28M points, next to the seconds of the k-means it follows), so threads with
// their own K partial sums to zero and merge would add code for little.
#include "../concentration.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace pcl_ext {

namespace {

template <typename T>
void cluster_stats_cpu_impl(const T* dist, const int64_t* ids, int64_t n, int64_t k, double alpha,
                            double* phi, int64_t* count) {
  std::fill(phi, phi + k, 0.0);  // the sums of sqrt(d) until the last loop
  std::fill(count, count + k, int64_t{0});
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = ids[i];
    const double d = static_cast<double>(dist[i]);
    TORCH_CHECK_INDEX(c >= 0 && c < k, "concentration: `im2cluster` holds cluster id ", c,
                      " at position ", i, ", outside [0, ", k, ")");
    TORCH_CHECK_VALUE(d >= 0.0 && d <= std::numeric_limits<double>::max(),
                      "concentration: `sq_dist` must be finite and >= 0, got ", d, " at position ",
                      i);
    phi[c] += std::sqrt(d);
    count[c] += 1;
  }
  for (int64_t c = 0; c < k; ++c) {
    const double m = static_cast<double>(count[c]);
    phi[c] = count[c] > 1 ? phi[c] / m / std::log(m + alpha) : 0.0;
  }
}

std::tuple<at::Tensor, at::Tensor> cluster_stats_cpu(const at::Tensor& sq_dist,
                                                     const at::Tensor& im2cluster,
                                                     int64_t num_clusters, double alpha) {
  check_cluster_stats_args(sq_dist, im2cluster, num_clusters, alpha);
  const at::Tensor dist = sq_dist.reshape({-1}).contiguous();
  const at::Tensor ids = im2cluster.reshape({-1}).contiguous();
  // float64 whatever the input: the percentile and the mean that follow in
  // pcl_ext.concentration then match NumPy's float64 arithmetic in PCL.
  at::Tensor phi = at::empty({num_clusters}, dist.options().dtype(at::kDouble));
  at::Tensor count = at::empty({num_clusters}, ids.options());
  const auto dtype = dist.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cluster_stats", [&] {
    cluster_stats_cpu_impl<scalar_t>(dist.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
                                     dist.numel(), num_clusters, alpha, phi.data_ptr<double>(),
                                     count.data_ptr<int64_t>());
  });
  return {phi, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(pcl_ext, CPU, m) { m.impl("cluster_stats", &cluster_stats_cpu); }

}  // namespace pcl_ext
