// Fused InfoNCE on CUDA: losses, lse, dloss_i/dq_i and correct in two launches, the key gradient
// in two more; nothing N x K is materialized. Built on the streaming softmax core
// (stream_softmax.cuh / .cu) that proto_nce.cu uses too.
//
// Forward (info_nce). The keys are the columns of one streaming-softmax term: the chunk kernel
// of stream_softmax.cu streams chunks of key tiles past blocks of bm queries, row i skipping its
// target column t_i and, with exclude_self, its own column i. It leaves per (chunk c, row i) the
// running max m_c, the sum l_c = sum_j exp(s_ij - m_c) and acc_c = sum_j exp(s_ij - m_c) k_j / T
// over the chunk's other columns. The combine (one block per row) computes the target logit
// s_t = q_i . k_t / T apart, in float32, and merges the chunks in chunk order:
//   M = max(s_t, max_c m_c),  rest = sum_c l_c e^{m_c - M},  sum = rest + e^{s_t - M},
//   lse = M + log(sum),  loss = lse - s_t,  correct = s_t >= max_c m_c - tol (hit_tolerance),
//   dq = sum_c acc_c e^{m_c - M} / sum - (rest / sum) k_t / T,
// the last term being (1 - p_t) k_t / T without the cancellation of 1 - p_t as p_t -> 1.
//
// Backward (info_nce_backward): dK_j = sum_i g_i (P_ij - [j == t_i]) q_i / T, P_ij = e^{s_ij -
// lse_i} (P_ii = 0 under exclude_self). The roles swap, FlashAttention-2 style: a block owns bm
// keys, the rows of the tile GEMMs, and streams one chunk of the queries as column tiles:
//   S^T = K Q^T (tile_scores),  W = P^T diag(w) (elementwise),  acc += W Q (tile_accumulate),
// then acc_j -= w_i q_i for the tile's rows i with t_i = j, in float32 from the exact query
// tile: the target's -1 stays out of W's rounding, as the forward keeps the target column apart.
// w_i = g_i 2^14 / max |g| over the chunk: W enters the GEMM in its input type, and |W| <= 2^14
// fits fp16 while P ~ 1/K of flat softmaxes stays a normal number; the stored partial undoes
// the scale (max |g| 2^-14 / T) in float32. lse is known, so there is no running max, and the
// chunks of queries merge by a plain float32 sum in chunk order (a second launch): no atomics,
// the same bits every run.
//
// Bounds, for a reviewer: tiles past the last key (rows >= K) or query (columns >= tc) load as
// zeros and get W = 0, and neither is stored; a tile's columns are global ids c0 + c, so t_i and
// i (exclude_self) are compared with global key ids j = row0 + r wherever they fall, inside or
// outside the current tile. A target outside [0, K) (or t_i == i under exclude_self), which the
// Python wrapper rejects, is never dereferenced: it turns row i's forward outputs NaN, and the
// backward matches no key with it.
#include "../info_nce.h"
#include "stream_softmax.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace pcl_ext {
namespace {

using namespace stream;

constexpr float kWeightScale = 0x1p14f;  // |W| <= 2^14: within fp16's range (65504)
constexpr size_t kBackwardBytesPerCol = 2 * sizeof(float) + sizeof(int64_t);  // w, lse, target

// The forward combine's parameters: the chunk kernel's (rows: queries; term 0: the keys) and
// the outputs.
struct ForwardParams : StreamParams {
  const int64_t* targets;  // [N]
  float* losses;           // [N]
  float* lse;              // [N]
  void* grad_q;            // [N, D] or nullptr (compute_grad_queries false)
  bool* correct;           // [N]
  float hit_tol;           // `correct`'s tolerance per unit of s_t sum_c |q_c k_tc| (hit_tolerance)
};
static_assert(sizeof(ForwardParams) <= 4000, "kernel parameters are limited to 4 KB");

// The backward's: rows (q, n) are the keys [K, D], term 0 the queries as columns.
struct BackwardParams : StreamParams {
  const float* grad;       // [N] grad_losses
  const float* lse;        // [N]
  const int64_t* targets;  // [N]
};
static_assert(sizeof(BackwardParams) <= 4000, "kernel parameters are limited to 4 KB");

// One block per row: merge the chunks in chunk order, add the target column, write the row's
// loss, lse, correct and (if asked) dloss/dq.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) info_nce_combine_kernel(
    const __grid_constant__ ForwardParams p) {
  extern __shared__ float sf[];  // exp(m_chunk - M), per chunk
  // 1 / sum and rest / sum = 1 - p_t, not 1 - p_t itself, which rounds to 0 as p_t -> 1.
  __shared__ float s_inv_sum, s_rest;
  const int64_t i = blockIdx.x, n = p.n;
  const int d = p.d, lane = threadIdx.x % 32;
  const TermDesc& keys = p.term[0];
  const T* q = static_cast<const T*>(p.q) + i * d;
  const int64_t t = p.targets[i];
  const bool valid = t >= 0 && t < keys.rows && !(keys.exclude_self && t == i);
  const T* kt = valid ? static_cast<const T*>(keys.src) + t * d : nullptr;
  const float nan = __int_as_float(0x7fc00000);

  if (threadIdx.x < 32) {  // warp 0: the row's scalars
    float dot = 0.0f, mag = 0.0f;
    if (kt != nullptr) {
      for (int c = lane; c < d; c += 32) {
        const float v = to_f(q[c]) * to_f(kt[c]);
        dot += v;
        mag += fabsf(v);
      }
    }
    dot = warp_sum(dot);
    const float target = valid ? dot * p.inv_t : nan;
    const float bound = warp_sum(mag) * p.inv_t;
    float col_max = -INFINITY;  // the other columns' max (-inf when there are none)
    for (int c = lane; c < keys.nchunks; c += 32) {
      col_max = fmaxf(col_max, p.ws_ml[(int64_t(c) * n + i) * 2]);
    }
    for (int o = 16; o > 0; o /= 2) {
      col_max = fmaxf(col_max, __shfl_xor_sync(0xffffffffu, col_max, o));
    }
    const float mx = fmaxf(target, col_max);
    float rest = 0.0f;
    for (int c = lane; c < keys.nchunks; c += 32) {
      const float* ml = p.ws_ml + (int64_t(c) * n + i) * 2;
      const float f = expf(ml[0] - mx);
      sf[c] = f;
      rest += ml[1] * f;
    }
    rest = warp_sum(rest);
    const float sum = rest + expf(target - mx);
    if (lane == 0) {
      const float lse = mx + logf(sum);
      s_inv_sum = 1.0f / sum;
      s_rest = rest / sum;
      p.lse[i] = lse;
      p.losses[i] = lse - target;
      p.correct[i] = target >= col_max - p.hit_tol * bound;
    }
  }
  __syncthreads();
  if (p.grad_q == nullptr) return;
  for (int c = threadIdx.x; c < d; c += kCombineThreads) {
    float e = 0.0f;
    for (int ch = 0; ch < keys.nchunks; ++ch) e += p.ws_acc[(int64_t(ch) * n + i) * d + c] * sf[ch];
    const float target = kt != nullptr ? to_f(kt[c]) * p.inv_t : nan;
    static_cast<T*>(p.grad_q)[i * d + c] = from_f<T>(e * s_inv_sum - target * s_rest);
  }
}

