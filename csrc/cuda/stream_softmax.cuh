// The streaming softmax core of the fused CUDA losses (proto_nce.cu, info_nce.cu).
//
// Rows (queries) against streamed column tiles through two block-level GEMMs on the same warp
// layout: S = A B^T (tile_scores), then acc += P B (tile_accumulate), with mma.sync tensor cores
// for fp16, bf16 and TF32-allowed float32 from sm_80 on, FFMA in the same tile layout for IEEE
// float32 (or 3xTF32 on request) and for every dtype before sm_80. stream_softmax.cu holds the
// Flash-Decoding forward kernel built on them (row block x column chunk, online max/sum,
// per-chunk (m, l, acc) left in a float32 workspace for the caller's deterministic merge);
// info_nce.cu's key-gradient pass uses the tile GEMMs directly. Host helpers choose the math
// (select_math), the tiles (plan_tiles) and the chunk width (chunk_width) the same way for all.
#pragma once

#include "../torch_stable.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <type_traits>

namespace pcl_ext {
namespace stream {

constexpr int kThreads = 256;  // 8 warps per block of the main kernel
constexpr int kWarps = kThreads / 32;
constexpr int kCombineThreads = 128;
constexpr int kMaxTerms = 32;        // the term table travels in the kernel parameters (< 4 KB)
constexpr int64_t kChunkQuantum = 64;
constexpr int64_t kMinChunk = 256;   // smaller chunks cost more workspace than they gain
constexpr double kTargetBlocks = 512;  // ~2 waves of 2 blocks on each of an H100's 132 SMs
constexpr size_t kTwoBlocksSmem = 110 * 1024;

enum class Math { kFFMA, kTF32, k3xTF32, kHalf };

struct TermDesc {
  const void* src;        // [rows, D] contiguous, the input dtype
  const int64_t* ids;     // column -> row of src (sampled mode); nullptr: column j is row j
  const float* phi;       // [rows]; nullptr: every column is scaled by inv_t (instance term)
  const int64_t* assign;  // [N] target rows; nullptr: the target is k_i (instance term)
  int64_t rows, cols;
  int chunk0, nchunks;    // this term's chunks are [chunk0, chunk0 + nchunks)
  float coef;             // term weight / N
  bool vec;               // rows are 16-byte aligned: tiles load with cp.async
  bool exclude_self;      // row i also skips column i (info_nce; columns are the rows of src)
};

// What the chunk kernel reads: rows q [n, d] against the columns of the terms. The losses
// extend it with what their combine kernels read.
struct StreamParams {
  const void* q;
  float* ws_acc;    // [chunks, N, D]
  float* ws_ml;     // [chunks, N, 2]: running max, running sum
  int64_t n, chunk_cols;
  int d, dp, bm, bn, ldx, ldp, lds, nterms;
  float inv_t;
  TermDesc term[kMaxTerms];
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else return x;
}

// mma.sync with bf16/tf32 and cp.async need sm_80. Older targets in the build list (sm_70,
// sm_75) compile only the FFMA kernels (compiled_here), which issue neither: the tensor-core
// operands below exist from sm_80 on, and the cp.async helpers, which the FFMA kernels name in
// branches they discard there, compile to a trap. PCL_EXT_ASM touches memory (kept in order
// with the barriers).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define PCL_EXT_SM80 0
#define PCL_EXT_ASM(...) __trap()
#else
#define PCL_EXT_SM80 1
#define PCL_EXT_ASM(...) asm volatile(__VA_ARGS__)
#endif

// The host launches tensor cores (kTF32, kHalf) from compute capability 8.0 on and FFMA below,
// for every dtype, and FFMA on sm_80+ for float32 only (select_math): each target
// compiles those kernels and a trap for the others.
template <typename T, Math M>
__device__ constexpr bool compiled_here() {
  return PCL_EXT_SM80 ? M != Math::kFFMA || std::is_same_v<T, float> : M == Math::kFFMA;
}

// Shared-memory tiles hold what the GEMMs read: the input dtype on tensor cores, float32 for
// FFMA (half inputs convert as they load, so they load with plain instructions, not cp.async).
template <typename T, Math M>
using TileT = std::conditional_t<M == Math::kFFMA, float, T>;
template <typename T, typename S>
constexpr bool kAsyncLoads = std::is_same_v<T, S> && PCL_EXT_SM80;

[[maybe_unused]] __device__ __forceinline__ void cp_async16(void* dst, const void* src,
                                                              int src_bytes) {
  // src_bytes = 0 zero-fills: padding columns and bad ids must read as 0, never garbage.
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  PCL_EXT_ASM("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src),
              "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  PCL_EXT_ASM("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  PCL_EXT_ASM("cp.async.wait_all;\n" ::: "memory");
}

// Warp-level 16x8 tiles in the C layout of mma.sync (g = lane / 4, t = lane % 4 owns rows g and
// g + 8, columns 2t and 2t + 1). Operands come from shared memory: A row-major (A[r][k] at
// s[r * ld + k]); B either k-contiguous (B[k][n] at s[n * ld + k]) or n-contiguous (s[k * ld + n]).
template <typename T, Math M>
struct Mma;

#if PCL_EXT_SM80
#define PCL_EXT_MMA(shape_types, c, a, b)                                                       \
  asm("mma.sync.aligned." shape_types " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n" \
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                          \
      : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]))

template <typename T>  // __half / __nv_bfloat16: m16n8k16
struct Mma<T, Math::kHalf> {
  static constexpr int kK = 16;
  struct A { uint32_t r[4]; };
  struct B { uint32_t r[2]; };
  static __device__ __forceinline__ uint32_t ld32(const T* p) {
    return *reinterpret_cast<const uint32_t*>(p);
  }
  static __device__ __forceinline__ A load_a(const T* s, int ld, int g, int t) {
    const T* p = s + g * ld + 2 * t;
    return {{ld32(p), ld32(p + 8 * ld), ld32(p + 8), ld32(p + 8 * ld + 8)}};
  }
  static __device__ __forceinline__ B load_b_kc(const T* s, int ld, int g, int t) {
    const T* p = s + g * ld + 2 * t;
    return {{ld32(p), ld32(p + 8)}};
  }
  // n-contiguous B is k-major in shared memory: ldmatrix.trans hands each lane the (k, k + 1)
  // pairs of its column. Lanes 0-7 and 8-15 address rows k0..k0+7 and k0+8..k0+15.
  static __device__ __forceinline__ B load_b_nc(const T* s, int ld, int g, int t) {
    B b{};
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(s + ((g * 4 + t) & 15) * ld));
    PCL_EXT_ASM("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                : "=r"(b.r[0]), "=r"(b.r[1]) : "r"(a));
    return b;
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const A& a, const B& b) {
    if constexpr (std::is_same_v<T, __half>) PCL_EXT_MMA("m16n8k16.row.col.f32.f16.f16.f32", c, a, b);
    else PCL_EXT_MMA("m16n8k16.row.col.f32.bf16.bf16.f32", c, a, b);
  }
};

template <>  // float on TF32 tensor cores: m16n8k8, operands rounded to nearest on load
struct Mma<float, Math::kTF32> {
  static constexpr int kK = 8;
  template <int N>
  struct Frag { uint32_t r[N]; };
  using A = Frag<4>;
  using B = Frag<2>;
  static __device__ __forceinline__ uint32_t tf32(float x) {
    uint32_t r = 0;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
  }
  // Each fragment's elements in float32, where mma.sync's layout takes them from; the loaders
  // round them to TF32, Mma<float, Math::k3xTF32> splits them into two TF32 terms.
  static __device__ __forceinline__ void a_elems(float (&v)[4], const float* s, int ld, int g,
                                                 int t) {
    const float* p = s + g * ld + t;
    v[0] = p[0], v[1] = p[8 * ld], v[2] = p[4], v[3] = p[8 * ld + 4];
  }
  static __device__ __forceinline__ void b_kc_elems(float (&v)[2], const float* s, int ld, int g,
                                                    int t) {
    const float* p = s + g * ld + t;
    v[0] = p[0], v[1] = p[4];
  }
  static __device__ __forceinline__ void b_nc_elems(float (&v)[2], const float* s, int ld, int g,
                                                    int t) {
    const float* p = s + t * ld + g;
    v[0] = p[0], v[1] = p[4 * ld];
  }
  template <int N>
  static __device__ __forceinline__ Frag<N> round(const float (&v)[N]) {
    Frag<N> f;
#pragma unroll
    for (int i = 0; i < N; ++i) f.r[i] = tf32(v[i]);
    return f;
  }
  static __device__ __forceinline__ A load_a(const float* s, int ld, int g, int t) {
    float v[4];
    a_elems(v, s, ld, g, t);
    return round(v);
  }
  static __device__ __forceinline__ B load_b_kc(const float* s, int ld, int g, int t) {
    float v[2];
    b_kc_elems(v, s, ld, g, t);
    return round(v);
  }
  static __device__ __forceinline__ B load_b_nc(const float* s, int ld, int g, int t) {
    float v[2];
    b_nc_elems(v, s, ld, g, t);
    return round(v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const A& a, const B& b) {
    PCL_EXT_MMA("m16n8k8.row.col.f32.tf32.tf32.f32", c, a, b);
  }
};

// float32 accuracy from TF32 tensor cores (3xTF32, as CUTLASS's fast-float32 GEMMs): each
// operand is big + small, two TF32 numbers (x - big - small is within 2^-22 |x|), and a b is
// a_small b_big + a_big b_small + a_big b_big (the dropped a_small b_small is ~2^-22 |a b|),
// the small products first so that they are not lost against the big one.
template <>
struct Mma<float, Math::k3xTF32> {
  using TF32 = Mma<float, Math::kTF32>;
  static constexpr int kK = 8;
  template <int N>
  struct Frag { TF32::Frag<N> big, small; };
  using A = Frag<4>;
  using B = Frag<2>;
  template <int N>
  static __device__ __forceinline__ Frag<N> split(const float (&v)[N]) {
    Frag<N> f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      f.big.r[i] = TF32::tf32(v[i]);
      f.small.r[i] = TF32::tf32(v[i] - __uint_as_float(f.big.r[i]));
    }
    return f;
  }
  static __device__ __forceinline__ A load_a(const float* s, int ld, int g, int t) {
    float v[4];
    TF32::a_elems(v, s, ld, g, t);
    return split(v);
  }
  static __device__ __forceinline__ B load_b_kc(const float* s, int ld, int g, int t) {
    float v[2];
    TF32::b_kc_elems(v, s, ld, g, t);
    return split(v);
  }
  static __device__ __forceinline__ B load_b_nc(const float* s, int ld, int g, int t) {
    float v[2];
    TF32::b_nc_elems(v, s, ld, g, t);
    return split(v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const A& a, const B& b) {
    TF32::mma(c, a.small, b.big);
    TF32::mma(c, a.big, b.small);
    TF32::mma(c, a.big, b.big);
  }
};

#endif  // PCL_EXT_SM80

template <>  // float in IEEE FP32 (TF32 not allowed): the same tiles and C layout, FFMA inside
struct Mma<float, Math::kFFMA> {
  static constexpr int kK = 8;
  struct A { float lo[8], hi[8]; };  // rows g and g + 8, k = 0..7
  struct B { float c0[8], c1[8]; };  // columns 2t and 2t + 1, k = 0..7
  static __device__ __forceinline__ void ld8(float (&v)[8], const float* p) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
  static __device__ __forceinline__ A load_a(const float* s, int ld, int g, int) {
    A a;
    ld8(a.lo, s + g * ld);
    ld8(a.hi, s + (g + 8) * ld);
    return a;
  }
  static __device__ __forceinline__ B load_b_kc(const float* s, int ld, int, int t) {
    B b;
    ld8(b.c0, s + 2 * t * ld);
    ld8(b.c1, s + (2 * t + 1) * ld);
    return b;
  }
  static __device__ __forceinline__ B load_b_nc(const float* s, int ld, int, int t) {
    B b;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float2 v = *reinterpret_cast<const float2*>(s + k * ld + 2 * t);
      b.c0[k] = v.x;
      b.c1[k] = v.y;
    }
    return b;
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const A& a, const B& b) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      c[0] = fmaf(a.lo[k], b.c0[k], c[0]);
      c[1] = fmaf(a.lo[k], b.c1[k], c[1]);
      c[2] = fmaf(a.hi[k], b.c0[k], c[2]);
      c[3] = fmaf(a.hi[k], b.c1[k], c[3]);
    }
  }
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Row of src that column `col` reads, or -1 for an id outside [0, rows) (never dereferenced).
__device__ __forceinline__ int64_t column_row(const TermDesc& td, int64_t col) {
  const int64_t r = td.ids != nullptr ? td.ids[col] : col;
  return r >= 0 && r < td.rows ? r : -1;
}

