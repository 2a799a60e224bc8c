// GELU (tanh approximation) and bias + GELU, forward and backward, for float32, float16 and
// bfloat16 tensors of any shape.
//
//   gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
//
// All four ops are elementwise and memory bound: every kernel reads each input element once and
// writes each output element once, in 16-byte vectors (8 bf16/fp16 or 4 fp32 per load), with the
// math in fp32 registers. Bytes moved per element (bf16): forward 2 in + 2 out, backward 4 in +
// 2 out, the minimum possible. bias_gelu's bias vector is loaded once per thread and kept in
// registers (its column never changes, see the 2D grid below), and its bias gradient is reduced
// deterministically: per-block fp32 partial sums, then sum_partial_rows_kernel (vector_io.cuh).
// Rows are covered by grid-stride loops over a persistent grid, so any size launches.
// Inputs that are not 16-byte aligned (a view starting at an odd element) or whose row length is
// not a whole number of vectors take the same kernels instantiated with 1-element accesses.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "vector_io.cuh"

namespace llmkernels {
namespace {

constexpr int kElementwiseThreads = 256;

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoeff = 0.044715f;

// sigmoid(2u) = (1 + tanh(u)) / 2, so gelu(x) = x * gelu_gate(x). Computed as 1 / (1 + exp(-2u)),
// which cannot produce inf/inf: for u -> -inf, exp(-2u) overflows to +inf and the gate is 0; for
// u -> +inf the gate is 1. __expf and __fdividef (a few ulp in fp32) keep the math well under the
// bf16/fp16 rounding of the result and within the fp32 tolerance; they do not depend on
// --use_fast_math.
__device__ __forceinline__ float gelu_gate(float x) {
  const float u = kSqrt2OverPi * x * fmaf(kGeluCoeff, x * x, 1.0f);
  return __fdividef(1.0f, 1.0f + __expf(-2.0f * u));
}

// d/dx gelu(x) = s + x * ds/du * du/dx with s = sigmoid(2u): ds/du = 2 s (1 - s),
// du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2). 1 - s is computed as e * s (e = exp(-2u)), which
// keeps full precision where s is near 1 (1 - s would cancel); when e overflows to inf (s = 0)
// e * s is NaN and fminf picks 1, the limit. Saturated s makes the second term 0.
__device__ __forceinline__ float gelu_grad(float x) {
  const float x2 = x * x;
  const float u = kSqrt2OverPi * x * fmaf(kGeluCoeff, x2, 1.0f);
  const float e = __expf(-2.0f * u);
  const float s = __fdividef(1.0f, 1.0f + e);
  const float one_minus_s = fminf(e * s, 1.0f);
  const float du_dx = kSqrt2OverPi * fmaf(3.0f * kGeluCoeff, x2, 1.0f);
  return s + 2.0f * x * s * one_minus_s * du_dx;
}

// y = gelu(x) over n elements. Grid-stride over kVec-element vectors, then the last n % kVec
// elements one at a time (kVec == 1: the scalar path, misaligned pointers).
template <typename T, int kVec>
__global__ void __launch_bounds__(kElementwiseThreads)
    gelu_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_vecs = n / kVec;
  for (int64_t v = first; v < num_vecs; v += stride) {
    float vals[kVec];
    load_floats<kVec>(x + v * kVec, vals);
#pragma unroll
    for (int i = 0; i < kVec; ++i) vals[i] *= gelu_gate(vals[i]);
    store_floats<kVec>(y + v * kVec, vals);
  }
  for (int64_t i = num_vecs * kVec + first; i < n; i += stride) {
    const float xi = to_float(x[i]);
    y[i] = from_float<T>(xi * gelu_gate(xi));
  }
}

// grad_x = grad_out * gelu'(x) over n elements; same layout as gelu_forward_kernel.
template <typename T, int kVec>
__global__ void __launch_bounds__(kElementwiseThreads)
    gelu_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                         T* __restrict__ grad_x, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_vecs = n / kVec;
  for (int64_t v = first; v < num_vecs; v += stride) {
    float dy[kVec], vals[kVec];
    load_floats<kVec>(grad_out + v * kVec, dy);
    load_floats<kVec>(x + v * kVec, vals);
#pragma unroll
    for (int i = 0; i < kVec; ++i) vals[i] = dy[i] * gelu_grad(vals[i]);
    store_floats<kVec>(grad_x + v * kVec, vals);
  }
  for (int64_t i = num_vecs * kVec + first; i < n; i += stride) {
    grad_x[i] = from_float<T>(to_float(grad_out[i]) * gelu_grad(to_float(x[i])));
  }
}

