"""LayerNorm over the last dimension in Triton, forward and backward.

    y = (x - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var + eps)   (biased variance)

Statistics are computed in float32 and saved (mean, rstd: (rows,) float32) for the
backward pass, which with xhat = (x - mean) * rstd and g = grad_out * weight is

    grad_x      = rstd * (g - mean_n(g * xhat) * xhat - mean_n(g))       per row
    grad_weight = sum over rows of grad_out * xhat                      per column
    grad_bias   = sum over rows of grad_out                             per column

LayerNorm is memory-bound: the forward reads x once and writes y once, the backward
reads grad_out and x once and writes grad_x once. The column sums of the backward are
kept in float32 registers per program and written as one row of partial sums per
program; sum_partials adds those rows in a fixed order, so the weight and bias gradients
are bitwise identical on every run (no atomics). Launch configurations follow from the
shape by fixed rules rather than autotuning, which could pick a different reduction
layout (and so different rounding) in another process.

add_layer_norm (llmkernels/add_layer_norm.py) runs the same kernels with HAS_RESIDUAL /
HAS_GRAD_SUM: the forward loads residual beside x, normalises sum = x + residual (rounded
to x's dtype) and stores sum too; the backward adds grad_sum to grad_x before its store.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import (
    define_op, grad_out_reason, launch, raise_if_unsupported, rows_of, split_rows, sum_partials, tensor_reason,
)  # fmt: skip

MAX_HIDDEN = 65536
# Rows up to this many elements are held in registers whole (one read of x); longer rows
# are walked in blocks of this size.
MAX_ROW_BLOCK = 8192
# Elements per tile when several short rows share a program: the forward holds one tile
# (x), the backward two (x, grad_out) plus two float32 accumulators, so it takes half.
FORWARD_TILE = 4096
BACKWARD_TILE = 2048


def supports_layer_norm(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]
) -> Optional[str]:
    """None if the Triton LayerNorm kernels can take these inputs, else the reason."""
    reason = tensor_reason(x, "x")
    if reason is None and x.dim() == 0:
        reason = "x must have at least one dimension"
    if reason is None and not 1 <= x.shape[-1] <= MAX_HIDDEN:
        reason = f"hidden size {x.shape[-1]} is not supported (1..{MAX_HIDDEN})"
    for name, param in (("weight", weight), ("bias", bias)):
        if reason is None and param is not None:
            reason = tensor_reason(param, name)
            if reason is None and tuple(param.shape) != (x.shape[-1],):
                reason = f"{name} must have shape ({x.shape[-1]},), got {tuple(param.shape)}"
    return reason


def _row_config(num_cols: int, tile_elements: int) -> tuple[int, int, int]:
    """(BLOCK_M rows per tile, BLOCK_N columns per tile, num_warps) for rows of num_cols.

    Short rows share a program (a tile of about tile_elements) so each program moves
    enough bytes; a row up to MAX_ROW_BLOCK is one tile row; longer rows loop. Eight
    elements per thread: one 16-byte access of bf16, registers low enough (40-100 on
    sm_90) for several programs per SM to keep loads in flight."""
    block_n = min(triton.next_power_of_2(num_cols), MAX_ROW_BLOCK)
    block_m = max(1, tile_elements // block_n)
    num_warps = min(16, max(4, block_m * block_n // 256))
    return block_m, block_n, num_warps


# --------------------------------------------------------------------- forward
@triton.jit
def _scale_and_shift(y, weight_ptr, bias_ptr, cols, col_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y * weight[cols] + bias[cols] for a (BLOCK_M, BLOCK_N) float32 tile, either optional."""
    if HAS_WEIGHT:
        y *= tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _load_input(x_ptrs, residual_ptrs, mask, HAS_RESIDUAL: tl.constexpr):
    """The values LayerNorm normalises, as float32: x, or with HAS_RESIDUAL x + residual
    rounded to x's dtype (add_layer_norm's sum output, exactly as stored)."""
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptrs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _layer_norm_forward_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    bias_ptr,
    y_ptr,
    sum_ptr,
    mean_ptr,
    rstd_ptr,
    num_rows,
    num_cols,
    x_row_stride,
    residual_row_stride,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROW_FITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Normalises BLOCK_M rows of x (rows, N) into y (contiguous), saves mean and rstd.

    Rows that fit one block (ROW_FITS: N <= BLOCK_N) are loaded once and kept in registers:
    the mean, then the variance as the mean of (x - mean)^2 (no cancellation), then y.
    Longer rows are read twice: a pass over column blocks that merges per-block (mean, sum
    of squared deviations) pairs (Chan et al.'s parallel variance), then a pass writing y.
    HAS_RESIDUAL (add_layer_norm): the rows normalised are x + residual, stored to sum
    (contiguous) by the first read; a long row's second pass adds x and residual again
    rather than reading back sum, which this program is writing."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    x_rows = x_ptr + rows[:, None] * x_row_stride  # (BLOCK_M, 1) row starts
    residual_rows = residual_ptr + rows[:, None] * residual_row_stride
    y_rows = y_ptr + rows[:, None] * num_cols
    sum_rows = sum_ptr + rows[:, None] * num_cols
    offsets = tl.arange(0, BLOCK_N)
    if ROW_FITS:
        col_mask = offsets < num_cols
        mask = row_mask[:, None] & col_mask[None, :]
        x = _load_input(x_rows + offsets[None, :], residual_rows + offsets[None, :], mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(sum_rows + offsets[None, :], x.to(sum_ptr.dtype.element_ty), mask=mask)
        mean = tl.sum(x, axis=1) / num_cols
        centered = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / num_cols + eps)
        y = _scale_and_shift(centered * rstd[:, None], weight_ptr, bias_ptr, offsets, col_mask, HAS_WEIGHT, HAS_BIAS)
        tl.store(y_rows + offsets[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        squared_deviations = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, num_cols, BLOCK_N):
            cols = start + offsets
            mask = row_mask[:, None] & (cols[None, :] < num_cols)
            x = _load_input(x_rows + cols[None, :], residual_rows + cols[None, :], mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(sum_rows + cols[None, :], x.to(sum_ptr.dtype.element_ty), mask=mask)
            count = start * 1.0  # elements merged so far: every earlier block was full
            block_count = tl.minimum(num_cols - start, BLOCK_N) * 1.0
            block_mean = tl.sum(x, axis=1) / block_count
            centered = tl.where(mask, x - block_mean[:, None], 0.0)
            merged_count = count + block_count
            delta = block_mean - mean
            mean += delta * (block_count / merged_count)
            squared_deviations += tl.sum(centered * centered, axis=1)
            squared_deviations += delta * delta * (count * block_count / merged_count)
        rstd = 1.0 / tl.sqrt(squared_deviations / num_cols + eps)
        for start in range(0, num_cols, BLOCK_N):
            cols = start + offsets
            col_mask = cols < num_cols
            mask = row_mask[:, None] & col_mask[None, :]
            x = _load_input(x_rows + cols[None, :], residual_rows + cols[None, :], mask, HAS_RESIDUAL)
            y = (x - mean[:, None]) * rstd[:, None]
            y = _scale_and_shift(y, weight_ptr, bias_ptr, cols, col_mask, HAS_WEIGHT, HAS_BIAS)
            tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


# -------------------------------------------------------------------- backward
@triton.jit
def _layer_norm_row_dots_kernel(
    grad_out_ptr,
    x_ptr,
    weight_ptr,
    mean_ptr,
    rstd_ptr,
    row_dots_ptr,
    num_cols,
    grad_out_row_stride,
    x_row_stride,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """For rows too long for one block: row_dots[row] = (mean_n(g * xhat), mean_n(g)), g = grad_out * weight.

    One program per row; the gradient kernel then handles (row group, column block) tiles."""
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    g_xhat = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, num_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < num_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_out_ptr + row * grad_out_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g *= tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        g_xhat += g * (x - mean) * rstd  # g = 0 where masked
        g_sum += g
    tl.store(row_dots_ptr + 2 * row, tl.sum(g_xhat, axis=0) / num_cols)
    tl.store(row_dots_ptr + 2 * row + 1, tl.sum(g_sum, axis=0) / num_cols)


@triton.jit
def _layer_norm_backward_kernel(
    grad_out_ptr,
    grad_sum_ptr,
    x_ptr,
    weight_ptr,
    mean_ptr,
    rstd_ptr,
    row_dots_ptr,
    grad_x_ptr,
    partial_grad_weight_ptr,
    partial_grad_bias_ptr,
    num_rows,
    num_cols,
    grad_out_row_stride,
    grad_sum_row_stride,
    x_row_stride,
    rows_per_program,
    HAS_GRAD_SUM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ROW_FITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """grad_x for a group of rows and one column block, plus that group's partial column sums.

    Program (g, c) walks rows [g * rows_per_program, ...) in BLOCK_M-row tiles over columns
    block c, accumulating grad_out * xhat and grad_out in float32 (BLOCK_M, BLOCK_N)
    registers, and stores their column sums as row g of the partial buffers. When a row
    fits one block (ROW_FITS, one column block) the row dot products are computed right here from
    the loaded tile, so grad_out and x are read exactly once; longer rows take them from
    row_dots (_layer_norm_row_dots_kernel). HAS_GRAD_SUM (add_layer_norm, x is the sum):
    grad_sum is added to grad_x before the one rounding to its dtype."""
    row_start = tl.program_id(0) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, num_rows)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < num_cols
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    grad_weight = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(grad_out_ptr + rows[:, None] * grad_out_row_stride + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        xhat = (x - mean[:, None]) * rstd[:, None]
        g = dy  # grad_out * weight, 0 where masked
        if HAS_WEIGHT:
            g = dy * weight[None, :]
        if ROW_FITS:
            g_xhat_mean = tl.sum(g * xhat, axis=1) / num_cols
            g_mean = tl.sum(g, axis=1) / num_cols
        else:
            g_xhat_mean = tl.load(row_dots_ptr + 2 * rows, mask=row_mask, other=0.0)
            g_mean = tl.load(row_dots_ptr + 2 * rows + 1, mask=row_mask, other=0.0)
        grad_x = (g - xhat * g_xhat_mean[:, None] - g_mean[:, None]) * rstd[:, None]
        if HAS_GRAD_SUM:
            grad_sum_ptrs = grad_sum_ptr + rows[:, None] * grad_sum_row_stride + cols[None, :]
            grad_x += tl.load(grad_sum_ptrs, mask=mask, other=0.0).to(tl.float32)
        grad_x_ptrs = grad_x_ptr + rows[:, None] * num_cols + cols[None, :]
        tl.store(grad_x_ptrs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        grad_weight += dy * xhat
        grad_bias += dy
    partial_offsets = tl.program_id(0) * num_cols + cols
    tl.store(partial_grad_weight_ptr + partial_offsets, tl.sum(grad_weight, axis=0), mask=col_mask)
    tl.store(partial_grad_bias_ptr + partial_offsets, tl.sum(grad_bias, axis=0), mask=col_mask)


# ------------------------------------------------------------------------- ops
def _forward(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum or None, y, mean, rstd): LayerNorm of x, or of x + residual when residual is given."""
    x2d = rows_of(x)  # (rows, N)
    residual2d = None if residual is None else rows_of(residual)  # (rows, N)
    num_rows, num_cols = x2d.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return summed, y, mean, rstd
    block_m, block_n, num_warps = _row_config(num_cols, FORWARD_TILE)
    launch(_layer_norm_forward_kernel, (triton.cdiv(num_rows, block_m),),
        x2d, x2d if residual2d is None else residual2d, x2d if weight is None else weight, x2d if bias is None else bias,
        y, y if summed is None else summed, mean, rstd,
        num_rows, num_cols, x2d.stride(0), 0 if residual2d is None else residual2d.stride(0), eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ROW_FITS=num_cols <= block_n, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return summed, y, mean, rstd


def _backward(
    grad_out: torch.Tensor,
    grad_sum: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    op: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) of LayerNorm of x, plus grad_sum in grad_x when given."""
    reason = supports_layer_norm(x, weight, None) or grad_out_reason(grad_out, x)
    if reason is None and grad_sum is not None and grad_sum.shape != x.shape:
        reason = f"grad_sum must have the shape of sum {tuple(x.shape)}, got {tuple(grad_sum.shape)}"
    raise_if_unsupported(reason, op)
    x2d, grad_out2d = rows_of(x), rows_of(grad_out)  # (rows, N) each
    grad_sum2d = None if grad_sum is None else rows_of(grad_sum)  # (rows, N)
    num_rows, num_cols = x2d.shape
    for name, stat in (("mean", mean), ("rstd", rstd)):
        if stat.shape != (num_rows,) or stat.dtype != torch.float32:
            raise ValueError(f"{op}: {name} must be float32 of shape ({num_rows},), got {stat.dtype} {tuple(stat.shape)}")
    mean, rstd = mean.contiguous(), rstd.contiguous()
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        zeros = torch.zeros(num_cols, dtype=torch.float32, device=x.device)
        return grad_x, zeros, zeros.clone()
    weight_arg = x2d if weight is None else weight
    block_m, block_n, num_warps = _row_config(num_cols, BACKWARD_TILE)
    col_blocks = triton.cdiv(num_cols, block_n)
    if col_blocks == 1:
        row_dots = mean  # unused: the kernel computes the row dot products from its tile
    else:
        row_dots = torch.empty((num_rows, 2), dtype=torch.float32, device=x.device)
        launch(_layer_norm_row_dots_kernel, (num_rows,),
            grad_out2d, x2d, weight_arg, mean, rstd, row_dots,
            num_cols, grad_out2d.stride(0), x2d.stride(0),
            HAS_WEIGHT=weight is not None, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    row_groups, rows_per_program = split_rows(num_rows, block_m, col_blocks)
    partial_grad_weight = torch.empty((row_groups, num_cols), dtype=torch.float32, device=x.device)
    partial_grad_bias = torch.empty((row_groups, num_cols), dtype=torch.float32, device=x.device)
    launch(_layer_norm_backward_kernel, (row_groups, col_blocks),
        grad_out2d, grad_out2d if grad_sum2d is None else grad_sum2d, x2d, weight_arg, mean, rstd, row_dots,
        grad_x, partial_grad_weight, partial_grad_bias,
        num_rows, num_cols, grad_out2d.stride(0), 0 if grad_sum2d is None else grad_sum2d.stride(0), x2d.stride(0),
        rows_per_program,
        HAS_GRAD_SUM=grad_sum is not None, HAS_WEIGHT=weight is not None, ROW_FITS=col_blocks == 1,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return grad_x, sum_partials(partial_grad_weight), sum_partials(partial_grad_bias)


@define_op("llmkernels::triton_layer_norm_forward")
def layer_norm_forward(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise_if_unsupported(supports_layer_norm(x, weight, bias), "triton_layer_norm_forward")
    _, y, mean, rstd = _forward(x, None, weight, bias, eps)
    return y, mean, rstd


@define_op("llmkernels::triton_layer_norm_backward")
def layer_norm_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, None, x, weight, mean, rstd, "triton_layer_norm_backward")


@define_op("llmkernels::triton_add_layer_norm_forward")
def add_layer_norm_forward(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    reason = supports_layer_norm(x, weight, bias)
    # add_layer_norm checks residual before dispatch; this guards direct calls of the op.
    if reason is None and (residual.shape, residual.dtype, residual.device) != (x.shape, x.dtype, x.device):
        reason = (
            f"residual must have x's shape, dtype and device {tuple(x.shape)} {x.dtype} {x.device}, "
            f"got {tuple(residual.shape)} {residual.dtype} {residual.device}"
        )
    raise_if_unsupported(reason, "triton_add_layer_norm_forward")
    return _forward(x, residual, weight, bias, eps)


@define_op("llmkernels::triton_add_layer_norm_backward")
def add_layer_norm_backward(
    grad_sum: torch.Tensor,
    grad_out: torch.Tensor,
    sum: torch.Tensor,  # noqa: A002  (the schema's name, shared with the CUDA op)
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, grad_sum, sum, weight, mean, rstd, "triton_add_layer_norm_backward")