// Columns [c0, c0 + tc) of a term (dtype T) into a [bn, ldx] tile of S (rows >= tc and
// elements >= d are 0) and their scales into sscale (0 past tc; NaN for a bad id, so that its
// row turns NaN).
template <typename T, typename S>
__device__ void load_columns(S* sx, float* sscale, const TermDesc& td, const StreamParams& p,
                             int64_t c0, int tc) {
  const T* src = static_cast<const T*>(td.src);
  if (td.vec) {
    constexpr int kPer = 16 / sizeof(T);
    const int per_row = p.dp / kPer;
    for (int idx = threadIdx.x; idx < p.bn * per_row; idx += kThreads) {
      const int j = idx / per_row, e0 = (idx - j * per_row) * kPer;
      const int64_t row = j < tc ? column_row(td, c0 + j) : -1;
      const bool ok = row >= 0 && e0 < p.d;  // d * sizeof(T) % 16 == 0: all 16 bytes or none
      if constexpr (kAsyncLoads<T, S>) {
        cp_async16(sx + j * p.ldx + e0, ok ? src + row * p.d + e0 : src, ok ? 16 : 0);
      } else {  // the same 16 bytes through registers, converted to the tile type
        uint4 v = make_uint4(0, 0, 0, 0);
        if (ok) v = *reinterpret_cast<const uint4*>(src + row * p.d + e0);
        const T* vt = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int e = 0; e < kPer; ++e) sx[j * p.ldx + e0 + e] = from_f<S>(to_f(vt[e]));
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < p.bn * p.dp; idx += kThreads) {
      const int j = idx / p.dp, e = idx - j * p.dp;
      const int64_t row = j < tc ? column_row(td, c0 + j) : -1;
      sx[j * p.ldx + e] = from_f<S>(row >= 0 && e < p.d ? to_f(src[row * p.d + e]) : 0.0f);
    }
  }
  for (int j = threadIdx.x; j < p.bn; j += kThreads) {
    float s = 0.0f;
    if (j < tc) {
      const int64_t row = column_row(td, c0 + j);
      s = row < 0 ? __int_as_float(0x7fc00000) : td.phi != nullptr ? 1.0f / td.phi[row] : p.inv_t;
    }
    sscale[j] = s;
  }
}


