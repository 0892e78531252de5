// Fused ProtoNCE on CUDA: the loss and dL/dq, dL/dk in three launches, no N x K logits.
//
// Every term of the loss is a softmax cross-entropy of q_i against columns x_j with a per-column
// scale s_j (1/T for the queue, 1/phi for prototypes). Flash-Decoding split: the columns of all
// terms are cut into chunks whose bounds depend only on the shapes, and one launch over
// (row block x chunk) streams column tiles through two GEMMs (mma.sync tensor cores for fp16,
// bf16 and TF32-allowed float32 from sm_80 on; FFMA in the same tile layout for IEEE float32,
// or 3xTF32 tensor cores if PCL_EXT_FLOAT32_MATH=3xtf32; FFMA for every dtype before sm_80,
// half inputs converted to float32 as the tiles load; the chunk kernel and its tile GEMMs are
// the streaming softmax core shared with info_nce, stream_softmax.cu/.cuh),
//   S = Q X^T,  P = exp(S * s - m) * s / s_max (online softmax),  acc = acc * alpha + P X,
// leaving (m, l, s_max * acc) per chunk and row in a float32 workspace. s_max, the largest
// scale the chunk has seen so far, keeps P <= 1: 1/phi alone overflows fp16 for phi < 1.5e-5.
// Each row's target column (k_i, or its cluster's prototype) stays out of the tiles: a combine
// launch merges the chunks of each term in chunk order, adds the target in float32, and writes
// dq, dk and one loss per row; a one-block launch sums the rows. With the target apart,
//   dq = sum_{j != t} p_j x_j s_j - (1 - p_t) x_t s_t
// keeps its accuracy as p_t -> 1, where p_t x_t s_t - x_t s_t from a rounded P would cancel.
// No atomics and fixed reduction orders: the same inputs give the same bits.
#include "../proto_nce.h"
#include "stream_softmax.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace pcl_ext {
namespace {

using namespace stream;

// What the combine kernel reads besides the chunk kernel's parameters.
struct Params : StreamParams {
  const void* k;
  void* dq;
  void* dk;
  float* row_loss;  // [N]
  bool* correct;    // [nterms, N]
  float hit_tol;    // `correct`'s tolerance per unit of s_t sum_c |q_c x_tc| (hit_tolerance)
};
static_assert(sizeof(Params) <= 4000, "kernel parameters are limited to 4 KB");

// One block per row: merge each term's chunks in chunk order, add the target column, then dq,
// dk and the row's loss.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) proto_nce_combine_kernel(
    const __grid_constant__ Params p) {
  extern __shared__ float sf[];  // exp(m_chunk - m_term), per chunk
  // 1 / sum and rest = 1 - p_t: the sum over the other columns over the whole sum, not 1 - p_t
  // itself, which rounds to 0 as p_t -> 1.
  __shared__ float s_inv_sum[kMaxTerms], s_scale[kMaxTerms], s_rest[kMaxTerms], s_loss[kMaxTerms];
  __shared__ int64_t s_row[kMaxTerms];
  const int64_t i = blockIdx.x, n = p.n;
  const int d = p.d, lane = threadIdx.x % 32;
  const T* q = static_cast<const T*>(p.q) + i * d;
  const T* k = static_cast<const T*>(p.k) + i * d;
  const float nan = __int_as_float(0x7fc00000);

  for (int t = threadIdx.x / 32; t < p.nterms; t += kCombineThreads / 32) {
    const TermDesc& td = p.term[t];
    const bool inst = td.assign == nullptr;
    const T* col = k;
    float scale = p.inv_t;
    int64_t row = -1;
    if (!inst) {
      const int64_t a = td.assign[i];
      row = a >= 0 && a < td.rows ? a : -1;
      col = row >= 0 ? static_cast<const T*>(td.src) + row * d : nullptr;
      scale = row >= 0 ? 1.0f / td.phi[row] : nan;
    }
    float dot = 0.0f, mag = 0.0f;
    if (col != nullptr) {
      for (int c = lane; c < d; c += 32) {
        const float v = to_f(q[c]) * to_f(col[c]);
        dot += v;
        mag += fabsf(v);
      }
    }
    const float target = warp_sum(dot) * scale;
    const float bound = warp_sum(mag) * scale;
    float col_max = -INFINITY;
    for (int c = lane; c < td.nchunks; c += 32) {
      col_max = fmaxf(col_max, p.ws_ml[((td.chunk0 + c) * n + i) * 2]);
    }
    for (int o = 16; o > 0; o /= 2) {
      col_max = fmaxf(col_max, __shfl_xor_sync(0xffffffffu, col_max, o));
    }
    const float mx = fmaxf(target, col_max);
    float rest = 0.0f;
    for (int c = lane; c < td.nchunks; c += 32) {
      const float* ml = p.ws_ml + ((td.chunk0 + c) * n + i) * 2;
      const float f = expf(ml[0] - mx);
      sf[td.chunk0 + c] = f;
      rest += ml[1] * f;
    }
    rest = warp_sum(rest);
    const float sum = rest + expf(target - mx);
    if (lane == 0) {
      s_inv_sum[t] = 1.0f / sum;
      s_rest[t] = rest / sum;
      s_scale[t] = scale;
      s_row[t] = row;
      s_loss[t] = td.coef * (mx + logf(sum) - target);
      p.correct[t * n + i] = target >= col_max - p.hit_tol * bound;  // col_max: the others
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float loss = 0.0f;
    for (int t = 0; t < p.nterms; ++t) loss += s_loss[t];
    p.row_loss[i] = loss;
  }
  for (int c = threadIdx.x; c < d; c += kCombineThreads) {
    float gq = 0.0f, gk = 0.0f;
    for (int t = 0; t < p.nterms; ++t) {
      const TermDesc& td = p.term[t];
      float e = 0.0f;
      for (int ch = td.chunk0; ch < td.chunk0 + td.nchunks; ++ch) {
        e += p.ws_acc[(ch * n + i) * d + c] * sf[ch];
      }
      float target;
      if (td.assign == nullptr) {
        target = to_f(k[c]) * s_scale[t];
        gk = -td.coef * s_rest[t] * p.inv_t * to_f(q[c]);
      } else {
        target = s_row[t] >= 0 ? to_f(static_cast<const T*>(td.src)[s_row[t] * d + c]) * s_scale[t]
                               : nan;
      }
      gq += td.coef * (e * s_inv_sum[t] - target * s_rest[t]);
    }
    static_cast<T*>(p.dq)[i * d + c] = from_f<T>(gq);
    static_cast<T*>(p.dk)[i * d + c] = from_f<T>(gk);
  }
}

// The loss: one block sums the per-row values in a fixed order.
template <typename T>
__global__ void __launch_bounds__(256) proto_nce_loss_kernel(const float* row_loss, int64_t n,
                                                             T* out) {
  __shared__ double part[256];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += 256) s += row_loss[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int o = 128; o > 0; o /= 2) {
    if (threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = from_f<T>(static_cast<float>(part[0]));
}

template <typename T, Math M>
void launch(const Params& p, int na, size_t smem, int64_t row_blocks, int nchunks, void* loss,
            cudaStream_t stream) {
  launch_chunks<T, M>(p, na, smem, row_blocks, nchunks, stream);
  proto_nce_combine_kernel<T><<<static_cast<unsigned>(p.n), kCombineThreads,
                                nchunks * sizeof(float), stream>>>(p);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  proto_nce_loss_kernel<T><<<1, 256, 0, stream>>>(p.row_loss, p.n, static_cast<T*>(loss));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

ProtoNCEOut proto_nce_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& queue_in,
                           const TensorList& prototypes, const TensorList& phi_in,
                           const TensorList& assignments, const TensorList& negatives,
                           double temperature, bool allow_tf32) {
  check_proto_nce_args(q_in, k_in, queue_in, prototypes, phi_in, assignments, negatives,
                       temperature);
  const auto dtype = q_in.scalar_type();
  PCL_CHECK_VALUE(dtype == ScalarType::Float || dtype == ScalarType::Half ||
                      dtype == ScalarType::BFloat16,
                  "proto_nce: the CUDA kernel takes float32, float16 or bfloat16 `q`, got ", dtype);
  const size_t m_count = prototypes.size();
  PCL_CHECK_VALUE(m_count < size_t(kMaxTerms), "proto_nce: the CUDA kernel takes at most ",
                  kMaxTerms - 1, " clusterings in `prototypes`, got ", m_count);
  const int device = q_in.get_device_index();
  const DeviceGuard device_guard(device);

  const Tensor q = ensure_contiguous(q_in), k = ensure_contiguous(k_in);
  const int64_t n = q.size(0), d = q.size(1);
  const size_t elem = q.element_size();

  const Math math = select_math(dtype, allow_tf32, device, "proto_nce");
  const size_t tile_elem = math == Math::kFFMA ? sizeof(float) : elem;
  const auto [bm, bn, dp, na, smem] = plan_tiles(d, tile_elem, device, "proto_nce", "q");

  Params p{};
  TensorList keep;  // owners of the contiguous copies the term table points into
  auto add_term = [&](const Tensor& src, const Tensor& ids, const Tensor& phi,
                      const Tensor& assign, double weight) {
    TermDesc& td = p.term[p.nterms++];
    keep.insert(keep.end(), {src, ids, phi, assign});
    td.src = src.const_data_ptr();
    td.ids = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
    td.phi = phi.defined() ? phi.const_data_ptr<float>() : nullptr;
    td.assign = assign.defined() ? assign.const_data_ptr<int64_t>() : nullptr;
    td.rows = src.size(0);
    td.cols = ids.defined() ? ids.numel() : src.size(0);
    td.coef = static_cast<float>(weight / static_cast<double>(n));
    td.vec = (d * elem) % 16 == 0 && reinterpret_cast<uintptr_t>(td.src) % 16 == 0;
  };
  add_term(ensure_contiguous(queue_in), Tensor(), Tensor(), Tensor(), 1.0);
  for (size_t m = 0; m < m_count; ++m) {
    const Tensor assign = ensure_contiguous(assignments[m]);
    // PCL's column layout [a_0 .. a_{N-1}, neg_0 .. neg_{r-1}]; row i's target is column i.
    // aten::cat(Tensor[] tensors, int dim=0)
    const Tensor ids = negatives.empty()
                           ? Tensor()
                           : torch::stable::detail::to<Tensor>(call_aten<2>(
                                 "aten::cat", "", TensorList{assign, negatives[m]}, int64_t{0})[0]);
    add_term(ensure_contiguous(prototypes[m]), ids, contiguous_as(phi_in[m], ScalarType::Float),
             assign, 1.0 / static_cast<double>(m_count));
  }

  const int64_t row_blocks = (n + bm - 1) / bm;
  int64_t total = 0;
  for (int t = 0; t < p.nterms; ++t) total += p.term[t].cols;
  const int64_t chunk_cols = chunk_width(total, row_blocks);
  int nchunks = 0;
  for (int t = 0; t < p.nterms; ++t) {
    p.term[t].chunk0 = nchunks;
    p.term[t].nchunks = static_cast<int>((p.term[t].cols + chunk_cols - 1) / chunk_cols);
    nchunks += p.term[t].nchunks;
  }
  // chunk_cols >= total * row_blocks / kTargetBlocks bounds nchunks by kTargetBlocks + kMaxTerms:
  // well within gridDim.y and the combine kernel's shared memory.
  PCL_INTERNAL_ASSERT(nchunks <= 12 * 1024, "proto_nce: unexpected chunk count ", nchunks);

  const Tensor ws = torch::stable::new_empty(q, {nchunks * n * (d + 2) + n}, ScalarType::Float);
  Tensor loss = torch::stable::new_empty(q, std::vector<int64_t>{});
  Tensor dq = torch::stable::new_empty(q, {n, d}), dk = torch::stable::new_empty(q, {n, d});
  Tensor correct = torch::stable::new_empty(q, {p.nterms, n}, ScalarType::Bool);
  p.correct = correct.mutable_data_ptr<bool>();
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.ws_acc = ws.mutable_data_ptr<float>();
  p.ws_ml = p.ws_acc + nchunks * n * d;
  p.row_loss = p.ws_ml + nchunks * n * 2;
  p.n = n;
  p.chunk_cols = chunk_cols;
  p.d = static_cast<int>(d);
  p.dp = dp;
  p.bm = bm;
  p.bn = bn;
  p.ldx = dp + static_cast<int>(16 / tile_elem);
  p.ldp = bn + static_cast<int>(16 / tile_elem);
  p.lds = bn + 4;
  p.inv_t = static_cast<float>(1.0 / temperature);

  const cudaStream_t stream = current_cuda_stream(q);
  void* out = loss.mutable_data_ptr();
  p.hit_tol = static_cast<float>(hit_tolerance(input_roundoff(math), acc_roundoff(math), d));
  decltype(&launch<float, Math::kFFMA>) kernels;
  if (dtype == ScalarType::Float) {
    kernels = math == Math::kTF32     ? launch<float, Math::kTF32>
              : math == Math::k3xTF32 ? launch<float, Math::k3xTF32>
                                      : launch<float, Math::kFFMA>;
  } else if (dtype == ScalarType::Half) {
    kernels = math == Math::kHalf ? launch<__half, Math::kHalf> : launch<__half, Math::kFFMA>;
  } else {
    kernels = math == Math::kHalf ? launch<__nv_bfloat16, Math::kHalf>
                                  : launch<__nv_bfloat16, Math::kFFMA>;
  }
  kernels(p, na, smem, row_blocks, nchunks, out, stream);
  return {loss, dq, dk, correct};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pcl_ext, CUDA, m) { m.impl("proto_nce", TORCH_BOX(&proto_nce_cuda)); }

}  // namespace pcl_ext
