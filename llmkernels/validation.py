"""Input checks shared by the public ops: every message names the argument and what was
expected, so bad input fails here with a readable error instead of inside a kernel.
Also the dtypes the fused kernels take, which the backends' support checks share."""
import math
from numbers import Real
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What the fused GELU/LayerNorm kernels (CUDA and Triton) and the Triton attention take.
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The loss reductions of F.cross_entropy, which linear_cross_entropy and its backends take.
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(name: str, value, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> None:
    """`value` must be a floating-point tensor, with exactly `ndim` or at least `min_ndim` dims."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")


def check_same_device(name: str, value: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if value.device != other.device:
        raise ValueError(f"{name} must be on the same device as {other_name} ({other.device}), got {value.device}")


def check_same_dtype(name: str, value: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if value.dtype != other.dtype:
        raise TypeError(f"{name} must have the same dtype as {other_name} ({other.dtype}), got {value.dtype}")


def check_parameter_dtype(name: str, value: torch.Tensor, x: torch.Tensor) -> None:
    """A per-column parameter (LayerNorm's weight or bias) in x's dtype, or float32: the
    mixed-precision case of low-precision activations with float32 master parameters."""
    if value.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {value.dtype}")


def check_bool(name: str, value) -> None:
    """Exactly True or False: a truthy string such as "no" must not silently mean True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def check_finite_number(name: str, value, *, positive: bool = False) -> None:
    """A finite real Python/NumPy number (not a bool, a string or a tensor), > 0 if `positive`."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (positive and not value > 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {value!r}")


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    """`meaning` says where the expected shape comes from, e.g. "(hidden,) of x"."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} {meaning}, got {tuple(value.shape)}")


def fused_dtype_reason(name: str, value: torch.Tensor) -> Optional[str]:
    """None if the fused kernels take value's dtype, else why not (a support check's reason)."""
    if value.dtype in FUSED_DTYPES:
        return None
    return f"{name} dtype {value.dtype} is not supported (float16, bfloat16, float32)"
