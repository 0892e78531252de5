// Fused ProtoNCE on the CPU: one pass over the columns computes the loss and dL/dq, dL/dk.
// The streaming softmax itself (tiles, online max/sum/accumulator, chunk merge) is shared with
// info_nce in stream_softmax.h.
//
// Every term of the loss is a softmax cross-entropy of q_i against a set of columns x_j with a
// per-column scale s_j (1/T for the queue, 1/phi for prototypes). The columns are split into a
// fixed number of chunks (fixed by the shapes, not by the thread count, so the bits do not
// depend on it); each chunk streams tiles of columns through two GEMMs:
//   S = q X^T (N x tile), P = exp(S*s - m) * s (online softmax), acc += P X  (N x D)
// and keeps (m, l, acc) per row. Chunks merge in a fixed order. Nothing N x K is allocated:
// the extra memory is O(chunks * N * D + threads * tile * (N + D)).
#include "../proto_nce.h"
#include "stream_softmax.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace pcl_ext {
namespace {

// One softmax term: columns x_j = src[ids[j]] (or src[j] without ids), scales 1/phi[row] or
// inv_t. The target of row i is k_i * inv_t (instance term, an extra per-row column) or
// src[assign[i]] / phi[assign[i]] (prototype terms; that column is also among the columns).
template <typename T>
struct Term {
  Tensor src;                    // [R, D] contiguous
  const int64_t* ids = nullptr;  // column list, or nullptr for all rows of src
  int64_t ncols = 0;
  const T* phi = nullptr;        // [R], or nullptr for the constant inv_t
  T inv_t = 0;
  const int64_t* assign = nullptr;  // [N] target rows of src; nullptr: instance term
  double weight = 1.0;
};

struct Chunk {
  size_t term;
  int64_t begin, end;
};

template <typename T>
void check_ids(const int64_t* ids, int64_t count, int64_t bound, const char* name, size_t m) {
  for (int64_t j = 0; j < count; ++j) {
    PCL_CHECK_INDEX(ids[j] >= 0 && ids[j] < bound, "proto_nce: `", name, "[", m,
                    "]` holds cluster id ", ids[j], " at position ", j, ", outside [0, ", bound,
                    ")");
  }
}

template <typename T>
ProtoNCEOut proto_nce_cpu_impl(const Tensor& q_in, const Tensor& k_in, const Tensor& queue_in,
                               const TensorList& prototypes, const TensorList& phi_in,
                               const TensorList& assignments, const TensorList& negatives,
                               double temperature) {
  const Tensor q = ensure_contiguous(q_in), k = ensure_contiguous(k_in);
  const int64_t n = q.size(0), d = q.size(1);
  const size_t m_count = prototypes.size();
  const bool sampled = !negatives.empty();

  std::vector<Term<T>> terms;
  TensorList keep;  // owners of the contiguous copies the terms point into
  Term<T> inst;
  inst.src = ensure_contiguous(queue_in);
  inst.ncols = inst.src.size(0);
  inst.inv_t = static_cast<T>(1.0 / temperature);
  terms.push_back(inst);
  for (size_t m = 0; m < m_count; ++m) {
    Term<T> t;
    t.src = ensure_contiguous(prototypes[m]);
    const int64_t kk = t.src.size(0);
    const Tensor phi = contiguous_as(phi_in[m], q.scalar_type());
    t.phi = phi.const_data_ptr<T>();
    for (int64_t c = 0; c < kk; ++c) {
      PCL_CHECK_VALUE(std::isfinite(t.phi[c]) && t.phi[c] > 0, "proto_nce: `phi[", m,
                      "]` must be positive and finite, got ", t.phi[c], " at cluster ", c);
    }
    const Tensor assign = ensure_contiguous(assignments[m]);
    t.assign = assign.const_data_ptr<int64_t>();
    check_ids<T>(t.assign, n, kk, "assignments", m);
    if (sampled) {
      const Tensor neg = ensure_contiguous(negatives[m]);
      check_ids<T>(neg.const_data_ptr<int64_t>(), neg.numel(), kk, "negatives", m);
      // PCL's column layout: [a_0 .. a_{N-1}, neg_0 .. neg_{r-1}], target of row i = column i.
      const Tensor ids = torch::stable::new_empty(assign, {n + neg.numel()});
      std::memcpy(ids.mutable_data_ptr<int64_t>(), t.assign, n * sizeof(int64_t));
      std::memcpy(ids.mutable_data_ptr<int64_t>() + n, neg.const_data_ptr<int64_t>(),
                  neg.numel() * sizeof(int64_t));
      t.ids = ids.const_data_ptr<int64_t>();
      t.ncols = ids.numel();
      keep.push_back(ids);
    } else {
      t.ncols = kk;
    }
    t.weight = 1.0 / static_cast<double>(m_count);
    keep.push_back(phi);
    keep.push_back(assign);
    terms.push_back(t);
  }

  // Tiles keep the N x tile logit block in L2; chunks are a fixed split of the columns.
  const int64_t tile = stream::tile_columns(n);
  int64_t total = 0;
  for (const auto& t : terms) total += t.ncols;
  const int64_t chunk_cols = stream::chunk_columns(total, tile, 16);
  std::vector<Chunk> chunks;
  std::vector<int64_t> first(terms.size()), count(terms.size());  // each term's chunks
  for (size_t ti = 0; ti < terms.size(); ++ti) {
    first[ti] = static_cast<int64_t>(chunks.size());
    for (int64_t c = 0; c < terms[ti].ncols; c += chunk_cols) {
      chunks.push_back({ti, c, std::min(terms[ti].ncols, c + chunk_cols)});
    }
    count[ti] = static_cast<int64_t>(chunks.size()) - first[ti];
  }
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  const Tensor acc_all = torch::stable::new_zeros(q, {nchunks, n, d});
  std::vector<T> row_max(nchunks * n, -std::numeric_limits<T>::infinity());
  std::vector<T> row_sum(nchunks * n, T(0));

  // The workers read the inputs only through raw pointers and cpu_matrix views, and multiply
  // through the C shims (csrc/torch_stable.h): no dispatcher call of theirs takes an input
  // tensor (which may require grad). Their scratch comes from torch's allocator, like the
  // rest of the op's memory.
  T* const acc_base = acc_all.mutable_data_ptr<T>();
  const T* const q_data = q.const_data_ptr<T>();
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  torch::stable::parallel_for(0, nchunks, 1, [&](int64_t first, int64_t last) {
    const Tensor scratch = torch::stable::empty({n * tile + tile * d}, q.scalar_type(),
                                                std::nullopt, cpu);
    T* const logits = scratch.mutable_data_ptr<T>();
    T* const gathered = logits + n * tile;
    std::vector<T> scale(tile), alpha(n);
    for (int64_t ci = first; ci < last; ++ci) {
      const Chunk& ch = chunks[ci];
      const Term<T>& t = terms[ch.term];
      const T* src = t.src.template const_data_ptr<T>();
      T* acc_p = acc_base + ci * n * d;
      T* m_p = row_max.data() + ci * n;
      T* l_p = row_sum.data() + ci * n;
      for (int64_t c0 = ch.begin; c0 < ch.end; c0 += tile) {
        const int64_t tc = std::min(tile, ch.end - c0);
        const T* x_p = src + c0 * d;
        if (t.ids != nullptr) {
          for (int64_t j = 0; j < tc; ++j) {
            std::memcpy(gathered + j * d, src + t.ids[c0 + j] * d, d * sizeof(T));
          }
          x_p = gathered;
        }
        for (int64_t j = 0; j < tc; ++j) {
          const int64_t row = t.ids != nullptr ? t.ids[c0 + j] : c0 + j;
          scale[j] = t.phi != nullptr ? T(1) / t.phi[row] : t.inv_t;
        }
        const stream::Mat<T> x{x_p, d, 1};
        stream::gemm(logits, tc, stream::Mat<T>{q_data, d, 1}, x.transposed(), n, tc, d,
                     false);  // S = q X^T
        stream::softmax_tile(logits, n, tc, scale.data(), m_p, l_p, acc_p, d, alpha.data());
        stream::gemm(acc_p, d, stream::Mat<T>{logits, tc, 1}, x, n, d, tc, true);  // acc += P X
      }
    }
  });

  // Merge the chunks of each term in a fixed order and form loss and gradients per row.
  Tensor dq = torch::stable::new_zeros(q, {n, d}), dk = torch::stable::new_zeros(q, {n, d});
  const T* q_p = q.const_data_ptr<T>();
  const T* k_p = k.const_data_ptr<T>();
  const T* acc_p = acc_all.const_data_ptr<T>();
  T* dq_p = dq.mutable_data_ptr<T>();
  T* dk_p = dk.mutable_data_ptr<T>();
  Tensor correct = torch::stable::new_empty(q, {static_cast<int64_t>(terms.size()), n},
                                            ScalarType::Bool);
  bool* correct_p = correct.mutable_data_ptr<bool>();
  // The tiles' logits come from a GEMM, the target logit from a dot product: equal values may
  // differ by rounding, which must not count a hit as a miss. Inputs are exact (u_in = 0).
  const T tol = static_cast<T>(hit_tolerance(0.0, std::numeric_limits<T>::epsilon() / 2, d));
  double loss = 0.0;
  std::vector<T> expect(d), target(d);
  for (size_t ti = 0; ti < terms.size(); ++ti) {
    const Term<T>& t = terms[ti];
    const T* src = t.src.template const_data_ptr<T>();
    const double w = t.weight / static_cast<double>(n);
    for (int64_t i = 0; i < n; ++i) {
      const T* qi = q_p + i * d;
      // Target column (scaled) and its logit.
      T tscale;
      const T* tcol;
      if (t.assign == nullptr) {
        tscale = t.inv_t;
        tcol = k_p + i * d;
      } else {
        tscale = T(1) / t.phi[t.assign[i]];
        tcol = src + t.assign[i] * d;
      }
      T tlogit = 0, tbound = 0;  // the logit and s_t sum_c |q_c x_tc|
      for (int64_t c = 0; c < d; ++c) {
        target[c] = tcol[c] * tscale;
        const T v = qi[c] * target[c];
        tlogit += v;
        tbound += std::abs(v);
      }
      T col_max = -std::numeric_limits<T>::infinity();
      for (int64_t ci = first[ti]; ci < first[ti] + count[ti]; ++ci) {
        col_max = std::max(col_max, row_max[ci * n + i]);
      }
      // A prototype term's col_max also holds the target's tiled logit, within tol of tlogit:
      // the comparison is with the other columns, as on CUDA, which leaves the target out.
      correct_p[ti * n + i] = tlogit >= col_max - tol * tbound;
      const T mx = t.assign == nullptr ? std::max(tlogit, col_max) : col_max;
      T sum = stream::merge_chunks(row_max.data() + first[ti] * n + i,
                                   row_sum.data() + first[ti] * n + i, n,
                                   acc_p + (first[ti] * n + i) * d, n * d, count[ti], d, mx,
                                   expect.data());
      T p_pos = 0;
      if (t.assign == nullptr) {  // the positive key is a column of row i only
        const T f = std::exp(tlogit - mx);
        sum += f;
        for (int64_t c = 0; c < d; ++c) expect[c] += target[c] * f;
        p_pos = f / sum;
      }
      loss += w * (static_cast<double>(mx) + std::log(static_cast<double>(sum)) - tlogit);
      for (int64_t c = 0; c < d; ++c) {
        dq_p[i * d + c] += static_cast<T>(w) * (expect[c] / sum - target[c]);
      }
      if (t.assign == nullptr) {
        const T g = static_cast<T>(w) * (p_pos - T(1)) * t.inv_t;
        for (int64_t c = 0; c < d; ++c) dk_p[i * d + c] += g * qi[c];
      }
    }
  }
  Tensor loss_t = torch::stable::new_empty(q, std::vector<int64_t>{});
  *loss_t.mutable_data_ptr<T>() = static_cast<T>(loss);
  return {loss_t, dq, dk, correct};
}

ProtoNCEOut proto_nce_cpu(const Tensor& q, const Tensor& k, const Tensor& queue,
                          const TensorList& prototypes, const TensorList& phi,
                          const TensorList& assignments, const TensorList& negatives,
                          double temperature, bool /*allow_tf32: CPU float32 is exact*/) {
  check_proto_nce_args(q, k, queue, prototypes, phi, assignments, negatives, temperature);
  switch (q.scalar_type()) {
    case ScalarType::Float:
      return proto_nce_cpu_impl<float>(q, k, queue, prototypes, phi, assignments, negatives,
                                       temperature);
    case ScalarType::Double:
      return proto_nce_cpu_impl<double>(q, k, queue, prototypes, phi, assignments, negatives,
                                        temperature);
    default:
      throw std::invalid_argument(detail::message(
          "proto_nce: the CPU kernel takes float32 or float64 `q`, got ", q.scalar_type(),
          " (pcl_ext.proto_nce upcasts half precision on the CPU)"));
  }
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pcl_ext, CPU, m) { m.impl("proto_nce", TORCH_BOX(&proto_nce_cpu)); }

}  // namespace pcl_ext
