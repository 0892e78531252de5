// The streaming softmax that the fused CPU losses (proto_nce, info_nce) are built from.
//
// A row's softmax over many columns is computed tile by tile without keeping the logits: per
// row, a running max m, a running sum l = sum_j exp(s_j - m) and an accumulator
// acc = sum_j exp(s_j - m) * scale_j x_j (the second GEMM of a tile, done by the caller).
// Each tile rescales (l, acc) by exp(m_old - m_new) when the max grows. The columns are split
// into chunks fixed by the shapes (never by the thread count, so the bits do not depend on
// it); each chunk keeps its own (m, l, acc), and the chunks of a row merge in a fixed order.
#pragma once

#include "../torch_stable.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace pcl_ext {
namespace stream {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The row loops below are where the exps are: compile them for AVX-512 and AVX2 as well,
// chosen at load time, so a portable build still runs at the machine's vector width.
#define PCL_EXT_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PCL_EXT_VECTOR_CLONES
#endif

// exp(x) for x <= 0-ish softmax arguments, branch-free so that the compiler vectorizes it:
// 2^n * p(r) with n = round(x / ln 2), |r| <= ln(2)/2 and a degree-6 minimax polynomial
// (relative error < 2e-7). Arguments below -87 give ~1e-38 instead of 0; NaN stays NaN.
inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : x;  // NaN passes through both
  x = x > 88.0f ? 88.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

// s[j] *= scale[j]; returns max_j s[j].
PCL_EXT_VECTOR_CLONES inline float scale_max_f32(float* __restrict s,
                                                  const float* __restrict scale, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) {
    const float v = s[j] * scale[j];
    s[j] = v;
    mx = v > mx ? v : mx;  // not std::max: GCC vectorizes the plain select, not the reference
  }
  return mx;
}

// s[j] <- exp(s[j] - shift) * scale[j]; returns sum_j exp(s[j] - shift).
PCL_EXT_VECTOR_CLONES inline float exp_sum_f32(float* __restrict s,
                                                const float* __restrict scale, int64_t n,
                                                float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_f32(s[j] - shift);
    sum += e;
    s[j] = e * scale[j];
  }
  return sum;
}

// s[j] <- exp(s[j] * mul - shift) * out: a softmax row whose log-sum-exp is already known.
PCL_EXT_VECTOR_CLONES inline void exp_affine_f32(float* __restrict s, int64_t n, float mul,
                                                  float shift, float out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = exp_f32(s[j] * mul - shift) * out;
}

// float64 is the gradcheck path: plain loops, libm exp.
inline double scale_max(double* s, const double* scale, int64_t n) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    s[j] *= scale[j];
    mx = std::max(mx, s[j]);
  }
  return mx;
}
inline double exp_sum(double* s, const double* scale, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double e = std::exp(s[j] - shift);
    sum += e;
    s[j] = e * scale[j];
  }
  return sum;
}
inline void exp_affine(double* s, int64_t n, double mul, double shift, double out) {
  for (int64_t j = 0; j < n; ++j) s[j] = std::exp(s[j] * mul - shift) * out;
}
inline float scale_max(float* s, const float* scale, int64_t n) {
  return scale_max_f32(s, scale, n);
}
inline float exp_sum(float* s, const float* scale, int64_t n, float shift) {
  return exp_sum_f32(s, scale, n, shift);
}
inline void exp_affine(float* s, int64_t n, float mul, float shift, float out) {
  exp_affine_f32(s, n, mul, shift, out);
}

// MKL blocks a product's inner dimension differently inside and outside a parallel region
// (measured with torch 2.14's MKL: beyond 256 the bits of a 1-thread and a 2-thread run
// differ). gemm() splits deeper products into calls of at most this depth, in a fixed order,
// so that the bits do not depend on the thread count.
constexpr int64_t kMaxGemmDepth = 256;

// A strided CPU matrix view: element (r, c) at data[r * rs + c * cs].
template <typename T>
struct Mat {
  const T* data;
  int64_t rs, cs;
  Mat transposed() const { return {data, cs, rs}; }
};

