// LayerNorm over the last dimension, forward and backward, for float32 / float16 / bfloat16 x with
// optional weight and bias (in x's dtype or float32).
//
//   forward:   y = (x - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var + eps)  (biased var);
//              mean and rstd (fp32, one per row) are saved for the backward.
//   backward:  xhat = (x - mean) * rstd,  g = grad_out * weight,
//              grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))   (means over the row),
//              grad_weight = sum over rows of grad_out * xhat,
//              grad_bias = sum over rows of grad_out.
//
// Memory bound. The minimum traffic is one read of x and one write of y (forward; 4 bytes per
// element in bf16) and one read of x and grad_out plus one write of grad_x (backward; 6 bytes);
// mean, rstd, weight and the partial sums are O(rows + cols). The kernels reach that minimum by
// holding each row in registers (raw 16-byte vectors; the math in fp32) between the statistics
// and the output, with 16-byte loads and stores. Three shapes, picked per row length in 16-byte
// vectors (8 bf16/fp16 or 4 fp32):
//
//   warp-per-row   <= 128 vectors (1024 bf16/fp16, 512 fp32: GPT-2's 768 and 1024): a block of
//                  8 warps works on 8 rows, one per warp, <= 4 vectors per lane in registers;
//                  the row sums are warp shuffles only (no shared memory, no barriers).
//   block-per-row  <= 1024 vectors (8192 bf16/fp16, 4096 fp32): one block of 160-256 threads per
//                  row, <= 4 vectors per thread in registers, sums through block_reduce_sum.
//   looped         longer rows, and rows that are not whole aligned vectors (odd hidden sizes,
//                  views starting at an odd element: the scalar path, 1-element accesses). The
//                  row does not fit in registers, so the forward reads it three times (sum,
//                  squared deviations from the mean, normalise: the same exact two-pass variance)
//                  and the backward's grad_x kernel twice; only the first read must come from
//                  DRAM, the block re-reads its row right away, from L2 (50 MB on H100) while
//                  the rows in flight fit there (bf16 rows up to ~16K). The backward adds a
//                  column-tiled kernel for grad_weight/grad_bias (one more read of x and grad_out).
//
// add_layer_norm (residual add + LayerNorm, each GPT block's `x + branch` followed by the next
// LayerNorm) runs the same kernels with kAddResidual / kAddGradSum set:
//
//   forward:   sum = x + residual (rounded to x's dtype, as PyTorch's add rounds), written out;
//              then the LayerNorm above of sum, in the same pass: the register kernels load x and
//              residual, add, store sum and keep it in the raw registers that hold x otherwise
//              (one read of each input, two writes: 8 bytes per bf16 element, against 12 for an
//              add kernel followed by LayerNorm).
//   backward:  grad_x = grad_residual = LayerNorm's grad_x (of sum) + grad_sum, added in fp32
//              before the single rounding; grad_sum is read where grad_x is written.
//
// Every kernel grid-strides over rows on a persistent grid (as many blocks as are resident), so
// any number of rows launches and the backward's partial buffers stay small: each thread keeps
// the same columns for all of its rows and accumulates grad_weight/grad_bias in registers, the
// block writes one fp32 partial row, and sum_partial_rows_kernel adds the partial rows in a fixed
//
// This header holds the kernels and their launchers; each launcher is compiled in its own
// translation unit (layer_norm_forward.cu, add_layer_norm_forward.cu, layer_norm_backward.cu,
// add_layer_norm_backward.cu), so that no one file holds most of the extension's
// instantiations and nvcc can build the four in parallel. layer_norm.cu holds the host side
// (checks, dtype dispatch, the op registrations) and calls them through layer_norm.cuh.
#pragma once

#include <ATen/ATen.h>

#include "layer_norm.cuh"
#include "vector_io.cuh"

namespace llmkernels {
namespace {

constexpr int kRowKernelThreads = 256;   // register kernels: block size (warp-per-row: 8 warps)
constexpr int kWarpsPerBlock = kRowKernelThreads / kWarpSize;
constexpr int kMaxVecsPerThread = 4;     // register kernels: vectors of a row held per thread
constexpr int kLoopedThreads = 256;      // looped kernels: max block size

// weight/bias values for columns [col, col + kVec): `absent` (1 for weight, 0 for bias) when the
// optional parameter is not given.
template <int kVec, typename P>
__device__ __forceinline__ void load_param(const P* __restrict__ param, int col, float absent,
                                           float (&dst)[kVec]) {
  if (param == nullptr) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) dst[j] = absent;
  } else {
    load_floats<kVec>(param + col, dst);
  }
}

