"""The numerics rule of design.md, adopted from the flash-attention test suite.

A kernel's output y in precision p passes when

    max|y - y_ref64| <= factor * max|y_torch_p - y_ref64| + floor

where y_ref64 is the reference computed in float64 and y_torch_p is PyTorch's own op
(F.gelu, F.layer_norm, SDPA/plain attention) run in the same precision p as the kernel:
the kernel may be at most `factor` times less accurate than PyTorch itself. Outputs use
factor 2, gradients factor 3. `floor` absorbs rounding noise when PyTorch's error is ~0.
"""
import torch

OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


def randn(shape, dtype, generator, device="cpu", scale=1.0, shift=0.0):
    """Fresh N(shift, scale^2) values, drawn in float32 on the CPU from the seeded generator
    (the same values on any machine), then moved to `device` and cast to `dtype`."""
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * scale + shift).to(device=device, dtype=dtype)


def max_abs_error(actual: torch.Tensor, reference_fp64: torch.Tensor) -> float:
    return (actual.double() - reference_fp64.double()).abs().max().item()


def assert_close_to_reference(
    actual: torch.Tensor,
    torch_low_precision: torch.Tensor,
    reference_fp64: torch.Tensor,
    *,
    factor: float = OUTPUT_FACTOR,
    floor: float = 1e-5,
    name: str = "output",
) -> None:
    assert actual.shape == reference_fp64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference_fp64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: has NaN or inf"
    error = max_abs_error(actual, reference_fp64)
    torch_error = max_abs_error(torch_low_precision, reference_fp64)
    bound = factor * torch_error + floor
    assert error <= bound, (
        f"{name}: max error {error:.3e} vs float64 exceeds {factor}x PyTorch's own error "
        f"{torch_error:.3e} + floor {floor:.1e} (bound {bound:.3e})"
    )


def assert_close_relative_to_max(actual: torch.Tensor, expected: torch.Tensor, *, rel: float, name: str) -> None:
    """max|actual - expected| <= rel * max|expected|: a tolerance scaled to the values'
    magnitude (an absolute one fixed for one size passes anything for much smaller values)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = max_abs_error(actual, expected)
    bound = rel * expected.double().abs().max().item()
    assert error <= bound, f"{name}: max difference {error:.3e} exceeds {rel:.1e} x max|expected| = {bound:.3e}"