// c (m x n, row-major with row stride ldc) = a b, or += a b with `accumulate`; a is m x k,
// b is k x n. Summed over the inner dimension in pieces of kMaxGemmDepth, in order.
template <typename T>
void gemm(T* c, int64_t ldc, Mat<T> a, Mat<T> b, int64_t m, int64_t n, int64_t k,
          bool accumulate) {
  const Tensor out = cpu_matrix(c, m, n, ldc, 1);
  for (int64_t k0 = 0; k0 < k; k0 += kMaxGemmDepth) {
    const int64_t depth = std::min(kMaxGemmDepth, k - k0);
    const Tensor a_k = cpu_matrix(a.data + k0 * a.cs, m, depth, a.rs, a.cs);
    const Tensor b_k = cpu_matrix(b.data + k0 * b.rs, depth, n, b.rs, b.cs);
    if (accumulate || k0 > 0) {
      addmm_(out, a_k, b_k);
    } else {
      mm_out(out, a_k, b_k);
    }
  }
}

// Columns per tile for a block of `rows` rows: the rows x tile logit block stays in L2.
inline int64_t tile_columns(int64_t rows) {
  return std::clamp<int64_t>((int64_t{1} << 17) / rows / 16 * 16, 64, 1024);
}

// Columns per chunk when `total` columns are split into about `target` chunks of whole tiles.
inline int64_t chunk_columns(int64_t total, int64_t tile, int64_t target) {
  return std::max<int64_t>(tile, ((total + target - 1) / target + tile - 1) / tile * tile);
}

// One tile of the online softmax for `rows` rows: s (rows x tc, row stride tc) holds the raw
// logits q_i . x_j; afterwards it holds P = exp(s * scale - m_new) * scale, ready for the
// caller's acc += P X. m, l (per row) are updated and acc (rows x d, or nullptr when the caller
// accumulates nothing) rescaled. A row whose logits so far are all -inf (masked columns) keeps
// m = -inf, l = 0 and a zero row of P. `alpha` is scratch of `rows` elements.
template <typename T>
void softmax_tile(T* s, int64_t rows, int64_t tc, const T* scale, T* m, T* l, T* acc, int64_t d,
                  T* alpha) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  bool rescale = false;
  for (int64_t i = 0; i < rows; ++i) {
    T* row = s + i * tc;
    const T mx = std::max(m[i], scale_max(row, scale, tc));
    if (mx == kNegInf) {
      alpha[i] = T(1);
      std::fill(row, row + tc, T(0));
      continue;
    }
    alpha[i] = std::exp(m[i] - mx);  // 0 on the first tile (m = -inf)
    rescale |= alpha[i] != T(1);
    l[i] = l[i] * alpha[i] + exp_sum(row, scale, tc, mx);
    m[i] = mx;
  }
  if (rescale && acc != nullptr) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t c = 0; c < d; ++c) acc[i * d + c] *= alpha[i];
    }
  }
}

// Merges one row's partials from `count` chunks in chunk order, relative to `mx` (>= every
// m): returns sum_c l_c exp(m_c - mx) and, when acc is not nullptr, writes
// expect = sum_c acc_c exp(m_c - mx) (d elements). Chunk c's m and l are at m[c * stride],
// l[c * stride], its acc row at acc + c * acc_stride.
template <typename T>
T merge_chunks(const T* m, const T* l, int64_t stride, const T* acc, int64_t acc_stride,
               int64_t count, int64_t d, T mx, T* expect) {
  T sum = 0;
  if (acc != nullptr) std::fill(expect, expect + d, T(0));
  for (int64_t c = 0; c < count; ++c) {
    const T f = std::exp(m[c * stride] - mx);
    sum += l[c * stride] * f;
    if (acc == nullptr) continue;
    const T* a = acc + c * acc_stride;
    for (int64_t k = 0; k < d; ++k) expect[k] += a[k] * f;
  }
  return sum;
}

}  // namespace stream
}  // namespace pcl_ext
