// Per-cluster sums of PCL's concentration estimate (pcl_ext.concentration), on CUDA.
//
// Deterministic without float atomics: a stable sort by cluster puts each cluster's points in one
// segment, in index order; one warp reduces a segment (lane-strided partial sums, then a fixed
// shuffle tree), so the order of every addition depends on the data alone. Ids outside
// [0, num_clusters) sort before or after every segment and are ignored: pcl_ext.concentration
// rejects them (and bad distances) beforehand with one synchronization.
#include "../concentration.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

std::tuple<at::Tensor, at::Tensor> cluster_stats_cuda(const at::Tensor& sq_dist,
                                                      const at::Tensor& im2cluster,
                                                      int64_t num_clusters, double alpha) {
  check_cluster_stats_args(sq_dist, im2cluster, num_clusters, alpha);
  const c10::cuda::CUDAGuard guard(sq_dist.device());
  const at::Tensor dist = sq_dist.reshape({-1}).contiguous();
  const at::Tensor ids = im2cluster.reshape({-1});
  auto [sorted_ids, order] = at::sort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  // offsets[c] = first sorted position with id >= c; cluster c is [offsets[c], offsets[c + 1]).
  const at::Tensor offsets =
      at::searchsorted(sorted_ids, at::arange(num_clusters + 1, ids.options()));
  at::Tensor phi = at::empty({num_clusters}, dist.options().dtype(at::kDouble));
  at::Tensor count = at::empty({num_clusters}, ids.options());

  const int64_t blocks = (num_clusters + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto dtype = dist.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cluster_stats", [&] {
    segment_stats_kernel<scalar_t><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
        dist.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(),
        offsets.const_data_ptr<int64_t>(), num_clusters, alpha, phi.data_ptr<double>(),
        count.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {phi, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(pcl_ext, CUDA, m) { m.impl("cluster_stats", &cluster_stats_cuda); }

}  // namespace pcl_ext
