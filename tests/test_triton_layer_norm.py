"""Triton LayerNorm kernels (llmkernels/triton/layer_norm.py) against the float64 reference.

CPU lane: Triton's interpreter (TRITON_INTERPRET=1, set by conftest), float32 and float16
at small odd sizes, including a row longer than one block (the looped path). GPU lane:
bfloat16/float16 up to hidden 65536.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from numerics import GRAD_FACTOR, assert_close_to_reference, randn
from test_cuda_norm_gelu import misaligned

import llmkernels
from llmkernels import backends
from llmkernels.layer_norm import layer_norm_reference
from llmkernels.triton.layer_norm import MAX_ROW_BLOCK, supports_layer_norm

pytestmark = [pytest.mark.triton,  # lanes: see conftest
              pytest.mark.skipif(not backends.available_backends()["triton"][0], reason="Triton backend not usable")]

ops = torch.ops.llmkernels
EPS = 1e-5


def _check_layer_norm(x, weight, bias, generator, floor=1e-5, sum_floor=1e-4):
    """Forward outputs (y, mean, rstd) and all three gradients against float64, with PyTorch's
    F.layer_norm in x's precision as the yardstick. sum_floor covers grad_weight/grad_bias,
    which are sums over rows."""
    hidden = x.shape[-1]
    grad_out = randn(x.shape, x.dtype, generator, x.device)
    y, mean, rstd = ops.triton_layer_norm_forward(x, weight, bias, EPS)
    grad_x, grad_weight, grad_bias = ops.triton_layer_norm_backward(grad_out, x, weight, mean, rstd)

    params = [p for p in (weight, bias) if p is not None]
    x64 = x.double().requires_grad_()
    params64 = [p.double().requires_grad_() for p in params]
    weight64 = params64[0] if weight is not None else None
    bias64 = params64[-1] if bias is not None else None
    y64 = layer_norm_reference(x64, weight64, bias64, EPS)
    grads64 = torch.autograd.grad(y64, [x64, *params64], grad_out.double())

    x_p = x.clone().requires_grad_()
    params_p = [p.clone().requires_grad_() for p in params]
    weight_p = params_p[0] if weight is not None else None
    bias_p = params_p[-1] if bias is not None else None
    # PyTorch's own op in x's precision (weight/bias cast to it, as autocast would)
    weight_p_cast = None if weight_p is None else weight_p.to(x.dtype)
    bias_p_cast = None if bias_p is None else bias_p.to(x.dtype)
    y_p = F.layer_norm(x_p, (hidden,), weight_p_cast, bias_p_cast, EPS)
    grads_p = torch.autograd.grad(y_p, [x_p, *params_p], grad_out)

    rows = x.numel() // hidden
    x_rows = x.double().reshape(rows, hidden)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (rows,)
    torch.testing.assert_close(mean.double(), x_rows.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(x_rows.var(-1, unbiased=False) + EPS), atol=1e-5, rtol=1e-4)
    assert_close_to_reference(y, y_p, y64, floor=floor, name="layer_norm out")
    assert_close_to_reference(grad_x, grads_p[0], grads64[0], factor=GRAD_FACTOR, floor=floor, name="grad_x")
    assert grad_weight.dtype == grad_bias.dtype == torch.float32
    assert grad_weight.shape == grad_bias.shape == (hidden,)
    names = (["grad_weight"] if weight is not None else []) + (["grad_bias"] if bias is not None else [])
    ours = {"grad_weight": grad_weight, "grad_bias": grad_bias}
    for name, grad_p, grad64 in zip(names, grads_p[1:], grads64[1:]):
        assert_close_to_reference(ours[name], grad_p, grad64, factor=GRAD_FACTOR, floor=sum_floor, name=name)


# ------------------------------------------------------------------- CPU lane
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "rows, hidden", [(1, 1), (3, 7), (100, 768), (3, 1000), (100, 1), (2, MAX_ROW_BLOCK + 1000)]
)
def test_layer_norm_matches_reference(rows, hidden, dtype, generator):
    x = randn((rows, hidden), dtype, generator, scale=2.0, shift=0.5)
    weight = randn((hidden,), dtype, generator, shift=1.0)
    bias = randn((hidden,), dtype, generator)
    _check_layer_norm(x, weight, bias, generator)


@pytest.mark.parametrize("affine", ["none", "weight_only", "bias_only"])
def test_layer_norm_optional_weight_and_bias(affine, generator):
    x = randn((5, 3, 77), torch.float32, generator)
    weight = randn((77,), torch.float32, generator) if affine == "weight_only" else None
    bias = randn((77,), torch.float32, generator) if affine == "bias_only" else None
    _check_layer_norm(x, weight, bias, generator)


def test_layer_norm_fp32_weight_with_fp16_input(generator):
    x = randn((9, 300), torch.float16, generator)
    weight = randn((300,), torch.float32, generator, shift=1.0)
    bias = randn((300,), torch.float32, generator)
    _check_layer_norm(x, weight, bias, generator)


def test_layer_norm_strided_rows(generator):
    x = randn((12, 130), torch.float32, generator)[::2, 3:103]  # strided rows, contiguous last dim
    weight, bias = randn((100,), torch.float32, generator), randn((100,), torch.float32, generator)
    _check_layer_norm(x, weight, bias, generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_extreme_inputs(dtype, generator):
    x = randn((6, 513), dtype, generator, scale=10.0)
    x[1] = 3.0  # all-equal row: variance 0
    x[2] = -60.0 if dtype == torch.float16 else -1e4
    x[3, ::2] = 1e3 if dtype == torch.float16 else 1e5  # large values next to small ones
    weight = randn((513,), dtype, generator, shift=1.0)
    bias = randn((513,), dtype, generator)
    y, mean, rstd = ops.triton_layer_norm_forward(x, weight, bias, EPS)
    grads = ops.triton_layer_norm_backward(torch.ones_like(x), x, weight, mean, rstd)
    for t in (y, mean, rstd, *grads):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(y[1].float(), bias.float())  # constant row -> exactly the bias
    _check_layer_norm(x, weight, bias, generator, sum_floor=1e-3)


def test_public_api_with_triton_backend(generator):
    """llmkernels.layer_norm with backend="triton": forward and autograd through the ops."""
    x = randn((4, 3, 65), torch.float32, generator).requires_grad_()
    weight = randn((65,), torch.float32, generator).requires_grad_()
    bias = randn((65,), torch.float32, generator).requires_grad_()
    y = llmkernels.layer_norm(x, weight, bias, backend="triton")
    grads = torch.autograd.grad((y * y).sum(), (x, weight, bias))
    inputs64 = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y64 = layer_norm_reference(*inputs64, EPS)
    grads64 = torch.autograd.grad((y64 * y64).sum(), inputs64)
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    for grad, grad64 in zip(grads, grads64):
        torch.testing.assert_close(grad.double(), grad64, atol=1e-4, rtol=1e-5)


def test_opcheck(generator):
    """Schema, fake (shape-only) implementation and tracing of the ops agree with eager."""
    x, grad_out = randn((5, 33), torch.float32, generator), randn((5, 33), torch.float32, generator)
    weight, bias = randn((33,), torch.float32, generator), randn((33,), torch.float32, generator)
    _, mean, rstd = ops.triton_layer_norm_forward(x, weight, bias, EPS)
    torch.library.opcheck(ops.triton_layer_norm_forward, (x, weight, bias, EPS))
    torch.library.opcheck(ops.triton_layer_norm_forward, (x, None, None, EPS))
    torch.library.opcheck(ops.triton_layer_norm_backward, (grad_out, x, weight, mean, rstd))


def test_supports_refuses_with_reason():
    assert "dtype" in supports_layer_norm(torch.zeros(2, 3, dtype=torch.int64), None, None)
    assert "hidden size" in supports_layer_norm(torch.zeros(2, 0), None, None)
    assert "weight" in supports_layer_norm(torch.zeros(2, 3), torch.zeros(4), None)


# ------------------------------------------------------------------- GPU lane
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "rows, hidden", [(1000, 1), (1000, 768), (1000, 1000), (1000, 4096), (16384, 768), (1000, 65536)]
)
def test_layer_norm_gpu(rows, hidden, dtype, generator):
    x = randn((rows, hidden), dtype, generator, "cuda", scale=2.0, shift=0.5)
    weight = randn((hidden,), torch.float32, generator, "cuda", shift=1.0)
    bias = randn((hidden,), torch.float32, generator, "cuda")
    _check_layer_norm(x, weight, bias, generator, sum_floor=1e-2)


@requires_cuda
def test_layer_norm_compile_fullgraph(generator):
    x = randn((64, 768), torch.bfloat16, generator, "cuda").requires_grad_()
    weight = randn((768,), torch.float32, generator, "cuda").requires_grad_()

    def f(x, weight):
        return ops.triton_layer_norm_forward(x, weight, None, EPS)[0]

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, weight), f(x, weight))
    # The backward through the compiled graph gives eager's gradients (the same kernels run).
    grads = torch.autograd.grad(compiled(x, weight).float().sum(), (x, weight))
    expected = torch.autograd.grad(f(x, weight).float().sum(), (x, weight))
    for name, grad, want in zip(("grad_x", "grad_weight"), grads, expected):
        torch.testing.assert_close(grad, want, msg=name)


# --------------------------------------------------------------------- sanitizer subset
# scripts/gpu_session.py runs these under compute-sanitizer memcheck and racecheck: one-tile
# rows with several rows per program (7, 768, 1000 columns: masked tails), a looped row past
# MAX_ROW_BLOCK (the row-dot kernel and column tiles), with and without weight and bias, and a
# misaligned input; the column sums (sum_partials) run in every backward.
@requires_cuda
@pytest.mark.parametrize("rows, hidden", [(3, 7), (5, 768), (3, 1000), (5, 1000), (2, MAX_ROW_BLOCK + 8)], ids=str)
def test_sanitizer_subset_layer_norm(rows, hidden, generator):
    x = randn((rows, hidden), torch.bfloat16, generator, "cuda", scale=2.0, shift=0.5)
    weight = randn((hidden,), torch.float32, generator, "cuda", shift=1.0)
    bias = randn((hidden,), torch.float32, generator, "cuda")
    _check_layer_norm(x, weight, bias, generator)
    _check_layer_norm(x, None, None, generator)
    _check_layer_norm(misaligned(x), weight, bias, generator)
