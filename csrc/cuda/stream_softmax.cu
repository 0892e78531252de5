// The Flash-Decoding forward of the streaming softmax (stream_softmax.cuh): one launch over
// (row block x chunk) streams a chunk's column tiles through the two tile GEMMs,
//   S = Q X^T,  P = exp(S * s - m) * s / s_max (online softmax),  acc = acc * alpha + P X,
// leaving (m, l, s_max * acc) per chunk and row in a float32 workspace, which the caller's
// combine kernel merges in chunk order. s_max, the largest column scale the chunk has seen so
// far, keeps P <= 1: 1/phi alone overflows fp16 for phi < 1.5e-5. Each row's target column
// (and, with exclude_self, column i of row i) stays out of the tiles: the caller adds the target
// in float32, so that dq = sum_{j != t} p_j x_j s_j - (1 - p_t) x_t s_t keeps its accuracy as
// p_t -> 1, where p_t x_t s_t - x_t s_t from a rounded P would cancel.
#include "stream_softmax.cuh"

namespace pcl_ext {
namespace stream {
namespace {

// One block: rows [rb * bm, +bm) against one chunk of one term. Warp w owns the 16-row slice
// w % (bm / 16) and every (8 / (bm / 16))-th 8-column tile of S and of acc: NA bounds the acc
// tiles per warp at compile time (dp / (8 * warps per slice) of them are live).
template <typename T, Math M, int NA>
__device__ __forceinline__ void chunk_tiles(const StreamParams& p) {
  using S = TileT<T, M>;
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
  load_rows<T>(sq, p.q, row0, p.n, p);

  const WarpTile w = warp_tile(bm);
  const int na = p.dp / (8 * w.wpn);
  float acc[NA][4] = {};
  const int tpr = kThreads / bm;  // softmax: tpr consecutive lanes share one row
  const int srow = threadIdx.x / tpr, ssub = threadIdx.x % tpr;
  float m_run = -INFINITY, l_run = 0.0f;
  float s_run = 0.0f;  // largest scale so far: the same in every thread (all rows see all columns)
  // The row's own target column, left to the combine: column i in sampled mode, a_i in
  // all-prototype mode and in info_nce (an id outside [0, K) matches no column), none for the
  // instance term; and its own column i where the term excludes it (info_nce's exclude_self).
  const int64_t grow = row0 + srow;
  const int64_t target_col = td.assign == nullptr || grow >= p.n ? -1
                             : td.ids != nullptr               ? grow
                                                               : td.assign[grow];
  const int64_t self_col = td.exclude_self && grow < p.n ? grow : -1;

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

    tile_scores<S, M>(ss, lds, sq, xb, ldx, p.dp, bn, w);  // S = Q X^T over the padded D
    __syncthreads();

    {  // online softmax of the tile's logits, one row per tpr lanes
      const float* srow_s = ss + srow * lds;
      // Tile-relative; negative (never a column) when the row has none.
      const int64_t skip = target_col - c0, skip_self = self_col < 0 ? -1 : self_col - c0;
      // fmaxf skips NaN: a bad column poisons the row through its exp, not through the max.
      float mx = -INFINITY, smax = 0.0f;
      for (int c = ssub; c < tc; c += tpr) {
        if (c != skip && c != skip_self) mx = fmaxf(mx, srow_s[c] * sc[c]);
        smax = fmaxf(smax, sc[c]);
      }
      for (int o = tpr / 2; o > 0; o /= 2) {
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, o));
      }
      const float m_new = fmaxf(m_run, mx), s_new = fmaxf(s_run, smax);
      // 0 on the first tile; 1 while every column so far was skipped (m still -inf)
      const float alpha = m_new == m_run ? 1.0f : expf(m_run - m_new);
      const float inv_s = 1.0f / s_new;
      float sum = 0.0f;
      for (int c = ssub; c < bn; c += tpr) {
        float pv = 0.0f;
        if (c < tc && c != skip && c != skip_self) {
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
      const float a_lo = salpha[w.slice * 16 + w.g], a_hi = salpha[w.slice * 16 + w.g + 8];
#pragma unroll
      for (int f = 0; f < NA; ++f) {
        acc[f][0] *= a_lo; acc[f][1] *= a_lo; acc[f][2] *= a_hi; acc[f][3] *= a_hi;
      }
      tile_accumulate<S, M>(acc, sp, ldp, xb, ldx, bn, na, w);
    }
  }

  const int64_t ws_row = int64_t(chunk) * p.n + row0;
  if (ssub == 0 && row0 + srow < p.n) {
    p.ws_ml[(ws_row + srow) * 2] = m_run;
    p.ws_ml[(ws_row + srow) * 2 + 1] = l_run;
  }
  // float32 from here on: the scale back in full
  store_acc(p.ws_acc + ws_row * p.d, acc, s_run, p.n - row0, na, p.d, w);
}

template <typename T, Math M, int NA>
__global__ void __launch_bounds__(kThreads, NA <= 8 ? 2 : 1)
    stream_chunk_kernel(const __grid_constant__ StreamParams p) {
  if constexpr (compiled_here<T, M>()) chunk_tiles<T, M, NA>(p);
  else __trap();
}

}  // namespace

template <typename T, Math M>
void launch_chunks(const StreamParams& p, int na, size_t smem, int64_t row_blocks, int nchunks,
                   cudaStream_t stream) {
  auto kernel = na <= 8 ? stream_chunk_kernel<T, M, 8> : stream_chunk_kernel<T, M, 16>;
  STD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  kernel<<<dim3(static_cast<unsigned>(row_blocks), nchunks), kThreads, smem, stream>>>(p);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

// The (dtype, math) pairs select_math returns.
template void launch_chunks<float, Math::kFFMA>(const StreamParams&, int, size_t, int64_t, int,
                                                cudaStream_t);
template void launch_chunks<float, Math::kTF32>(const StreamParams&, int, size_t, int64_t, int,
                                                cudaStream_t);
template void launch_chunks<float, Math::k3xTF32>(const StreamParams&, int, size_t, int64_t, int,
                                                  cudaStream_t);
template void launch_chunks<__half, Math::kFFMA>(const StreamParams&, int, size_t, int64_t, int,
                                                 cudaStream_t);
template void launch_chunks<__half, Math::kHalf>(const StreamParams&, int, size_t, int64_t, int,
                                                 cudaStream_t);
template void launch_chunks<__nv_bfloat16, Math::kFFMA>(const StreamParams&, int, size_t,
                                                        int64_t, int, cudaStream_t);
template void launch_chunks<__nv_bfloat16, Math::kHalf>(const StreamParams&, int, size_t,
                                                        int64_t, int, cudaStream_t);

}  // namespace stream
}  // namespace pcl_ext