// x + residual for one 16-byte vector of each, rounded to T: the raw vector of the sum, which is
// both stored (add_layer_norm's sum output) and normalised, so the output is exactly the LayerNorm
// of the sum returned.
template <typename T>
__device__ __forceinline__ int4 add_vectors(const int4& x_raw, const int4& residual_raw) {
  constexpr int kVec = kVecElems<T>;
  float a[kVec], b[kVec];
  unpack_floats<T>(x_raw, a);
  unpack_floats<T>(residual_raw, b);
#pragma unroll
  for (int j = 0; j < kVec; ++j) a[j] += b[j];
  return pack_floats<T>(a);
}

// The kVec values at `offset` that the looped kernels normalise, in fp32: x's, or with
// kAddResidual x + residual rounded to T (the sum output, exactly). residual is nullptr (and
// never offset) without kAddResidual.
template <int kVec, bool kAddResidual, typename T>
__device__ __forceinline__ void load_input(const T* __restrict__ x, const T* __restrict__ residual,
                                           int64_t offset, float (&vals)[kVec]) {
  load_floats<kVec>(x + offset, vals);
  if constexpr (kAddResidual) {
    float r[kVec];
    load_floats<kVec>(residual + offset, r);
#pragma unroll
    for (int j = 0; j < kVec; ++j) vals[j] = to_float(from_float<T>(vals[j] + r[j]));
  }
}

// vals[0 .. kVec) += grad_sum[offset .. offset + kVec) with kAddGradSum (add_layer_norm's
// backward: the sum output's gradient reaches x and residual unchanged); nothing otherwise, and
// grad_sum is then nullptr.
template <int kVec, bool kAddGradSum, typename T>
__device__ __forceinline__ void add_grad_sum(const T* __restrict__ grad_sum, int64_t offset,
                                             float (&vals)[kVec]) {
  if constexpr (kAddGradSum) {
    float g[kVec];
    load_floats<kVec>(grad_sum + offset, g);
#pragma unroll
    for (int j = 0; j < kVec; ++j) vals[j] += g[j];
  }
}

// The threads that share one row in the register kernels: a warp (kWarpPerRow, 8 rows per block)
// or the whole block. `rank` is this thread's index within the team; a row's vector v belongs to
// rank v % size. Every rank keeps the same vectors (columns) for all rows.
template <bool kWarpPerRow>
struct RowTeam {
  int rank;
  int size;
  int64_t first_row;
  int64_t row_stride;

  __device__ __forceinline__ RowTeam() {
    if constexpr (kWarpPerRow) {
      rank = threadIdx.x % kWarpSize;
      size = kWarpSize;
      first_row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
      row_stride = int64_t(gridDim.x) * kWarpsPerBlock;
    } else {
      rank = threadIdx.x;
      size = blockDim.x;
      first_row = blockIdx.x;
      row_stride = gridDim.x;
    }
  }

  // Sums over the team; every member gets the totals. scratch: kCount * 32 floats of shared
  // memory (block teams only).
  template <int kCount>
  __device__ __forceinline__ void sum(float (&vals)[kCount], float* scratch) const {
    if constexpr (kWarpPerRow) {
      warp_reduce_sum(vals);
    } else {
      block_reduce_sum(vals, scratch);
    }
  }
};