// y = gelu(x + bias) for x (rows, cols), bias (cols,). 2D grid: blockIdx.x selects 32 vectors of
// columns, blockIdx.y a group of rows; each thread keeps its column's bias in registers and
// walks rows blockIdx.y * 8 + threadIdx.y, + gridDim.y * 8, ... (no per-element modulo).
template <typename T, typename P, int kVec>
__global__ void __launch_bounds__(kTileCols * kTileRows)
    bias_gelu_forward_kernel(const T* __restrict__ x, const P* __restrict__ bias,
                             T* __restrict__ y, int64_t rows, int cols) {
  const int vec = blockIdx.x * kTileCols + threadIdx.x;
  if (vec >= cols / kVec) return;
  const int col = vec * kVec;
  float b[kVec];
  load_floats<kVec>(bias + col, b);
  const int64_t row_stride = int64_t(gridDim.y) * kTileRows;
  for (int64_t row = int64_t(blockIdx.y) * kTileRows + threadIdx.y; row < rows; row += row_stride) {
    const int64_t offset = row * cols + col;
    float vals[kVec];
    load_floats<kVec>(x + offset, vals);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float z = vals[i] + b[i];
      vals[i] = z * gelu_gate(z);
    }
    store_floats<kVec>(y + offset, vals);
  }
}

// grad_x = grad_out * gelu'(x + bias), and this block's share of grad_bias = sum over rows of
// grad_x (fp32, before rounding grad_x to T). Same grid as bias_gelu_forward_kernel. Each thread
// accumulates its columns over its rows in registers; the 8 row slices of the block are added
// in order through shared memory and written to partial_grad_bias[blockIdx.y] (gridDim.y, cols).
template <typename T, typename P, int kVec>
__global__ void __launch_bounds__(kTileCols * kTileRows)
    bias_gelu_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                              const P* __restrict__ bias, T* __restrict__ grad_x,
                              float* __restrict__ partial_grad_bias, int64_t rows, int cols) {
  __shared__ float slice_sums[kTileRows][kTileCols * kVec];
  const int vec = blockIdx.x * kTileCols + threadIdx.x;
  const bool active = vec < cols / kVec;
  const int col = vec * kVec;
  float grad_bias[kVec] = {};
  if (active) {
    float b[kVec];
    load_floats<kVec>(bias + col, b);
    const int64_t row_stride = int64_t(gridDim.y) * kTileRows;
    for (int64_t row = int64_t(blockIdx.y) * kTileRows + threadIdx.y; row < rows;
         row += row_stride) {
      const int64_t offset = row * cols + col;
      float dy[kVec], vals[kVec];
      load_floats<kVec>(grad_out + offset, dy);
      load_floats<kVec>(x + offset, vals);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        vals[i] = dy[i] * gelu_grad(vals[i] + b[i]);
        grad_bias[i] += vals[i];
      }
      store_floats<kVec>(grad_x + offset, vals);
    }
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) slice_sums[threadIdx.y][threadIdx.x * kVec + i] = grad_bias[i];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    float* partial = partial_grad_bias + int64_t(blockIdx.y) * cols + col;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      float total = 0.0f;
#pragma unroll
      for (int s = 0; s < kTileRows; ++s) total += slice_sums[s][threadIdx.x * kVec + i];
      partial[i] = total;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

