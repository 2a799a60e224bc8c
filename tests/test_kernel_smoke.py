"""A correctness smoke of every kernel, in seconds: the first check of a GPU session
(scripts/gpu_session.py, call 1) before any figure is measured.

Each fused backend that can run here (CUDA, Triton), each op it has a kernel for, one ragged
shape (odd sizes: the kernels' tail paths), forward and backward through the public op,
against the float64 reference under the numerics rule (tests/numerics.py): at most 2x (3x for
gradients) PyTorch's own error in the same precision, plus a floor relative to the
reference's magnitude. GPU lane: float16 and bfloat16. CPU lane: the Triton kernels in
Triton's interpreter, float32, smaller shapes (the same code path, so a broken smoke shows
before a GPU minute is spent).

With LLMKERNELS_SMOKE_RECORD=<file>, every comparison is appended to that file as one JSON
line (the GPU session keeps them with its outputs).
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import llmkernels
from llmkernels import backends
from numerics import GRAD_FACTOR, OUTPUT_FACTOR, max_abs_error, randn

from conftest import requires_cuda

# Of max|reference|, by the inputs' dtype: covers rounding noise where PyTorch's own error is
# ~0. Float32 (the CPU lane) rounds ~1e-7 apart, so 1e-3 there would pass a kernel off by 1e-3.
RELATIVE_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-3, torch.float32: 1e-5}


def _shapes(device):
    """(rows, hidden) of the row ops, attention's (B, H, S, D), linear_cross_entropy's (N, C, V)."""
    if device == "cuda":
        return {"rows": (67, 771), "attention": (2, 3, 77, 64), "lce": (77, 64, 1001)}
    return {"rows": (7, 45), "attention": (1, 2, 19, 16), "lce": (13, 16, 97)}


def _inputs(op, dtype, device, generator):
    """The op's tensor inputs (those that get gradients) and its other keyword arguments."""
    shapes = _shapes(device)
    rows, hidden = shapes["rows"]
    if op == "gelu":
        return [randn((rows, hidden), dtype, generator, device, scale=2.0)], {}
    if op == "bias_gelu":
        return [randn((rows, hidden), dtype, generator, device, scale=2.0), randn((hidden,), dtype, generator, device)], {}
    if op in ("layer_norm", "add_layer_norm"):
        tensors = [randn((rows, hidden), dtype, generator, device, scale=2.0, shift=0.5)]
        if op == "add_layer_norm":
            tensors.append(randn((rows, hidden), dtype, generator, device))
        tensors += [randn((hidden,), dtype, generator, device, shift=1.0), randn((hidden,), dtype, generator, device)]
        return tensors, {"eps": 1e-5}
    if op == "flash_attention":
        shape = shapes["attention"]
        return [randn(shape, dtype, generator, device) for _ in range(3)], {"causal": True}
    num_rows, hidden, vocab = shapes["lce"]
    x = randn((num_rows, hidden), dtype, generator, device)
    weight = randn((vocab, hidden), dtype, generator, device, scale=hidden ** -0.5)
    targets = torch.randint(0, vocab, (num_rows,), generator=generator).to(device)
    targets[::5] = -1  # ignored positions
    return [x, weight], {"targets": targets}


def _ours(op, backend):
    fn = getattr(llmkernels, op)
    return lambda *args, **kwargs: fn(*args, **kwargs, backend=backend)


def _reference(op):
    return getattr(llmkernels, f"{op}_reference")


def _pytorch(op):
    """PyTorch's own op, the yardstick in the same precision."""
    if op == "gelu":
        return lambda x: F.gelu(x, approximate="tanh")
    if op == "bias_gelu":
        return lambda x, bias: F.gelu(x + bias, approximate="tanh")
    if op == "layer_norm":
        return lambda x, w, b, eps: F.layer_norm(x, x.shape[-1:], w, b, eps)
    if op == "add_layer_norm":
        return lambda x, residual, w, b, eps: (x + residual, F.layer_norm(x + residual, x.shape[-1:], w, b, eps))
    if op == "flash_attention":
        return lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return lambda x, weight, targets: F.cross_entropy(x @ weight.T, targets, ignore_index=-1)


def _forward_backward(fn, tensors, kwargs, grad_generator):
    """Outputs and the gradients of every tensor input for random output gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outputs = fn(*leaves, **kwargs)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    grad_outputs = [torch.randn(o.shape, generator=grad_generator).to(o.device, o.dtype) for o in outputs]
    grads = torch.autograd.grad(outputs, leaves, grad_outputs)
    return outputs, list(grads)


def _record(entry):
    path = os.environ.get("LLMKERNELS_SMOKE_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def smoke(backend, op, dtype, device):
    generator = torch.Generator().manual_seed(17)
    tensors, kwargs = _inputs(op, dtype, device, generator)
    reasons = llmkernels.explain(op, *tensors, **kwargs)
    assert reasons[backend] is None, f"{backend} does not take the smoke's {op} call: {reasons[backend]}"
    results = {}
    for name, fn, inputs in (("ours", _ours(op, backend), tensors), ("pytorch", _pytorch(op), tensors),
                             ("reference", _reference(op), [t.double() for t in tensors])):
        results[name] = _forward_backward(fn, inputs, kwargs, torch.Generator().manual_seed(29))
    failures = []
    for kind, factor in (("output", OUTPUT_FACTOR), ("grad", GRAD_FACTOR)):
        index = 0 if kind == "output" else 1
        for i, (ours, pytorch, ref) in enumerate(zip(*(results[n][index] for n in ("ours", "pytorch", "reference")))):
            error, torch_error = max_abs_error(ours, ref), max_abs_error(pytorch, ref)
            bound = factor * torch_error + RELATIVE_FLOOR[dtype] * ref.abs().max().item()
            ok = bool(torch.isfinite(ours).all()) and error <= bound
            entry = {"backend": backend, "op": op, "dtype": str(dtype).removeprefix("torch."), "what": f"{kind} {i}",
                     "error": error, "pytorch_error": torch_error, "bound": bound, "ok": ok}
            _record(entry)
            if not ok:
                failures.append(entry)
    assert not failures, failures


def _cases(device):
    usable = [name for name in ("cuda", "triton") if device == "cuda" or name == "triton"]
    return [(backend, op) for backend in usable for op in sorted(backends.OPS) if backend in backends.OPS[op].kernels]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend, op", _cases("cuda"))
def test_smoke_every_kernel_on_the_gpu(backend, op, dtype):
    assert llmkernels.available_backends()[backend][0], llmkernels.available_backends()[backend][1]
    smoke(backend, op, dtype, "cuda")


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("backend, op", _cases("cpu"))
def test_smoke_every_triton_kernel_in_the_interpreter(backend, op):
    smoke(backend, op, torch.float32, "cpu")