// Forward, row in registers (warp-per-row or block-per-row). Each thread loads its <= 4 vectors
// of the row once and keeps them as raw 16-byte vectors (half the registers of fp32 values for
// bf16/fp16); the team sums them for the mean, then sums the squared deviations from the same
// registers (an exact two-pass variance with one read of x), then writes y from them. At least
// 4 blocks per SM (<= 64 registers, no spills): 32 warps keep enough loads in flight.
// kAddResidual (add_layer_norm): the vectors of residual are loaded with those of x, and the
// registers hold (and sum_out receives) x + residual instead of x.
template <typename T, typename P, bool kWarpPerRow, int kVecsPerThread, bool kAddResidual>
__global__ void __launch_bounds__(kRowKernelThreads, 4)
    layer_norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                              const P* __restrict__ weight, const P* __restrict__ bias,
                              T* __restrict__ out, T* __restrict__ sum_out,
                              float* __restrict__ mean_out, float* __restrict__ rstd_out,
                              int64_t rows, int cols, float eps) {
  constexpr int kVec = kVecElems<T>;
  __shared__ float scratch[kWarpSize];
  const RowTeam<kWarpPerRow> team;
  const int num_vecs = cols / kVec;
  for (int64_t row = team.first_row; row < rows; row += team.row_stride) {
    const int64_t row_offset = row * cols;
    int4 x_raw[kVecsPerThread];
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      const int vec = team.rank + i * team.size;
      if (vec < num_vecs) x_raw[i] = load_vector(x + row_offset + vec * kVec);
    }
    if constexpr (kAddResidual) {
#pragma unroll
      for (int i = 0; i < kVecsPerThread; ++i) {
        const int vec = team.rank + i * team.size;
        if (vec < num_vecs) {
          x_raw[i] = add_vectors<T>(x_raw[i], load_vector(residual + row_offset + vec * kVec));
          store_vector(sum_out + row_offset + vec * kVec, x_raw[i]);
        }
      }
    }
    float sum[1] = {0.0f};
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      if (team.rank + i * team.size < num_vecs) {
        float vals[kVec];
        unpack_floats<T>(x_raw[i], vals);
#pragma unroll
        for (int j = 0; j < kVec; ++j) sum[0] += vals[j];
      }
    }
    team.sum(sum, scratch);
    const float row_mean = sum[0] / cols;
    float sum_sq[1] = {0.0f};
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      if (team.rank + i * team.size < num_vecs) {
        float vals[kVec];
        unpack_floats<T>(x_raw[i], vals);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float d = vals[j] - row_mean;
          sum_sq[0] += d * d;
        }
      }
    }
    team.sum(sum_sq, scratch);
    const float row_rstd = rsqrtf(sum_sq[0] / cols + eps);
    if (team.rank == 0) {
      mean_out[row] = row_mean;
      rstd_out[row] = row_rstd;
    }
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      const int vec = team.rank + i * team.size;
      if (vec < num_vecs) {
        const int col = vec * kVec;
        float vals[kVec], w[kVec], b[kVec];
        unpack_floats<T>(x_raw[i], vals);
        load_param(weight, col, 1.0f, w);
        load_param(bias, col, 0.0f, b);
#pragma unroll
        for (int j = 0; j < kVec; ++j) vals[j] = (vals[j] - row_mean) * row_rstd * w[j] + b[j];
        store_floats<kVec>(out + row_offset + col, vals);
      }
    }
  }
}

// Forward for rows that do not fit in registers, or are not whole aligned vectors (kVec == 1).
// One block per row, three reads of the row: the sum (mean), the sum of squared deviations from
// that mean (the exact two-pass variance, as accurate as the register kernels), and the
// normalisation. Only the first read is certain to come from DRAM: the block re-reads its row
// right away, while it is still in L2 unless the rows in flight exceed L2. kAddResidual: every
// pass reads x and residual and adds them again (the first also writes sum_out), which is cheaper
// than reading back sum_out, a buffer this kernel writes (no read-only cache path for it).
template <typename T, typename P, int kVec, bool kAddResidual>
__global__ void __launch_bounds__(kLoopedThreads)
    layer_norm_forward_looped_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                     const P* __restrict__ weight, const P* __restrict__ bias,
                                     T* __restrict__ out, T* __restrict__ sum_out,
                                     float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                     int64_t rows, int cols, float eps) {
  __shared__ float scratch[kWarpSize];
  const int num_vecs = cols / kVec;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t row_offset = row * cols;
    float sum[1] = {0.0f};
    for (int vec = threadIdx.x; vec < num_vecs; vec += blockDim.x) {
      float vals[kVec];
      load_input<kVec, kAddResidual>(x, residual, row_offset + vec * kVec, vals);
      if constexpr (kAddResidual) store_floats<kVec>(sum_out + row_offset + vec * kVec, vals);
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum[0] += vals[j];
    }
    block_reduce_sum(sum, scratch);
    const float row_mean = sum[0] / cols;
    float sum_sq[1] = {0.0f};
    for (int vec = threadIdx.x; vec < num_vecs; vec += blockDim.x) {
      float vals[kVec];
      load_input<kVec, kAddResidual>(x, residual, row_offset + vec * kVec, vals);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float d = vals[j] - row_mean;
        sum_sq[0] += d * d;
      }
    }
    block_reduce_sum(sum_sq, scratch);
    const float row_rstd = rsqrtf(sum_sq[0] / cols + eps);
    if (threadIdx.x == 0) {
      mean_out[row] = row_mean;
      rstd_out[row] = row_rstd;
    }
    for (int vec = threadIdx.x; vec < num_vecs; vec += blockDim.x) {
      const int col = vec * kVec;
      float vals[kVec], w[kVec], b[kVec];
      load_input<kVec, kAddResidual>(x, residual, row_offset + col, vals);
      load_param(weight, col, 1.0f, w);
      load_param(bias, col, 0.0f, b);
#pragma unroll
      for (int j = 0; j < kVec; ++j) vals[j] = (vals[j] - row_mean) * row_rstd * w[j] + b[j];
      store_floats<kVec>(out + row_offset + col, vals);
    }
  }
}

