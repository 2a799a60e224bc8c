"""LayerNorm's eps on every backend: rows whose variance (~1e-4) is far below eps = 1e-2, so a
kernel that ignored eps (or added it in the wrong place) would scale them ~10x too much.

layer_norm and add_layer_norm, forward and the gradient of x (which reads the saved rstd),
against the formula written out here in float64, on every backend: the reference, Triton
(in the interpreter on CPU, compiled on a GPU) and CUDA (GPU lane). Both a row that fits one
block and a row longer than one (the Triton looped path) are checked.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from numerics import GRAD_FACTOR, assert_close_to_reference, randn

import llmkernels
from llmkernels import backends
from llmkernels.triton.layer_norm import MAX_ROW_BLOCK

EPSILONS = [1e-5, 1e-2]
TRITON_USABLE = backends.available_backends()["triton"][0] if backends.TRITON_IMPORTABLE else False

BACKEND_CASES = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("triton", "cpu", id="triton-interpreter", marks=[
        pytest.mark.triton_interpreter, pytest.mark.skipif(not TRITON_USABLE, reason="Triton backend not usable")]),
    pytest.param("triton", "cuda", id="triton-gpu", marks=requires_cuda),
    pytest.param("cuda", "cuda", id="cuda", marks=requires_cuda),
]  # fmt: skip


def layer_norm64(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """(h - mean) / sqrt(biased variance + eps) * weight + bias, in float64, written out."""
    h = h.double()
    centered = h - h.mean(-1, keepdim=True)
    return centered / torch.sqrt((centered * centered).mean(-1, keepdim=True) + eps) * weight.double() + bias.double()


def low_variance_rows(rows: int, hidden: int, device: str, generator) -> torch.Tensor:
    """Rows around 0.1 with standard deviation 1e-2 (variance 1e-4), one row exactly constant."""
    x = randn((rows, hidden), torch.float32, generator, device, scale=1e-2, shift=0.1)
    x[0] = 3.0
    return x


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("rows, hidden", [(6, 257), (2, MAX_ROW_BLOCK + 9)], ids=["one-block", "looped"])
def test_layer_norm_eps_on_low_variance_rows(backend, device, eps, rows, hidden, generator):
    x = low_variance_rows(rows, hidden, device, generator).requires_grad_()
    weight = randn((hidden,), torch.float32, generator, device, shift=1.0)
    bias = randn((hidden,), torch.float32, generator, device)
    grad_out = randn((rows, hidden), torch.float32, generator, device)

    y = llmkernels.layer_norm(x, weight, bias, eps=eps, backend=backend)
    (grad_x,) = torch.autograd.grad(y, x, grad_out)
    x64 = x.detach().double().requires_grad_()
    y64 = layer_norm64(x64, weight, bias, eps)
    (grad_x64,) = torch.autograd.grad(y64, x64, grad_out.double())
    x_p = x.detach().clone().requires_grad_()
    y_p = F.layer_norm(x_p, (hidden,), weight, bias, eps)  # PyTorch's own, the yardstick
    (grad_x_p,) = torch.autograd.grad(y_p, x_p, grad_out)

    floor = 1e-6 * y64.abs().max().item()
    assert_close_to_reference(y, y_p, y64, floor=floor, name=f"{backend} layer_norm eps={eps}")
    grad_floor = 1e-6 * grad_x64.abs().max().item()
    assert_close_to_reference(grad_x, grad_x_p, grad_x64, factor=GRAD_FACTOR, floor=grad_floor, name="grad_x")


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("eps", EPSILONS)
def test_add_layer_norm_eps_on_low_variance_rows(backend, device, eps, generator):
    rows, hidden = 5, 129
    x = low_variance_rows(rows, hidden, device, generator)
    residual = randn((rows, hidden), torch.float32, generator, device, scale=1e-2)
    residual[0] = 0.0
    weight = randn((hidden,), torch.float32, generator, device, shift=1.0)
    bias = randn((hidden,), torch.float32, generator, device)

    total, y = llmkernels.add_layer_norm(x, residual, weight, bias, eps=eps, backend=backend)
    torch.testing.assert_close(total, x + residual, atol=0, rtol=0)
    y64 = layer_norm64(x.double() + residual.double(), weight, bias, eps)
    y_p = F.layer_norm(x + residual, (hidden,), weight, bias, eps)
    assert_close_to_reference(y, y_p, y64, floor=1e-6 * y64.abs().max().item(), name=f"{backend} add_layer_norm eps={eps}")