// One block: keys [rb * bm, +bm) against one chunk of the queries; the chunk's partial dK, in
// float32, into ws_acc [chunk, K, D]. Same smem layout and warp tiles as the chunk kernel, plus
// per query of the tile its weight g_i 2^14 / g_max, lse_i and target.
template <typename T, Math M, int NA>
__device__ __forceinline__ void key_grad_tiles(const BackwardParams& p) {
  using S = TileT<T, M>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int bm = p.bm, bn = p.bn, ldx = p.ldx, ldp = p.ldp, lds = p.lds;
  S* sk = reinterpret_cast<S*>(smem);  // the block's keys
  S* sx = sk + bm * ldx;               // two query tiles: load tile i + 1 while computing tile i
  S* sp = sx + 2 * bn * ldx;           // W in the GEMM input type
  float* ss = reinterpret_cast<float*>(sp + bm * ldp);  // S^T = K Q^T
  float* sscale = ss + bm * lds;       // load_columns' column scales (all 1/T: unused)
  float* sred = sscale + 2 * bn;       // smem_bytes' bm per-row floats: the warps' max |g_i|
  float* sw = sred + bm;
  float* slse = sw + bn;
  int64_t* stgt = reinterpret_cast<int64_t*>(slse + bn);  // 8-byte aligned: bm, bn % 16 == 0

  const TermDesc& queries = p.term[0];
  const int chunk = blockIdx.y;
  const int64_t cbeg = int64_t(chunk) * p.chunk_cols;
  const int64_t cend = std::min(queries.cols, cbeg + p.chunk_cols);
  const int ntiles = int((cend - cbeg + bn - 1) / bn);
  const int64_t row0 = int64_t(blockIdx.x) * bm;  // the block's first key

  load_columns<T>(sx, sscale, queries, p, cbeg, int(std::min<int64_t>(bn, cend - cbeg)));
  if constexpr (kAsyncLoads<T, S>) cp_async_commit();
  load_rows<T>(sk, p.q, row0, p.n, p);

  // The chunk's largest |g_i| (fmaxf skips NaN: a NaN g_i reaches dK through its own W).
  float gmax = 0.0f;
  for (int64_t i = cbeg + threadIdx.x; i < cend; i += kThreads) gmax = fmaxf(gmax, fabsf(p.grad[i]));
  for (int o = 16; o > 0; o /= 2) gmax = fmaxf(gmax, __shfl_xor_sync(0xffffffffu, gmax, o));
  if (threadIdx.x % 32 == 0) sred[threadIdx.x / 32] = gmax;  // kWarps (8) <= bm
  __syncthreads();
  gmax = 0.0f;
  for (int k = 0; k < kWarps; ++k) gmax = fmaxf(gmax, sred[k]);

  const WarpTile w = warp_tile(bm);
  const int na = p.dp / (8 * w.wpn);
  float acc[NA][4] = {};
  for (int it = 0; it < ntiles; ++it) {
    const int buf = it & 1;
    const int64_t c0 = cbeg + int64_t(it) * bn;
    const int tc = int(std::min<int64_t>(bn, cend - c0));
    if constexpr (kAsyncLoads<T, S>) cp_async_wait_all();
    __syncthreads();  // tile `it` landed; every warp is done with tile it - 1 (and buffer buf^1)
    if (it + 1 < ntiles) {
      load_columns<T>(sx + (buf ^ 1) * bn * ldx, sscale + (buf ^ 1) * bn, queries, p, c0 + bn,
                      int(std::min<int64_t>(bn, cend - c0 - bn)));
      if constexpr (kAsyncLoads<T, S>) cp_async_commit();
    }
    for (int c = threadIdx.x; c < bn; c += kThreads) {  // read after the next barrier
      const bool in = c < tc;
      sw[c] = in && gmax > 0.0f ? p.grad[c0 + c] / gmax * kWeightScale : 0.0f;
      slse[c] = in ? p.lse[c0 + c] : 0.0f;
      stgt[c] = in ? p.targets[c0 + c] : -1;
    }
    const S* xb = sx + buf * bn * ldx;
    tile_scores<S, M>(ss, lds, sk, xb, ldx, p.dp, bn, w);  // S^T = K Q^T over the padded D
    __syncthreads();

    // W[r][c] = P_ij w_i for key j = row0 + r and query i = c0 + c (0 past the last key or
    // query, and for j == i under exclude_self).
    for (int idx = threadIdx.x; idx < bm * bn; idx += kThreads) {
      const int r = idx / bn, c = idx - r * bn;
      const int64_t j = row0 + r, i = c0 + c;
      float v = 0.0f;
      if (c < tc && j < p.n && !(queries.exclude_self && i == j)) {
        v = expf(ss[r * lds + c] * p.inv_t - slse[c]) * sw[c];
      }
      sp[r * ldp + c] = from_f<S>(v);
    }
    __syncthreads();

    tile_accumulate<S, M>(acc, sp, ldp, xb, ldx, bn, na, w);  // acc += W Q
    // The targets' -w_i q_i, kept out of W's rounding (as the forward keeps the target column
    // apart): added in float32 to this thread's acc rows j = t_i, from the exact query tile.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t j = row0 + w.slice * 16 + w.g + 8 * h;
      for (int c = 0; c < tc; ++c) {
        if (stgt[c] != j) continue;
        const float wc = sw[c];
        const S* qc = xb + c * ldx;
#pragma unroll
        for (int f = 0; f < NA; ++f) {
          if (f < na) {
            const int col = (w.wn + w.wpn * f) * 8 + 2 * w.t4;  // < dp: zeros past d
            acc[f][2 * h] -= wc * to_f(qc[col]);
            acc[f][2 * h + 1] -= wc * to_f(qc[col + 1]);
          }
        }
      }
    }
  }
  store_acc(p.ws_acc + (int64_t(chunk) * p.n + row0) * p.d, acc,
            gmax / kWeightScale * p.inv_t, p.n - row0, na, p.d, w);
}