// Rows [row0, row0 + bm) of src [rows, d] (dtype T) into a [bm, ldx] tile of S, zeros past the
// last row and past d.
template <typename T, typename S>
__device__ void load_rows(S* sq, const void* src_v, int64_t row0, int64_t rows,
                          const StreamParams& p) {
  const T* src = static_cast<const T*>(src_v);
  for (int idx = threadIdx.x; idx < p.bm * p.dp; idx += kThreads) {
    const int r = idx / p.dp, e = idx - r * p.dp;
    sq[r * p.ldx + e] =
        from_f<S>(row0 + r < rows && e < p.d ? to_f(src[(row0 + r) * p.d + e]) : 0.0f);
  }
}

// This warp's share of a block's tiles: warp w owns the 16-row slice w % (bm / 16) and every
// wpn-th 8-column tile from wn on, wpn = kWarps / (bm / 16); lane = 4 g + t4 in the C layout of
// mma.sync.
struct WarpTile {
  int slice, wn, wpn, g, t4;
};

__device__ __forceinline__ WarpTile warp_tile(int bm) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slices = bm / 16;
  return {warp % slices, warp / slices, kWarps / slices, lane / 4, lane % 4};
}

// ss [bm, bn] (row stride lds, float) = A B^T for A = sa [bm, dp] and B = sb [bn, dp], both with
// row stride ld and zeros past d. bn <= 32 wpn: at most 4 tiles of 8 columns per warp.
template <typename S, Math M>
__device__ __forceinline__ void tile_scores(float* ss, int lds, const S* sa, const S* sb, int ld,
                                            int dp, int bn, const WarpTile& w) {
  using Op = Mma<S, M>;
  float s[4][4] = {};
  for (int k0 = 0; k0 < dp; k0 += Op::kK) {
    const auto a = Op::load_a(sa + w.slice * 16 * ld + k0, ld, w.g, w.t4);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int nt = w.wn + w.wpn * i;
      if (nt < bn / 8) Op::mma(s[i], a, Op::load_b_kc(sb + nt * 8 * ld + k0, ld, w.g, w.t4));
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int nt = w.wn + w.wpn * i;
    if (nt < bn / 8) {
      float* o = ss + (w.slice * 16 + w.g) * lds + nt * 8 + 2 * w.t4;
      *reinterpret_cast<float2*>(o) = make_float2(s[i][0], s[i][1]);
      *reinterpret_cast<float2*>(o + 8 * lds) = make_float2(s[i][2], s[i][3]);
    }
  }
}

