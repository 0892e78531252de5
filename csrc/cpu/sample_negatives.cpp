// Negative clusters of PCL's sampled ProtoNCE (pcl_ext.sample_negatives), on the CPU.
//
// The free clusters (no row of `assignments` is in them) are ranked by (key, id); the first r
// are returned in increasing id order. The CUDA kernel ranks by the same integers, so both
// backends return the same ids for the same keys. O(K) and no sort: a histogram of the keys'
// top 12 bits finds the bucket that holds the r-th rank, nth_element within that bucket finds
// the rank itself, and a pass in id order keeps the clusters up to it.
#include "../sample_negatives.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <vector>

namespace pcl_ext {

namespace {

Tensor sample_negatives_cpu(const Tensor& assignments, const Tensor& keys_in, int64_t r) {
  check_sample_negatives_args(assignments, keys_in, r);
  const Tensor ids = ensure_contiguous(assignments);
  const Tensor keys = ensure_contiguous(keys_in);
  const int64_t n = ids.numel(), k = keys.numel();
  const int64_t* a = ids.const_data_ptr<int64_t>();
  const float* key = keys.const_data_ptr<float>();

  std::vector<uint8_t> taken(k, 0);
  for (int64_t i = 0; i < n; ++i) {
    PCL_CHECK_INDEX(a[i] >= 0 && a[i] < k, "sample_negatives: `assignments` holds cluster id ",
                    a[i], " at position ", i, ", outside [0, ", k, ")");
    taken[a[i]] = 1;
  }
  // (key, id) as one integer: the key's order first, ties to the smaller id (ids < 2^31).
  auto rank = [key](int64_t c) { return (uint64_t{ordered_bits(key[c])} << 32) | uint64_t(c); };
  constexpr int kShift = 20;  // 4096 buckets: sign, exponent and 3 mantissa bits
  std::array<int64_t, (1 << (32 - kShift))> hist{};
  for (int64_t c = 0; c < k; ++c) {
    if (!taken[c]) ++hist[ordered_bits(key[c]) >> kShift];
  }
  int64_t n_free = 0;
  for (int64_t h : hist) n_free += h;
  PCL_CHECK_VALUE(r <= n_free, "sample_negatives: `r` = ", r, " exceeds the ", n_free,
                  " clusters that no row of `assignments` is assigned to");
  Tensor out = torch::stable::new_empty(ids, {r});
  if (r == 0) return out;
  uint32_t bucket = 0;
  int64_t below = 0;  // free clusters in the buckets before `bucket`
  while (below + hist[bucket] < r) below += hist[bucket++];
  std::vector<uint64_t> candidates;
  candidates.reserve(hist[bucket]);
  for (int64_t c = 0; c < k; ++c) {
    if (!taken[c] && (ordered_bits(key[c]) >> kShift) == bucket) candidates.push_back(rank(c));
  }
  const auto nth = candidates.begin() + (r - below - 1);
  std::nth_element(candidates.begin(), nth, candidates.end());
  const uint64_t last = *nth;  // the r-th smallest rank; ranks are distinct
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t c = 0, j = 0; j < r; ++c) {
    o[j] = c;  // kept if selected: with random keys a branch here would often be mispredicted
    j += static_cast<int64_t>(!taken[c] & (rank(c) <= last));
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pcl_ext, CPU, m) {
  m.impl("sample_negatives", TORCH_BOX(&sample_negatives_cpu));
}

}  // namespace pcl_ext