// Backward, row in registers (warp-per-row or block-per-row): one read of x and grad_out, one
// write of grad_x. Each thread holds its vectors of x and grad_out as raw 16-byte vectors (half
// the registers of fp32 values for bf16/fp16), the team sums g and g * xhat, and grad_x follows
// from the registers. grad_weight/grad_bias accumulate in fp32 registers across all of the
// thread's rows (its columns never change) and are written once per block to
// partial_grad_weight/partial_grad_bias[blockIdx.x] (gridDim.x, cols): directly for a block team
// (each column has one owner), and for warp teams after adding the 8 warps in warp order through
// shared memory (block_sums, 2 * cols floats of dynamic shared memory). At least 2 blocks per
// SM (<= 128 registers, no spills): 16 warps keep enough loads in flight. kAddGradSum
// (add_layer_norm): grad_sum is added to grad_x, read only where grad_x is written (holding it
// from the start would cost 4 registers per vector for no saved traffic).
template <typename T, typename P, bool kWarpPerRow, int kVecsPerThread, bool kAddGradSum>
__global__ void __launch_bounds__(kRowKernelThreads, 2)
    layer_norm_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ grad_sum,
                               const T* __restrict__ x, const P* __restrict__ weight,
                               const float* __restrict__ mean, const float* __restrict__ rstd,
                               T* __restrict__ grad_x,
                               float* __restrict__ partial_grad_weight,
                               float* __restrict__ partial_grad_bias, int64_t rows, int cols) {
  constexpr int kVec = kVecElems<T>;
  __shared__ float scratch[2 * kWarpSize];
  extern __shared__ float block_sums[];
  const RowTeam<kWarpPerRow> team;
  const int num_vecs = cols / kVec;
  float grad_weight[kVecsPerThread][kVec] = {};
  float grad_bias[kVecsPerThread][kVec] = {};
  for (int64_t row = team.first_row; row < rows; row += team.row_stride) {
    const float row_mean = mean[row];
    const float row_rstd = rstd[row];
    const int64_t row_offset = row * cols;
    int4 x_raw[kVecsPerThread], dy_raw[kVecsPerThread];
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      const int vec = team.rank + i * team.size;
      if (vec < num_vecs) {
        x_raw[i] = load_vector(x + row_offset + vec * kVec);
        dy_raw[i] = load_vector(grad_out + row_offset + vec * kVec);
      }
    }
    float sums[2] = {0.0f, 0.0f};  // sum of g, sum of g * xhat
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      const int vec = team.rank + i * team.size;
      if (vec < num_vecs) {
        float xhat[kVec], dy[kVec], w[kVec];
        unpack_floats<T>(x_raw[i], xhat);
        unpack_floats<T>(dy_raw[i], dy);
        load_param(weight, vec * kVec, 1.0f, w);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          xhat[j] = (xhat[j] - row_mean) * row_rstd;
          const float g = dy[j] * w[j];
          sums[0] += g;
          sums[1] += g * xhat[j];
          grad_weight[i][j] += dy[j] * xhat[j];
          grad_bias[i][j] += dy[j];
        }
      }
    }
    team.sum(sums, scratch);
    const float mean_g = sums[0] / cols;
    const float mean_g_xhat = sums[1] / cols;
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      const int vec = team.rank + i * team.size;
      if (vec < num_vecs) {
        float xhat[kVec], dy[kVec], w[kVec];
        unpack_floats<T>(x_raw[i], xhat);
        unpack_floats<T>(dy_raw[i], dy);
        load_param(weight, vec * kVec, 1.0f, w);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          xhat[j] = (xhat[j] - row_mean) * row_rstd;
          dy[j] = (dy[j] * w[j] - mean_g - xhat[j] * mean_g_xhat) * row_rstd;
        }
        add_grad_sum<kVec, kAddGradSum>(grad_sum, row_offset + vec * kVec, dy);
        store_floats<kVec>(grad_x + row_offset + vec * kVec, dy);
      }
    }
  }

  float* block_grad_weight = partial_grad_weight + int64_t(blockIdx.x) * cols;
  float* block_grad_bias = partial_grad_bias + int64_t(blockIdx.x) * cols;
  if constexpr (kWarpPerRow) {
    // Warp 0 stores its column sums, then warps 1..7 add theirs one at a time.
    const int warp = threadIdx.x / kWarpSize;
    for (int w = 0; w < kWarpsPerBlock; ++w) {
      if (warp == w) {
#pragma unroll
        for (int i = 0; i < kVecsPerThread; ++i) {
          const int vec = team.rank + i * team.size;
          if (vec < num_vecs) {
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
              const int col = vec * kVec + j;
              block_sums[col] = (w == 0 ? 0.0f : block_sums[col]) + grad_weight[i][j];
              block_sums[cols + col] = (w == 0 ? 0.0f : block_sums[cols + col]) + grad_bias[i][j];
            }
          }
        }
      }
      __syncthreads();
    }
    for (int col = threadIdx.x; col < cols; col += blockDim.x) {
      block_grad_weight[col] = block_sums[col];
      block_grad_bias[col] = block_sums[cols + col];
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      const int vec = team.rank + i * team.size;
      if (vec < num_vecs) {
        store_floats<kVec>(block_grad_weight + vec * kVec, grad_weight[i]);
        store_floats<kVec>(block_grad_bias + vec * kVec, grad_bias[i]);
      }
    }
  }
}

