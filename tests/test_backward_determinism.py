"""Every fused backward kernel is bitwise reproducible on the GPU (GPU lane).

The kernels promise it (no atomics: each output block has one owner, column sums are added
in a fixed order), and training relies on it: a rerun of a step gives the same weights.
Only a GPU can break it (programs run concurrently there; Triton's interpreter runs them
one after another, so a CPU run of these tests could not fail), so every case is marked
gpu. Sizes span many programs per output: thousands of rows, long rows, many key blocks.
"""
import pytest
import torch
from conftest import requires_cuda, requires_cuda_kernels
from numerics import randn

import llmkernels

BF16 = torch.bfloat16


def layer_norm_case(hidden):
    def run(generator, backend):
        x = randn((4096, hidden), BF16, generator, "cuda").requires_grad_()
        weight = randn((hidden,), torch.float32, generator, "cuda", shift=1.0).requires_grad_()
        bias = randn((hidden,), torch.float32, generator, "cuda").requires_grad_()
        return (x, weight, bias), llmkernels.layer_norm(x, weight, bias, backend=backend)

    return run


def add_layer_norm_run(generator, backend):
    x, residual = (randn((4096, 768), BF16, generator, "cuda").requires_grad_() for _ in range(2))
    weight = randn((768,), torch.float32, generator, "cuda", shift=1.0).requires_grad_()
    bias = randn((768,), torch.float32, generator, "cuda").requires_grad_()
    total, normed = llmkernels.add_layer_norm(x, residual, weight, bias, backend=backend)
    return (x, residual, weight, bias), (total, normed)


def gelu_run(generator, backend):
    x = randn((16384, 3072), BF16, generator, "cuda").requires_grad_()
    return (x,), llmkernels.gelu(x, backend=backend)


def bias_gelu_run(generator, backend):
    x = randn((16384, 3072), BF16, generator, "cuda").requires_grad_()
    bias = randn((3072,), BF16, generator, "cuda").requires_grad_()
    return (x, bias), llmkernels.bias_gelu(x, bias, backend=backend)


def attention_case(causal, kv_heads):
    def run(generator, backend):
        q = randn((2, 8, 1000, 64), BF16, generator, "cuda").requires_grad_()
        k, v = (randn((2, kv_heads, 1000, 64), BF16, generator, "cuda").requires_grad_() for _ in range(2))
        return (q, k, v), llmkernels.flash_attention(q, k, v, causal=causal, backend=backend)

    return run


def linear_cross_entropy_case(reduction):
    def run(generator, backend):
        x = randn((8192, 768), BF16, generator, "cuda").requires_grad_()
        weight = randn((50257, 768), BF16, generator, "cuda", scale=768**-0.5 * 2).requires_grad_()
        targets = torch.randint(0, 50257, (8192,), generator=generator).to("cuda")
        targets[1::5] = -1
        loss = llmkernels.linear_cross_entropy(x, weight, targets, reduction=reduction, backend=backend)
        return (x, weight), loss

    return run


CASES = {
    "layer_norm-768": layer_norm_case(768),
    "layer_norm-65536": layer_norm_case(65536),
    "add_layer_norm": add_layer_norm_run,
    "gelu": gelu_run,
    "bias_gelu": bias_gelu_run,
    "attention-causal": attention_case(True, 8),
    "attention-full": attention_case(False, 8),
    "attention-causal-grouped": attention_case(True, 2),
    "linear_cross_entropy-mean": linear_cross_entropy_case("mean"),
    "linear_cross_entropy-none": linear_cross_entropy_case("none"),
}
# Triton only: the CUDA extension has no linear_cross_entropy and no grouped-query attention.
NO_CUDA_KERNEL = {"linear_cross_entropy-mean", "linear_cross_entropy-none", "attention-causal-grouped"}


def params():
    for case in CASES:
        yield pytest.param("triton", case, id=f"triton-{case}", marks=[requires_cuda, pytest.mark.triton])
        if case not in NO_CUDA_KERNEL:
            yield pytest.param("cuda", case, id=f"cuda-{case}", marks=[requires_cuda, requires_cuda_kernels])


def gradients(case, backend, seed):
    """The gradients of every input for a fixed upstream gradient, from fresh inputs of `seed`."""
    generator = torch.Generator().manual_seed(seed)
    inputs, outputs = CASES[case](generator, backend)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    upstream = [randn(out.shape, out.dtype, generator, "cuda") for out in outputs]
    return torch.autograd.grad(outputs, inputs, upstream)


@pytest.mark.parametrize("backend, case", list(params()))
def test_backward_is_bitwise_reproducible(backend, case):
    first = gradients(case, backend, seed=7)
    for _ in range(2):
        again = gradients(case, backend, seed=7)
        for index, (a, b) in enumerate(zip(first, again)):
            assert torch.equal(a, b), f"{backend} {case}: gradient {index} differs between identical runs"
