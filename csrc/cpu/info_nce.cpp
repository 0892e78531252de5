// Fused InfoNCE on the CPU: the streaming softmax of stream_softmax.h over key tiles.
//
// Forward: work items are (row block, column chunk) pairs, fixed by the shapes. Each streams
// its key tiles through S = Q_b K_t^T, the online softmax and (for the query gradient)
// acc += P K_t; the chunks of a row merge in a fixed order into lse, the loss and dL/dq.
// Backward (the key gradient): each work item owns a block of keys and streams the row tiles
// through S = Q_r K_b^T, P = g * exp(S / T - lse) / T and dK_b += P^T Q_r (FlashAttention's
// backward order, with dK_b staying in cache); then subtracts g_i q_i / T from its targets.
// Nothing N x K is allocated in either pass, and every output element is written by one work
// item in a fixed order: the bits do not depend on the thread count.
#include "../info_nce.h"
#include "stream_softmax.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace pcl_ext {
namespace {

using stream::Mat;

constexpr int64_t kRowBlock = 128;     // forward rows per work item
constexpr int64_t kMinChunk = 1024;    // forward columns per chunk (at least): below, the
                                       // merge and the per-chunk partials cost more than
                                       // the parallelism buys (7% at K = 512, 1 thread)
constexpr int64_t kKeyBlock = 128;     // backward keys per work item (at most)
constexpr int64_t kMinKeyBlock = 64;   // (at least): 32-key blocks lost 5% at K = 512
constexpr int64_t kBackwardRows = stream::kMaxGemmDepth;  // backward rows per tile
constexpr int64_t kTargetItems = 16;   // work items to aim for (parallelism, not threads)

// targets in [0, K); with exclude_self, targets[i] != i (the target would be masked).
void check_targets(const int64_t* targets, int64_t n, int64_t k, bool exclude_self,
                   const char* op) {
  for (int64_t i = 0; i < n; ++i) {
    PCL_CHECK_INDEX(targets[i] >= 0 && targets[i] < k, op, ": `targets` holds column ",
                    targets[i], " at row ", i, ", outside [0, ", k, ") (the rows of `keys`)");
    PCL_CHECK_VALUE(!exclude_self || targets[i] != i, op, ": `targets[", i, "]` is ", i,
                    ", row ", i, "'s own column, which `exclude_self` removes");
  }
}

Tensor cpu_scratch(int64_t numel, ScalarType dtype) {
  return torch::stable::empty({numel}, dtype, std::nullopt,
                              torch::stable::Device(torch::headeronly::DeviceType::CPU));
}

// What both passes open with: contiguous inputs (kept alive here), sizes, checked targets, 1/T.
template <typename T>
struct Inputs {
  Tensor q, keys, targets;
  int64_t n, d, kk;
  const int64_t* tg;
  T inv_t;
  const T* q_p;
  const T* k_p;

