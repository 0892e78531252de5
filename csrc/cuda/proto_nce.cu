// Fused ProtoNCE on CUDA: the loss and dL/dq, dL/dk in three launches, no N x K logits.
//
// Every term of the loss is a softmax cross-entropy of q_i against columns x_j with a per-column
// scale s_j (1/T for the queue, 1/phi for prototypes). Flash-Decoding split: the columns of all
// terms are cut into chunks whose bounds depend only on the shapes, and one launch over
// (row block x chunk) streams column tiles through two GEMMs (mma.sync tensor cores for fp16,
// bf16 and TF32-allowed float32 from sm_80 on; FFMA in the same tile layout for IEEE float32,
// or 3xTF32 tensor cores if PCL_EXT_FLOAT32_MATH=3xtf32; FFMA for every dtype before sm_80,
// half inputs converted to float32 as the tiles load),
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

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <type_traits>
#include <vector>

namespace pcl_ext {
namespace {

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
};

struct Params {
  const void* q;
  const void* k;
  void* dq;
  void* dk;
  float* ws_acc;    // [chunks, N, D]
  float* ws_ml;     // [chunks, N, 2]: running max, running sum
  float* row_loss;  // [N]
  bool* correct;    // [nterms, N]
  float hit_tol;    // `correct`'s tolerance per unit of s_t sum_c |q_c x_tc| (hit_tolerance)
  int64_t n, chunk_cols;
  int d, dp, bm, bn, ldx, ldp, lds, nterms;
  float inv_t;
  TermDesc term[kMaxTerms];
};
static_assert(sizeof(Params) <= 4000, "kernel parameters are limited to 4 KB");

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
// for every dtype, and FFMA on sm_80+ for float32 only (`math` in proto_nce_cuda): each target
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

// Row of src that column `col` reads, or -1 for an id outside [0, rows) (never dereferenced).
__device__ __forceinline__ int64_t column_row(const TermDesc& td, int64_t col) {
  const int64_t r = td.ids != nullptr ? td.ids[col] : col;
  return r >= 0 && r < td.rows ? r : -1;
}

// Columns [c0, c0 + tc) of a term (dtype T) into a [bn, ldx] tile of S (rows >= tc and
// elements >= d are 0) and their scales into sscale (0 past tc; NaN for a bad id, so that its
// row turns NaN).
template <typename T, typename S>
__device__ void load_columns(S* sx, float* sscale, const TermDesc& td, const Params& p,
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

// One block: rows [rb * bm, +bm) against one chunk of one term. Warp w owns the 16-row slice
// w % (bm / 16) and every (8 / (bm / 16))-th 8-column tile of S and of acc: NA bounds the acc
// tiles per warp at compile time (dp / (8 * warps per slice) of them are live).
template <typename T, Math M, int NA>
__device__ __forceinline__ void chunk_tiles(const Params& p) {
  using S = TileT<T, M>;
  using Op = Mma<S, M>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int bm = p.bm, bn = p.bn, ldx = p.ldx, ldp = p.ldp, lds = p.lds;
  S* sq = reinterpret_cast<S*>(smem);
  S* sx = sq + bm * ldx;        // two column-tile buffers: load tile i + 1 while computing tile i
  S* sp = sx + 2 * bn * ldx;    // P = exp(S * s - m) * s / s_max in the GEMM input type
  float* ss = reinterpret_cast<float*>(sp + bm * ldp);
  float* sscale = ss + bm * lds;  // two buffers, like sx
  float* salpha = sscale + 2 * bn;

  const int chunk = blockIdx.y;
  int ti = 0;
  for (int t = 1; t < p.nterms; ++t) ti = chunk >= p.term[t].chunk0 ? t : ti;
  const TermDesc& td = p.term[ti];
  const int64_t cbeg = int64_t(chunk - td.chunk0) * p.chunk_cols;
  const int64_t cend = std::min(td.cols, cbeg + p.chunk_cols);
  const int ntiles = int((cend - cbeg + bn - 1) / bn);
  const int64_t row0 = int64_t(blockIdx.x) * bm;

  load_columns<T>(sx, sscale, td, p, cbeg, int(std::min<int64_t>(bn, cend - cbeg)));
  if constexpr (kAsyncLoads<T, S>) cp_async_commit();
  const T* q = static_cast<const T*>(p.q);
  for (int idx = threadIdx.x; idx < bm * p.dp; idx += kThreads) {
    const int r = idx / p.dp, e = idx - r * p.dp;
    sq[r * ldx + e] =
        from_f<S>(row0 + r < p.n && e < p.d ? to_f(q[(row0 + r) * p.d + e]) : 0.0f);
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int slices = bm / 16, wpn = kWarps / slices;  // warps per 16-row slice
  const int slice = warp % slices, wn = warp / slices;
  const int na = p.dp / (8 * wpn);
  float acc[NA][4] = {};
  const int tpr = kThreads / bm;  // softmax: tpr consecutive lanes share one row
  const int srow = threadIdx.x / tpr, ssub = threadIdx.x % tpr;
  float m_run = -INFINITY, l_run = 0.0f;
  float s_run = 0.0f;  // largest scale so far: the same in every thread (all rows see all columns)
  // The row's own target column, left to the combine: column i in sampled mode, a_i in
  // all-prototype mode (an id outside [0, K) matches no column), none for the instance term.
  const int64_t grow = row0 + srow;
  const int64_t target_col = td.assign == nullptr || grow >= p.n ? -1
                             : td.ids != nullptr               ? grow
                                                               : td.assign[grow];

  for (int it = 0; it < ntiles; ++it) {
    const int buf = it & 1;
    const int64_t c0 = cbeg + int64_t(it) * bn;
    const int tc = int(std::min<int64_t>(bn, cend - c0));
    if constexpr (kAsyncLoads<T, S>) cp_async_wait_all();
    __syncthreads();  // tile `it` landed; every warp is done with tile it - 1 (and buffer buf^1)
    if (it + 1 < ntiles) {
      load_columns<T>(sx + (buf ^ 1) * bn * ldx, sscale + (buf ^ 1) * bn, td, p, c0 + bn,
                      int(std::min<int64_t>(bn, cend - c0 - bn)));
      if constexpr (kAsyncLoads<T, S>) cp_async_commit();
    }
    const S* xb = sx + buf * bn * ldx;
    const float* sc = sscale + buf * bn;

    {  // S = Q X^T over the padded D (zeros past d)
      float s[4][4] = {};
      for (int k0 = 0; k0 < p.dp; k0 += Op::kK) {
        const auto a = Op::load_a(sq + slice * 16 * ldx + k0, ldx, g, t4);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int nt = wn + wpn * i;
          if (nt < bn / 8) Op::mma(s[i], a, Op::load_b_kc(xb + nt * 8 * ldx + k0, ldx, g, t4));
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int nt = wn + wpn * i;
        if (nt < bn / 8) {
          float* o = ss + (slice * 16 + g) * lds + nt * 8 + 2 * t4;
          *reinterpret_cast<float2*>(o) = make_float2(s[i][0], s[i][1]);
          *reinterpret_cast<float2*>(o + 8 * lds) = make_float2(s[i][2], s[i][3]);
        }
      }
    }
    __syncthreads();

    {  // online softmax of the tile's logits, one row per tpr lanes
      const float* srow_s = ss + srow * lds;
      const int64_t skip = target_col - c0;
      // fmaxf skips NaN: a bad column poisons the row through its exp, not through the max.
      float mx = -INFINITY, smax = 0.0f;
      for (int c = ssub; c < tc; c += tpr) {
        if (c != skip) mx = fmaxf(mx, srow_s[c] * sc[c]);
        smax = fmaxf(smax, sc[c]);
      }
      for (int o = tpr / 2; o > 0; o /= 2) {
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, o));
      }
      const float m_new = fmaxf(m_run, mx), s_new = fmaxf(s_run, smax);
      // 0 on the first tile; 1 while every column so far was the target (m still -inf)
      const float alpha = m_new == m_run ? 1.0f : expf(m_run - m_new);
      const float inv_s = 1.0f / s_new;
      float sum = 0.0f;
      for (int c = ssub; c < bn; c += tpr) {
        float pv = 0.0f;
        if (c < tc && c != skip) {
          const float e = expf(srow_s[c] * sc[c] - m_new);
          sum += e;
          pv = e * (sc[c] * inv_s);  // <= 1: representable in every GEMM input type
        }
        sp[srow * ldp + c] = from_f<S>(pv);
      }
      for (int o = tpr / 2; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      l_run = l_run * alpha + sum;
      m_run = m_new;
      // acc was scaled by 1/s_run: move it to the new max and scale (s_run = 0 on the first tile,
      // where acc is still 0).
      if (ssub == 0) salpha[srow] = alpha * (s_run * inv_s);
      s_run = s_new;
    }
    __syncthreads();

    {  // acc = acc * alpha + P X
      const float a_lo = salpha[slice * 16 + g], a_hi = salpha[slice * 16 + g + 8];
#pragma unroll
      for (int f = 0; f < NA; ++f) {
        acc[f][0] *= a_lo; acc[f][1] *= a_lo; acc[f][2] *= a_hi; acc[f][3] *= a_hi;
      }
      for (int k0 = 0; k0 < bn; k0 += Op::kK) {
        const auto a = Op::load_a(sp + slice * 16 * ldp + k0, ldp, g, t4);
#pragma unroll
        for (int f = 0; f < NA; ++f) {
          if (f < na) {
            const int n0 = (wn + wpn * f) * 8;
            Op::mma(acc[f], a, Op::load_b_nc(xb + k0 * ldx + n0, ldx, g, t4));
          }
        }
      }
    }
  }

  const int64_t ws_row = int64_t(chunk) * p.n + row0;
  if (ssub == 0 && row0 + srow < p.n) {
    p.ws_ml[(ws_row + srow) * 2] = m_run;
    p.ws_ml[(ws_row + srow) * 2 + 1] = l_run;
  }
#pragma unroll
  for (int f = 0; f < NA; ++f) {
    const int col = (wn + wpn * f) * 8 + 2 * t4;
    if (f >= na || col >= p.d) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = slice * 16 + g + 8 * h;
      if (row0 + r >= p.n) continue;
      float* o = p.ws_acc + (ws_row + r) * p.d + col;
      o[0] = acc[f][2 * h] * s_run;  // float32 from here on: the scale back in full
      if (col + 1 < p.d) o[1] = acc[f][2 * h + 1] * s_run;
    }
  }
}

template <typename T, Math M, int NA>
__global__ void __launch_bounds__(kThreads, NA <= 8 ? 2 : 1)
    proto_nce_chunk_kernel(const __grid_constant__ Params p) {
  if constexpr (compiled_here<T, M>()) chunk_tiles<T, M, NA>(p);
  else __trap();
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

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

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

size_t smem_bytes(int bm, int bn, int dp, size_t elem) {
  const int pad = int(16 / elem);  // 16-byte row padding: keeps cp.async alignment, skews banks
  return elem * (size_t(bm) * (dp + pad) + 2 * size_t(bn) * (dp + pad) + size_t(bm) * (bn + pad)) +
         4 * (size_t(bm) * (bn + 4) + 2 * size_t(bn) + size_t(bm));
}

template <typename T, Math M>
void launch(const Params& p, int na, size_t smem, int64_t row_blocks, int nchunks, void* loss,
            cudaStream_t stream) {
  auto kernel = na <= 8 ? proto_nce_chunk_kernel<T, M, 8> : proto_nce_chunk_kernel<T, M, 16>;
  STD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  kernel<<<dim3(static_cast<unsigned>(row_blocks), nchunks), kThreads, smem, stream>>>(p);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
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

  // Tensor cores from compute capability 8.0 on, FFMA in float32 otherwise; the device code
  // compiles exactly these pairs (compiled_here). float32 takes TF32 where torch's own float32
  // matmuls may (`allow_tf32`: pcl_ext.proto_nce reads the resolved precision setting, which
  // the stable ABI cannot), else FFMA or, on request, 3xTF32: float32 accuracy from tensor
  // cores, an option until a GPU measures its speed against FFMA.
  const char* f32_math = std::getenv("PCL_EXT_FLOAT32_MATH");
  const std::string_view f32_mode = f32_math != nullptr ? f32_math : "";
  PCL_CHECK_VALUE(f32_mode.empty() || f32_mode == "ffma" || f32_mode == "3xtf32",
                  "proto_nce: the environment variable PCL_EXT_FLOAT32_MATH must be unset, "
                  "\"ffma\" or \"3xtf32\", got \"", f32_mode, "\"");
  const Math math = cuda_device_attribute(cudaDevAttrComputeCapabilityMajor, device) < 8
                        ? Math::kFFMA
                    : dtype != ScalarType::Float ? Math::kHalf
                    : allow_tf32                 ? Math::kTF32
                    : f32_mode == "3xtf32"       ? Math::k3xTF32
                                                 : Math::kFFMA;
  const size_t tile_elem = math == Math::kFFMA ? sizeof(float) : elem;

  // Tiles: the largest row block whose accumulator fits 8 (else 16) 8-column tiles per warp and
  // whose tiles fit in shared memory, with the widest column tile that leaves room for two
  // blocks per SM (else one). Smaller row blocks need less: they serve D = 256 in float32 on a
  // T4's 64 KB.
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
        if (bn == 0 && smem_bytes(cand, cbn, cdp, tile_elem) <= budget) bn = cbn;
      }
    }
    if (bn > 0) {
      bm = cand, dp = cdp, na = cna;
      break;
    }
  }
  PCL_CHECK_VALUE(fits_registers, "proto_nce: the CUDA kernel supports embedding dimensions "
                  "up to 1024, `q` has D = ", d);
  PCL_CHECK_VALUE(bm > 0, "proto_nce: `q` has D = ", d, ", too large for the shared memory "
                  "of this GPU (", smem_limit, " bytes per block)");
  const size_t smem = smem_bytes(bm, bn, dp, tile_elem);

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

  // Chunks: a fixed function of the shapes, aiming at ~kTargetBlocks blocks in all.
  const int64_t row_blocks = (n + bm - 1) / bm;
  int64_t total = 0;
  for (int t = 0; t < p.nterms; ++t) total += p.term[t].cols;
  int64_t chunk_cols = static_cast<int64_t>(
      std::ceil(static_cast<double>(total) * static_cast<double>(row_blocks) / kTargetBlocks));
  chunk_cols = round_up(std::max(chunk_cols, kMinChunk), kChunkQuantum);
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
  // TF32 rounds the tiles' inputs to 10 stored mantissa bits, 3xTF32 leaves 2^-22 of each and
  // drops a product as small (fp16/bf16 products are exact); tensor cores' adders may
  // truncate: twice float32's unit roundoff.
  const double u_in = math == Math::kTF32 ? 0x1p-11 : math == Math::k3xTF32 ? 0x1p-21 : 0.0;
  p.hit_tol = static_cast<float>(hit_tolerance(u_in, math == Math::kFFMA ? 0x1p-24 : 0x1p-23, d));
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
