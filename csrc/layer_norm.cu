// LayerNorm and add_layer_norm (residual add + LayerNorm), forward and backward: the host side.
// Input checks, the dtype dispatch to the launchers, the final fixed-order sum of the
// backward's grad_weight/grad_bias partial rows, and the op registrations. The kernels, and
// how they work, are in layer_norm_kernels.cuh; four translation units compile them
// (layer_norm_forward.cu, add_layer_norm_forward.cu, layer_norm_backward.cu,
// add_layer_norm_backward.cu) so that the build spreads over parallel nvcc jobs.
#include <type_traits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "layer_norm.cuh"
#include "vector_io.cuh"

namespace llmkernels {
namespace {

bool is_given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// weight and bias in the one dtype the kernels read them in: x's dtype when every given one has
// it, else float32 (fp32 master weights with bf16/fp16 activations are read natively; any other
// mix is converted to float32 here, an (N,) copy). Absent ones stay undefined (nullptr).
struct LayerNormParams {
  at::Tensor weight;
  at::Tensor bias;
  bool fp32;
};

LayerNormParams prepare_params(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias) {
  const int64_t cols = x.size(-1);
  for (const auto& [param, arg] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (!is_given(*param)) continue;
    const at::Tensor& p = param->value();
    check_cuda_tensor(p, arg);
    TORCH_CHECK(p.device() == x.device(), arg, " must be on x's device ", x.device(), ", got ",
                p.device());
    TORCH_CHECK(p.dim() == 1 && p.size(0) == cols, arg, " must have shape (", cols,
                ",) to match x's last dimension, got ", p.sizes());
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), arg, " must be a floating tensor, got ",
                p.scalar_type());
  }
  const auto has_x_dtype = [&](const std::optional<at::Tensor>& p) {
    return !is_given(p) || p->scalar_type() == x.scalar_type();
  };
  const at::ScalarType dtype =
      has_x_dtype(weight) && has_x_dtype(bias) ? x.scalar_type() : at::kFloat;
  const auto as_dtype = [&](const std::optional<at::Tensor>& p) {
    return is_given(p) ? p->to(dtype).contiguous() : at::Tensor();
  };
  return {as_dtype(weight), as_dtype(bias), dtype == at::kFloat};
}

// Number of columns (x's last dimension), checked to fit the kernels' int indexing. 0 is allowed:
// like the fake implementation (llmkernels/layer_norm.py), such an x has 0 rows (layer_norm_rows).
int layer_norm_cols(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  const int64_t cols = x.size(-1);
  TORCH_CHECK(cols < (int64_t(1) << 31),
              "x: last dimension (normalized size) must be below 2^31, got ", cols);
  return int(cols);
}

// Rows of x as the kernels see it (all leading dimensions); 0 when cols is 0, matching the fake.
int64_t layer_norm_rows(const at::Tensor& x, int cols) { return cols == 0 ? 0 : x.numel() / cols; }

// Calls fn(std::true_type{}) when `flag`, else fn(std::false_type{}): a runtime choice of the
// kAddResidual / kAddGradSum instantiations.
template <typename Fn>
void dispatch_bool(bool flag, Fn&& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// Forward of layer_norm (residual_in undefined) and add_layer_norm. Returns (sum, out, mean,
// rstd); sum is undefined for layer_norm.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const at::Tensor& residual_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    double eps) {
  check_float_input(x_in, "x");
  const bool add_residual = residual_in.defined();
  if (add_residual) check_grad_out(residual_in, x_in, "residual");
  const int cols = layer_norm_cols(x_in);
  const LayerNormParams params = prepare_params(x_in, weight_in, bias_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  // The kernels index x as dense (rows, cols): a strided view is copied once here (a no-op for
  // the usual contiguous activation).
  const at::Tensor x = x_in.contiguous();
  const at::Tensor residual = add_residual ? residual_in.contiguous() : at::Tensor();
  const int64_t rows = layer_norm_rows(x, cols);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor sum = add_residual ? at::empty(x.sizes(), x.options()) : at::Tensor();
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {sum, out, mean, rstd};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const auto launch = [&](auto param_tag, auto add_tag) {
      using P = decltype(param_tag);
      launch_layer_norm_forward<T, P, decltype(add_tag)::value>(
          typed_ptr<T>(x), typed_ptr<T>(residual), typed_ptr<P>(params.weight),
          typed_ptr<P>(params.bias), typed_mutable_ptr<T>(out),
          add_residual ? typed_mutable_ptr<T>(sum) : nullptr, mean.data_ptr<float>(),
          rstd.data_ptr<float>(), rows, cols, float(eps), stream);
    };
    dispatch_bool(add_residual, [&](auto add_tag) {
      if (params.fp32) {
        launch(float{}, add_tag);
      } else {
        launch(T{}, add_tag);
      }
    });
  });
  return {sum, out, mean, rstd};
}

