"""Residual add + LayerNorm in one pass, the pair that joins consecutive GPT blocks:

    sum = x + residual                        (in x's dtype, as PyTorch's add rounds)
    out = layer_norm(sum, weight, bias, eps)  (statistics per row, in fp32)

Both are returned: sum is the residual stream the next add reads, out feeds the next
attention or MLP. The fused kernels (csrc/layer_norm.cu, llmkernels/triton/layer_norm.py)
are LayerNorm's with the add folded in: one read of x and residual, one write of sum and
out, instead of an add kernel (two reads, one write) followed by LayerNorm (one read, one
write). The backward is LayerNorm's with the sum's gradient added to grad_x in the same
kernel; x and residual get the same gradient:

    grad_x = grad_residual = layer_norm_backward(grad_out)(sum) + grad_sum

This file holds the plain-PyTorch reference, the fake and autograd registrations of the
fused ops and the public function.
"""
from typing import Optional

import torch

from . import backends
from .layer_norm import (
    check_layer_norm_args, fake_param_grads, fake_row_stats, layer_norm_reference, layer_norm_unsupported,
    param_grads, save_param_dtypes,
)  # fmt: skip
from .validation import check_same_device, check_same_dtype, check_shape, check_tensor


# ----------------------------------------------------------------------------- reference
def add_layer_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, LayerNorm of it) in plain PyTorch: the add in x's dtype, LayerNorm's
    statistics in at least float32."""
    summed = x + residual  # (..., N)
    return summed, layer_norm_reference(summed, weight, bias, eps)


# ------------------------------------------------------- fused ops: fake + autograd
def _register_fake_cuda_ops() -> None:
    @torch.library.register_fake("llmkernels::add_layer_norm_forward")
    def _(x, residual, weight, bias, eps):
        return (x.new_empty(x.shape), x.new_empty(x.shape), *fake_row_stats(x))

    @torch.library.register_fake("llmkernels::add_layer_norm_backward")
    def _(grad_sum, grad_out, summed, weight, mean, rstd):
        return (summed.new_empty(summed.shape), *fake_param_grads(summed))


def _register_autograd(backend: str) -> None:
    forward_name = "llmkernels::" + backends.FUSED_OP_PREFIX[backend] + "add_layer_norm_forward"
    add_layer_norm_backward = backends.fused_op(backend, "add_layer_norm_backward")

    def setup_context(ctx, inputs, output):
        _x, _residual, weight, bias, _eps = inputs
        summed, _, mean, rstd = output
        ctx.save_for_backward(summed, weight, mean, rstd)  # LayerNorm's input is the sum
        save_param_dtypes(ctx, weight, bias)

    def backward(ctx, grad_sum, grad_out, _grad_mean, _grad_rstd):
        summed, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = add_layer_norm_backward(grad_sum, grad_out, summed, weight, mean, rstd)
        return grad_x, grad_x, *param_grads(ctx, grad_weight, grad_bias), None  # x and residual alike

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


if backends.CUDA_EXTENSION_LOADED:
    _register_fake_cuda_ops()
for _backend in backends.registered_fused_backends():
    _register_autograd(_backend)


# ------------------------------------------------------------------------- dispatch
def _add_layer_norm_unsupported(
    backend: str,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> Optional[str]:
    # residual has x's shape, dtype and device (checked first): a backend that can
    # normalise x can add residual to it.
    return layer_norm_unsupported(backend, x, weight, bias)


def _check_add_layer_norm_args(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> tuple:
    """add_layer_norm's input checks; returns (x, residual, weight, bias), what the support
    check takes."""
    check_layer_norm_args(x, weight, bias, eps)
    check_tensor("residual", residual)
    check_shape("residual", residual, x.shape, "(the shape of x)")
    check_same_dtype("residual", residual, "x", x)
    check_same_device("residual", residual, "x", x)
    return x, residual, weight, bias


backends.register_op("add_layer_norm", _check_add_layer_norm_args, _add_layer_norm_unsupported)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, layer_norm(x + residual)) in one pass over x and residual.

    x and residual have the same shape (..., N), dtype and device; weight and bias
    (optional) have shape (N,). Gradients flow to x, residual, weight and bias through both
    outputs."""
    _check_add_layer_norm_args(x, residual, weight, bias, eps)
    chosen = backends.select_backend("add_layer_norm", backend, x, residual, weight, bias)
    if chosen == "reference":
        return add_layer_norm_reference(x, residual, weight, bias, eps)
    forward = backends.fused_op(chosen, "add_layer_norm_forward")
    summed, out, _mean, _rstd = forward(x, residual, weight, bias, float(eps))
    return summed, out
