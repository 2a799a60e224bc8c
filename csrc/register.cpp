// The one place where the llmkernels operator schemas are declared.
//
// Each kernel file (gelu.cu, layer_norm.cu with add_layer_norm, flash_attention.cu) registers
// its CUDA implementation with its own TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) block; fake
// (meta) implementations and autograd formulas are registered from Python
// (llmkernels/gelu.py, layer_norm.py, add_layer_norm.py, attention.py), as
// pytorch/extension-cpp does.
#include <Python.h>
#include <torch/library.h>

// Importing `llmkernels._C` runs the static registrations below. The module itself
// is empty: every op is reached through torch.ops.llmkernels.*, so no pybind11.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(llmkernels, m) {
  // GELU with the tanh approximation, and bias + GELU fused into one pass.
  m.def("gelu_forward(Tensor x) -> Tensor");
  m.def("gelu_backward(Tensor grad_out, Tensor x) -> Tensor");
  m.def("bias_gelu_forward(Tensor x, Tensor bias) -> Tensor");
  // Returns (grad_x, grad_bias); grad_bias is float32 and reduced deterministically.
  m.def("bias_gelu_backward(Tensor grad_out, Tensor x, Tensor bias) -> (Tensor, Tensor)");

  // LayerNorm over the last dimension. Returns (out, mean, rstd); mean and rstd are
  // float32 with one value per row and are what the backward pass reuses.
  m.def("layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias); the last two are float32 sums over rows.
  m.def("layer_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");

  // Residual add + LayerNorm in one pass: returns (sum, out, mean, rstd) with sum = x + residual
  // (x's dtype) and out = layer_norm(sum); mean and rstd as in layer_norm_forward.
  m.def("add_layer_norm_forward(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias): grad_x, the gradient of both x and residual, is
  // layer_norm_backward's grad_x (with sum for x) plus grad_sum.
  m.def("add_layer_norm_backward(Tensor grad_sum, Tensor grad_out, Tensor sum, Tensor? weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");

  // Flash attention on (batch, heads, seq, head_dim). Returns (out, lse) where lse is
  // the float32 natural-log log-sum-exp of each query row's scaled scores.
  m.def("flash_attention_forward(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v).
  m.def("flash_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
}
