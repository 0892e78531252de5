// Ring-buffer enqueue on the CPU: one copy per surviving row (a memcpy when rows are dense),
// then the pointer advances.
#include "../queue.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace pcl_ext {
namespace {

template <typename T>
void copy_rows(const Tensor& buffer, const Tensor& keys, int64_t first, int64_t start,
               int64_t rows) {
  const int64_t size = buffer.size(0), dim = buffer.size(1);
  T* dst = buffer.mutable_data_ptr<T>();
  const T* src = keys.const_data_ptr<T>();
  const int64_t ds0 = buffer.stride(0), ds1 = buffer.stride(1);
  const int64_t ss0 = keys.stride(0), ss1 = keys.stride(1);
  const bool dense_rows = (ds1 == 1 || dim == 1) && (ss1 == 1 || dim == 1);
  // Copies under ~256 KiB stay on the calling thread: waking the pool costs more than them.
  constexpr int64_t kGrainBytes = int64_t{1} << 18;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(dim * sizeof(T), 1));
  torch::stable::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      int64_t row = start + r;
      row -= row >= size ? size : 0;
      T* d = dst + row * ds0;
      const T* s = src + (first + r) * ss0;
      if (dense_rows) {
        std::memcpy(d, s, dim * sizeof(T));
      } else {
        for (int64_t c = 0; c < dim; ++c) d[c * ds1] = s[c * ss1];
      }
    }
  });
}

void ring_enqueue_cpu(const Tensor& buffer, const Tensor& ptr, const Tensor& keys) {
  check_ring_enqueue_args(buffer, ptr, keys);
  const int64_t size = buffer.size(0), batch = keys.size(0);
  int64_t* p = ptr.mutable_data_ptr<int64_t>();
  PCL_CHECK_INDEX(*p >= 0 && *p < size, "ring_enqueue_: `ptr` = ", *p,
                    " is outside [0, size) with size = ", size);
  // Enqueueing row by row, later rows overwrite earlier ones: only the last min(B, size) rows
  // survive, and row j of keys lands where sequential enqueueing puts it, (ptr + j) mod size.
  const int64_t rows = std::min(batch, size);
  const int64_t first = batch - rows;
  const int64_t start = (*p + first) % size;
  PCL_DISPATCH_FLOATING(buffer.scalar_type(), "ring_enqueue_cpu",
                        [&] { copy_rows<scalar_t>(buffer, keys, first, start, rows); });
  *p = (*p + batch) % size;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pcl_ext, CPU, m) {
  m.impl("ring_enqueue_", TORCH_BOX(&ring_enqueue_cpu));
}

}  // namespace pcl_ext
