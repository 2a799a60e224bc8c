"""The op boundary: backend discovery and selection, the reference ops against PyTorch in
float64, autograd through every backend that can run here, torch.compile without graph
breaks, torch.library.opcheck, and clear errors for bad input."""
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import llmkernels
from llmkernels import backends

from conftest import OP_SCHEMAS, requires_cuda


def randn(*shape, generator, dtype=torch.float64, requires_grad=False):
    return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_(requires_grad)


# --------------------------------------------------------------- backends and the build
def test_available_backends_says_what_runs_and_why_not():
    status = llmkernels.available_backends()
    assert list(status) == ["cuda", "triton", "reference"]
    assert status["reference"] == (True, "")
    for name, (usable, reason) in status.items():
        assert usable or reason, f"{name} is unusable without a reason"
    if not torch.cuda.is_available():
        assert not status["cuda"][0]
        assert "CUDA" in status["cuda"][1]


@pytest.mark.skipif(os.environ.get("LLMKERNELS_EXPECT_EXTENSION") != "1", reason="only where the build promises the extension (CI, GPU script)")
def test_extension_was_built_and_registers_every_schema():
    assert backends.CUDA_EXTENSION_LOADED, llmkernels.available_backends()["cuda"][1]
    for name, schema in OP_SCHEMAS.items():
        assert str(getattr(torch.ops.llmkernels, name).default._schema) == schema
    if not torch.cuda.is_available():
        assert llmkernels.available_backends()["cuda"] == (False, "the CUDA extension is built, but no CUDA device is available")


@pytest.mark.skipif(not backends.CUDA_EXTENSION_LOADED, reason="the CUDA extension is not built here")
def test_cuda_op_on_cpu_tensor_is_a_clear_error_not_a_crash(generator):
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.llmkernels.gelu_forward(randn(4, generator=generator, dtype=torch.float32))


@pytest.mark.skipif(not backends.TRITON_IMPORTABLE, reason="triton is not installed")
def test_triton_ops_share_the_cuda_schemas():
    for name, schema in OP_SCHEMAS.items():
        triton_schema = str(getattr(torch.ops.llmkernels, "triton_" + name).default._schema)
        assert triton_schema == schema.replace("llmkernels::", "llmkernels::triton_")


