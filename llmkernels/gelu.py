"""GELU with the tanh approximation, and bias + GELU in one pass.

    gelu(x) = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))

This file holds the plain-PyTorch reference, the fake (shape-only) and autograd
registrations of the fused ops (csrc/gelu.cu, llmkernels/triton/gelu.py), and the public
functions that pick a backend.
"""
import math
from typing import Optional

import torch

from . import backends
from .validation import check_same_device, check_same_dtype, check_shape, check_tensor, fused_dtype_reason

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC_COEFF = 0.044715

if backends.TRITON_IMPORTABLE:
    from .triton import gelu as triton_gelu


# ----------------------------------------------------------------------------- reference
def gelu_reference(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU in plain PyTorch, computed in at least float32 and returned in x's dtype."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    if approximate == "tanh":
        y = 0.5 * h * (1.0 + torch.tanh(SQRT_2_OVER_PI * (h + CUBIC_COEFF * h * h * h)))
    else:  # the exact form, with the Gaussian CDF written through erf
        y = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    return y.to(x.dtype)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x + bias), bias broadcast over the last dimension of x."""
    h = x.to(torch.promote_types(x.dtype, torch.float32)) + bias  # (..., N)
    return gelu_reference(h).to(x.dtype)


# ------------------------------------------------------- fused ops: fake + autograd
def _register_fake_cuda_ops() -> None:
    @torch.library.register_fake("llmkernels::gelu_forward")
    def _(x):
        return x.new_empty(x.shape)

    @torch.library.register_fake("llmkernels::gelu_backward")
    def _(grad_out, x):
        return x.new_empty(x.shape)

    @torch.library.register_fake("llmkernels::bias_gelu_forward")
    def _(x, bias):
        return x.new_empty(x.shape)

    @torch.library.register_fake("llmkernels::bias_gelu_backward")
    def _(grad_out, x, bias):
        return x.new_empty(x.shape), bias.new_empty(bias.shape, dtype=torch.float32)


def _register_autograd(backend: str) -> None:
    prefix = "llmkernels::" + backends.FUSED_OP_PREFIX[backend]
    gelu_backward = backends.fused_op(backend, "gelu_backward")
    bias_gelu_backward = backends.fused_op(backend, "bias_gelu_backward")

    def save_inputs(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def gelu_grad(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return gelu_backward(grad_out, x)

    def bias_gelu_grad(ctx, grad_out):
        x, bias = ctx.saved_tensors
        grad_x, grad_bias = bias_gelu_backward(grad_out, x, bias)
        return grad_x, grad_bias.to(bias.dtype)

    torch.library.register_autograd(prefix + "gelu_forward", gelu_grad, setup_context=save_inputs)
    torch.library.register_autograd(prefix + "bias_gelu_forward", bias_gelu_grad, setup_context=save_inputs)


if backends.CUDA_EXTENSION_LOADED:
    _register_fake_cuda_ops()
for _backend in backends.registered_fused_backends():
    _register_autograd(_backend)


# ------------------------------------------------------------------------- dispatch
def cuda_unsupported(x: torch.Tensor) -> Optional[str]:
    """Why the CUDA elementwise/row kernels cannot take x, or None. Shared with layer_norm."""
    if x.device.type != "cuda":
        return f"x is on {x.device}, the CUDA kernels need a CUDA tensor"
    return fused_dtype_reason("x", x)


def _gelu_unsupported(backend: str, x: torch.Tensor, approximate: str = "tanh") -> Optional[str]:
    if backend == "reference":
        return None
    if approximate != "tanh":
        return "the fused kernels implement approximate='tanh' only"
    if backend == "cuda":
        return cuda_unsupported(x)
    return triton_gelu.supports_gelu(x)


def _bias_gelu_unsupported(backend: str, x: torch.Tensor, bias: torch.Tensor) -> Optional[str]:
    if backend == "reference":
        return None
    if backend == "cuda":
        return cuda_unsupported(x)
    return triton_gelu.supports_bias_gelu(x, bias)


def _check_gelu_arguments(x: torch.Tensor, approximate: str = "tanh") -> tuple:
    check_tensor("x", x)
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return x, approximate


def _check_bias_gelu_arguments(x: torch.Tensor, bias: torch.Tensor) -> tuple:
    check_tensor("x", x, min_ndim=1)
    check_tensor("bias", bias, ndim=1)
    check_shape("bias", bias, (x.shape[-1],), "(the last dimension of x)")
    check_same_device("bias", bias, "x", x)
    # One dtype, as the fused kernels read it; under autocast the caller casts the bias.
    check_same_dtype("bias", bias, "x", x)
    return x, bias


backends.register_op("gelu", _check_gelu_arguments, _gelu_unsupported)
backends.register_op("bias_gelu", _check_bias_gelu_arguments, _bias_gelu_unsupported)


def gelu(x: torch.Tensor, approximate: str = "tanh", backend: str = "auto") -> torch.Tensor:
    """GELU of x. The fused kernels implement approximate="tanh" (GPT-2's); "none" (erf)
    always runs the reference."""
    x, approximate = _check_gelu_arguments(x, approximate)
    chosen = backends.select_backend("gelu", backend, x, approximate)
    if chosen == "reference":
        return gelu_reference(x, approximate)
    return backends.fused_op(chosen, "gelu_forward")(x)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """gelu_tanh(x + bias) in one pass; bias has shape (x.shape[-1],) and x's dtype."""
    x, bias = _check_bias_gelu_arguments(x, bias)
    chosen = backends.select_backend("bias_gelu", backend, x, bias)
    if chosen == "reference":
        return bias_gelu_reference(x, bias)
    return backends.fused_op(chosen, "bias_gelu_forward")(x, bias)