// Backward grad_x for rows that do not fit in registers or are not whole aligned vectors
// (kVec == 1). One block per row; the first read of x and grad_out sums g and g * xhat, the
// second (mostly from L2) writes grad_x, plus grad_sum with kAddGradSum. grad_weight/grad_bias
// come from layer_norm_backward_params_kernel.
template <typename T, typename P, int kVec, bool kAddGradSum>
__global__ void __launch_bounds__(kLoopedThreads)
    layer_norm_backward_looped_kernel(const T* __restrict__ grad_out,
                                      const T* __restrict__ grad_sum, const T* __restrict__ x,
                                      const P* __restrict__ weight, const float* __restrict__ mean,
                                      const float* __restrict__ rstd, T* __restrict__ grad_x,
                                      int64_t rows, int cols) {
  __shared__ float scratch[2 * kWarpSize];
  const int num_vecs = cols / kVec;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float row_mean = mean[row];
    const float row_rstd = rstd[row];
    const int64_t row_offset = row * cols;
    float sums[2] = {0.0f, 0.0f};  // sum of g, sum of g * xhat
    for (int vec = threadIdx.x; vec < num_vecs; vec += blockDim.x) {
      const int col = vec * kVec;
      float xs[kVec], dy[kVec], w[kVec];
      load_floats<kVec>(x + row_offset + col, xs);
      load_floats<kVec>(grad_out + row_offset + col, dy);
      load_param(weight, col, 1.0f, w);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float g = dy[j] * w[j];
        sums[0] += g;
        sums[1] += g * (xs[j] - row_mean) * row_rstd;
      }
    }
    block_reduce_sum(sums, scratch);
    const float mean_g = sums[0] / cols;
    const float mean_g_xhat = sums[1] / cols;
    for (int vec = threadIdx.x; vec < num_vecs; vec += blockDim.x) {
      const int col = vec * kVec;
      float xs[kVec], dy[kVec], w[kVec];
      load_floats<kVec>(x + row_offset + col, xs);
      load_floats<kVec>(grad_out + row_offset + col, dy);
      load_param(weight, col, 1.0f, w);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float xhat = (xs[j] - row_mean) * row_rstd;
        xs[j] = (dy[j] * w[j] - mean_g - xhat * mean_g_xhat) * row_rstd;
      }
      add_grad_sum<kVec, kAddGradSum>(grad_sum, row_offset + col, xs);
      store_floats<kVec>(grad_x + row_offset + col, xs);
    }
  }
}