// bias (cols,) on x's device, returned contiguous in x's dtype or float32 (the kernels read
// either; any other floating dtype is converted to float32 here, a (cols,) copy).
at::Tensor prepare_bias(const at::Tensor& bias, const at::Tensor& x) {
  check_cuda_tensor(bias, "bias");
  TORCH_CHECK(bias.device() == x.device(), "bias must be on x's device ", x.device(), ", got ",
              bias.device());
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension for bias_gelu");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(-1), "bias must have shape (",
              x.size(-1), ",) to match x's last dimension, got ", bias.sizes());
  TORCH_CHECK(at::isFloatingType(bias.scalar_type()), "bias must be a floating tensor, got ",
              bias.scalar_type());
  const bool native = bias.scalar_type() == x.scalar_type() || bias.scalar_type() == at::kFloat;
  return (native ? bias : bias.to(at::kFloat)).contiguous();
}

template <typename T, int kVec>
void launch_gelu_forward(const T* x, T* y, int64_t n, cudaStream_t stream) {
  const auto kernel = gelu_forward_kernel<T, kVec>;
  const int grid = persistent_grid(kernel, ceil_div(ceil_div(n, kVec), kElementwiseThreads),
                                   kElementwiseThreads);
  kernel<<<grid, kElementwiseThreads, 0, stream>>>(x, y, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kVec>
void launch_gelu_backward(const T* grad_out, const T* x, T* grad_x, int64_t n,
                          cudaStream_t stream) {
  const auto kernel = gelu_backward_kernel<T, kVec>;
  const int grid = persistent_grid(kernel, ceil_div(ceil_div(n, kVec), kElementwiseThreads),
                                   kElementwiseThreads);
  kernel<<<grid, kElementwiseThreads, 0, stream>>>(grad_out, x, grad_x, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename P, int kVec>
void launch_bias_gelu_forward(const T* x, const P* bias, T* y, int64_t rows, int cols,
                              cudaStream_t stream) {
  const auto kernel = bias_gelu_forward_kernel<T, P, kVec>;
  const dim3 grid = column_tile_grid(kernel, rows, cols / kVec);
  kernel<<<grid, dim3(kTileCols, kTileRows), 0, stream>>>(x, bias, y, rows, cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename P, int kVec>
void launch_bias_gelu_backward(const T* grad_out, const T* x, const P* bias, T* grad_x,
                               at::Tensor& grad_bias, int64_t rows, int cols, cudaStream_t stream) {
  const auto kernel = bias_gelu_backward_kernel<T, P, kVec>;
  const dim3 grid = column_tile_grid(kernel, rows, cols / kVec);
  // (1, row groups, cols): one partial row per blockIdx.y, reduced by sum_partial_rows_kernel.
  at::Tensor partials = at::empty({1, int64_t(grid.y), cols}, grad_bias.options());
  kernel<<<grid, dim3(kTileCols, kTileRows), 0, stream>>>(
      grad_out, x, bias, grad_x, partials.data_ptr<float>(), rows, cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_sum_partial_rows<1>(partials, ColumnSums<1>{{grad_bias.data_ptr<float>()}}, stream);
}

}  // namespace

at::Tensor gelu_forward_cuda(const at::Tensor& x_in) {
  check_float_input(x_in, "x");
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  // The kernel walks the elements densely: a strided view is copied once here (a no-op for the
  // usual contiguous activation).
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const T* x_ptr = typed_ptr<T>(x);
    T* y_ptr = typed_mutable_ptr<T>(y);
    if (is_vector_aligned(x_ptr) && is_vector_aligned(y_ptr)) {
      launch_gelu_forward<T, kVecElems<T>>(x_ptr, y_ptr, n, stream);
    } else {
      launch_gelu_forward<T, 1>(x_ptr, y_ptr, n, stream);
    }
  });
  return y;
}

at::Tensor gelu_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in) {
  check_float_input(x_in, "x");
  check_grad_out(grad_out_in, x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  // Dense walk over the elements: strided views are copied once (no-op when contiguous).
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return grad_x;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const T* dy_ptr = typed_ptr<T>(grad_out);
    const T* x_ptr = typed_ptr<T>(x);
    T* dx_ptr = typed_mutable_ptr<T>(grad_x);
    if (is_vector_aligned(dy_ptr) && is_vector_aligned(x_ptr) && is_vector_aligned(dx_ptr)) {
      launch_gelu_backward<T, kVecElems<T>>(dy_ptr, x_ptr, dx_ptr, n, stream);
    } else {
      launch_gelu_backward<T, 1>(dy_ptr, x_ptr, dx_ptr, n, stream);
    }
  });
  return grad_x;
}

at::Tensor bias_gelu_forward_cuda(const at::Tensor& x_in, const at::Tensor& bias_in) {
  check_float_input(x_in, "x");
  const at::Tensor bias = prepare_bias(bias_in, x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  // The kernel indexes x as dense (rows, cols): a strided view is copied once here (no-op when
  // contiguous).
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t cols64 = x.size(-1);
  TORCH_CHECK(cols64 < (int64_t(1) << 31), "x: last dimension must be below 2^31, got ", cols64);
  if (x.numel() == 0) return y;
  const int cols = int(cols64);
  const int64_t rows = x.numel() / cols;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const auto launch = [&](auto bias_tag) {
      using P = decltype(bias_tag);
      const T* x_ptr = typed_ptr<T>(x);
      const P* bias_ptr = typed_ptr<P>(bias);
      T* y_ptr = typed_mutable_ptr<T>(y);
      if (cols % kVecElems<T> == 0 && is_vector_aligned(x_ptr) && is_vector_aligned(bias_ptr) &&
          is_vector_aligned(y_ptr)) {
        launch_bias_gelu_forward<T, P, kVecElems<T>>(x_ptr, bias_ptr, y_ptr, rows, cols, stream);
      } else {
        launch_bias_gelu_forward<T, P, 1>(x_ptr, bias_ptr, y_ptr, rows, cols, stream);
      }
    };
    if (bias.scalar_type() == at::kFloat) {
      launch(float{});
    } else {
      launch(T{});
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cuda(const at::Tensor& grad_out_in,
                                                           const at::Tensor& x_in,
                                                           const at::Tensor& bias_in) {
  check_float_input(x_in, "x");
  check_grad_out(grad_out_in, x_in);
  const at::Tensor bias = prepare_bias(bias_in, x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  // Dense (rows, cols) indexing: strided views are copied once (no-op when contiguous).
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const int64_t cols64 = x.size(-1);
  TORCH_CHECK(cols64 < (int64_t(1) << 31), "x: last dimension must be below 2^31, got ", cols64);
  at::Tensor grad_bias = at::empty({cols64}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {grad_x, grad_bias.zero_()};
  const int cols = int(cols64);
  const int64_t rows = x.numel() / cols;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const auto launch = [&](auto bias_tag) {
      using P = decltype(bias_tag);
      const T* dy_ptr = typed_ptr<T>(grad_out);
      const T* x_ptr = typed_ptr<T>(x);
      const P* bias_ptr = typed_ptr<P>(bias);
      T* dx_ptr = typed_mutable_ptr<T>(grad_x);
      if (cols % kVecElems<T> == 0 && is_vector_aligned(dy_ptr) && is_vector_aligned(x_ptr) &&
          is_vector_aligned(bias_ptr) && is_vector_aligned(dx_ptr)) {
        launch_bias_gelu_backward<T, P, kVecElems<T>>(dy_ptr, x_ptr, bias_ptr, dx_ptr, grad_bias,
                                                      rows, cols, stream);
      } else {
        launch_bias_gelu_backward<T, P, 1>(dy_ptr, x_ptr, bias_ptr, dx_ptr, grad_bias, rows, cols,
                                           stream);
      }
    };
    if (bias.scalar_type() == at::kFloat) {
      launch(float{});
    } else {
      launch(T{});
    }
  });
  return {grad_x, grad_bias};
}

}  // namespace llmkernels

TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) {
  m.impl("gelu_forward", &llmkernels::gelu_forward_cuda);
  m.impl("gelu_backward", &llmkernels::gelu_backward_cuda);
  m.impl("bias_gelu_forward", &llmkernels::bias_gelu_forward_cuda);
  m.impl("bias_gelu_backward", &llmkernels::bias_gelu_backward_cuda);
}
