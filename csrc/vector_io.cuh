// Shared helpers for the memory-bound kernels (layer_norm.cu, gelu.cu; flash_attention.cu takes
// the conversions and the warp sum).
//
// - load_floats / store_floats: move kCount consecutive elements between global memory and fp32
//   registers in 16-byte vectors (one LDG.128 / STG.128 each, the widest access a thread can make
//   on sm_80/sm_90), or element by element when kCount elements are not whole vectors (the
//   scalar path). load_vector / unpack_floats / pack_floats / store_vector do the same in steps,
//   for kernels that keep rows in registers as raw 16-byte vectors (LayerNorm).
// - warp_reduce_sum / block_reduce_sum: fixed-order sum reductions, so results are bitwise
//   reproducible run to run.
// - sum_partial_rows_kernel: second pass of every deterministic column reduction (LayerNorm's
//   dweight/dbias, bias_gelu's dbias). A first-pass kernel writes fp32 partial sums, one row per
//   block, and this kernel adds those rows in a fixed order. No atomics anywhere.
// - persistent_grid / column_tile_grid: launch only as many blocks as fit on the device at once;
//   grid-stride loops then cover any number of rows (no grid-size limit at 1M rows) and partial
//   buffers stay small.
// - host-side input checks shared by the ops.
#pragma once

#include <algorithm>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

namespace llmkernels {

constexpr int kWarpSize = 32;
constexpr int kVectorBytes = 16;

// Elements of T in one 16-byte vector: 8 for bf16/fp16, 4 for fp32.
template <typename T>
constexpr int kVecElems = kVectorBytes / sizeof(T);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool is_vector_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % kVectorBytes == 0;
}

// Calls fn(T{}) with T the CUDA element type for `dtype` (float, __half, __nv_bfloat16); any other
// dtype is rejected with a message naming the argument.
template <typename Fn>
void dispatch_float_type(at::ScalarType dtype, const char* arg, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(__half{}); break;
    case at::kBFloat16: fn(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, arg, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

inline void check_cuda_tensor(const at::Tensor& t, const char* arg) {
  TORCH_CHECK(t.is_cuda(), arg, " must be a CUDA tensor, got device ", t.device());
}

// An activation input: CUDA, float32 / float16 / bfloat16.
inline void check_float_input(const at::Tensor& t, const char* arg) {
  check_cuda_tensor(t, arg);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              arg, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// A gradient (arg: grad_out, or add_layer_norm's grad_sum), or another input that pairs element by
// element with x (add_layer_norm's residual): same device, shape and dtype as x.
inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& x,
                           const char* arg = "grad_out") {
  check_cuda_tensor(grad_out, arg);
  TORCH_CHECK(grad_out.device() == x.device(), arg, " must be on x's device ", x.device(), ", got ",
              grad_out.device());
  TORCH_CHECK(grad_out.sizes() == x.sizes(), arg, " must have x's shape ", x.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), arg, " must have x's dtype ",
              x.scalar_type(), ", got ", grad_out.scalar_type());
}

// Data pointer of t as the CUDA element type T (t's dtype already dispatched to T); nullptr for
// an undefined tensor (an absent optional weight or bias).
template <typename T>
const T* typed_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}
template <typename T>
T* typed_mutable_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Blocks of `kernel` to launch: enough for `work_blocks`, but no more than fit on the device at
// once. Deterministic for a given device, so the per-block partial sums add up in the same order
// every run.
template <typename Kernel>
int persistent_grid(Kernel kernel, int64_t work_blocks, int threads, size_t dynamic_smem = 0) {
  int blocks_per_sm = 0;
  int num_sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, threads,
                                                               dynamic_smem));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  const int64_t resident = int64_t(std::max(blocks_per_sm, 1)) * num_sms;
  return int(std::max<int64_t>(1, std::min(work_blocks, resident)));
}