// acc += A B for A = sa [bm, bn] (row stride lda) and B = sb [bn, dp] (row stride ldb): this
// warp's 8-column tiles of acc, na of the NA live.
template <typename S, Math M, int NA>
__device__ __forceinline__ void tile_accumulate(float (&acc)[NA][4], const S* sa, int lda,
                                                const S* sb, int ldb, int bn, int na,
                                                const WarpTile& w) {
  using Op = Mma<S, M>;
  for (int k0 = 0; k0 < bn; k0 += Op::kK) {
    const auto a = Op::load_a(sa + w.slice * 16 * lda + k0, lda, w.g, w.t4);
#pragma unroll
    for (int f = 0; f < NA; ++f) {
      if (f < na) {
        const int n0 = (w.wn + w.wpn * f) * 8;
        Op::mma(acc[f], a, Op::load_b_nc(sb + k0 * ldb + n0, ldb, w.g, w.t4));
      }
    }
  }
}

// out[r * d + c] = scale * acc for the block's rows r < rows_left and columns c < d (out: the
// block's first row).
template <int NA>
__device__ __forceinline__ void store_acc(float* out, const float (&acc)[NA][4], float scale,
                                          int64_t rows_left, int na, int d, const WarpTile& w) {
#pragma unroll
  for (int f = 0; f < NA; ++f) {
    const int col = (w.wn + w.wpn * f) * 8 + 2 * w.t4;
    if (f >= na || col >= d) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = w.slice * 16 + w.g + 8 * h;
      if (r >= rows_left) continue;
      float* o = out + int64_t(r) * d + col;
      o[0] = acc[f][2 * h] * scale;
      if (col + 1 < d) o[1] = acc[f][2 * h + 1] * scale;
    }
  }
}

