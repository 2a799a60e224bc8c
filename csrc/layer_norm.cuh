// The interface between layer_norm.cu (host side: checks, dtype dispatch, registration) and the
// translation units that compile the LayerNorm kernels (layer_norm_kernels.cuh). Splitting them
// keeps any one nvcc job small: the four kernel files hold about 47 instantiations each.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/ATen.h>

namespace llmkernels {

// Forward of LayerNorm over rows of `cols` elements: out, mean and rstd (fp32, one per row).
// kAddResidual (add_layer_norm): residual is read and sum = x + residual written beside x; both
// nullptr otherwise.
template <typename T, typename P, bool kAddResidual>
void launch_layer_norm_forward(const T* x, const T* residual, const P* weight, const P* bias,
                               T* out, T* sum, float* mean, float* rstd, int64_t rows, int cols,
                               float eps, cudaStream_t stream);

// Backward: writes grad_x and returns the (2, num partial rows, cols) fp32 partial sums of
// grad_weight and grad_bias, which the caller adds up in a fixed order (sum_partial_rows_kernel).
// kAddGradSum (add_layer_norm): grad_sum is added to grad_x; nullptr otherwise.
template <typename T, typename P, bool kAddGradSum>
at::Tensor launch_layer_norm_backward(const T* grad_out, const T* grad_sum, const T* x,
                                      const P* weight, const float* mean, const float* rstd,
                                      T* grad_x, const at::TensorOptions& float_options,
                                      int64_t rows, int cols, cudaStream_t stream);

}  // namespace llmkernels

// Calls MACRO(T, P, FLAG) for every (x dtype, weight/bias dtype) the ops accept: parameters in
// x's dtype, or fp32 parameters with bf16/fp16 activations (layer_norm.cu's dispatch).
#define LLMKERNELS_FOR_EACH_LAYER_NORM_TYPE(MACRO, FLAG) \
  MACRO(float, float, FLAG)                              \
  MACRO(__half, __half, FLAG)                            \
  MACRO(__half, float, FLAG)                             \
  MACRO(__nv_bfloat16, __nv_bfloat16, FLAG)              \
  MACRO(__nv_bfloat16, float, FLAG)