// Column-tiled kernels (bias_gelu, LayerNorm's looped-path dweight/dbias) use a (32, 8) block:
// threadIdx.x walks 32 consecutive vectors of a row (a coalesced 512-byte segment for bf16),
// threadIdx.y picks one of 8 rows, and each thread keeps the same columns for all of its rows, so
// per-column values (a bias, running column sums) stay in registers.
constexpr int kTileCols = kWarpSize;
constexpr int kTileRows = 8;

// Grid of a column-tiled kernel over (rows, num_vecs vectors): every column tile, and as many row
// groups as keep the device full (at most 65535, the gridDim.y limit); the kernel grid-strides
// over the remaining rows.
template <typename Kernel>
dim3 column_tile_grid(Kernel kernel, int64_t rows, int num_vecs) {
  const int64_t col_tiles = ceil_div(num_vecs, kTileCols);
  const int64_t resident =
      persistent_grid(kernel, col_tiles * ceil_div(rows, kTileRows), kTileCols * kTileRows);
  const int64_t row_groups = std::min<int64_t>(
      {ceil_div(rows, kTileRows), std::max<int64_t>(1, resident / col_tiles), 65535});
  return dim3(unsigned(col_tiles), unsigned(row_groups));
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One 16-byte vector as raw bits in 4 registers (8 bf16/fp16 or 4 fp32 values): rows held in
// registers as raw vectors take half the registers of their fp32 values (bf16/fp16). src must be
// 16-byte aligned and not written by the running kernel (read-only cache path).
template <typename T>
__device__ __forceinline__ int4 load_vector(const T* __restrict__ src) {
  return __ldg(reinterpret_cast<const int4*>(src));
}

template <typename T>
__device__ __forceinline__ void unpack_floats(const int4& raw, float (&dst)[kVecElems<T>]) {
  const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) dst[i] = to_float(elems[i]);
}

// The inverse of unpack_floats: kVecElems<T> fp32 values as one raw 16-byte vector of T (round to
// nearest even).
template <typename T>
__device__ __forceinline__ int4 pack_floats(const float (&src)[kVecElems<T>]) {
  int4 raw;
  T* elems = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) elems[i] = from_float<T>(src[i]);
  return raw;
}

// One raw 16-byte vector to dst (16-byte aligned).
template <typename T>
__device__ __forceinline__ void store_vector(T* __restrict__ dst, const int4& raw) {
  *reinterpret_cast<int4*>(dst) = raw;
}

// Reads src[0 .. kCount) into fp32 registers. When the kCount elements are whole 16-byte vectors,
// src must be 16-byte aligned and they are read with 128-bit loads through the read-only cache
// (src must not be written by the running kernel); otherwise element by element.
template <int kCount, typename T>
__device__ __forceinline__ void load_floats(const T* __restrict__ src, float (&dst)[kCount]) {
  constexpr int kBytes = kCount * int(sizeof(T));
  if constexpr (kBytes % kVectorBytes == 0) {
    constexpr int kPerVector = kVecElems<T>;
#pragma unroll
    for (int v = 0; v < kBytes / kVectorBytes; ++v) {
      float vals[kPerVector];
      unpack_floats<T>(load_vector(src + v * kPerVector), vals);
#pragma unroll
      for (int i = 0; i < kPerVector; ++i) dst[v * kPerVector + i] = vals[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < kCount; ++i) dst[i] = to_float(src[i]);
  }
}

// Writes kCount fp32 registers to dst[0 .. kCount) as T (round to nearest even), with 128-bit
// stores when they are whole 16-byte vectors (dst then 16-byte aligned).
template <int kCount, typename T>
__device__ __forceinline__ void store_floats(T* __restrict__ dst, const float (&src)[kCount]) {
  constexpr int kBytes = kCount * int(sizeof(T));
  if constexpr (kBytes % kVectorBytes == 0) {
    constexpr int kPerVector = kVecElems<T>;
#pragma unroll
    for (int v = 0; v < kBytes / kVectorBytes; ++v) {
      float vals[kPerVector];
#pragma unroll
      for (int i = 0; i < kPerVector; ++i) vals[i] = src[v * kPerVector + i];
      store_vector(dst + v * kPerVector, pack_floats<T>(vals));
    }
  } else {
#pragma unroll
    for (int i = 0; i < kCount; ++i) dst[i] = from_float<T>(src[i]);
  }
}

// Butterfly sum over the 32 lanes; every lane ends with the same bits (each step adds the same two
// values on both partner lanes, and fp32 addition is commutative).
template <int kCount>
__device__ __forceinline__ void warp_reduce_sum(float (&vals)[kCount]) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int i = 0; i < kCount; ++i) vals[i] += __shfl_xor_sync(0xffffffffu, vals[i], offset);
  }
}

