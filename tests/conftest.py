"""Shared test set-up. Without a GPU the Triton kernels run in Triton's interpreter, which
reads TRITON_INTERPRET when the kernels are defined, so it is set before llmkernels is
imported anywhere."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import llmkernels  # noqa: E402
from llmkernels import backends  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_extension = pytest.mark.skipif(
    not backends.CUDA_EXTENSION_LOADED, reason="the CUDA extension llmkernels._C is not built here"
)
requires_cuda_kernels = pytest.mark.skipif(
    not (backends.CUDA_EXTENSION_LOADED and torch.cuda.is_available()),
    reason="needs the CUDA extension and a CUDA device",
)

# The op contract: one schema per fused op, shared by the CUDA extension and (with a
# triton_ prefix) the Triton kernels.
OP_SCHEMAS = {
    "gelu_forward": "llmkernels::gelu_forward(Tensor x) -> Tensor",
    "gelu_backward": "llmkernels::gelu_backward(Tensor grad_out, Tensor x) -> Tensor",
    "bias_gelu_forward": "llmkernels::bias_gelu_forward(Tensor x, Tensor bias) -> Tensor",
    "bias_gelu_backward": "llmkernels::bias_gelu_backward(Tensor grad_out, Tensor x, Tensor bias) -> (Tensor, Tensor)",
    "layer_norm_forward": "llmkernels::layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
    "layer_norm_backward": "llmkernels::layer_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)",
    "add_layer_norm_forward": "llmkernels::add_layer_norm_forward(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
    "add_layer_norm_backward": "llmkernels::add_layer_norm_backward(Tensor grad_sum, Tensor grad_out, Tensor sum, Tensor? weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)",
    "flash_attention_forward": "llmkernels::flash_attention_forward(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)",
    "flash_attention_backward": "llmkernels::flash_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, float scale) -> (Tensor, Tensor, Tensor)",
}


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, CUDA device: {torch.cuda.is_available()}"]
    for name, (usable, reason) in llmkernels.available_backends().items():
        lines.append(f"llmkernels backend {name}: {'usable' if usable else 'not usable: ' + reason}")
    return lines


@pytest.fixture
def generator():
    """A seeded generator per test: fresh random inputs, reproducible failures."""
    return torch.Generator().manual_seed(1234)