// ------------------------------------------------------------------------------------ host
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The dynamic shared memory of a block: the row tile, two column tiles, P, the float32 logits,
// two buffers of column scales, one float per row, and extra_per_col bytes per column.
inline size_t smem_bytes(int bm, int bn, int dp, size_t elem, size_t extra_per_col = 0) {
  const int pad = int(16 / elem);  // 16-byte row padding: keeps cp.async alignment, skews banks
  return elem * (size_t(bm) * (dp + pad) + 2 * size_t(bn) * (dp + pad) + size_t(bm) * (bn + pad)) +
         4 * (size_t(bm) * (bn + 4) + 2 * size_t(bn) + size_t(bm)) + extra_per_col * size_t(bn);
}

// Tensor cores from compute capability 8.0 on, FFMA in float32 otherwise; the device code
// compiles exactly these pairs (compiled_here). float32 takes TF32 where torch's own float32
// matmuls may (`allow_tf32`: the Python wrappers read the resolved precision setting, which
// the stable ABI cannot), else FFMA or, on request, 3xTF32: float32 accuracy from tensor
// cores, an option until a GPU measures its speed against FFMA.
inline Math select_math(ScalarType dtype, bool allow_tf32, int device, const char* op) {
  const char* f32_math = std::getenv("PCL_EXT_FLOAT32_MATH");
  const std::string_view f32_mode = f32_math != nullptr ? f32_math : "";
  PCL_CHECK_VALUE(f32_mode.empty() || f32_mode == "ffma" || f32_mode == "3xtf32",
                  op, ": the environment variable PCL_EXT_FLOAT32_MATH must be unset, "
                  "\"ffma\" or \"3xtf32\", got \"", f32_mode, "\"");
  return cuda_device_attribute(cudaDevAttrComputeCapabilityMajor, device) < 8
             ? Math::kFFMA
         : dtype != ScalarType::Float ? Math::kHalf
         : allow_tf32                 ? Math::kTF32
         : f32_mode == "3xtf32"       ? Math::k3xTF32
                                      : Math::kFFMA;
}

