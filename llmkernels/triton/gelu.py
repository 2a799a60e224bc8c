"""GELU (tanh approximation) and bias + GELU in Triton, forward and backward.

    gelu(x) = 0.5 * x * (1 + tanh(u)),   u = sqrt(2/pi) * (x + 0.044715 * x^3)

Written through the logistic function, since 1 + tanh(u) = 2 * sigmoid(2u):

    gelu(x)  = x * s,   s = sigmoid(2u) = 1 / (1 + exp(-2u))
    gelu'(x) = s + x * 2 s (1 - s) * du/dx,   du/dx = sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)

exp(-2u) overflowing to inf for very negative x gives s = 0, never NaN. All arithmetic is
in float32; loads and stores are in the tensor's dtype.

These kernels are memory-bound (a few FLOPs per byte), so all that matters is moving
bytes at full bandwidth: each thread loads 16 bytes per access (8 bf16/fp16 or 4 fp32)
and has several accesses in flight, and every byte is read and written exactly once.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import (
    define_op, grad_out_reason, launch, raise_if_unsupported, rows_of, split_rows, sum_partials, tensor_reason,
)  # fmt: skip

# -2 * sqrt(2/pi) * log2(e): exp(-2u) = exp2(NEG_TWO_SQRT_2_OVER_PI_LOG2E * (x + 0.044715 x^3))
NEG_TWO_SQRT_2_OVER_PI_LOG2E = tl.constexpr(-2.0 * 0.7978845608028654 * 1.4426950408889634)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
CUBIC_COEFF = tl.constexpr(0.044715)
# Beyond |x| = 20, s (1 - s) is below 1e-600 (0 in float32), so the derivative's
# polynomial is evaluated at x clamped to this range: exact, and x^3 never overflows.
DERIVATIVE_CLAMP = tl.constexpr(20.0)

NUM_WARPS = 4
ACCESSES_PER_THREAD = 4  # 16-byte accesses in flight per thread


def supports_gelu(x: torch.Tensor) -> Optional[str]:
    """None if the Triton GELU kernels can take x, else the reason."""
    return tensor_reason(x, "x")


def supports_bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> Optional[str]:
    """None if the Triton bias-GELU kernels can take x (..., N) and bias (N,), else the reason."""
    reason = tensor_reason(x, "x") or tensor_reason(bias, "bias")
    if reason is None and x.dim() == 0:
        reason = "x must have at least one dimension"
    if reason is None and (bias.dim() != 1 or bias.shape[0] != x.shape[-1]):
        reason = f"bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}"
    return reason


def _elements_per_access(dtype: torch.dtype) -> int:
    """Elements in one 16-byte access: 8 for bf16/fp16, 4 for fp32."""
    return 16 // dtype.itemsize


def _flat_block(dtype: torch.dtype) -> int:
    """Elements per program of the flat kernels: 4096 bf16/fp16, 2048 fp32 (8 KB read per input)."""
    return _elements_per_access(dtype) * 32 * NUM_WARPS * ACCESSES_PER_THREAD


def _tile(x2d: torch.Tensor, elements: int) -> tuple[int, int]:
    """(BLOCK_M rows, BLOCK_N columns) of a bias-GELU tile of about `elements`: up to 64
    16-byte accesses wide, as many rows as fill the rest."""
    block_n = min(triton.next_power_of_2(x2d.shape[1]), 64 * _elements_per_access(x2d.dtype))
    block_m = max(1, elements // block_n)
    return block_m, block_n


# ------------------------------------------------------------------------ math
@triton.jit
def _gelu_and_sigmoid(h):
    """gelu(h) and s = sigmoid(2u) for float32 h."""
    s = 1.0 / (1.0 + tl.math.exp2((h + h * h * h * CUBIC_COEFF) * NEG_TWO_SQRT_2_OVER_PI_LOG2E))
    return h * s, s


@triton.jit
def _gelu_derivative(h):
    """d gelu / dh for float32 h."""
    _, s = _gelu_and_sigmoid(h)
    hc = tl.minimum(tl.maximum(h, -DERIVATIVE_CLAMP), DERIVATIVE_CLAMP)
    du = (1.0 + hc * hc * (3.0 * CUBIC_COEFF)) * SQRT_2_OVER_PI
    return s + hc * 2.0 * s * (1.0 - s) * du


# --------------------------------------------------------------------- kernels
@triton.jit
def _gelu_forward_kernel(x_ptr, y_ptr, num_elements, BLOCK: tl.constexpr):
    """y = gelu(x) over a flat contiguous array, BLOCK elements per program."""
    start = tl.program_id(0).to(tl.int64) * BLOCK  # 64-bit block start, 32-bit offsets within it
    offsets = tl.arange(0, BLOCK)
    mask = offsets < num_elements - start
    h = tl.load(x_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32)
    y, _ = _gelu_and_sigmoid(h)
    tl.store(y_ptr + start + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_backward_kernel(grad_out_ptr, x_ptr, grad_x_ptr, num_elements, BLOCK: tl.constexpr):
    """grad_x = grad_out * gelu'(x) over flat contiguous arrays."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = tl.arange(0, BLOCK)
    mask = offsets < num_elements - start
    h = tl.load(x_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(grad_out_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32)
    grad_x = dy * _gelu_derivative(h)
    tl.store(grad_x_ptr + start + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_forward_kernel(
    x_ptr, bias_ptr, y_ptr, num_rows, num_cols, x_row_stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """y = gelu(x + bias) on a (BLOCK_M, BLOCK_N) tile of x (rows, N); y is contiguous.

    2D tiles rather than a flat range so the bias is loaded once per tile as one vector
    (a flat index would need a modulo per element and gathers for the bias)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < num_cols
    mask = (rows[:, None] < num_rows) & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
    y, _ = _gelu_and_sigmoid(x.to(tl.float32) + bias.to(tl.float32)[None, :])
    tl.store(y_ptr + rows[:, None] * num_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward_kernel(
    grad_out_ptr,
    x_ptr,
    bias_ptr,
    grad_x_ptr,
    partial_grad_bias_ptr,
    num_rows,
    num_cols,
    grad_out_row_stride,
    x_row_stride,
    rows_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """grad_x = grad_out * gelu'(x + bias), and this program's share of grad_bias.

    Program (g, c) walks rows [g * rows_per_program, ...) of columns block c in BLOCK_M-row
    tiles, keeps the column sums of grad_x in float32 registers, and writes them to
    partial_grad_bias[g, cols]; sum_partials then adds the partial rows in a fixed order.
    One read of grad_out and x, one write of grad_x: the bias gradient costs no extra pass."""
    row_start = tl.program_id(0) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, num_rows)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < num_cols
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    grad_bias = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & col_mask[None, :]
        rows = rows.to(tl.int64)
        h = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(grad_out_ptr + rows[:, None] * grad_out_row_stride + cols[None, :], mask=mask, other=0.0)
        grad_x = dy.to(tl.float32) * _gelu_derivative(h + bias[None, :])  # 0 where masked (dy = 0)
        grad_x_ptrs = grad_x_ptr + rows[:, None] * num_cols + cols[None, :]
        tl.store(grad_x_ptrs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        grad_bias += grad_x
    tl.store(partial_grad_bias_ptr + tl.program_id(0) * num_cols + cols, tl.sum(grad_bias, axis=0), mask=col_mask)


# ------------------------------------------------------------------------- ops
@define_op("llmkernels::triton_gelu_forward")
def gelu_forward(x: torch.Tensor) -> torch.Tensor:
    raise_if_unsupported(supports_gelu(x), "triton_gelu_forward")
    x_flat = x.contiguous()  # the flat kernel needs contiguous memory; a no-op when it is already
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = _flat_block(x.dtype)
    grid = (triton.cdiv(x.numel(), block),)
    if x.numel() > 0:
        launch(_gelu_forward_kernel, grid, x_flat, y, x.numel(), BLOCK=block, num_warps=NUM_WARPS)
    return y


@define_op("llmkernels::triton_gelu_backward")
def gelu_backward(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    raise_if_unsupported(supports_gelu(x) or grad_out_reason(grad_out, x), "triton_gelu_backward")
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = _flat_block(x.dtype)
    grid = (triton.cdiv(x.numel(), block),)
    if x.numel() > 0:
        launch(_gelu_backward_kernel, grid,
            grad_out.contiguous(), x.contiguous(), grad_x, x.numel(), BLOCK=block, num_warps=NUM_WARPS
        )
    return grad_x


@define_op("llmkernels::triton_bias_gelu_forward")
def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    raise_if_unsupported(supports_bias_gelu(x, bias), "triton_bias_gelu_forward")
    x2d = rows_of(x)  # (rows, N)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_m, block_n = _tile(x2d, _flat_block(x.dtype))
    grid = (triton.cdiv(x2d.shape[0], block_m), triton.cdiv(x2d.shape[1], block_n))
    if x.numel() > 0:
        launch(_bias_gelu_forward_kernel, grid,
            x2d, bias, y, x2d.shape[0], x2d.shape[1], x2d.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS,
        )  # fmt: skip
    return y


@define_op("llmkernels::triton_bias_gelu_backward")
def bias_gelu_backward(
    grad_out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    raise_if_unsupported(supports_bias_gelu(x, bias) or grad_out_reason(grad_out, x), "triton_bias_gelu_backward")
    x2d, grad_out2d = rows_of(x), rows_of(grad_out)  # (rows, N) each
    num_rows, num_cols = x2d.shape
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return grad_x, torch.zeros(num_cols, dtype=torch.float32, device=x.device)
    # Half-size tiles: two inputs and a float32 accumulator per element (about 70 registers on sm_90)
    block_m, block_n = _tile(x2d, _flat_block(x.dtype) // 2)
    col_blocks = triton.cdiv(num_cols, block_n)
    row_groups, rows_per_program = split_rows(num_rows, block_m, col_blocks)
    partial_grad_bias = torch.empty((row_groups, num_cols), dtype=torch.float32, device=x.device)
    launch(_bias_gelu_backward_kernel, (row_groups, col_blocks),
        grad_out2d, x2d, bias, grad_x, partial_grad_bias,
        num_rows, num_cols, grad_out2d.stride(0), x2d.stride(0), rows_per_program,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS,
    )  # fmt: skip
    return grad_x, sum_partials(partial_grad_bias)
