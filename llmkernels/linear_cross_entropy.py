"""Linear layer + cross-entropy, the LM head and its loss, without the (N, V) logits:

    loss = F.cross_entropy(x @ weight.T + bias, targets, ignore_index=..., reduction=...)

x (N, C), weight (V, C), bias (V,) optional, targets (N,) int64. Both backends walk the
rows in chunks (chunk_rows: about 256 MiB of logits each), so memory grows with one
chunk's logits, not with N x V:

  reference  plain PyTorch: each chunk's F.linear + F.cross_entropy under activation
             checkpointing, so the backward recomputes that chunk's logits (four matmuls
             instead of three); computed in at least float32. Runs anywhere.
  triton     cuBLAS matmuls and one Triton kernel per chunk that forms the loss and,
             in place, the gradient of the logits; for a reduced loss the gradients of
             x, weight and bias are formed in the forward and scaled in the backward
             (llmkernels/triton/linear_cross_entropy.py has the memory model).

Semantics are PyTorch's: targets == ignore_index contribute no loss and no gradient;
"mean" divides by the number of targets that are not ignored, so with every target
ignored it is nan (0/0) while "sum" is 0 and "none" gives zeros, and every gradient is
zero in all three. The loss is float32 (float64 for float64 inputs) whatever the input
dtype, as the model's F.cross_entropy(logits.float()) gives. Under autocast x, weight and
bias are cast to the autocast dtype first, as F.linear would be.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import backends
from .validation import REDUCTIONS, check_same_device, check_same_dtype, check_shape, check_tensor

if backends.TRITON_IMPORTABLE:
    from .triton import linear_cross_entropy as triton_linear_cross_entropy

# Logits held at once: enough rows per chunk for the matmuls to run at full rate (2048
# rows at V = 50257 in bf16), small next to the (N, V) logits of a training batch.
CHUNK_LOGITS_BYTES = 256 * 2**20
ROW_MULTIPLE = 128  # rows per chunk, a multiple of the matmul tiles


def chunk_rows(num_rows: int, vocab: int, element_size: int) -> int:
    """Rows per chunk so that one chunk of (rows, vocab) logits takes about
    CHUNK_LOGITS_BYTES: the rows split evenly, rounded up to a multiple of ROW_MULTIPLE."""
    chunks = max(1, math.ceil(num_rows * vocab * element_size / CHUNK_LOGITS_BYTES))
    rows = math.ceil(math.ceil(num_rows / chunks) / ROW_MULTIPLE) * ROW_MULTIPLE
    return max(1, min(num_rows, rows))


# ----------------------------------------------------------------------------- reference
def _chunk_losses(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                  ignore_index: int) -> torch.Tensor:
    logits = F.linear(x, weight, bias)  # (rows, C) -> (rows, V)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")  # (rows,), 0 where ignored


def linear_cross_entropy_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -1,
    reduction: str = "mean",
    rows_per_chunk: Optional[int] = None,
) -> torch.Tensor:
    """F.cross_entropy(F.linear(x, weight, bias), targets) in at least float32, one chunk of
    rows at a time; activation checkpointing recomputes each chunk's logits in the backward,
    so neither pass holds more than one chunk of them."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x_, weight_ = x.to(compute_dtype), weight.to(compute_dtype)  # cast once: grad_weight sums in compute_dtype
    bias_ = None if bias is None else bias.to(compute_dtype)
    num_rows = x.shape[0]
    step = rows_per_chunk or chunk_rows(num_rows, weight.shape[0], x_.element_size())
    with torch.autocast(x.device.type, enabled=False):  # F.linear in compute_dtype, not the autocast dtype
        losses = [
            checkpoint(_chunk_losses, x_[start : start + step], weight_, bias_, targets[start : start + step],
                       ignore_index, use_reentrant=False)
            for start in range(0, num_rows, step)
        ]
    losses = torch.cat(losses) if losses else x_.new_zeros(0)  # (N,)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != ignore_index).sum()  # nan when every target is ignored, as PyTorch