// The unit roundoffs of `correct`'s tolerance (hit_tolerance): TF32 rounds the tiles' inputs to
// 10 stored mantissa bits, 3xTF32 leaves 2^-22 of each and drops a product as small (fp16/bf16
// products are exact); tensor cores' adders may truncate: twice float32's unit roundoff.
inline double input_roundoff(Math math) {
  return math == Math::kTF32 ? 0x1p-11 : math == Math::k3xTF32 ? 0x1p-21 : 0.0;
}
inline double acc_roundoff(Math math) { return math == Math::kFFMA ? 0x1p-24 : 0x1p-23; }

struct TilePlan {
  int bm, bn, dp, na;
  size_t smem;
};

// Tiles: the largest row block whose accumulator fits 8 (else 16) 8-column tiles per warp and
// whose tiles fit in shared memory, with the widest column tile that leaves room for two
// blocks per SM (else one). Smaller row blocks need less: they serve D = 256 in float32 on a
// T4's 64 KB. `arg`: the argument whose D the messages name.
inline TilePlan plan_tiles(int64_t d, size_t tile_elem, int device, const char* op,
                           const char* arg, size_t extra_per_col = 0) {
  const auto smem_limit = static_cast<size_t>(
      cuda_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  int bm = 0, bn = 0, dp = 0, na = 0;
  bool fits_registers = false;
  for (int cand : {64, 32, 16}) {
    const int wpn = kWarps / (cand / 16);
    const int cdp = int(round_up(d, 8 * wpn));
    const int cna = cdp / (8 * wpn);
    if (cna > (cand == 16 ? 16 : 8)) continue;
    fits_registers = true;
    for (size_t budget : {std::min(kTwoBlocksSmem, smem_limit), smem_limit}) {
      for (int cbn : {64, 32, 16}) {
        if (bn == 0 && smem_bytes(cand, cbn, cdp, tile_elem, extra_per_col) <= budget) bn = cbn;
      }
    }
    if (bn > 0) {
      bm = cand, dp = cdp, na = cna;
      break;
    }
  }
  PCL_CHECK_VALUE(fits_registers, op, ": the CUDA kernel supports embedding dimensions "
                  "up to 1024, `", arg, "` has D = ", d);
  PCL_CHECK_VALUE(bm > 0, op, ": `", arg, "` has D = ", d, ", too large for the shared memory "
                  "of this GPU (", smem_limit, " bytes per block)");
  return {bm, bn, dp, na, smem_bytes(bm, bn, dp, tile_elem, extra_per_col)};
}

// Columns per chunk: a fixed function of the shapes, aiming at ~kTargetBlocks blocks in all.
// It bounds the chunk count by kTargetBlocks + (number of terms).
inline int64_t chunk_width(int64_t total_cols, int64_t row_blocks) {
  const auto cols = static_cast<int64_t>(std::ceil(static_cast<double>(total_cols) *
                                                   static_cast<double>(row_blocks) / kTargetBlocks));
  return round_up(std::max(cols, kMinChunk), kChunkQuantum);
}

// The forward pass of stream_softmax.cu: grid (row blocks, chunks) over p, each block leaving
// its chunk's (m, l) and acc * (largest column scale) in the workspace. Instantiated there for
// every (T, M) that select_math returns.
template <typename T, Math M>
void launch_chunks(const StreamParams& p, int na, size_t smem, int64_t row_blocks, int nchunks,
                   cudaStream_t stream);

}  // namespace stream
}  // namespace pcl_ext