// Backward of layer_norm (grad_sum_in undefined) and add_layer_norm. Returns (grad_x,
// grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out_in, const at::Tensor& grad_sum_in, const at::Tensor& x_in,
    const std::optional<at::Tensor>& weight_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in) {
  check_float_input(x_in, "x");
  check_grad_out(grad_out_in, x_in);
  const bool add_grad_sum = grad_sum_in.defined();
  if (add_grad_sum) check_grad_out(grad_sum_in, x_in, "grad_sum");
  const int cols = layer_norm_cols(x_in);
  const int64_t rows = layer_norm_rows(x_in, cols);
  for (const auto& [stat, arg] : {std::pair{&mean_in, "mean"}, std::pair{&rstd_in, "rstd"}}) {
    check_cuda_tensor(*stat, arg);
    TORCH_CHECK(stat->device() == x_in.device(), arg, " must be on x's device ", x_in.device(),
                ", got ", stat->device());
    TORCH_CHECK(stat->scalar_type() == at::kFloat, arg, " must be float32, got ",
                stat->scalar_type());
    TORCH_CHECK(stat->numel() == rows, arg, " must have one value per row (", rows, "), got ",
                stat->numel());
  }
  const LayerNormParams params = prepare_params(x_in, weight_in, std::nullopt);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  // Dense (rows, cols) indexing: strided views are copied once (no-op when contiguous).
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor grad_sum = add_grad_sum ? grad_sum_in.contiguous() : at::Tensor();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty({cols}, x.options().dtype(at::kFloat));
  at::Tensor grad_bias = at::empty({cols}, x.options().dtype(at::kFloat));
  if (rows == 0) return {grad_x, grad_weight.zero_(), grad_bias.zero_()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partials;  // (2, num partial rows, cols): grad_weight's, then grad_bias's
  dispatch_float_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const auto launch = [&](auto param_tag, auto add_tag) {
      using P = decltype(param_tag);
      partials = launch_layer_norm_backward<T, P, decltype(add_tag)::value>(
          typed_ptr<T>(grad_out), typed_ptr<T>(grad_sum), typed_ptr<T>(x),
          typed_ptr<P>(params.weight), mean.data_ptr<float>(), rstd.data_ptr<float>(),
          typed_mutable_ptr<T>(grad_x), grad_weight.options(), rows, cols, stream);
    };
    dispatch_bool(add_grad_sum, [&](auto add_tag) {
      if (params.fp32) {
        launch(float{}, add_tag);
      } else {
        launch(T{}, add_tag);
      }
    });
  });
  const ColumnSums<2> sums{{grad_weight.data_ptr<float>(), grad_bias.data_ptr<float>()}};
  launch_sum_partial_rows<2>(partials, sums, stream);
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  const auto sum_out_mean_rstd = forward(x, at::Tensor(), weight, bias, eps);
  return {std::get<1>(sum_out_mean_rstd), std::get<2>(sum_out_mean_rstd),
          std::get<3>(sum_out_mean_rstd)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd) {
  return backward(grad_out, at::Tensor(), x, weight, mean, rstd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_forward_cuda(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  return forward(x, residual, weight, bias, eps);
}

// The add_layer_norm backward: `sum` plays x's part, grad_sum is added to grad_x.
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward_cuda(
    const at::Tensor& grad_sum, const at::Tensor& grad_out, const at::Tensor& sum,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd) {
  return backward(grad_out, grad_sum, sum, weight, mean, rstd);
}

}  // namespace llmkernels

TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) {
  m.impl("layer_norm_forward", &llmkernels::layer_norm_forward_cuda);
  m.impl("layer_norm_backward", &llmkernels::layer_norm_backward_cuda);
  m.impl("add_layer_norm_forward", &llmkernels::add_layer_norm_forward_cuda);
  m.impl("add_layer_norm_backward", &llmkernels::add_layer_norm_backward_cuda);
}
