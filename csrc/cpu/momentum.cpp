// Momentum (EMA) update of the key encoder on the CPU: key = m * key + (1 - m) * query.
//
// The op streams 12 bytes per float32 parameter and does 3 flops on them, so it is memory
// bound: the point is one pass, at the machine's vector width, with every thread busy. All
// tensors are laid end to end in one flat element range cut into equal pieces, which the
// threads of a single parallel_for claim one by one; a piece runs the vectorized loop
// over each (tensor, begin, end) it covers. MoCo's per-parameter Python loop instead makes
// ~4 passes and 2 temporaries per parameter and runs small tensors single-threaded.
#include "../momentum.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <vector>

namespace pcl_ext {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// Also compile the loop for AVX-512 and AVX2, chosen at load time (see proto_nce.cpp).
#define PCL_EXT_MOMENTUM_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PCL_EXT_MOMENTUM_CLONES
#endif

// Storage <-> arithmetic type. Half precision is computed in float. The 16-bit conversions
// are written as branch-free bit arithmetic (c10's have branches and calls) so that the loop
// vectorizes; both round to nearest even like c10::Half / c10::BFloat16.
template <typename T>
struct Io {
  using raw = T;
  using acc = T;
  static acc load(raw x) { return x; }
  static raw store(acc x) { return x; }
};

template <>
struct Io<c10::BFloat16> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw x) { return std::bit_cast<float>(static_cast<uint32_t>(x) << 16); }
  static raw store(acc x) {
    const uint32_t u = std::bit_cast<uint32_t>(x);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return static_cast<raw>(x != x ? 0x7fc0u : rounded);
  }
};

template <>
struct Io<c10::Half> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw x) {
    const uint32_t sign = static_cast<uint32_t>(x & 0x8000u) << 16;
    const uint32_t bits = static_cast<uint32_t>(x & 0x7fffu) << 13;
    // Finite values (subnormal ones too) are exact after rescaling the exponent by 2^112.
    const uint32_t finite = std::bit_cast<uint32_t>(std::bit_cast<float>(bits) * 0x1p112f);
    const uint32_t special = bits | 0x7f800000u;  // inf and NaN keep their payload
    return std::bit_cast<float>(sign | (bits >= (0x7c00u << 13) ? special : finite));
  }
  static raw store(acc x) {
    const uint32_t u = std::bit_cast<uint32_t>(x);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    // Overflow to inf; NaN to a quiet NaN.
    const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
    // Below 2^-14 the result is subnormal: adding 0.5 lines the half's mantissa up with the
    // low float bits, and the FPU's own rounding is round-to-nearest-even.
    const uint32_t small =
        std::bit_cast<uint32_t>(std::bit_cast<float>(a) + 0.5f) - std::bit_cast<uint32_t>(0.5f);
    // Normal: rebias the exponent and round the 13 dropped bits to nearest even.
    const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
    const uint32_t h = a >= 0x47800000u ? big : (a < 0x38800000u ? small : normal);
    return static_cast<raw>(h | sign);
  }
};

template <typename T>
PCL_EXT_MOMENTUM_CLONES void ema(typename Io<T>::raw* __restrict key,
                                 const typename Io<T>::raw* __restrict query, int64_t n,
                                 typename Io<T>::acc m, typename Io<T>::acc w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    key[i] = Io<T>::store(m * Io<T>::load(key[i]) + w * Io<T>::load(query[i]));
  }
}

struct Pair {
  void* key;
  const void* query;
  ScalarType dtype;
};

void ema_range(const Pair& p, int64_t begin, int64_t end, double m) {
  PCL_DISPATCH_FLOATING(p.dtype, "momentum_update_cpu", [&] {
    using raw = typename Io<scalar_t>::raw;
    using acc = typename Io<scalar_t>::acc;
    ema<scalar_t>(static_cast<raw*>(p.key) + begin, static_cast<const raw*>(p.query) + begin,
                  end - begin, static_cast<acc>(m), static_cast<acc>(1.0 - m));
  });
}

// Elements per piece of the flat range: 256 KiB of float32 per stream, large enough that the
// per-piece overhead vanishes, small enough that ResNet-50 splits into ~400 pieces (balance).
constexpr int64_t kPiece = int64_t{1} << 16;

void momentum_update_cpu(const TensorList& key, const TensorList& query, double momentum) {
  check_momentum_args(key, query, momentum, torch::headeronly::DeviceType::CPU);
  const MomentumPairs pairs(key, query);
  std::vector<Pair> flat;
  std::vector<int64_t> offset{0};  // offset[t]: start of tensor t in the flat range
  flat.reserve(key.size());
  offset.reserve(key.size() + 1);
  for (size_t i = 0; i < key.size(); ++i) {
    flat.push_back({pairs.key[i].mutable_data_ptr(), pairs.query[i].const_data_ptr(),
                    pairs.key[i].scalar_type()});
    offset.push_back(offset.back() + pairs.key[i].numel());
  }
  const int64_t total = offset.back();
  const int64_t pieces = (total + kPiece - 1) / kPiece;
  // Threads claim pieces from a shared counter instead of a fixed share: on a loaded machine
  // a descheduled thread then delays the step by one piece, not by its whole share (the
  // result does not depend on who computes which piece).
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(pieces, torch::stable::get_num_threads());
  torch::stable::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t p; (p = next.fetch_add(1, std::memory_order_relaxed)) < pieces;) {
      int64_t lo = p * kPiece;
      const int64_t hi = std::min(total, lo + kPiece);
      // First tensor with elements at or after lo (empty tensors are skipped).
      size_t t = std::upper_bound(offset.begin(), offset.end(), lo) - offset.begin() - 1;
      for (; lo < hi; ++t) {
        const int64_t end = std::min(offset[t + 1], hi);
        if (end > lo) ema_range(flat[t], lo - offset[t], end - offset[t], momentum);
        lo = std::max(lo, end);
      }
    }
  });
  pairs.write_back(key);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pcl_ext, CPU, m) {
  m.impl("momentum_update_", TORCH_BOX(&momentum_update_cpu));
}

}  // namespace pcl_ext
