"""LayerNorm over the last dimension:

    y = (x - mean) / sqrt(var + eps) * weight + bias      (statistics per row, in fp32)

This file holds the plain-PyTorch reference, the fake and autograd registrations of the
fused ops (csrc/layer_norm.cu, llmkernels/triton/layer_norm.py) and the public function.
"""
from typing import Optional

import torch

from . import backends
from .gelu import cuda_unsupported
from .validation import check_finite_number, check_parameter_dtype, check_same_device, check_shape, check_tensor

if backends.TRITON_IMPORTABLE:
    from .triton import layer_norm as triton_layer_norm


# ----------------------------------------------------------------------------- reference
def layer_norm_reference(
    x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm in plain PyTorch, statistics in at least float32, result in x's dtype."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))  # (..., N)
    mean = h.mean(dim=-1, keepdim=True)  # (..., 1)
    variance = (h - mean).pow(2).mean(dim=-1, keepdim=True)  # (..., 1), biased like GPT-2's
    y = (h - mean) * torch.rsqrt(variance + eps)  # (..., N)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


# ------------------------------------------------------- fused ops: fake + autograd
def fake_row_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape-only (mean, rstd) of the fused forward ops: float32, one per row of x (...)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats = x.new_empty((rows,), dtype=torch.float32)
    return stats, stats.new_empty(stats.shape)


def fake_param_grads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape-only (grad_weight, grad_bias) of the fused backward ops: float32, (N,)."""
    per_column = x.new_empty((x.shape[-1],), dtype=torch.float32)
    return per_column, per_column.new_empty(per_column.shape)


def save_param_dtypes(ctx, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def param_grads(ctx, grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> tuple:
    """The kernels always reduce both sums (fp32); hand back the ones that have inputs, in
    their dtypes (see save_param_dtypes)."""
    grad_weight = None if ctx.weight_dtype is None else grad_weight.to(ctx.weight_dtype)
    grad_bias = None if ctx.bias_dtype is None else grad_bias.to(ctx.bias_dtype)
    return grad_weight, grad_bias


def _register_fake_cuda_ops() -> None:
    @torch.library.register_fake("llmkernels::layer_norm_forward")
    def _(x, weight, bias, eps):
        return (x.new_empty(x.shape), *fake_row_stats(x))

    @torch.library.register_fake("llmkernels::layer_norm_backward")
    def _(grad_out, x, weight, mean, rstd):
        return (x.new_empty(x.shape), *fake_param_grads(x))


def _register_autograd(backend: str) -> None:
    forward_name = "llmkernels::" + backends.FUSED_OP_PREFIX[backend] + "layer_norm_forward"
    layer_norm_backward = backends.fused_op(backend, "layer_norm_backward")

    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        save_param_dtypes(ctx, weight, bias)

    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = layer_norm_backward(grad_out, x, weight, mean, rstd)
        return grad_x, *param_grads(ctx, grad_weight, grad_bias), None

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


if backends.CUDA_EXTENSION_LOADED:
    _register_fake_cuda_ops()
for _backend in backends.registered_fused_backends():
    _register_autograd(_backend)


# ------------------------------------------------------------------------- dispatch
def layer_norm_unsupported(
    backend: str, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]
) -> Optional[str]:
    if backend == "reference":
        return None
    if backend == "cuda":
        return cuda_unsupported(x)
    return triton_layer_norm.supports_layer_norm(x, weight, bias)


def check_layer_norm_args(
    x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: float = 1e-5
) -> tuple:
    """The public LayerNorm ops' input checks (errors name the argument); returns (x, weight,
    bias), what the support check takes."""
    check_tensor("x", x, min_ndim=1)
    hidden = x.shape[-1]
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            check_tensor(name, param, ndim=1)
            check_shape(name, param, (hidden,), "(the last dimension of x)")
            check_same_device(name, param, "x", x)
            check_parameter_dtype(name, param, x)
    check_finite_number("eps", eps, positive=True)
    return x, weight, bias


backends.register_op("layer_norm", check_layer_norm_args, layer_norm_unsupported)


def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm of x over its last dimension; weight and bias (optional) have shape (N,) and
    x's dtype or float32 (float32 parameters on low-precision activations)."""
    x, weight, bias = check_layer_norm_args(x, weight, bias, eps)
    chosen = backends.select_backend("layer_norm", backend, x, weight, bias)
    if chosen == "reference":
        return layer_norm_reference(x, weight, bias, eps)
    out, _mean, _rstd = backends.fused_op(chosen, "layer_norm_forward")(x, weight, bias, float(eps))
    return out
