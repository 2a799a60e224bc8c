"""Triton GELU / bias-GELU kernels (llmkernels/triton/gelu.py) against the float64 reference.

CPU lane: Triton's interpreter (TRITON_INTERPRET=1, set by conftest), float32 and float16
at small odd sizes. GPU lane: bfloat16/float16 at full sizes.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from numerics import GRAD_FACTOR, assert_close_to_reference, randn
from test_cuda_norm_gelu import misaligned

import llmkernels
from llmkernels import backends
from llmkernels.gelu import bias_gelu_reference, gelu_reference
from llmkernels.triton.gelu import supports_bias_gelu, supports_gelu

pytestmark = [pytest.mark.triton,  # lanes: see conftest
              pytest.mark.skipif(not backends.available_backends()["triton"][0], reason="Triton backend not usable")]

ops = torch.ops.llmkernels
CPU_DTYPES = [torch.float32, torch.float16]


def _check_gelu(x, generator, floor=1e-5):
    grad_out = randn(x.shape, x.dtype, generator, x.device)
    y = ops.triton_gelu_forward(x)
    grad_x = ops.triton_gelu_backward(grad_out, x)

    x64 = x.double().requires_grad_()
    y64 = gelu_reference(x64)
    (grad64,) = torch.autograd.grad(y64, x64, grad_out.double())
    x_p = x.clone().requires_grad_()
    y_p = F.gelu(x_p, approximate="tanh")  # PyTorch's own op in the same precision
    (grad_p,) = torch.autograd.grad(y_p, x_p, grad_out)

    assert y.dtype == x.dtype and grad_x.dtype == x.dtype
    assert_close_to_reference(y, y_p, y64, floor=floor, name="gelu out")
    assert_close_to_reference(grad_x, grad_p, grad64, factor=GRAD_FACTOR, floor=floor, name="gelu grad_x")


def _check_bias_gelu(x, bias, generator, floor=1e-5, bias_floor=1e-4):
    grad_out = randn(x.shape, x.dtype, generator, x.device)
    y = ops.triton_bias_gelu_forward(x, bias)
    grad_x, grad_bias = ops.triton_bias_gelu_backward(grad_out, x, bias)

    x64, bias64 = x.double().requires_grad_(), bias.double().requires_grad_()
    y64 = bias_gelu_reference(x64, bias64)
    grad_x64, grad_bias64 = torch.autograd.grad(y64, (x64, bias64), grad_out.double())
    x_p, bias_p = x.clone().requires_grad_(), bias.clone().requires_grad_()
    y_p = F.gelu(x_p + bias_p, approximate="tanh")
    grad_x_p, grad_bias_p = torch.autograd.grad(y_p, (x_p, bias_p), grad_out)

    assert grad_bias.dtype == torch.float32 and grad_bias.shape == bias.shape
    assert_close_to_reference(y, y_p, y64, floor=floor, name="bias_gelu out")
    assert_close_to_reference(grad_x, grad_x_p, grad_x64, factor=GRAD_FACTOR, floor=floor, name="bias_gelu grad_x")
    assert_close_to_reference(
        grad_bias, grad_bias_p, grad_bias64, factor=GRAD_FACTOR, floor=bias_floor, name="bias_gelu grad_bias"
    )


# ------------------------------------------------------------------- CPU lane
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1001,), (37, 1001), (3, 5, 7)])
def test_gelu_matches_reference(shape, dtype, generator):
    _check_gelu(randn(shape, dtype, generator, scale=3.0), generator)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 1001), (3, 5, 17), (300, 7)])
def test_bias_gelu_matches_reference(shape, dtype, generator):
    x = randn(shape, dtype, generator, scale=3.0)
    bias = randn(shape[-1:], dtype, generator)
    _check_bias_gelu(x, bias, generator)


def test_gelu_strided_input(generator):
    x = randn((64, 33), torch.float32, generator)[:, 1::2]  # non-contiguous columns
    _check_gelu(x, generator)


def test_bias_gelu_strided_rows(generator):
    x = randn((40, 66), torch.float32, generator)[::3, 1:34]  # strided rows, contiguous last dim
    bias = randn((33,), torch.float32, generator)
    _check_bias_gelu(x, bias, generator)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_gelu_extreme_inputs_are_finite(dtype, generator):
    big = 60000.0 if dtype == torch.float16 else 1e4
    x = torch.tensor([-big, -100.0, -30.0, -10.0, -1e-3, 0.0, 1e-3, 10.0, 30.0, 100.0, big], dtype=dtype)
    x = torch.cat([x, randn((1000,), dtype, generator, scale=10.0)])
    grad_out = torch.ones_like(x)
    y = ops.triton_gelu_forward(x)
    grad_x = ops.triton_gelu_backward(grad_out, x)
    assert torch.isfinite(y).all() and torch.isfinite(grad_x).all()
    _check_gelu(x, generator)
    bias = randn((x.shape[0],), dtype, generator, scale=10.0)
    grad_x, grad_bias = ops.triton_bias_gelu_backward(grad_out[None], x[None], bias)
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_bias).all()


def test_public_api_with_triton_backend(generator):
    """llmkernels.gelu / bias_gelu with backend="triton": forward and autograd through the ops."""
    x = randn((7, 33), torch.float32, generator).requires_grad_()
    bias = randn((33,), torch.float32, generator).requires_grad_()
    y = llmkernels.bias_gelu(x, bias, backend="triton") + llmkernels.gelu(x, backend="triton")
    grad_x, grad_bias = torch.autograd.grad(y.sum(), (x, bias))
    x64, bias64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    y64 = bias_gelu_reference(x64, bias64) + gelu_reference(x64)
    grad_x64, grad_bias64 = torch.autograd.grad(y64.sum(), (x64, bias64))
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_x.double(), grad_x64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_bias.double(), grad_bias64, atol=1e-4, rtol=1e-5)


def test_opcheck(generator):
    """Schema, fake (shape-only) implementation and tracing of the ops agree with eager."""
    x, grad_out = randn((5, 33), torch.float32, generator), randn((5, 33), torch.float32, generator)
    bias = randn((33,), torch.float32, generator)
    torch.library.opcheck(ops.triton_gelu_forward, (x,))
    torch.library.opcheck(ops.triton_gelu_backward, (grad_out, x))
    torch.library.opcheck(ops.triton_bias_gelu_forward, (x, bias))
    torch.library.opcheck(ops.triton_bias_gelu_backward, (grad_out, x, bias))


def test_supports_refuses_with_reason():
    assert "dtype" in supports_gelu(torch.zeros(3, dtype=torch.int32))
    assert "shape" in supports_bias_gelu(torch.zeros(2, 3), torch.zeros(4))


# ------------------------------------------------------------------- GPU lane
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4099,), (1000, 3072), (16384, 768), (3, 1025, 4096)])
def test_gelu_gpu(shape, dtype, generator):
    _check_gelu(randn(shape, dtype, generator, "cuda", scale=3.0), generator)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1000, 3072), (16384, 768), (7, 1025, 4097)])
def test_bias_gelu_gpu(shape, dtype, generator):
    x = randn(shape, dtype, generator, "cuda", scale=3.0)
    bias = randn(shape[-1:], dtype, generator, "cuda")
    _check_bias_gelu(x, bias, generator, bias_floor=1e-2)


@requires_cuda
def test_ops_compile_fullgraph(generator):
    x = randn((64, 768), torch.bfloat16, generator, "cuda").requires_grad_()
    bias = randn((768,), torch.bfloat16, generator, "cuda").requires_grad_()

    def f(x, bias):
        return ops.triton_bias_gelu_forward(x, bias) + ops.triton_gelu_forward(x)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, bias), f(x, bias))
    # The backward through the compiled graph gives eager's gradients (the same kernels run).
    grads = torch.autograd.grad(compiled(x, bias).float().sum(), (x, bias))
    expected = torch.autograd.grad(f(x, bias).float().sum(), (x, bias))
    for name, grad, want in zip(("grad_x", "grad_bias"), grads, expected):
        torch.testing.assert_close(grad, want, msg=name)


# --------------------------------------------------------------------- sanitizer subset
# scripts/gpu_session.py runs these under compute-sanitizer memcheck and racecheck: the flat
# GELU kernels with a masked tail, the bias-GELU row tiles (7, 768, 1000 columns) and the
# column sums of grad_bias, and a misaligned input.
@requires_cuda
@pytest.mark.parametrize("rows, hidden", [(3, 7), (5, 768), (3, 1000), (5, 1000)], ids=str)
def test_sanitizer_subset_gelu(rows, hidden, generator):
    x = randn((rows, hidden), torch.bfloat16, generator, "cuda", scale=3.0)
    bias = randn((hidden,), torch.bfloat16, generator, "cuda")
    for x_in in (x, misaligned(x)):
        _check_gelu(x_in, generator)
        _check_bias_gelu(x_in, bias, generator)