  Inputs(const Tensor& q_in, const Tensor& k_in, const Tensor& targets_in, double temperature,
         bool exclude_self, const char* op)
      : q(ensure_contiguous(q_in)), keys(ensure_contiguous(k_in)),
        targets(ensure_contiguous(targets_in)), n(q.size(0)), d(q.size(1)), kk(keys.size(0)),
        tg(targets.const_data_ptr<int64_t>()), inv_t(static_cast<T>(1.0 / temperature)),
        q_p(q.const_data_ptr<T>()), k_p(keys.const_data_ptr<T>()) {
    check_targets(tg, n, kk, exclude_self, op);
  }
};

template <typename T>
InfoNCEOut info_nce_cpu_impl(const Tensor& q_in, const Tensor& k_in, const Tensor& targets_in,
                             double temperature, bool exclude_self, bool grad_q) {
  const Inputs<T> in(q_in, k_in, targets_in, temperature, exclude_self, "info_nce");
  const Tensor& q = in.q;
  const int64_t n = in.n, d = in.d, kk = in.kk;
  const int64_t* tg = in.tg;
  const T inv_t = in.inv_t;
  const T* q_p = in.q_p;
  const T* k_p = in.k_p;

  // Row blocks first; columns split into chunks only as far as parallelism needs.
  const int64_t rb = std::min(n, kRowBlock), row_blocks = (n + rb - 1) / rb;
  const int64_t tile = std::min(stream::kMaxGemmDepth, stream::tile_columns(rb));
  const int64_t chunk_cols =
      std::max((kMinChunk + tile - 1) / tile * tile,
               stream::chunk_columns(kk, tile, (kTargetItems + row_blocks - 1) / row_blocks));
  const int64_t nchunks = (kk + chunk_cols - 1) / chunk_cols;
  std::vector<T> row_max(nchunks * n, -std::numeric_limits<T>::infinity());
  std::vector<T> row_sum(nchunks * n, T(0));
  // One chunk (the SimCLR case: row blocks give the parallelism) accumulates in dq itself.
  const Tensor acc_all = !grad_q       ? torch::stable::new_empty(q, {0})
                         : nchunks > 1 ? torch::stable::new_zeros(q, {nchunks, n, d})
                                       : torch::stable::new_zeros(q, {n, d});
  T* const acc_base = grad_q ? acc_all.mutable_data_ptr<T>() : nullptr;

  torch::stable::parallel_for(0, row_blocks * nchunks, 1, [&](int64_t first, int64_t last) {
    const Tensor scratch = cpu_scratch(rb * tile, q.scalar_type());
    T* const logits = scratch.mutable_data_ptr<T>();
    std::vector<T> scale(tile, inv_t), alpha(rb);
    for (int64_t item = first; item < last; ++item) {
      const int64_t ci = item % nchunks, r0 = item / nchunks * rb;
      const int64_t rows = std::min(rb, n - r0);
      const int64_t c_end = std::min(kk, (ci + 1) * chunk_cols);
      T* m_p = row_max.data() + ci * n + r0;
      T* l_p = row_sum.data() + ci * n + r0;
      T* acc_p = grad_q ? acc_base + (ci * n + r0) * d : nullptr;
      for (int64_t c0 = ci * chunk_cols; c0 < c_end; c0 += tile) {
        const int64_t tc = std::min(tile, c_end - c0);
        const Mat<T> k_t{k_p + c0 * d, d, 1};
        stream::gemm(logits, tc, Mat<T>{q_p + r0 * d, d, 1}, k_t.transposed(), rows, tc, d,
                     false);  // S = Q_b K_t^T
        if (exclude_self) {  // row i's column i, where it falls in this tile
          for (int64_t i = std::max(r0, c0); i < std::min(r0 + rows, c0 + tc); ++i) {
            logits[(i - r0) * tc + (i - c0)] = -std::numeric_limits<T>::infinity();
          }
        }
        stream::softmax_tile(logits, rows, tc, scale.data(), m_p, l_p, acc_p, d, alpha.data());
        if (grad_q) stream::gemm(acc_p, d, Mat<T>{logits, tc, 1}, k_t, rows, d, tc, true);
      }
    }
  });

  // Per row: merge the chunks, then loss = lse - s_t, dL/dq = sum_j P_j k_j / T - k_t / T.
  const Tensor losses = torch::stable::new_empty(q, {n}), lse = torch::stable::new_empty(q, {n});
  const Tensor dq = grad_q && nchunks > 1 ? torch::stable::new_empty(q, {n, d}) : acc_all;
  const Tensor correct = torch::stable::new_empty(q, {n}, ScalarType::Bool);
  T* loss_p = losses.mutable_data_ptr<T>();
  T* lse_p = lse.mutable_data_ptr<T>();
  T* dq_p = grad_q ? dq.mutable_data_ptr<T>() : nullptr;
  bool* correct_p = correct.mutable_data_ptr<bool>();
  // proto_nce's tie rule: the tiles' logits come from a GEMM, the target's from a dot product.
  const T tol = static_cast<T>(hit_tolerance(0.0, std::numeric_limits<T>::epsilon() / 2, d));
  torch::stable::parallel_for(0, n, 64, [&](int64_t first, int64_t last) {
    std::vector<T> expect(grad_q && nchunks > 1 ? d : 0);
    for (int64_t i = first; i < last; ++i) {
      const T* qi = q_p + i * d;
      const T* kt = k_p + tg[i] * d;
      T tlogit = 0, tbound = 0;  // s_t and s_t's scale times sum_c |q_c k_tc|
#pragma omp simd reduction(+ : tlogit, tbound)
      for (int64_t c = 0; c < d; ++c) {
        const T v = qi[c] * (kt[c] * inv_t);
        tlogit += v;
        tbound += std::abs(v);
      }
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t ci = 0; ci < nchunks; ++ci) mx = std::max(mx, row_max[ci * n + i]);
      correct_p[i] = tlogit >= mx - tol * tbound;  // mx includes the target's tiled logit
      T sum = row_sum[i];  // one chunk: its m is mx, so (l, acc) need no rescaling
      const T* ex = grad_q ? acc_base + i * d : nullptr;
      if (nchunks > 1) {
        sum = stream::merge_chunks(row_max.data() + i, row_sum.data() + i, n, ex, n * d,
                                   nchunks, d, mx, expect.data());
        ex = expect.data();
      }
      lse_p[i] = mx + std::log(sum);
      loss_p[i] = lse_p[i] - tlogit;
      if (grad_q) {
        const T inv_sum = T(1) / sum;
        for (int64_t c = 0; c < d; ++c) dq_p[i * d + c] = ex[c] * inv_sum - kt[c] * inv_t;
      }
    }
  });
  return {losses, lse, dq, correct};
}