# ------------------------------------------------------------ reference ops in float64
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 768), (3, 1000)])
def test_reference_gelu_and_layer_norm_match_pytorch(shape, generator):
    x = randn(*shape, generator=generator) * 3
    weight, bias = randn(shape[-1], generator=generator), randn(shape[-1], generator=generator)
    torch.testing.assert_close(llmkernels.gelu_reference(x), F.gelu(x, approximate="tanh"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(llmkernels.gelu_reference(x, "none"), F.gelu(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(llmkernels.bias_gelu_reference(x, bias), F.gelu(x + bias, approximate="tanh"))
    expected = F.layer_norm(x, (shape[-1],), weight, bias, eps=1e-5)
    torch.testing.assert_close(llmkernels.layer_norm_reference(x, weight, bias, 1e-5), expected, rtol=1e-10, atol=1e-10)
    expected = F.layer_norm(x, (shape[-1],), eps=1e-3)
    torch.testing.assert_close(llmkernels.layer_norm_reference(x, eps=1e-3), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("query_len,key_len,heads,kv_heads", [(1, 1, 2, 2), (17, 17, 4, 2), (5, 33, 3, 3), (113, 113, 2, 1)])
def test_reference_attention_matches_sdpa(causal, query_len, key_len, heads, kv_heads, generator):
    q = randn(2, heads, query_len, 16, generator=generator)
    k, v = (randn(2, kv_heads, key_len, 16, generator=generator) for _ in range(2))
    k_full, v_full = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    mask = torch.ones(query_len, key_len, dtype=torch.bool).tril(key_len - query_len) if causal else None
    expected = F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask, scale=0.3)
    actual = llmkernels.flash_attention_reference(q, k, v, causal=causal, scale=0.3)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_reference_low_precision_computes_in_float32(generator):
    x = randn(3, 64, generator=generator, dtype=torch.float16) * 4
    expected = F.layer_norm(x.double(), (64,)).to(torch.float16)
    assert (llmkernels.layer_norm_reference(x) - expected).abs().max() <= 2e-3


def test_reference_gradients_by_gradcheck(generator):
    x = randn(3, 5, generator=generator, requires_grad=True)
    weight, bias = randn(5, generator=generator, requires_grad=True), randn(5, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: llmkernels.layer_norm(*a, backend="reference"), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda a, b: llmkernels.bias_gelu(a, b, backend="reference"), (x, bias))
    q, k, v = (randn(1, 2, 6, 4, generator=generator, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda *a: llmkernels.flash_attention(*a, backend="reference"), (q, k, v))


# ------------------------------------------------------------------ backend selection
def runnable_fused_backends():
    return [name for name in backends.registered_fused_backends() if llmkernels.available_backends()[name][0]]


def test_auto_picks_the_first_backend_that_supports_the_call(generator):
    x = randn(3, 8, generator=generator, dtype=torch.float32)
    reasons = llmkernels.explain("gelu", x)
    assert list(reasons) == ["cuda", "triton", "reference"] and reasons["reference"] is None
    first = next(name for name, reason in reasons.items() if reason is None)
    assert backends.select_backend("gelu", "auto", x) == first
    # erf GELU exists only in the reference, so auto falls back with a stated reason.
    assert backends.select_backend("gelu", "auto", x, "none") == "reference"
    assert llmkernels.explain("gelu", x, "none")["triton"] is not None


def test_auto_attention_with_a_non_positive_scale_falls_back_correctly(generator):
    q, k, v = (randn(1, 2, 9, 16, generator=generator, dtype=torch.float32) for _ in range(3))
    assert llmkernels.explain("flash_attention", q, k, v, scale=-0.5)["triton"] == "scale must be positive, got -0.5"
    expected = llmkernels.flash_attention_reference(q, k, v, causal=True, scale=-0.5)
    torch.testing.assert_close(llmkernels.flash_attention(q, k, v, scale=-0.5), expected)


def test_environment_variable_replaces_auto_but_not_an_explicit_backend(monkeypatch, generator):
    x = randn(4, 8, generator=generator, dtype=torch.float32)
    monkeypatch.setenv(backends.BACKEND_ENV_VAR, "reference")
    assert backends.select_backend("layer_norm", "auto", x, None, None) == "reference"
    if not llmkernels.available_backends()["cuda"][0]:
        with pytest.raises(llmkernels.BackendUnavailableError, match="backend 'cuda'"):
            llmkernels.layer_norm(x, backend="cuda")
    monkeypatch.setenv(backends.BACKEND_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="LLMKERNELS_BACKEND"):
        llmkernels.layer_norm(x)


def test_unknown_backend_argument_is_named(generator):
    with pytest.raises(ValueError, match="argument backend"):
        llmkernels.gelu(randn(3, generator=generator), backend="cudnn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_explicit_cuda_backend_without_gpu_says_why(generator):
    q = randn(1, 1, 4, 64, generator=generator, dtype=torch.float32)
    with pytest.raises(llmkernels.BackendUnavailableError, match="flash_attention: backend 'cuda' cannot run this call"):
        llmkernels.flash_attention(q, q, q, backend="cuda")


# -------------------------------------- autograd through each backend that runs here
def all_ops_loss(x, weight, bias, q, k, v, backend):
    hidden = llmkernels.layer_norm(x, weight, bias, 1e-5, backend=backend)
    hidden = llmkernels.bias_gelu(hidden, bias, backend=backend) + llmkernels.gelu(hidden, backend=backend)
    attended = llmkernels.flash_attention(q, k, v, causal=True, backend=backend)
    return hidden.square().sum() + attended.square().sum()


def backend_device(backend):
    """Where a backend's kernels run in this process: the reference, and Triton under its
    interpreter, on CPU; the compiled kernels on the GPU."""
    return "cpu" if backend == "reference" or (backend == "triton" and backends.TRITON_INTERPRETER) else "cuda"


def all_ops_inputs(generator, dtype=torch.float32, device="cpu"):
    make = lambda *shape: randn(*shape, generator=generator, dtype=dtype).to(device).requires_grad_(True)  # noqa: E731
    return make(5, 32), make(32), make(32), make(1, 2, 17, 64), make(1, 2, 17, 64), make(1, 2, 17, 64)


@pytest.mark.parametrize("backend", ["reference"] + runnable_fused_backends())
def test_every_runnable_backend_matches_the_reference_with_gradients(backend, generator):
    inputs = all_ops_inputs(generator, device=backend_device(backend))
    loss = all_ops_loss(*inputs, backend=backend)
    grads = torch.autograd.grad(loss, inputs)
    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    loss64 = all_ops_loss(*inputs64, backend="reference")
    grads64 = torch.autograd.grad(loss64, inputs64)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-4, atol=1e-4)
    for grad, grad64 in zip(grads, grads64):
        torch.testing.assert_close(grad.double(), grad64, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("backend", ["reference"] + runnable_fused_backends())
def test_compiled_forward_and_backward_without_graph_breaks(backend, generator):
    torch._dynamo.reset()
    inputs = all_ops_inputs(generator, device=backend_device(backend))
    # aot_eager traces everything (fullgraph=True fails on any graph break) and runs the
    # ops' fake and autograd registrations; inductor codegen is exercised for the reference.
    compiler = "inductor" if backend == "reference" else "aot_eager"
    compiled = torch.compile(all_ops_loss, fullgraph=True, backend=compiler)
    loss = compiled(*inputs, backend=backend)
    grads = torch.autograd.grad(loss, inputs)
    expected_loss = all_ops_loss(*inputs, backend=backend)
    expected_grads = torch.autograd.grad(expected_loss, inputs)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-4)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ opcheck
def opcheck_cases(generator, device):
    make = lambda *shape, dtype=torch.float32: randn(*shape, generator=generator, dtype=dtype).to(device)  # noqa: E731
    x, bias, grad = make(3, 40), make(40), make(3, 40)
    weight = make(40)
    mean, rstd = x.mean(-1), torch.rsqrt(x.var(-1, unbiased=False) + 1e-5)
    q, k, v = (make(1, 2, 17, 64, dtype=torch.float16) for _ in range(3))
    return {
        "gelu_forward": (x,),
        "gelu_backward": (grad, x),
        "bias_gelu_forward": (x, bias),
        "bias_gelu_backward": (grad, x, bias),
        "layer_norm_forward": (x, weight, bias, 1e-5),
        "layer_norm_backward": (grad, x, weight, mean, rstd),
        "flash_attention_forward": (q, k, v, True, 0.125),
    }


def opcheck_backends():
    return [(name, op) for name in runnable_fused_backends() for op in ("gelu_forward", "gelu_backward",
            "bias_gelu_forward", "bias_gelu_backward", "layer_norm_forward", "layer_norm_backward",
            "flash_attention_forward")]


@pytest.mark.parametrize("backend,op_name", opcheck_backends())
def test_opcheck(backend, op_name, generator):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = opcheck_cases(generator, device)[op_name]
    if op_name.endswith("_forward"):
        args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.dim() else a for a in args)
    torch.library.opcheck(backends.fused_op(backend, op_name), args)


# ------------------------------------------------------------------ bad input
def test_bad_inputs_name_the_argument(generator):
    q = randn(1, 2, 8, 16, generator=generator)
    x = randn(4, 8, generator=generator)
    cases = [
        (lambda: llmkernels.flash_attention(q[0], q, q), ValueError, "q must have 4 dimensions"),
        (lambda: llmkernels.flash_attention(q, q.float(), q), TypeError, "k must have the same dtype as q"),
        (lambda: llmkernels.flash_attention(q, q, q.to("meta")), ValueError, "v must be on the same device as q"),
        (lambda: llmkernels.flash_attention(q, q[..., :8], q[..., :8]), ValueError, "k must have shape"),
        (lambda: llmkernels.flash_attention(q, q, q[:, :, :4]), ValueError, "v must have the same shape as k"),
        (lambda: llmkernels.flash_attention(q, randn(1, 3, 8, 16, generator=generator), randn(1, 3, 8, 16, generator=generator)), ValueError, "multiple of the heads of k"),
        (lambda: llmkernels.flash_attention(q, q[:, :, :4], q[:, :, :4]), ValueError, "causal attention needs query length"),
        (lambda: llmkernels.flash_attention(q.long(), q, q), TypeError, "q must be a floating-point tensor"),
        (lambda: llmkernels.layer_norm(x, randn(7, generator=generator)), ValueError, "weight must have shape"),
        (lambda: llmkernels.layer_norm(x, bias=x), ValueError, "bias must have 1 dimensions"),
        (lambda: llmkernels.layer_norm(x, eps=0.0), ValueError, "eps must be a finite positive number"),
        (lambda: llmkernels.layer_norm(x, eps="1e-5"), TypeError, "eps must be a number"),
        (lambda: llmkernels.layer_norm(x.float(), x[0].half()), TypeError, r"weight must have x's dtype \(torch.float32\) or float32"),
        (lambda: llmkernels.layer_norm(x.half(), bias=x[0].double()), TypeError, "bias must have x's dtype"),
        (lambda: llmkernels.bias_gelu(x, x[0].half()), TypeError, "bias must have the same dtype as x"),
        (lambda: llmkernels.flash_attention(q, q, q, causal="yes"), TypeError, "causal must be a bool"),
        (lambda: llmkernels.flash_attention(q, q, q, scale=float("nan")), ValueError, "scale must be a finite number"),
        (lambda: llmkernels.flash_attention(q, q[..., :8], q), ValueError, "k must have shape"),  # k alone is off
        (lambda: llmkernels.explain("flash_attn", q, q, q), ValueError, r"unknown op 'flash_attn'; expected one of (\w+, )*flash_attention, "),
        (lambda: llmkernels.layer_norm(x.int()), TypeError, "x must be a floating-point tensor"),
        (lambda: llmkernels.layer_norm([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: llmkernels.gelu(x, approximate="sigmoid"), ValueError, "approximate must be"),
        (lambda: llmkernels.bias_gelu(x, randn(4, generator=generator)), ValueError, "bias must have shape"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_explain_refuses_what_the_op_refuses(generator):
    q = randn(1, 2, 8, 16, generator=generator)
    x = randn(4, 8, generator=generator)
    calls = [
        ("flash_attention", (q, q, q[:, :, :4]), {}),
        ("flash_attention", (q, q, q), {"causal": "yes"}),
        ("layer_norm", (x, x[0].half()), {}),
        ("bias_gelu", (x, x[0].half()), {}),
        ("gelu", (x,), {"approximate": "sigmoid"}),
    ]
    for op, args, kwargs in calls:
        with pytest.raises((TypeError, ValueError)) as from_op:
            getattr(llmkernels, op)(*args, **kwargs)
        with pytest.raises(from_op.type, match=re.escape(str(from_op.value))):
            llmkernels.explain(op, *args, **kwargs)


def test_layer_norm_takes_float32_parameters_on_low_precision_x(generator):
    x = randn(3, 8, generator=generator).half()
    weight, bias = (randn(8, generator=generator, dtype=torch.float32) for _ in range(2))
    expected = llmkernels.layer_norm_reference(x.float(), weight, bias).half()
    torch.testing.assert_close(llmkernels.layer_norm(x, weight, bias), expected, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------ GPU lane
@requires_cuda
@pytest.mark.parametrize("backend", runnable_fused_backends())
def test_gpu_backends_bf16_match_reference_rule(backend, generator):
    from numerics import GRAD_FACTOR, assert_close_to_reference

    inputs = [t.detach().to("cuda", torch.bfloat16).requires_grad_(True) for t in all_ops_inputs(generator)]
    loss = all_ops_loss(*inputs, backend=backend)
    grads = torch.autograd.grad(loss, inputs)
    torch_loss = all_ops_loss(*inputs, backend="reference")
    torch_grads = torch.autograd.grad(torch_loss, inputs)
    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    grads64 = torch.autograd.grad(all_ops_loss(*inputs64, backend="reference"), inputs64)
    for index, (grad, torch_grad, grad64) in enumerate(zip(grads, torch_grads, grads64)):
        assert_close_to_reference(grad, torch_grad, grad64, factor=GRAD_FACTOR, floor=1e-2 * math.sqrt(grad64.numel()), name=f"grad {index}")


def test_fused_model_meets_the_dtype_rules_under_autocast(monkeypatch):
    """Under bf16 autocast the fused GPT hands bias_gelu a bf16 bias (it casts) and layer_norm
    float32 parameters; both are accepted and the loss matches the unfused model's."""
    from llm.config import GPTConfig
    from llm.model import GPT

    monkeypatch.setenv(backends.BACKEND_ENV_VAR, "reference")  # Triton's CPU interpreter has no bf16
    torch.manual_seed(0)
    config = dict(vocab_size=97, context_length=16, n_embd=32, n_layer=2, n_head=2)
    plain, fused = GPT(GPTConfig(**config)), GPT(GPTConfig(**config, use_fused=True))
    fused.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss_plain = plain(idx, idx)
        _, loss_fused = fused(idx, idx)
    loss_fused.backward()
    torch.testing.assert_close(loss_fused.float(), loss_plain.float(), atol=2e-2, rtol=2e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fused.parameters())
