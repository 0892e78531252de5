// Per-cluster sums of PCL's concentration estimate (pcl_ext.concentration), on the CPU.
//
// One sequential pass in float64: each cluster's sum runs over its points in index order, so the
// result does not depend on the thread count. It is a scatter into K accumulators (~3 ns a
// point: ~4 ms at 1.28M points, next to the seconds of the k-means it follows), so threads with
// their own K partial sums to zero and merge would add code for little.
#include "../concentration.h"

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
    PCL_CHECK_INDEX(c >= 0 && c < k, "concentration: `im2cluster` holds cluster id ", c,
                    " at position ", i, ", outside [0, ", k, ")");
    PCL_CHECK_VALUE(d >= 0.0 && d <= std::numeric_limits<double>::max(),
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

std::tuple<Tensor, Tensor> cluster_stats_cpu(const Tensor& sq_dist, const Tensor& im2cluster,
                                             int64_t num_clusters, double alpha) {
  check_cluster_stats_args(sq_dist, im2cluster, num_clusters, alpha);
  const Tensor dist = ensure_contiguous(torch::stable::reshape(sq_dist, {-1}));
  const Tensor ids = ensure_contiguous(torch::stable::reshape(im2cluster, {-1}));
  // float64 whatever the input: the percentile and the mean that follow in
  // pcl_ext.concentration then match NumPy's float64 arithmetic in PCL.
  Tensor phi = torch::stable::new_empty(dist, {num_clusters}, ScalarType::Double);
  Tensor count = torch::stable::new_empty(ids, {num_clusters});
  PCL_DISPATCH_FLOATING(dist.scalar_type(), "cluster_stats", [&] {
    cluster_stats_cpu_impl<scalar_t>(dist.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
                                     dist.numel(), num_clusters, alpha,
                                     phi.mutable_data_ptr<double>(),
                                     count.mutable_data_ptr<int64_t>());
  });
  return {phi, count};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pcl_ext, CPU, m) {
  m.impl("cluster_stats", TORCH_BOX(&cluster_stats_cpu));
}

}  // namespace pcl_ext