// grad_weight/grad_bias partial sums for the looped path, column-tiled (see column_tile_grid):
// each thread owns kVec columns, walks rows blockIdx.y * 8 + threadIdx.y, + gridDim.y * 8, ...
// accumulating grad_out * xhat and grad_out in registers; the block's 8 row slices are added in
// order through shared memory into partial_grad_weight/partial_grad_bias[blockIdx.y]. This reads
// x and grad_out once more (the looped path's price for unbounded row length).
template <typename T, int kVec>
__global__ void __launch_bounds__(kTileCols * kTileRows)
    layer_norm_backward_params_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                      const float* __restrict__ mean,
                                      const float* __restrict__ rstd,
                                      float* __restrict__ partial_grad_weight,
                                      float* __restrict__ partial_grad_bias, int64_t rows,
                                      int cols) {
  __shared__ float slice_sums[2][kTileRows][kTileCols * kVec];
  const int vec = blockIdx.x * kTileCols + threadIdx.x;
  const bool active = vec < cols / kVec;
  const int col = vec * kVec;
  float grad_weight[kVec] = {};
  float grad_bias[kVec] = {};
  if (active) {
    const int64_t row_stride = int64_t(gridDim.y) * kTileRows;
    for (int64_t row = int64_t(blockIdx.y) * kTileRows + threadIdx.y; row < rows;
         row += row_stride) {
      const float row_mean = mean[row];
      const float row_rstd = rstd[row];
      float xs[kVec], dy[kVec];
      load_floats<kVec>(x + row * cols + col, xs);
      load_floats<kVec>(grad_out + row * cols + col, dy);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        grad_weight[j] += dy[j] * ((xs[j] - row_mean) * row_rstd);
        grad_bias[j] += dy[j];
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    slice_sums[0][threadIdx.y][threadIdx.x * kVec + j] = grad_weight[j];
    slice_sums[1][threadIdx.y][threadIdx.x * kVec + j] = grad_bias[j];
  }
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    const int64_t offset = int64_t(blockIdx.y) * cols + col;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float total_weight = 0.0f, total_bias = 0.0f;
#pragma unroll
      for (int s = 0; s < kTileRows; ++s) {
        total_weight += slice_sums[0][s][threadIdx.x * kVec + j];
        total_bias += slice_sums[1][s][threadIdx.x * kVec + j];
      }
      partial_grad_weight[offset + j] = total_weight;
      partial_grad_bias[offset + j] = total_bias;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

enum class RowKernel { kWarpPerRow, kBlockPerRow, kLooped };

struct RowPlan {
  RowKernel kernel;
  bool vectorized;      // 16-byte accesses (else the looped kernels with 1-element accesses)
  int vecs_per_thread;  // register kernels: 1..4 (warp-per-row), 1, 2 or 4 (block-per-row)
  int threads;
};

// Which kernel shape serves rows of `cols` elements; `aligned`: every data pointer is 16-byte
// aligned (then, with cols a multiple of vec, every row starts on a vector boundary).
RowPlan plan_rows(int cols, int vec, bool aligned) {
  if (!aligned || cols % vec != 0) {
    const int64_t threads =
        std::min<int64_t>(kLoopedThreads, ceil_div(cols, kWarpSize) * kWarpSize);
    return {RowKernel::kLooped, false, 0, int(threads)};
  }
  const int num_vecs = cols / vec;
  if (num_vecs <= kWarpSize * kMaxVecsPerThread) {
    return {RowKernel::kWarpPerRow, true, int(ceil_div(num_vecs, kWarpSize)), kRowKernelThreads};
  }
  for (int per_thread = 1; per_thread <= kMaxVecsPerThread; per_thread *= 2) {
    const int64_t threads = ceil_div(num_vecs, per_thread);
    if (threads <= kRowKernelThreads) {
      const int64_t block = ceil_div(threads, kWarpSize) * kWarpSize;
      return {RowKernel::kBlockPerRow, true, per_thread, int(block)};
    }
  }
  return {RowKernel::kLooped, true, 0, kLoopedThreads};
}

// Looped path of the backward: grad_x kernel, then the column-tiled grad_weight/grad_bias
// kernel. Returns the (2, row groups, cols) partial sums.
template <typename T, typename P, int kVec, bool kAddGradSum>
at::Tensor launch_layer_norm_backward_looped(const T* grad_out, const T* grad_sum, const T* x,
                                             const P* weight, const float* mean, const float* rstd,
                                             T* grad_x, int64_t rows, int cols, int threads,
                                             const at::TensorOptions& float_options,
                                             cudaStream_t stream) {
  const auto grad_x_kernel = layer_norm_backward_looped_kernel<T, P, kVec, kAddGradSum>;
  const int grid = persistent_grid(grad_x_kernel, rows, threads);
  grad_x_kernel<<<grid, threads, 0, stream>>>(grad_out, grad_sum, x, weight, mean, rstd, grad_x,
                                               rows, cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const auto params_kernel = layer_norm_backward_params_kernel<T, kVec>;
  const dim3 tile_grid = column_tile_grid(params_kernel, rows, cols / kVec);
  at::Tensor partials = at::empty({2, int64_t(tile_grid.y), cols}, float_options);
  float* partial_grad_weight = partials.data_ptr<float>();
  float* partial_grad_bias = partial_grad_weight + int64_t(tile_grid.y) * cols;
  params_kernel<<<tile_grid, dim3(kTileCols, kTileRows), 0, stream>>>(
      grad_out, x, mean, rstd, partial_grad_weight, partial_grad_bias, rows, cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

}  // namespace

// The launchers declared in layer_norm.cuh; each translation unit instantiates its own set with
// LLMKERNELS_INSTANTIATE_LAYER_NORM.
template <typename T, typename P, bool kAddResidual>
void launch_layer_norm_forward(const T* x, const T* residual, const P* weight, const P* bias,
                               T* out, T* sum, float* mean, float* rstd, int64_t rows, int cols,
                               float eps, cudaStream_t stream) {
  const RowPlan plan = plan_rows(cols, kVecElems<T>,
                                 is_vector_aligned(x) && is_vector_aligned(residual) &&
                                     is_vector_aligned(weight) && is_vector_aligned(bias) &&
                                     is_vector_aligned(out) && is_vector_aligned(sum));
  const auto launch = [&](auto kernel, int64_t work_blocks) {
    const int grid = persistent_grid(kernel, work_blocks, plan.threads);
    kernel<<<grid, plan.threads, 0, stream>>>(x, residual, weight, bias, out, sum, mean, rstd, rows,
                                              cols, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  constexpr bool kAdd = kAddResidual;
  const int per_thread = plan.vecs_per_thread;
  switch (plan.kernel) {
    case RowKernel::kWarpPerRow: {
      const int64_t blocks = ceil_div(rows, kWarpsPerBlock);
      if (per_thread == 1) launch(layer_norm_forward_kernel<T, P, true, 1, kAdd>, blocks);
      else if (per_thread == 2) launch(layer_norm_forward_kernel<T, P, true, 2, kAdd>, blocks);
      else if (per_thread == 3) launch(layer_norm_forward_kernel<T, P, true, 3, kAdd>, blocks);
      else launch(layer_norm_forward_kernel<T, P, true, 4, kAdd>, blocks);
      break;
    }
    case RowKernel::kBlockPerRow:
      if (per_thread == 1) launch(layer_norm_forward_kernel<T, P, false, 1, kAdd>, rows);
      else if (per_thread == 2) launch(layer_norm_forward_kernel<T, P, false, 2, kAdd>, rows);
      else launch(layer_norm_forward_kernel<T, P, false, 4, kAdd>, rows);
      break;
    case RowKernel::kLooped:
      if (plan.vectorized) launch(layer_norm_forward_looped_kernel<T, P, kVecElems<T>, kAdd>, rows);
      else launch(layer_norm_forward_looped_kernel<T, P, 1, kAdd>, rows);
      break;
  }
}

template <typename T, typename P, bool kAddGradSum>
at::Tensor launch_layer_norm_backward(const T* grad_out, const T* grad_sum, const T* x,
                                      const P* weight, const float* mean, const float* rstd,
                                      T* grad_x, const at::TensorOptions& float_options,
                                      int64_t rows, int cols, cudaStream_t stream) {
  const RowPlan plan = plan_rows(cols, kVecElems<T>,
                                 is_vector_aligned(grad_out) && is_vector_aligned(grad_sum) &&
                                     is_vector_aligned(x) && is_vector_aligned(weight) &&
                                     is_vector_aligned(grad_x));
  at::Tensor partials;  // (2, num partial rows, cols): grad_weight's, then grad_bias's
  const auto launch = [&](auto kernel, int64_t work_blocks, size_t smem) {
    const int grid = persistent_grid(kernel, work_blocks, plan.threads, smem);
    partials = at::empty({2, grid, cols}, float_options);
    float* partial_grad_weight = partials.data_ptr<float>();
    float* partial_grad_bias = partial_grad_weight + int64_t(grid) * cols;
    kernel<<<grid, plan.threads, smem, stream>>>(grad_out, grad_sum, x, weight, mean, rstd, grad_x,
                                                 partial_grad_weight, partial_grad_bias, rows,
                                                 cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  constexpr bool kAdd = kAddGradSum;
  const int per_thread = plan.vecs_per_thread;
  switch (plan.kernel) {
    case RowKernel::kWarpPerRow: {
      const int64_t blocks = ceil_div(rows, kWarpsPerBlock);
      const size_t smem = 2 * size_t(cols) * sizeof(float);  // block_sums
      const auto run = [&](auto kernel) { launch(kernel, blocks, smem); };
      if (per_thread == 1) run(layer_norm_backward_kernel<T, P, true, 1, kAdd>);
      else if (per_thread == 2) run(layer_norm_backward_kernel<T, P, true, 2, kAdd>);
      else if (per_thread == 3) run(layer_norm_backward_kernel<T, P, true, 3, kAdd>);
      else run(layer_norm_backward_kernel<T, P, true, 4, kAdd>);
      break;
    }
    case RowKernel::kBlockPerRow:
      if (per_thread == 1) launch(layer_norm_backward_kernel<T, P, false, 1, kAdd>, rows, 0);
      else if (per_thread == 2) launch(layer_norm_backward_kernel<T, P, false, 2, kAdd>, rows, 0);
      else launch(layer_norm_backward_kernel<T, P, false, 4, kAdd>, rows, 0);
      break;
    case RowKernel::kLooped:
      partials = plan.vectorized
                     ? launch_layer_norm_backward_looped<T, P, kVecElems<T>, kAdd>(
                           grad_out, grad_sum, x, weight, mean, rstd, grad_x, rows, cols,
                           plan.threads, float_options, stream)
                     : launch_layer_norm_backward_looped<T, P, 1, kAdd>(
                           grad_out, grad_sum, x, weight, mean, rstd, grad_x, rows, cols,
                           plan.threads, float_options, stream);
      break;
  }
  return partials;
}

}  // namespace llmkernels

// Explicit instantiations, one line per translation unit, e.g.
// LLMKERNELS_FOR_EACH_LAYER_NORM_TYPE(LLMKERNELS_INSTANTIATE_LAYER_NORM_FORWARD, false).
#define LLMKERNELS_INSTANTIATE_LAYER_NORM_FORWARD(T, P, ADD)                                      \
  template void llmkernels::launch_layer_norm_forward<T, P, ADD>(                                 \
      const T*, const T*, const P*, const P*, T*, T*, float*, float*, int64_t, int, float,        \
      cudaStream_t);
#define LLMKERNELS_INSTANTIATE_LAYER_NORM_BACKWARD(T, P, ADD)                                     \
  template at::Tensor llmkernels::launch_layer_norm_backward<T, P, ADD>(                          \
      const T*, const T*, const T*, const P*, const float*, const float*, T*,                     \
      const at::TensorOptions&, int64_t, int, cudaStream_t);
