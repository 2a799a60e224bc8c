"""Linear + cross-entropy in chunks of rows (after Liger-Kernel's fused linear cross-entropy):
the loss of F.cross_entropy(x @ weight.T + bias, targets) and its gradients without ever
holding the (N, V) logits.

For each chunk of rows_per_chunk rows (llmkernels.linear_cross_entropy.chunk_rows: about
256 MiB of logits):

    logits = x_chunk @ weight.T + bias                     (rows, V)   cuBLAS, input dtype
    _cross_entropy_kernel: per row, loss = lse - logits[target] (fp32) and, in place,
        logits <- scale * (softmax(logits) - onehot(target))    = d loss / d logits
    grad_x[chunk] = grad_logits @ weight                    (rows, C)   cuBLAS
    grad_weight  += grad_logits.T @ x_chunk                 (V, C)      cuBLAS, accumulated in fp32
    grad_bias    += column sums of grad_logits              (V,)        fp32

The kernel reads each logit row twice (an online log-sum-exp, then the softmax) and writes
it once, in place, so the chunk's logits and their gradient share one buffer; the three
matmuls are what the unfused LM head and its backward do anyway. Computing the gradients
in the forward (when a loss is reduced to a scalar, its gradient is that scalar times these)
saves recomputing the logits in the backward; with reduction="none" each row's gradient
scale is known only in the backward, which then recomputes the logits chunk by chunk.

Memory (bf16, N rows, C = 768, V = 50257): one chunk of logits (about 256 MiB), the
fp32 grad_weight accumulator (4 V C bytes; on CPU also one chunk's bf16 product, 2 V C),
grad_x, and the gradients kept from the forward for the backward (grad_x, grad_weight in
the input dtype). Eager PyTorch holds about three (N, V) tensors at its peak.

The ops are opaque custom ops even on a GPU (not triton_op): the chunk loop allocates and
overwrites its own buffers, and tracing it into a compiled graph could let
functionalization copy every chunk's logits before the kernel overwrites them; there is
nothing around the op for the compiler to fuse with.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..validation import REDUCTIONS
from . import launch, raise_if_unsupported, tensor_reason

MAX_BLOCK_V = 4096  # logits per row per loop iteration of the kernel
NUM_WARPS = 8


def supports_linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Optional[str]:
    """None if the Triton backend can take these inputs (linear_cross_entropy has checked
    that they share one dtype and device with targets), else the reason."""
    for name, tensor in (("x", x), ("weight", weight), ("bias", bias)):
        if tensor is not None:
            reason = tensor_reason(tensor, name)
            if reason is not None:
                return reason
    return None


# ---------------------------------------------------------------------------- kernel
@triton.jit
def _cross_entropy_kernel(
    logits_ptr,
    targets_ptr,
    losses_ptr,
    grad_scale_ptr,
    vocab,
    logits_row_stride,
    grad_scale_stride,
    ignore_index,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row of a chunk's logits (rows, vocab):

        losses[row] = logsumexp(logits[row]) - logits[row, target]     (0 where ignored)
        logits[row] <- grad_scale[row] * (softmax(logits[row]) - onehot(target))   if COMPUTE_GRAD

    in float32, the logits read in their own dtype. Pass 1 walks the row in BLOCK_V blocks
    keeping a running max m and sum s of exp(logit - m) (online log-sum-exp: one read);
    pass 2 reads the row again and overwrites it with its gradient. Ignored rows get loss 0
    and gradient 0; a target outside [0, vocab) that is not ignore_index gives a NaN loss
    (PyTorch raises there, which would need a device sync here). grad_scale_stride is 0 for
    one scale for all rows (1/count for "mean", 1 for "sum") or 1 for a scale per row."""
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < vocab)
    offsets = tl.arange(0, BLOCK_V)

    running_max = tl.full((), float("-inf"), dtype=tl.float32)
    running_sum = tl.full((), 0.0, dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + offsets
        logits = tl.load(row_logits + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(logits, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    target_logit = tl.load(row_logits + target, mask=valid & in_range, other=0.0).to(tl.float32)
    loss = tl.where(in_range, lse - target_logit, float("nan"))
    tl.store(losses_ptr + row, tl.where(valid, loss, 0.0))

    if COMPUTE_GRAD:
        # where(), not a multiply: the "mean" scale is inf when every target is ignored
        scale = tl.where(valid, tl.load(grad_scale_ptr + row * grad_scale_stride), 0.0)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            mask = cols < vocab
            logits = tl.load(row_logits + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(logits - lse) - tl.where(cols == target, 1.0, 0.0)
            grad = tl.where(valid, grad * scale, 0.0)
            tl.store(row_logits + cols, grad.to(row_logits.dtype.element_ty), mask=mask)


def _cross_entropy_in_place(
    logits: torch.Tensor,
    targets: torch.Tensor,
    losses: torch.Tensor,
    grad_scale: Optional[torch.Tensor],
    ignore_index: int,
) -> None:
    """Per-row losses of one chunk into `losses`; with grad_scale (one value, or one per
    row), the chunk's logits are overwritten with their gradient."""
    block_v = min(triton.next_power_of_2(logits.shape[1]), MAX_BLOCK_V)
    scale = losses if grad_scale is None else grad_scale  # unused pointer without COMPUTE_GRAD
    launch(_cross_entropy_kernel, (logits.shape[0],),
        logits, targets, losses, scale, logits.shape[1], logits.stride(0),
        0 if scale.numel() == 1 else 1, ignore_index,
        COMPUTE_GRAD=grad_scale is not None, BLOCK_V=block_v, num_warps=NUM_WARPS,
    )  # fmt: skip


# ------------------------------------------------------------------------ chunk loop
def _chunked(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    ignore_index: int,
    rows_per_chunk: int,
    grad_scale: Optional[torch.Tensor],
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(per-row losses (N,) fp32, grad_x, grad_weight, grad_bias); the gradients (of the
    loss sum weighted by grad_scale) only when grad_scale is given, else None."""
    num_rows, vocab = x.shape[0], weight.shape[0]
    losses = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    grad_x = grad_weight = grad_bias = None
    if grad_scale is not None:
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        grad_bias = None if bias is None else torch.zeros(vocab, dtype=torch.float32, device=x.device)
    for start in range(0, num_rows, rows_per_chunk):
        end = min(start + rows_per_chunk, num_rows)
        x_chunk = x[start:end]  # (rows, C)
        if bias is None:
            logits = x_chunk @ weight.t()  # (rows, C) @ (C, V) -> (rows, V)
        else:
            logits = torch.addmm(bias, x_chunk, weight.t())  # bias + x_chunk @ weight.T
        chunk_scale = grad_scale if grad_scale is None or grad_scale.numel() == 1 else grad_scale[start:end]
        _cross_entropy_in_place(logits, targets[start:end], losses[start:end], chunk_scale, ignore_index)
        if grad_scale is not None:
            grad_logits = logits  # overwritten in place by the kernel
            torch.mm(grad_logits, weight, out=grad_x[start:end])  # (rows, V) @ (V, C) -> (rows, C)
            if grad_weight.dtype == grad_logits.dtype:  # float32: accumulate inside the matmul
                grad_weight.addmm_(grad_logits.t(), x_chunk)
            elif grad_logits.is_cuda:  # bf16/fp16 products accumulated in fp32 inside the matmul (cuBLAS)
                torch.addmm(grad_weight, grad_logits.t(), x_chunk, out_dtype=torch.float32, out=grad_weight)
            else:  # no mixed-precision addmm on CPU: each chunk's (V, C) product rounded once, summed in fp32
                grad_weight += grad_logits.t() @ x_chunk
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0, dtype=torch.float32)
            del grad_logits
        del logits  # free this chunk before the next one is allocated: one chunk alive at a time
    if grad_scale is not None:
        grad_weight = grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
    return losses, grad_x, grad_weight, grad_bias


def _reduce(losses: torch.Tensor, valid_count: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    total = losses.sum()
    return total / valid_count if reduction == "mean" else total  # mean over no targets: 0/0 = nan, as PyTorch


def _check_call(op: str, x, weight, targets, bias, reduction: str, rows_per_chunk: int) -> None:
    """The ops' own checks, for direct calls: linear_cross_entropy checks all this first."""
    reason = supports_linear_cross_entropy(x, weight, bias)
    if reason is None and (weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)):
        bias_dtype = None if bias is None else bias.dtype
        reason = f"x, weight and bias must share one dtype, got {x.dtype}, {weight.dtype}, {bias_dtype}"
    if reason is None and targets.device != x.device:
        reason = f"targets is on {targets.device}, x on {x.device}"
    raise_if_unsupported(reason, op)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if rows_per_chunk < 1:
        raise ValueError(f"{op}: rows_per_chunk must be >= 1, got {rows_per_chunk}")


def _empty(x: torch.Tensor) -> torch.Tensor:
    """The placeholder for a gradient an op does not return (schemas have no Optional outputs)."""
    return x.new_empty((0,))


# ------------------------------------------------------------------------------- ops
@torch.library.custom_op("llmkernels::triton_linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    rows_per_chunk: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_x, grad_weight, grad_bias). The loss is fp32: a scalar, or (N,) for
    reduction="none". With compute_grad and a reduced loss, the gradients of that loss
    (for a loss gradient of 1) come too; otherwise they are empty and the backward op
    recomputes them."""
    _check_call("triton_linear_cross_entropy_forward", x, weight, targets, bias, reduction, rows_per_chunk)
    # Targets not ignored, which only "mean" divides by: a device tensor, no sync.
    valid_count = (targets != ignore_index).sum() if reduction == "mean" else None
    grad_scale = None
    if compute_grad and reduction != "none":
        grad_scale = (1.0 / valid_count if reduction == "mean" else torch.ones((), device=x.device)).float().reshape(1)
    losses, grad_x, grad_weight, grad_bias = _chunked(
        x, weight, targets.contiguous(), bias, ignore_index, rows_per_chunk, grad_scale
    )
    loss = _reduce(losses, valid_count, reduction)
    if grad_scale is None:
        return loss, _empty(x), _empty(x), _empty(x)
    return loss, grad_x, grad_weight, _empty(x) if grad_bias is None else grad_bias


@linear_cross_entropy_forward.register_fake
def _(x, weight, targets, bias, ignore_index, reduction, rows_per_chunk, compute_grad):
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=torch.float32)
    if not compute_grad or reduction == "none":
        return loss, _empty(x), _empty(x), _empty(x)
    grad_bias = _empty(x) if bias is None else bias.new_empty(bias.shape)
    return loss, x.new_empty(x.shape), weight.new_empty(weight.shape), grad_bias


@torch.library.custom_op("llmkernels::triton_linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    rows_per_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) for the loss gradient grad_loss (a scalar, or (N,)
    for reduction="none"), the logits recomputed chunk by chunk; grad_bias empty without bias."""
    _check_call("triton_linear_cross_entropy_backward", x, weight, targets, bias, reduction, rows_per_chunk)
    expected = (x.shape[0],) if reduction == "none" else ()
    if tuple(grad_loss.shape) != expected:
        raise ValueError(
            f"triton_linear_cross_entropy_backward: grad_loss must have shape {expected}, got {tuple(grad_loss.shape)}"
        )
    grad_scale = grad_loss.float().reshape(-1)  # (1,) or (N,)
    if reduction == "mean":
        grad_scale = grad_scale / (targets != ignore_index).sum()
    _, grad_x, grad_weight, grad_bias = _chunked(
        x, weight, targets.contiguous(), bias, ignore_index, rows_per_chunk, grad_scale.contiguous()
    )
    return grad_x, grad_weight, _empty(x) if grad_bias is None else grad_bias


@linear_cross_entropy_backward.register_fake
def _(grad_loss, x, weight, targets, bias, ignore_index, reduction, rows_per_chunk):
    grad_bias = _empty(x) if bias is None else bias.new_empty(bias.shape)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), grad_bias
