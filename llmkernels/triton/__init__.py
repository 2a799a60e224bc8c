"""Triton backend: fused GELU, LayerNorm and flash attention kernels.

Each module defines its ops with define_op (torch.library.triton_op) under the names
llmkernels::triton_<op> (same schemas as the CUDA ops, see csrc/register.cpp), so
torch.compile traces into the kernels, plus a supports_<op>(...) -> reason | None check
that the dispatcher (llmkernels/backends.py) consults. Autograd is registered by the
op modules one level up (llmkernels/gelu.py, ...), not here.

The kernels run on CUDA tensors, or on CPU tensors inside Triton's interpreter when
TRITON_INTERPRET=1 was set before this package was imported (tests without a GPU).

This file holds what the three modules share: the device/dtype and grad_out checks, whether
the interpreter is on (which picks small single configs instead of autotuning), op
definition and kernel launch, and the deterministic column sums of per-program partial
sums used by the LayerNorm and bias-GELU backward passes.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from ..backends import TRITON_INTERPRETER as INTERPRETER
from ..validation import fused_dtype_reason


def tensor_reason(tensor: torch.Tensor, name: str = "x") -> Optional[str]:
    """None if the Triton kernels can take tensor's device and dtype here, else why not."""
    if tensor.device.type != "cuda" and not (tensor.device.type == "cpu" and INTERPRETER):
        return f"{name} is on {tensor.device}; the Triton kernels need CUDA (or CPU with TRITON_INTERPRET=1)"
    if tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu":
        return "bfloat16 is not supported by the Triton interpreter on CPU"
    return fused_dtype_reason(name, tensor)


def grad_out_reason(grad_out: torch.Tensor, x: torch.Tensor) -> Optional[str]:
    """None if grad_out has x's shape, as the elementwise and row backward kernels need."""
    if grad_out.shape == x.shape:
        return None
    return f"grad_out must have x's shape {tuple(x.shape)}, got {tuple(grad_out.shape)}"


def define_op(name: str):
    """Decorator: define the op `name` ("llmkernels::triton_...") from a function that
    allocates outputs and launches kernels with launch(); schema from its annotations.

    Normally a torch.library.triton_op, so torch.compile traces into the kernels. Under
    the interpreter the kernels are Python functions that cannot run on fake tensors, so
    the op is an opaque custom_op instead (compile calls it as a black box) whose fake
    implementation is the same function with the launches skipped."""

    def decorator(fn):
        if not INTERPRETER:
            return triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op

    return decorator


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) through wrap_triton, the launch torch.compile traces.

    Under the interpreter a shape-only (fake tensor) run of an op skips the kernel, which
    would try to read the fake data (see define_op); on a GPU wrap_triton itself turns the
    launch into a graph node when tracing."""
    if INTERPRETER and any(is_fake(arg) for arg in args if isinstance(arg, torch.Tensor)):
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


def raise_if_unsupported(reason: Optional[str], op: str) -> None:
    """Raise ValueError("<op>: <reason>") when a supports_* check returned a reason."""
    if reason is not None:
        raise ValueError(f"{op}: {reason}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy if its last dimension is strided: the kernels take the
    strides of the other dimensions but read each row as one contiguous vector."""
    return t if t.stride(-1) == 1 else t.contiguous()


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """x (..., N) as a (rows, N) view whose last dimension is contiguous.

    The kernels take a row stride, so a strided batch of rows (e.g. a slice) is read in
    place; only when the last dimension itself is strided, or the leading dimensions
    cannot be flattened into one stride, does this copy."""
    return last_dim_contiguous(x).reshape(-1, x.shape[-1])  # (rows, N): a view when possible, else a copy


# ------------------------------------------------------ deterministic column sums
@triton.jit
def _sum_partials_kernel(partials_ptr, out_ptr, num_partials, num_cols, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n] = sum over p of partials[p, n], partials (num_partials, num_cols) float32.

    Each program owns BLOCK_N columns and walks the partial rows in a fixed order, so the
    result is bitwise the same on every run (no atomics). The partials come from the
    backward kernels (one row per program there), so this pass reads a few MB at most."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < num_cols
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for start in range(0, num_partials, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows[:, None] < num_partials) & col_mask[None, :]
        acc += tl.load(partials_ptr + rows[:, None] * num_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0), mask=col_mask)


def sum_partials(partials: torch.Tensor) -> torch.Tensor:
    """(P, N) float32 -> (N,) float32, summed over P in a fixed order."""
    num_partials, num_cols = partials.shape
    out = torch.empty(num_cols, dtype=torch.float32, device=partials.device)
    block_n = 128
    grid = (triton.cdiv(num_cols, block_n),)
    launch(_sum_partials_kernel, grid, partials, out, num_partials, num_cols, BLOCK_P=16, BLOCK_N=block_n)
    return out


# Programs that the row-reducing backward kernels (LayerNorm, bias-GELU) spread the rows
# over: enough to fill an H100 (132 SMs x 4) while keeping the (programs, N) buffer of
# partial sums small. A constant, not the SM count, so results do not depend on the GPU.
REDUCTION_PROGRAMS = 512


def split_rows(num_rows: int, block_m: int, col_blocks: int) -> tuple[int, int]:
    """(row_groups, rows_per_program) for a backward grid of (row_groups, col_blocks)
    programs: about REDUCTION_PROGRAMS in all, each taking whole BLOCK_M-row tiles. Fixed
    by the shape alone, so the order of the partial sums is the same on every run."""
    row_groups = max(1, min(triton.cdiv(num_rows, block_m), REDUCTION_PROGRAMS // col_blocks))
    rows_per_program = triton.cdiv(triton.cdiv(num_rows, row_groups), block_m) * block_m
    return triton.cdiv(num_rows, rows_per_program), rows_per_program


from . import attention, gelu, layer_norm  # noqa: E402  (register the ops)

__all__ = [
    "attention",
    "define_op",
    "gelu",
    "grad_out_reason",
    "last_dim_contiguous",
    "launch",
    "layer_norm",
    "raise_if_unsupported",
    "rows_of",
    "split_rows",
    "sum_partials",
    "tensor_reason",
]
