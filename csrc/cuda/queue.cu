// Ring-buffer enqueue on the GPU: one launch, the pointer never leaves device memory, so the
// op needs no host synchronization and can be captured in a CUDA graph.
#include "../queue.h"

#include <algorithm>
#include <cstdint>

namespace pcl_ext {
namespace {

// The race: every block must use the old pointer, and the pointer must end up advanced, within
// one launch. Blocks do not all run at once, so a block that stored the new pointer early would
// be seen by a block that starts later. Instead, each block's first act is one atomicAdd of
// 2^kTicketShift on the pointer word itself. The value it gets back holds the old pointer,
// untouched, in its low bits and, in its high bits, how many blocks came before it: a ticket.
// Atomics on one address are totally ordered, so the block holding the last ticket knows that
// every other block has already read the old pointer; it alone stores the new pointer, which
// also clears the tickets. Blocks share nothing else (no block reads what another writes), so
// no __threadfence is needed: stream order publishes the rows and the pointer to later kernels.
constexpr int kTicketShift = 40;  // pointers below 2^40; tickets below 2^23 (kMaxBlocks)
constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;

// Word is the copy unit: a whole element, or up to 16 bytes of a dense row. Strides are in Words.
template <typename Word>
__global__ void __launch_bounds__(kThreads)
    ring_enqueue_kernel(Word* __restrict__ buffer, const Word* __restrict__ keys,
                        unsigned long long* __restrict__ ptr, int64_t size, int64_t batch,
                        int64_t rows, int64_t first, int64_t words, int64_t bs0, int64_t bs1,
                        int64_t ks0, int64_t ks1) {
  __shared__ int64_t start;
  if (threadIdx.x == 0) {
    const unsigned long long old = atomicAdd(ptr, 1ull << kTicketShift);
    // A valid pointer is below size; the modulo only keeps a corrupt one from writing out of
    // bounds (the CPU kernel raises instead; here checking would cost a host synchronization).
    const int64_t p =
        static_cast<int64_t>(old & ((1ull << kTicketShift) - 1)) % size;
    start = (p + first) % size;
    if ((old >> kTicketShift) == gridDim.x - 1) {
      atomicExch(ptr, static_cast<unsigned long long>((p + batch) % size));
    }
  }
  __syncthreads();
  const int64_t total = rows * words;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * kThreads) {
    const int64_t r = i / words, c = i - r * words;
    int64_t row = start + r;
    row -= row >= size ? size : 0;
    buffer[row * bs0 + c * bs1] = keys[(first + r) * ks0 + c * ks1];
  }
}

// The widest copy unit (16, 8 or 4 bytes) that dense rows, their strides and both base
// addresses allow; otherwise one element at a time, following the strides.
int64_t word_bytes(const Tensor& buffer, const Tensor& keys) {
  const int64_t el = static_cast<int64_t>(buffer.element_size()), dim = buffer.size(1);
  const bool dense_rows = (buffer.stride(1) == 1 && keys.stride(1) == 1) || dim == 1;
  if (!dense_rows) return el;
  const auto b = reinterpret_cast<uintptr_t>(buffer.const_data_ptr());
  const auto k = reinterpret_cast<uintptr_t>(keys.const_data_ptr());
  for (int64_t w : {16, 8, 4}) {
    if (w > el && (dim * el) % w == 0 && b % w == 0 && k % w == 0 &&
        (buffer.stride(0) * el) % w == 0 && (keys.stride(0) * el) % w == 0) {
      return w;
    }
  }
  return el;
}

template <typename Word>
void launch(const Tensor& buffer, const Tensor& ptr, const Tensor& keys, int64_t rows,
            int64_t first, int64_t word) {
  const int64_t el = static_cast<int64_t>(buffer.element_size());
  const bool dense = word > el;  // then a row is contiguous: column stride one Word
  const int64_t per_word = word / el;
  const int64_t words = buffer.size(1) / per_word;
  const int64_t bs0 = buffer.stride(0) / per_word, ks0 = keys.stride(0) / per_word;
  const int64_t bs1 = dense ? 1 : buffer.stride(1), ks1 = dense ? 1 : keys.stride(1);
  const int64_t blocks = std::clamp<int64_t>((rows * words + kThreads - 1) / kThreads, 1,
                                             kMaxBlocks);
  ring_enqueue_kernel<Word><<<blocks, kThreads, 0, current_cuda_stream(buffer)>>>(
      static_cast<Word*>(buffer.mutable_data_ptr()),
      static_cast<const Word*>(keys.const_data_ptr()),
      reinterpret_cast<unsigned long long*>(ptr.mutable_data_ptr<int64_t>()), buffer.size(0),
      keys.size(0), rows, first, words, bs0, bs1, ks0, ks1);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

void ring_enqueue_cuda(const Tensor& buffer, const Tensor& ptr, const Tensor& keys) {
  check_ring_enqueue_args(buffer, ptr, keys);
  const int64_t size = buffer.size(0), batch = keys.size(0);
  PCL_CHECK_VALUE(size < (int64_t{1} << kTicketShift), "ring_enqueue_: `buffer` has ", size,
                  " rows; the CUDA kernel supports fewer than 2^", kTicketShift);
  if (batch == 0) return;
  const DeviceGuard guard(buffer.get_device_index());
  // Same row mapping as the CPU kernel: the last min(B, size) rows of keys survive.
  const int64_t rows = std::min(batch, size);
  const int64_t first = batch - rows;
  switch (const int64_t word = word_bytes(buffer, keys)) {
    case 16: launch<uint4>(buffer, ptr, keys, rows, first, word); break;
    case 8: launch<uint64_t>(buffer, ptr, keys, rows, first, word); break;
    case 4: launch<uint32_t>(buffer, ptr, keys, rows, first, word); break;
    case 2: launch<uint16_t>(buffer, ptr, keys, rows, first, word); break;
    default:
      PCL_INTERNAL_ASSERT(false, "ring_enqueue_: unexpected copy unit of ", word, " bytes");
  }
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pcl_ext, CUDA, m) {
  m.impl("ring_enqueue_", TORCH_BOX(&ring_enqueue_cuda));
}

}  // namespace pcl_ext
