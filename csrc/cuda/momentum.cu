// Momentum (EMA) update on CUDA: key = m * key + (1 - m) * query, one launch per dtype.
//
// A model has ~100-300 parameter tensors, most of them tiny (biases, norms): one launch each
// (MoCo's loop, 3-4 launches each) is launch-bound. Here every (device, dtype) group is one
// multi-tensor launch: the host writes a table of (key, query, numel, first block) and a
// block -> tensor map into pinned memory, copies it to the device asynchronously on the
// current stream (no synchronization), and block b updates chunk b - first_block of its
// tensor with 16-byte vector loads when both pointers are aligned.
#include "../momentum.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace pcl_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread and stream
// Bytes of each stream per block: 32 KiB = 2 rounds of kThreads x kUnroll x 16 bytes.
constexpr int kChunkBytes = 32768;

struct Entry {
  void* key;
  const void* query;
  int64_t numel;
  int64_t first_block;
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T val[V];
};

// Half precision is computed in float.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ T ema(T k, T q, acc_t<T> m, acc_t<T> w) {
  using acc = acc_t<T>;
  return static_cast<T>(m * static_cast<acc>(k) + w * static_cast<acc>(q));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    momentum_kernel(const Entry* __restrict__ table, const int32_t* __restrict__ block_tensor,
                    acc_t<T> m, acc_t<T> w) {
  constexpr int V = 16 / sizeof(T);
  constexpr int kChunk = kChunkBytes / sizeof(T);
  const Entry e = table[block_tensor[blockIdx.x]];
  const int64_t begin = (blockIdx.x - e.first_block) * int64_t{kChunk};
  const int n = static_cast<int>(min(int64_t{kChunk}, e.numel - begin));
  T* __restrict__ key = static_cast<T*>(e.key) + begin;
  const T* __restrict__ query = static_cast<const T*>(e.query) + begin;
  // Pointers read from the table are generic; saying they are global gives LDG/STG.
  __builtin_assume(__isGlobal(key) && __isGlobal(query));

  int done = 0;
  if (((reinterpret_cast<uintptr_t>(key) | reinterpret_cast<uintptr_t>(query)) % 16) == 0) {
    using V16 = Vec<T, V>;
    V16* kv = reinterpret_cast<V16*>(key);
    const V16* qv = reinterpret_cast<const V16*>(query);
    const int nvec = n / V;
    for (int base = threadIdx.x; base < nvec; base += kThreads * kUnroll) {
      V16 a[kUnroll], b[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll requests in flight
        const int j = base + u * kThreads;
        if (j < nvec) {
          a[u] = kv[j];
          b[u] = qv[j];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = base + u * kThreads;
        if (j < nvec) {
#pragma unroll
          for (int c = 0; c < V; ++c) a[u].val[c] = ema(a[u].val[c], b[u].val[c], m, w);
          kv[j] = a[u];
        }
      }
    }
    done = nvec * V;
  }
  for (int i = done + threadIdx.x; i < n; i += kThreads) key[i] = ema(key[i], query[i], m, w);
}

// One launch over the pairs `idx` (same device, same dtype).
void launch_group(const MomentumPairs& pairs, const std::vector<size_t>& idx, double momentum) {
  const Tensor& first = pairs.key[idx.front()];
  const int64_t chunk = kChunkBytes / static_cast<int64_t>(first.element_size());
  std::vector<int64_t> blocks_of(idx.size());
  int64_t blocks = 0;
  for (size_t t = 0; t < idx.size(); ++t) {
    blocks_of[t] = (pairs.key[idx[t]].numel() + chunk - 1) / chunk;
    blocks += blocks_of[t];
  }
  if (blocks == 0) return;
  PCL_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(),
                  "momentum_update_: too many elements for one launch (", blocks * chunk, ")");

  // Table layout: Entry[idx.size()] then int32 block_tensor[blocks].
  const int64_t table_bytes = static_cast<int64_t>(idx.size() * sizeof(Entry));
  const int64_t bytes = table_bytes + blocks * static_cast<int64_t>(sizeof(int32_t));
  Tensor host = torch::stable::empty({bytes}, ScalarType::Byte, std::nullopt,
                                     torch::stable::Device(torch::headeronly::DeviceType::CPU),
                                     /*pin_memory=*/true);
  auto* entries = reinterpret_cast<Entry*>(host.mutable_data_ptr<uint8_t>());
  auto* block_tensor = reinterpret_cast<int32_t*>(host.mutable_data_ptr<uint8_t>() + table_bytes);
  int64_t b = 0;
  for (size_t t = 0; t < idx.size(); ++t) {
    const size_t i = idx[t];
    entries[t] = {pairs.key[i].mutable_data_ptr(), pairs.query[i].const_data_ptr(),
                  pairs.key[i].numel(), b};
    for (int64_t j = 0; j < blocks_of[t]; ++j) block_tensor[b++] = static_cast<int32_t>(t);
  }
  // The caching host allocator keeps `host` alive until this copy has run (it records an event
  // on the stream), so the copy needs no synchronization.
  Tensor dev = torch::stable::new_empty(first, {bytes}, ScalarType::Byte);
  torch::stable::copy_(dev, host, /*non_blocking=*/true);

  const cudaStream_t stream = current_cuda_stream(first);
  const uint8_t* table = dev.const_data_ptr<uint8_t>();
  PCL_DISPATCH_FLOATING(first.scalar_type(), "momentum_update_cuda", [&] {
    using acc = acc_t<scalar_t>;
    momentum_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        reinterpret_cast<const Entry*>(table),
        reinterpret_cast<const int32_t*>(table + table_bytes), static_cast<acc>(momentum),
        static_cast<acc>(1.0 - momentum));
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void momentum_update_cuda(const TensorList& key, const TensorList& query, double momentum) {
  check_momentum_args(key, query, momentum, torch::headeronly::DeviceType::CUDA);
  if (key.empty()) return;
  const MomentumPairs pairs(key, query);

  // Group by (device, dtype) in order of first appearance: usually one or two groups.
  std::vector<std::vector<size_t>> groups;
  for (size_t i = 0; i < key.size(); ++i) {
    const Tensor& k = pairs.key[i];
    auto same = [&](const std::vector<size_t>& g) {
      const Tensor& r = pairs.key[g.front()];
      return r.device() == k.device() && r.scalar_type() == k.scalar_type();
    };
    auto it = std::find_if(groups.begin(), groups.end(), same);
    if (it == groups.end()) {
      groups.push_back({i});
    } else {
      it->push_back(i);
    }
  }
  for (const auto& g : groups) {
    const Tensor& first = pairs.key[g.front()];
    const DeviceGuard device_guard(first.get_device_index());
    // A captured graph would replay the copy from a pinned buffer that is reused after this
    // call: refuse rather than replay stale pointers.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    STD_CUDA_CHECK(cudaStreamIsCapturing(current_cuda_stream(first), &capture));
    PCL_CHECK(capture == cudaStreamCaptureStatusNone,
              "momentum_update_: cannot be captured in a CUDA graph (its tensor table is "
              "copied from host memory at every call)");
    launch_group(pairs, g, momentum);
  }
  pairs.write_back(key);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pcl_ext, CUDA, m) {
  m.impl("momentum_update_", TORCH_BOX(&momentum_update_cuda));
}

}  // namespace pcl_ext
