// Negative clusters of PCL's sampled ProtoNCE (pcl_ext.sample_negatives), on CUDA, with no host
// synchronization: every cluster gets a distinct int64 rank that orders by (key, id) as on the
// CPU, assigned clusters get the largest rank, topk picks the r smallest, and they are
// returned in increasing id order, as on the CPU. Distinct ranks make the set independent of how
// topk breaks ties. Ids of `assignments` outside [0, num_clusters) exclude nothing
// (pcl_ext.sample_negatives and proto_nce check them).
#include "../sample_negatives.h"

#include <algorithm>
#include <cstdint>
#include <limits>

namespace pcl_ext {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kTaken = std::numeric_limits<int64_t>::max();

// The CPU kernel's rank: high 32 bits ordered_bits(key) (csrc/sample_negatives.h), low 32 bits
// the id, which breaks ties. Flipping the top bit turns that unsigned order into topk's signed one.
__global__ void rank_kernel(const float* __restrict__ keys, int64_t k, int64_t* __restrict__ rank) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < k;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t u = (uint64_t{ordered_bits(keys[c])} << 32) | static_cast<uint64_t>(c);
    rank[c] = static_cast<int64_t>(u ^ (uint64_t{1} << 63));
  }
}

__global__ void exclude_kernel(const int64_t* __restrict__ assignments, int64_t n, int64_t k,
                               int64_t* __restrict__ rank) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t a = assignments[i];
    if (a >= 0 && a < k) rank[a] = kTaken;
  }
}

int grid_for(int64_t work) {
  return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, 4096));
}

Tensor sample_negatives_cuda(const Tensor& assignments, const Tensor& keys_in, int64_t r) {
  check_sample_negatives_args(assignments, keys_in, r);
  const DeviceGuard guard(assignments.get_device_index());
  const Tensor ids = ensure_contiguous(assignments);
  const Tensor keys = ensure_contiguous(keys_in);
  const int64_t n = ids.numel(), k = keys.numel();
  if (r == 0) return torch::stable::new_empty(ids, {0});
  Tensor rank = torch::stable::new_empty(ids, {k});
  const cudaStream_t stream = current_cuda_stream(ids);
  rank_kernel<<<grid_for(k), kThreads, 0, stream>>>(keys.const_data_ptr<float>(), k,
                                                    rank.mutable_data_ptr<int64_t>());
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  if (n > 0) {
    exclude_kernel<<<grid_for(n), kThreads, 0, stream>>>(ids.const_data_ptr<int64_t>(), n, k,
                                                         rank.mutable_data_ptr<int64_t>());
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // r larger than the free clusters cannot be checked here without a synchronization: the
  // wrapper does it, only when r > num_clusters - N.
  // aten::topk(Tensor self, SymInt k, int dim=-1, bool largest=True, bool sorted=True)
  const auto top = call_aten<5>("aten::topk", "", rank, r, int64_t{0}, false, false);
  const auto picked = torch::stable::detail::to<Tensor>(top[1]);
  // aten::sort(Tensor self, int dim=-1, bool descending=False)
  const auto sorted = call_aten<3>("aten::sort", "", picked, int64_t{0}, false);
  return torch::stable::detail::to<Tensor>(sorted[0]);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pcl_ext, CUDA, m) {
  m.impl("sample_negatives", TORCH_BOX(&sample_negatives_cuda));
}

}  // namespace pcl_ext