template <typename T>
Tensor info_nce_backward_cpu_impl(const Tensor& g_in, const Tensor& q_in, const Tensor& k_in,
                                  const Tensor& targets_in, const Tensor& lse_in,
                                  double temperature, bool exclude_self) {
  const Inputs<T> in(q_in, k_in, targets_in, temperature, exclude_self, "info_nce_backward");
  const Tensor& q = in.q;
  const int64_t n = in.n, d = in.d, kk = in.kk;
  const int64_t* tg = in.tg;
  const T inv_t = in.inv_t;
  const T* q_p = in.q_p;
  const T* k_p = in.k_p;
  const Tensor g = ensure_contiguous(g_in), lse = ensure_contiguous(lse_in);
  const T* g_p = g.const_data_ptr<T>();
  const T* lse_p = lse.const_data_ptr<T>();

  // Key blocks small enough for kTargetItems work items, whole multiples of 16 keys.
  const int64_t kb =
      std::clamp<int64_t>(((kk + kTargetItems - 1) / kTargetItems + 15) & ~int64_t{15},
                          kMinKeyBlock, kKeyBlock);
  const int64_t key_blocks = (kk + kb - 1) / kb;
  const int64_t rt = std::min(n, kBackwardRows);
  const Tensor dk = torch::stable::new_zeros(q, {kk, d});
  T* const dk_base = dk.mutable_data_ptr<T>();

  torch::stable::parallel_for(0, key_blocks, 1, [&](int64_t first, int64_t last) {
    const Tensor scratch = cpu_scratch(rt * kb, q.scalar_type());
    T* const probs = scratch.mutable_data_ptr<T>();
    for (int64_t b = first; b < last; ++b) {
      const int64_t k0 = b * kb, keys_b = std::min(kb, kk - k0);
      const Mat<T> k_b{k_p + k0 * d, d, 1};
      for (int64_t r0 = 0; r0 < n; r0 += rt) {
        const int64_t rows = std::min(rt, n - r0);
        const Mat<T> q_r{q_p + r0 * d, d, 1};
        stream::gemm(probs, keys_b, q_r, k_b.transposed(), rows, keys_b, d,
                     false);  // S = Q_r K_b^T
        for (int64_t i = 0; i < rows; ++i) {
          stream::exp_affine(probs + i * keys_b, keys_b, inv_t, lse_p[r0 + i],
                             g_p[r0 + i] * inv_t);
        }
        if (exclude_self) {
          for (int64_t i = std::max(r0, k0); i < std::min(r0 + rows, k0 + keys_b); ++i) {
            probs[(i - r0) * keys_b + (i - k0)] = T(0);
          }
        }
        stream::gemm(dk_base + k0 * d, d, Mat<T>{probs, 1, keys_b}, q_r, keys_b, d, rows,
                     true);  // dK_b += P^T Q_r
      }
      for (int64_t i = 0; i < n; ++i) {  // the targets' -g_i q_i / T, in row order
        if (tg[i] < k0 || tg[i] >= k0 + keys_b) continue;
        const T w = g_p[i] * inv_t;
        T* row = dk_base + tg[i] * d;
        for (int64_t c = 0; c < d; ++c) row[c] -= w * q_p[i * d + c];
      }
    }
  });
  return dk;
}

[[noreturn]] void bad_dtype(const char* op, ScalarType t) {
  throw std::invalid_argument(detail::message(
      op, ": the CPU kernel takes float32 or float64 `queries`, got ", t,
      " (pcl_ext.info_nce upcasts half precision on the CPU)"));
}

InfoNCEOut info_nce_cpu(const Tensor& queries, const Tensor& keys, const Tensor& targets,
                        double temperature, bool exclude_self, bool compute_grad_queries,
                        bool /*allow_tf32: CPU float32 is exact*/) {
  check_info_nce_args(queries, keys, targets, temperature, exclude_self);
  switch (queries.scalar_type()) {
    case ScalarType::Float:
      return info_nce_cpu_impl<float>(queries, keys, targets, temperature, exclude_self,
                                      compute_grad_queries);
    case ScalarType::Double:
      return info_nce_cpu_impl<double>(queries, keys, targets, temperature, exclude_self,
                                       compute_grad_queries);
    default:
      bad_dtype("info_nce", queries.scalar_type());
  }
}

Tensor info_nce_backward_cpu(const Tensor& grad_losses, const Tensor& queries, const Tensor& keys,
                             const Tensor& targets, const Tensor& lse, double temperature,
                             bool exclude_self, bool /*allow_tf32*/) {
  check_info_nce_backward_args(grad_losses, queries, keys, targets, lse, temperature,
                               exclude_self);
  switch (queries.scalar_type()) {
    case ScalarType::Float:
      return info_nce_backward_cpu_impl<float>(grad_losses, queries, keys, targets, lse,
                                               temperature, exclude_self);
    case ScalarType::Double:
      return info_nce_backward_cpu_impl<double>(grad_losses, queries, keys, targets, lse,
                                                temperature, exclude_self);
    default:
      bad_dtype("info_nce_backward", queries.scalar_type());
  }
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pcl_ext, CPU, m) {
  m.impl("info_nce", TORCH_BOX(&info_nce_cpu));
  m.impl("info_nce_backward", TORCH_BOX(&info_nce_backward_cpu));
}

}  // namespace pcl_ext