template <typename T, Math M, int NA>
__global__ void __launch_bounds__(kThreads, NA <= 8 ? 2 : 1)
    info_nce_key_grad_kernel(const __grid_constant__ BackwardParams p) {
  if constexpr (compiled_here<T, M>()) key_grad_tiles<T, M, NA>(p);
  else __trap();
}

// dK = the chunks' partials summed in chunk order, in the keys' dtype.
template <typename T>
__global__ void __launch_bounds__(256) info_nce_key_grad_sum_kernel(const float* ws,
                                                                    int64_t per_chunk,
                                                                    int nchunks, T* out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < per_chunk; e += stride) {
    float s = 0.0f;
    for (int ch = 0; ch < nchunks; ++ch) s += ws[ch * per_chunk + e];
    out[e] = from_f<T>(s);
  }
}

template <typename T, Math M>
void launch_forward(const ForwardParams& p, int na, size_t smem, int64_t row_blocks,
                    int nchunks, cudaStream_t stream) {
  launch_chunks<T, M>(p, na, smem, row_blocks, nchunks, stream);
  info_nce_combine_kernel<T><<<static_cast<unsigned>(p.n), kCombineThreads,
                               nchunks * sizeof(float), stream>>>(p);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, Math M>
void launch_backward(const BackwardParams& p, int na, size_t smem, int64_t row_blocks,
                     int nchunks, void* dk, cudaStream_t stream) {
  auto kernel = na <= 8 ? info_nce_key_grad_kernel<T, M, 8> : info_nce_key_grad_kernel<T, M, 16>;
  STD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  kernel<<<dim3(static_cast<unsigned>(row_blocks), nchunks), kThreads, smem, stream>>>(p);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t per_chunk = p.n * p.d;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((per_chunk + 255) / 256, 8192));
  info_nce_key_grad_sum_kernel<T><<<blocks, 256, 0, stream>>>(p.ws_acc, per_chunk, nchunks,
                                                              static_cast<T*>(dk));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

// The launcher of (dtype, math), as select_math chose them.
template <template <typename, Math> class Launch>
auto pick(ScalarType dtype, Math math) {
  if (dtype == ScalarType::Float) {
    return math == Math::kTF32     ? Launch<float, Math::kTF32>::run
           : math == Math::k3xTF32 ? Launch<float, Math::k3xTF32>::run
                                   : Launch<float, Math::kFFMA>::run;
  }
  if (dtype == ScalarType::Half) {
    return math == Math::kHalf ? Launch<__half, Math::kHalf>::run
                               : Launch<__half, Math::kFFMA>::run;
  }
  return math == Math::kHalf ? Launch<__nv_bfloat16, Math::kHalf>::run
                             : Launch<__nv_bfloat16, Math::kFFMA>::run;
}
template <typename T, Math M>
struct Forward {
  static constexpr auto run = launch_forward<T, M>;
};
template <typename T, Math M>
struct Backward {
  static constexpr auto run = launch_backward<T, M>;
};

void check_cuda_dtype(ScalarType dtype, const char* op) {
  PCL_CHECK_VALUE(dtype == ScalarType::Float || dtype == ScalarType::Half ||
                      dtype == ScalarType::BFloat16,
                  op, ": the CUDA kernel takes float32, float16 or bfloat16 `queries`, got ",
                  dtype);
}

// The columns of both passes: rows of src [rows, D], scaled by 1/T, the same row's column
// skipped under exclude_self.
TermDesc plain_columns(const Tensor& src, bool exclude_self) {
  TermDesc td{};
  td.src = src.const_data_ptr();
  td.rows = td.cols = src.size(0);
  td.vec = (src.size(1) * src.element_size()) % 16 == 0 &&
           reinterpret_cast<uintptr_t>(td.src) % 16 == 0;
  td.exclude_self = exclude_self;
  return td;
}

// The tile geometry of a plan, shared by both passes.
void set_tiles(StreamParams& p, const TilePlan& plan, int64_t d, size_t tile_elem,
               double temperature) {
  p.d = static_cast<int>(d);
  p.dp = plan.dp;
  p.bm = plan.bm;
  p.bn = plan.bn;
  p.ldx = plan.dp + static_cast<int>(16 / tile_elem);
  p.ldp = plan.bn + static_cast<int>(16 / tile_elem);
  p.lds = plan.bn + 4;
  p.inv_t = static_cast<float>(1.0 / temperature);
}

InfoNCEOut info_nce_cuda(const Tensor& queries_in, const Tensor& keys_in,
                         const Tensor& targets_in, double temperature, bool exclude_self,
                         bool compute_grad_queries, bool allow_tf32) {
  check_info_nce_args(queries_in, keys_in, targets_in, temperature, exclude_self);
  const auto dtype = queries_in.scalar_type();
  check_cuda_dtype(dtype, "info_nce");
  const int device = queries_in.get_device_index();
  const DeviceGuard device_guard(device);

  const Tensor q = ensure_contiguous(queries_in), k = ensure_contiguous(keys_in);
  const Tensor targets = ensure_contiguous(targets_in);
  const int64_t n = q.size(0), d = q.size(1), kk = k.size(0);
  const Math math = select_math(dtype, allow_tf32, device, "info_nce");
  const size_t tile_elem = math == Math::kFFMA ? sizeof(float) : q.element_size();
  const TilePlan plan = plan_tiles(d, tile_elem, device, "info_nce", "queries");

  ForwardParams p{};
  p.nterms = 1;
  TermDesc& keys = p.term[0] = plain_columns(k, exclude_self);
  keys.assign = targets.const_data_ptr<int64_t>();  // the target column stays out of the tiles
  const int64_t row_blocks = (n + plan.bm - 1) / plan.bm;
  p.chunk_cols = chunk_width(kk, row_blocks);
  keys.nchunks = static_cast<int>((kk + p.chunk_cols - 1) / p.chunk_cols);
  const int nchunks = keys.nchunks;
  PCL_INTERNAL_ASSERT(nchunks <= 12 * 1024, "info_nce: unexpected chunk count ", nchunks);

  const Tensor ws = torch::stable::new_empty(q, {nchunks * n * (d + 2)}, ScalarType::Float);
  Tensor losses = torch::stable::new_empty(q, {n}, ScalarType::Float);
  Tensor lse = torch::stable::new_empty(q, {n}, ScalarType::Float);
  Tensor grad_q = compute_grad_queries ? torch::stable::new_empty(q, {n, d})
                                       : torch::stable::new_empty(q, std::vector<int64_t>{0});
  Tensor correct = torch::stable::new_empty(q, {n}, ScalarType::Bool);
  set_tiles(p, plan, d, tile_elem, temperature);
  p.q = q.const_data_ptr();
  p.n = n;
  p.ws_acc = ws.mutable_data_ptr<float>();
  p.ws_ml = p.ws_acc + nchunks * n * d;
  p.targets = targets.const_data_ptr<int64_t>();
  p.losses = losses.mutable_data_ptr<float>();
  p.lse = lse.mutable_data_ptr<float>();
  p.grad_q = compute_grad_queries ? grad_q.mutable_data_ptr() : nullptr;
  p.correct = correct.mutable_data_ptr<bool>();
  p.hit_tol = static_cast<float>(hit_tolerance(input_roundoff(math), acc_roundoff(math), d));
  pick<Forward>(dtype, math)(p, plan.na, plan.smem, row_blocks, nchunks, current_cuda_stream(q));
  return {losses, lse, grad_q, correct};
}

Tensor info_nce_backward_cuda(const Tensor& grad_losses_in, const Tensor& queries_in,
                              const Tensor& keys_in, const Tensor& targets_in,
                              const Tensor& lse_in, double temperature, bool exclude_self,
                              bool allow_tf32) {
  check_info_nce_backward_args(grad_losses_in, queries_in, keys_in, targets_in, lse_in,
                               temperature, exclude_self);
  const auto dtype = queries_in.scalar_type();
  check_cuda_dtype(dtype, "info_nce_backward");
  const int device = queries_in.get_device_index();
  const DeviceGuard device_guard(device);

  const Tensor q = ensure_contiguous(queries_in), k = ensure_contiguous(keys_in);
  const Tensor targets = ensure_contiguous(targets_in), grad = ensure_contiguous(grad_losses_in);
  const Tensor lse = ensure_contiguous(lse_in);
  const int64_t n = q.size(0), d = q.size(1), kk = k.size(0);
  const Math math = select_math(dtype, allow_tf32, device, "info_nce_backward");
  const size_t tile_elem = math == Math::kFFMA ? sizeof(float) : q.element_size();
  const TilePlan plan =
      plan_tiles(d, tile_elem, device, "info_nce_backward", "queries", kBackwardBytesPerCol);

  BackwardParams p{};
  p.nterms = 1;
  p.term[0] = plain_columns(q, exclude_self);
  const int64_t row_blocks = (kk + plan.bm - 1) / plan.bm;
  p.chunk_cols = chunk_width(n, row_blocks);
  const int nchunks = static_cast<int>((n + p.chunk_cols - 1) / p.chunk_cols);
  p.term[0].nchunks = nchunks;
  PCL_INTERNAL_ASSERT(nchunks <= 12 * 1024, "info_nce_backward: unexpected chunk count ", nchunks);

  const Tensor ws = torch::stable::new_empty(k, {nchunks * kk * d}, ScalarType::Float);
  Tensor dk = torch::stable::new_empty(k, {kk, d});
  set_tiles(p, plan, d, tile_elem, temperature);
  p.q = k.const_data_ptr();
  p.n = kk;
  p.ws_acc = ws.mutable_data_ptr<float>();
  p.grad = grad.const_data_ptr<float>();
  p.lse = lse.const_data_ptr<float>();
  p.targets = targets.const_data_ptr<int64_t>();
  pick<Backward>(dtype, math)(p, plan.na, plan.smem, row_blocks, nchunks, dk.mutable_data_ptr(),
                              current_cuda_stream(k));
  return dk;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pcl_ext, CUDA, m) {
  m.impl("info_nce", TORCH_BOX(&info_nce_cuda));
  m.impl("info_nce_backward", TORCH_BOX(&info_nce_backward_cuda));
}

}  // namespace pcl_ext