# ------------------------------------------------------------- fused ops: autograd
def _register_autograd(backend: str) -> None:
    forward_name = "llmkernels::" + backends.FUSED_OP_PREFIX[backend] + "linear_cross_entropy_forward"
    backward_op = backends.fused_op(backend, "linear_cross_entropy_backward")

    def setup_context(ctx, inputs, output):
        x, weight, targets, bias, ignore_index, reduction, rows_per_chunk, compute_grad = inputs
        _, grad_x, grad_weight, grad_bias = output
        # The gradient outputs carry no gradient; without this autograd would hand the
        # backward zero-filled (N, C) and (V, C) tensors for them (measured: +171 MiB fp32).
        ctx.mark_non_differentiable(grad_x, grad_weight, grad_bias)
        ctx.set_materialize_grads(False)
        ctx.has_bias = bias is not None
        # A reduced loss's gradients came with the forward (for d loss = 1): scale them.
        # Otherwise ("none", or a forward without them) the backward recomputes them.
        ctx.grads_from_forward = compute_grad and reduction != "none"
        if ctx.grads_from_forward:
            ctx.save_for_backward(grad_x, grad_weight, grad_bias)
        else:
            ctx.save_for_backward(x, weight, targets, bias)
            ctx.ignore_index, ctx.reduction, ctx.rows_per_chunk = ignore_index, reduction, rows_per_chunk

    def backward(ctx, grad_loss, _grad_x, _grad_weight, _grad_bias):
        if ctx.grads_from_forward:
            grad_x, grad_weight, grad_bias = (grad * grad_loss for grad in ctx.saved_tensors)
        else:
            x, weight, targets, bias = ctx.saved_tensors
            grad_x, grad_weight, grad_bias = backward_op(
                grad_loss, x, weight, targets, bias, ctx.ignore_index, ctx.reduction, ctx.rows_per_chunk
            )
        return grad_x, grad_weight, None, grad_bias if ctx.has_bias else None, None, None, None, None

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


if backends.TRITON_IMPORTABLE:
    _register_autograd("triton")


# ------------------------------------------------------------------------- dispatch
def _linear_cross_entropy_unsupported(
    backend: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> Optional[str]:
    if backend == "reference":
        return None
    return triton_linear_cross_entropy.supports_linear_cross_entropy(x, weight, bias)


def _check_inputs(x, weight, targets, bias=None, ignore_index=-1, reduction="mean") -> tuple:
    """linear_cross_entropy's input checks (errors name the argument); returns (x, weight,
    bias), what the support check takes."""
    check_tensor("x", x, ndim=2)
    check_tensor("weight", weight, ndim=2)
    num_rows, hidden = x.shape
    if weight.shape[0] == 0 or weight.shape[1] != hidden:
        raise ValueError(
            f"weight must have shape (vocab >= 1, {hidden}) (hidden = x.shape[1]), got {tuple(weight.shape)}"
        )
    check_same_dtype("weight", weight, "x", x)
    check_same_device("weight", weight, "x", x)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_shape("bias", bias, (weight.shape[0],), "(vocab = weight.shape[0])")
        check_same_dtype("bias", bias, "x", x)
        check_same_device("bias", bias, "x", x)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be an int64 (torch.long) tensor of class indices, got {targets.dtype}")
    check_shape("targets", targets, (num_rows,), "(x.shape[0])")
    check_same_device("targets", targets, "x", x)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return x, weight, bias


# No CUDA kernel: the Triton backend fuses it (LLMKERNELS_BACKEND=cuda falls back as auto does).
backends.register_op("linear_cross_entropy", _check_inputs, _linear_cross_entropy_unsupported,
                     kernels=("triton", "reference"))


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -1,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T + bias, targets, ignore_index=ignore_index, reduction=reduction)
    for x (N, C), weight (V, C), bias (V,) or None, targets (N,) int64, never holding the
    (N, V) logits. Returns a float32 loss: a scalar, or (N,) for reduction="none"."""
    _check_inputs(x, weight, targets, bias, ignore_index, reduction)
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(x.device.type)  # what F.linear would compute in
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    chosen = backends.select_backend("linear_cross_entropy", backend, x, weight, bias)
    if chosen == "reference":
        return linear_cross_entropy_reference(x, weight, targets, bias, ignore_index, reduction)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    rows_per_chunk = chunk_rows(x.shape[0], weight.shape[0], x.element_size())
    loss, _grad_x, _grad_weight, _grad_bias = backends.fused_op(chosen, "linear_cross_entropy_forward")(
        x, weight, targets, bias, ignore_index, reduction, rows_per_chunk, needs_grad
    )
    return loss
