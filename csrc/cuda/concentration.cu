// Per-cluster sums of PCL's concentration estimate (pcl_ext.concentration), on CUDA.
//
// Deterministic without float atomics: a stable sort by cluster puts each cluster's points in one
// segment, in index order; one warp reduces a segment (lane-strided partial sums, then a fixed
// shuffle tree), so the order of every addition depends on the data alone. Ids outside
// [0, num_clusters) sort before or after every segment and are ignored: pcl_ext.concentration
// rejects them (and bad distances) beforehand with one synchronization.
#include "../concentration.h"

#include <tuple>

namespace pcl_ext {

namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void segment_stats_kernel(const T* __restrict__ dist, const int64_t* __restrict__ order,
                                     const int64_t* __restrict__ offsets, int64_t k, double alpha,
                                     double* __restrict__ phi, int64_t* __restrict__ count) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= k) return;  // uniform across the warp: the shuffles below see all 32 lanes
  const int64_t begin = offsets[c], end = offsets[c + 1];
  double sum = 0.0;
  for (int64_t j = begin + lane; j < end; j += 32) {
    sum += sqrt(static_cast<double>(dist[order[j]]));
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  }
  if (lane == 0) {
    const int64_t m = end - begin;
    count[c] = m;
    phi[c] = m > 1 ? sum / static_cast<double>(m) / log(static_cast<double>(m) + alpha) : 0.0;
  }
}

// offsets[c] = the first position of `sorted` holding an id >= c, for c in [0, k]: cluster c
// is then [offsets[c], offsets[c + 1]). One binary search per thread.
__global__ void segment_offsets_kernel(const int64_t* __restrict__ sorted, int64_t n, int64_t k,
                                       int64_t* __restrict__ offsets) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c > k) return;
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < c) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  offsets[c] = lo;
}

std::tuple<Tensor, Tensor> cluster_stats_cuda(const Tensor& sq_dist, const Tensor& im2cluster,
                                              int64_t num_clusters, double alpha) {
  check_cluster_stats_args(sq_dist, im2cluster, num_clusters, alpha);
  const DeviceGuard guard(sq_dist.get_device_index());
  const Tensor dist = ensure_contiguous(torch::stable::reshape(sq_dist, {-1}));
  const Tensor ids = torch::stable::reshape(im2cluster, {-1});
  const int64_t n = ids.numel();
  // aten::sort.stable(Tensor self, *, bool? stable, int dim=-1, bool descending=False)
  const auto sorted = call_aten<4>("aten::sort", "stable", ids, std::optional<bool>(true),
                                   int64_t{0}, false);
  const auto sorted_ids = torch::stable::detail::to<Tensor>(sorted[0]);
  const auto order = torch::stable::detail::to<Tensor>(sorted[1]);
  Tensor offsets = torch::stable::new_empty(ids, {num_clusters + 1});
  Tensor phi = torch::stable::new_empty(dist, {num_clusters}, ScalarType::Double);
  Tensor count = torch::stable::new_empty(ids, {num_clusters});

  const cudaStream_t stream = current_cuda_stream(dist);
  constexpr int kOffsetThreads = 256;
  segment_offsets_kernel<<<(num_clusters + kOffsetThreads) / kOffsetThreads, kOffsetThreads, 0,
                           stream>>>(sorted_ids.const_data_ptr<int64_t>(), n, num_clusters,
                                     offsets.mutable_data_ptr<int64_t>());
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t blocks = (num_clusters + kWarpsPerBlock - 1) / kWarpsPerBlock;
  PCL_DISPATCH_FLOATING(dist.scalar_type(), "cluster_stats", [&] {
    segment_stats_kernel<scalar_t><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
        dist.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(),
        offsets.const_data_ptr<int64_t>(), num_clusters, alpha, phi.mutable_data_ptr<double>(),
        count.mutable_data_ptr<int64_t>());
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {phi, count};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pcl_ext, CUDA, m) {
  m.impl("cluster_stats", TORCH_BOX(&cluster_stats_cuda));
}

}  // namespace pcl_ext