// Sums kCount values over the block (blockDim.x a multiple of 32, blockDim.y == 1); every thread
// gets the totals. scratch: shared memory of kCount * 32 floats. Ends with a barrier, so the
// caller may call it again with the same scratch.
template <int kCount>
__device__ __forceinline__ void block_reduce_sum(float (&vals)[kCount], float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  warp_reduce_sum(vals);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kCount; ++i) scratch[i * kWarpSize + warp] = vals[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kCount; ++i) {
    vals[i] = lane < num_warps ? scratch[i * kWarpSize + lane] : 0.0f;
  }
  warp_reduce_sum(vals);
  __syncthreads();
}

// Output pointers of sum_partial_rows_kernel: out[k] (cols,) receives the k-th column sum.
template <int kNumSums>
struct ColumnSums {
  float* out[kNumSums];
};

constexpr int kPartialSlices = 32;  // threadIdx.y of sum_partial_rows_kernel

// out[k][c] = sum over p of partials[k][p][c], partials: (kNumSums, num_partials, cols) fp32.
// Block (32, 32) covers 32 columns (one coalesced 128-byte row segment per warp); slice y adds
// partial rows y, y + 32, y + 64, ... (a few independent loads per thread, so the pass takes
// about one L2 latency) and threadIdx.y == 0 adds the 32 slice sums in order. The summation
// order depends only on num_partials: the result is bitwise reproducible. blockIdx.y picks k.
// The partials are small (one row per block of a persistent grid) and were just written, so
// this pass reads L2.
template <int kNumSums>
__global__ void __launch_bounds__(kWarpSize * kPartialSlices)
    sum_partial_rows_kernel(const float* __restrict__ partials, int num_partials, int cols,
                            ColumnSums<kNumSums> sums) {
  __shared__ float slice_sums[kPartialSlices][kWarpSize];
  const int col = blockIdx.x * kWarpSize + threadIdx.x;
  const float* partial = partials + int64_t(blockIdx.y) * num_partials * cols;
  float sum = 0.0f;
  if (col < cols) {
#pragma unroll 8
    for (int p = threadIdx.y; p < num_partials; p += kPartialSlices) {
      sum += partial[int64_t(p) * cols + col];
    }
  }
  slice_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.0f;
#pragma unroll
    for (int s = 0; s < kPartialSlices; ++s) total += slice_sums[s][threadIdx.x];
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) {
      if (k == int(blockIdx.y)) sums.out[k][col] = total;
    }
  }
}

// partials: (kNumSums, num_partials, cols) float32 contiguous on the current device.
template <int kNumSums>
void launch_sum_partial_rows(const at::Tensor& partials, ColumnSums<kNumSums> sums,
                             cudaStream_t stream) {
  const int num_partials = int(partials.size(1));
  const int cols = int(partials.size(2));
  const dim3 grid(unsigned(ceil_div(cols, kWarpSize)), kNumSums);
  sum_partial_rows_kernel<kNumSums><<<grid, dim3(kWarpSize, kPartialSlices), 0, stream>>>(
      partials.data_ptr<float>(), num_partials, cols, sums);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace llmkernels
