"""add_layer_norm: (x + residual, layer_norm(x + residual)) and its backward, every backend.

CPU lane: the reference against PyTorch in float64 (values and gradcheck); the Triton
kernels in Triton's interpreter at small odd sizes (float32/float16, a row longer than
one block, strided rows, absent weight/bias, fp32 weight with fp16 input) under the
numerics rule (tests/numerics.py) for both outputs and all four gradients; opcheck;
bitwise reproducible backward; bad input; the GPT with use_fused=True (loss and every
gradient within the numerics rule of the unfused model, one fused op per residual add,
no graph break under torch.compile(fullgraph=True)).

GPU lane: the CUDA and Triton ops over rows 1, 3, 1000 and hidden 1, 48, 768, 1000,
4096, 65536 in bf16/fp16/fp32; fp32 weights with bf16 input; misaligned and strided
inputs; bitwise reproducible backward; opcheck; the CUDA ops' own errors.

Sanitizer subset (small exact-size tensors, every CUDA kernel shape with the add):
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        --kernel-name kns=llmkernels python -m pytest tests/test_add_layer_norm.py -q -x -k sanitizer_subset
    and the same with --tool racecheck, synccheck, initcheck (see tests/test_cuda_norm_gelu.py).
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import llmkernels
import numerics
from conftest import requires_cuda, requires_cuda_kernels
from llmkernels import backends
from llmkernels.add_layer_norm import add_layer_norm_reference
from numerics import GRAD_FACTOR, OUTPUT_FACTOR, assert_close_to_reference
from test_cuda_norm_gelu import SANITIZER_LAYER_NORM, layer_norm_low_precision, misaligned, sum_floor

ops = torch.ops.llmkernels
EPS = 1e-5
FLOOR = 1e-5
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def runnable(backend):
    """A pytest.param for a fused backend, skipped where it cannot run."""
    usable, reason = llmkernels.available_backends()[backend]
    if backend == "cuda":
        usable = usable and backends.CUDA_EXTENSION_LOADED
    return pytest.param(backend, marks=pytest.mark.skipif(not usable, reason=reason or "not usable here"))


def fused_ops(backend):
    """(forward, backward) ops of a fused backend."""
    return backends.fused_op(backend, "add_layer_norm_forward"), backends.fused_op(backend, "add_layer_norm_backward")


def add_layer_norm_low_precision(x, residual, weight, bias, eps):
    """PyTorch in x's precision: the add, then F.layer_norm (parameters rounded to x's dtype)."""
    summed = x + residual
    return summed, layer_norm_low_precision(summed, weight, bias, eps)


def outputs_and_grads(fn, x, residual, weight, bias, grad_sum, grad_out, eps=EPS):
    """(sum, out, grad_x, grad_residual, grad_weight, grad_bias) of fn through autograd;
    absent parameters get None gradients."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, residual, weight, bias)]
    summed, out = fn(*leaves, eps)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((summed, out), present, (grad_sum.to(summed.dtype), grad_out.to(out.dtype))))
    return (summed.detach(), out.detach(), *(None if t is None else next(grads) for t in leaves))


def add_layer_norm_inputs(shape, dtype, generator, device="cpu", param_dtype=None, affine=True):
    """(x, residual, weight, bias, grad_sum, grad_out): fresh random values, never zeros."""
    randn = functools.partial(numerics.randn, generator=generator, device=device)
    param_dtype = param_dtype or dtype
    x = randn(shape, dtype, scale=2.0, shift=0.5)
    residual = randn(shape, dtype, scale=3.0)
    weight = randn(shape[-1:], param_dtype, shift=1.0) if affine else None
    bias = randn(shape[-1:], param_dtype) if affine else None
    return x, residual, weight, bias, randn(shape, dtype), randn(shape, dtype)


def check_add_layer_norm(backend, x, residual, weight, bias, grad_sum, grad_out, eps=EPS):
    """Runs a fused backend's forward and backward ops and checks both outputs, the saved
    statistics and all four gradients against float64 under the numerics rule, with PyTorch
    in x's precision as the yardstick; returns the op outputs."""
    forward, backward = fused_ops(backend)
    summed, out, mean, rstd = forward(x, residual, weight, bias, eps)
    grad_x, grad_weight, grad_bias = backward(grad_sum, grad_out, summed, weight, mean, rstd)
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    label = f"({backend}, shape {tuple(x.shape)}, {x.dtype}, weight {None if weight is None else weight.dtype})"

    for name, t in (("sum", summed), ("out", out), ("grad_x", grad_x)):
        assert t.dtype == x.dtype and t.shape == x.shape, f"{name} {label}"
    for name, t in (("mean", mean), ("rstd", rstd)):
        assert t.dtype == torch.float32 and t.shape == (rows,), f"{name} {label}"
    for name, t in (("grad_weight", grad_weight), ("grad_bias", grad_bias)):
        assert t.dtype == torch.float32 and t.shape == (hidden,), f"{name} {label}"
    # The sum is x + residual rounded once to x's dtype, exactly as PyTorch's add.
    assert torch.equal(summed, x + residual), f"sum {label}"
    sum64 = summed.double().reshape(rows, hidden)
    torch.testing.assert_close(mean.double(), sum64.mean(-1), rtol=1e-5, atol=1e-5, msg=f"mean {label}")
    rstd64 = torch.rsqrt(sum64.var(-1, unbiased=False) + eps)
    torch.testing.assert_close(rstd.double(), rstd64, rtol=1e-5, atol=1e-5, msg=f"rstd {label}")

    as64 = [None if t is None else t.double() for t in (x, residual, weight, bias)]
    expected = outputs_and_grads(add_layer_norm_reference, *as64, grad_sum.double(), grad_out.double(), eps)
    torch_low = outputs_and_grads(add_layer_norm_low_precision, x, residual, weight, bias, grad_sum, grad_out, eps)
    ours = (summed, out, grad_x, grad_x)  # x and residual share one gradient
    names = ("sum", "out", "grad_x", "grad_residual")
    for index, (name, actual) in enumerate(zip(names, ours)):
        is_output = index < 2
        assert_close_to_reference(
            actual, torch_low[index], expected[index], factor=OUTPUT_FACTOR if is_output else GRAD_FACTOR,
            floor=FLOOR, name=f"{name} {label}",
        )  # fmt: skip
    # grad_weight = sum(grad_out * xhat), grad_bias = sum(grad_out) over rows: always computed.
    xhat64 = (sum64 - sum64.mean(-1, keepdim=True)) * rstd64[:, None]
    grad_out64 = grad_out.double().reshape(rows, hidden)
    for name, actual, reference, low in (
        ("grad_weight", grad_weight, (grad_out64 * xhat64).sum(0), torch_low[4]),
        ("grad_bias", grad_bias, grad_out64.sum(0), torch_low[5]),
    ):
        low = reference.float() if low is None else low  # no PyTorch counterpart: float32 accuracy
        assert_close_to_reference(actual, low, reference, factor=GRAD_FACTOR, floor=sum_floor(rows), name=f"{name} {label}")
    return summed, out, mean, rstd, grad_x, grad_weight, grad_bias


# ------------------------------------------------------------------ reference, CPU
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 48)])
def test_reference_is_the_add_then_layer_norm(shape, generator):
    x, residual, weight, bias, _, _ = add_layer_norm_inputs(shape, torch.float64, generator)
    summed, out = add_layer_norm_reference(x, residual, weight, bias, EPS)
    torch.testing.assert_close(summed, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(out, F.layer_norm(x + residual, shape[-1:], weight, bias, EPS), rtol=1e-12, atol=1e-12)
    summed, out = llmkernels.add_layer_norm(x, residual, backend="reference")
    torch.testing.assert_close(out, F.layer_norm(x + residual, shape[-1:]), rtol=1e-12, atol=1e-12)


def test_reference_gradients_by_gradcheck(generator):
    inputs = [t.requires_grad_() for t in add_layer_norm_inputs((3, 5), torch.float64, generator)[:4]]
    assert torch.autograd.gradcheck(lambda *a: llmkernels.add_layer_norm(*a, backend="reference"), inputs)


# ------------------------------------------------------------- Triton interpreter, CPU
needs_cpu_triton = pytest.mark.skipif(
    torch.cuda.is_available() or not llmkernels.available_backends()["triton"][0],
    reason="the CPU lane runs Triton in its interpreter (the GPU lane covers a device)",
)


@needs_cpu_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (37, 48), (4, 768), (2, 3, 1000)])
def test_triton_matches_reference_cpu(shape, dtype, generator):
    check_add_layer_norm("triton", *add_layer_norm_inputs(shape, dtype, generator))


@needs_cpu_triton
def test_triton_long_rows_take_the_looped_path_cpu(generator):
    from llmkernels.triton.layer_norm import MAX_ROW_BLOCK

    check_add_layer_norm("triton", *add_layer_norm_inputs((2, MAX_ROW_BLOCK + 1000), torch.float32, generator))


@needs_cpu_triton
@pytest.mark.parametrize("case", ["no affine", "fp32 weight fp16 input"])
def test_triton_optional_and_mixed_parameters_cpu(case, generator):
    if case == "no affine":
        inputs = add_layer_norm_inputs((5, 77), torch.float32, generator, affine=False)
    else:
        inputs = add_layer_norm_inputs((9, 300), torch.float16, generator, param_dtype=torch.float32)
    check_add_layer_norm("triton", *inputs)


@needs_cpu_triton
def test_triton_non_contiguous_inputs_cpu(generator):
    x, residual, weight, bias, grad_sum, grad_out = add_layer_norm_inputs((12, 130), torch.float32, generator)
    strided = [t[::2, 3:103] for t in (x, residual, grad_sum, grad_out)]  # strided rows, contiguous last dim
    transposed = [t[:, :6].t().contiguous().t() for t in (x, residual, grad_sum, grad_out)]  # strided last dim
    assert not any(t.is_contiguous() for t in strided + transposed)
    first = check_add_layer_norm("triton", strided[0], strided[1], weight[:100], bias[:100], strided[2], strided[3])
    again = check_add_layer_norm(
        "triton", *(t.contiguous() for t in strided[:2]), weight[:100], bias[:100], *(t.contiguous() for t in strided[2:])
    )
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    check_add_layer_norm("triton", transposed[0], transposed[1], weight[:6], bias[:6], *transposed[2:])


@needs_cpu_triton
def test_triton_backward_is_bitwise_reproducible_cpu(generator):
    x, residual, weight, bias, grad_sum, grad_out = add_layer_norm_inputs((37, 200), torch.float32, generator)
    forward, backward = fused_ops("triton")
    summed, _, mean, rstd = forward(x, residual, weight, bias, EPS)
    first = backward(grad_sum, grad_out, summed, weight, mean, rstd)
    for a, b in zip(first, backward(grad_sum, grad_out, summed, weight, mean, rstd)):
        assert torch.equal(a, b)


@needs_cpu_triton
def test_triton_opcheck_cpu(generator):
    x, residual, weight, bias, grad_sum, grad_out = add_layer_norm_inputs((5, 33), torch.float32, generator)
    forward, backward = fused_ops("triton")
    summed, _, mean, rstd = forward(x, residual, weight, bias, EPS)
    torch.library.opcheck(forward, (x.requires_grad_(), residual.requires_grad_(), weight, bias, EPS))
    torch.library.opcheck(forward, (x, residual, None, None, EPS))
    torch.library.opcheck(backward, (grad_sum, grad_out, summed, weight, mean, rstd))


# ------------------------------------------------------------------ public function
def test_public_function_autograd_matches_the_reference(generator):
    """Whichever backend auto picks here (Triton's interpreter on a CPU machine), forward and
    autograd of the public function agree with the reference in float64."""
    inputs = [t.requires_grad_() for t in add_layer_norm_inputs((4, 3, 65), torch.float32, generator)[:4]]
    summed, out = llmkernels.add_layer_norm(*inputs)
    loss = (out * out).sum() + (summed * summed.detach().cos()).sum()  # both outputs reach the loss
    grads = torch.autograd.grad(loss, inputs)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    summed64, out64 = add_layer_norm_reference(*inputs64, EPS)
    grads64 = torch.autograd.grad((out64 * out64).sum() + (summed64 * summed64.detach().cos()).sum(), inputs64)
    torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(summed.double(), summed64, atol=1e-6, rtol=1e-6)
    for grad, grad64 in zip(grads, grads64):
        torch.testing.assert_close(grad.double(), grad64, atol=1e-4, rtol=1e-5)


def test_explain_names_each_backends_reason(generator):
    x, residual, weight, bias, _, _ = add_layer_norm_inputs((3, 8), torch.float32, generator)
    reasons = llmkernels.explain("add_layer_norm", x, residual, weight, bias)
    assert list(reasons) == ["cuda", "triton", "reference"] and reasons["reference"] is None
    if llmkernels.available_backends()["triton"][0]:
        assert reasons["triton"] is None
    with pytest.raises(ValueError, match="residual must have shape"):  # explain validates like the op
        llmkernels.explain("add_layer_norm", x, residual[:2], weight, bias)
    first = next(name for name, reason in reasons.items() if reason is None)
    assert backends.select_backend("add_layer_norm", "auto", x, residual, weight, bias) == first


def test_bad_inputs_name_the_argument(generator):
    x, residual, weight, bias, _, _ = add_layer_norm_inputs((4, 8), torch.float32, generator)
    call = llmkernels.add_layer_norm
    cases = [
        (lambda: call(x, residual[:3], weight, bias), ValueError, r"residual must have shape \(4, 8\) \(the shape of x\)"),
        (lambda: call(x, residual.double(), weight, bias), TypeError, "residual must have the same dtype as x"),
        (lambda: call(x, residual.to("meta"), weight, bias), ValueError, "residual must be on the same device as x"),
        (lambda: call(x, residual.int(), weight, bias), TypeError, "residual must be a floating-point tensor"),
        (lambda: call(x, [1.0], weight, bias), TypeError, "residual must be a torch.Tensor"),
        (lambda: call(x.int(), residual, weight, bias), TypeError, "x must be a floating-point tensor"),
        (lambda: call(x, residual, weight[:7], bias), ValueError, r"weight must have shape \(8,\)"),
        (lambda: call(x, residual, weight, bias[None]), ValueError, "bias must have 1 dimensions"),
        (lambda: call(x, residual, weight, bias.to("meta")), ValueError, "bias must be on the same device as x"),
        (lambda: call(x, residual, weight, bias, eps=0.0), ValueError, "eps must be a finite positive number"),
        (lambda: call(x, residual, backend="cudnn"), ValueError, "argument backend"),
    ]
    for fn, error, message in cases:
        with pytest.raises(error, match=message):
            fn()
    if not llmkernels.available_backends()["cuda"][0]:
        with pytest.raises(llmkernels.BackendUnavailableError, match="add_layer_norm: backend 'cuda' cannot run"):
            call(x, residual, backend="cuda")


# -------------------------------------------------------------------------- the model
def tiny_fused_pair(**overrides):
    """(unfused, fused) tiny GPTs with the same weights."""
    from llm.config import GPTConfig
    from llm.model import GPT

    fields = {**dict(vocab_size=97, context_length=24, n_embd=32, n_layer=3, n_head=4, vocab_pad_multiple=64), **overrides}
    torch.manual_seed(0)
    unfused = GPT(GPTConfig(**fields))
    fused = GPT(GPTConfig(**fields, use_fused=True))
    fused.load_state_dict(unfused.state_dict())
    return unfused, fused


def test_fused_model_routes_every_residual_add_through_add_layer_norm(monkeypatch):
    unfused, fused = tiny_fused_pair()
    assert list(fused.state_dict()) == list(unfused.state_dict())  # Hugging Face names unchanged
    calls = []
    original = llmkernels.add_layer_norm
    monkeypatch.setattr(llmkernels, "add_layer_norm", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    fused(torch.randint(0, 97, (2, 9)))
    assert len(calls) == 2 * fused.config.n_layer  # both adds of every block; ln_1 of block 0 alone has none


def test_fused_model_loss_and_gradients_within_the_numerics_rule():
    """float32 fused and unfused models against the unfused model in float64: the fused
    loss at most 2x, every gradient at most 3x PyTorch's own error, plus the floor."""
    unfused, fused = tiny_fused_pair()
    unfused64 = tiny_fused_pair()[0].double()
    idx = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (fused, unfused, unfused64):
        _, loss = model(idx, idx)
        results.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    (loss, grads), (loss_torch, grads_torch), (loss64, grads64) = results
    assert_close_to_reference(loss, loss_torch, loss64, factor=OUTPUT_FACTOR, floor=FLOOR, name="loss")
    names = [name for name, _ in fused.named_parameters()]
    for name, grad, grad_torch, grad64 in zip(names, grads, grads_torch, grads64):
        assert_close_to_reference(grad, grad_torch, grad64, factor=GRAD_FACTOR, floor=FLOOR, name=f"grad {name}")


def test_fused_model_compiles_fullgraph_with_one_op_per_residual_add():
    """torch.compile(fullgraph=True) of the fused training loss: no graph break, and the
    traced graph holds 2 * n_layer add_layer_norm ops (the compile test in test_llm_model.py
    covers the backward and inductor on a GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.randn(2, 64, device=device)
    if llmkernels.explain("add_layer_norm", probe, probe, None, None)["triton"] is not None:
        pytest.skip("no fused add_layer_norm backend runs here")
    torch._dynamo.reset()
    _, fused = tiny_fused_pair(n_embd=64)  # head_dim 16: the Triton attention takes it
    fused = fused.to(device)
    graphs = []

    def count_ops(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(lambda idx: fused(idx, idx)[1], fullgraph=True, backend=count_ops)
    idx = torch.randint(0, 97, (2, 9), device=device)
    torch.testing.assert_close(compiled(idx), fused(idx, idx)[1])
    (graph,) = graphs
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert sum("add_layer_norm_forward" in t for t in targets) == 2 * fused.config.n_layer, targets


# ------------------------------------------------------------------------------ GPU lane
ROWS = (1, 3, 1000)
HIDDEN = (1, 48, 768, 1000, 4096, 65536)  # scalar, warp-per-row, block-per-row, looped
GPU_BACKENDS = [runnable("cuda"), runnable("triton")]


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_reference_gpu(backend, rows, hidden, dtype, generator):
    check_add_layer_norm(backend, *add_layer_norm_inputs((rows, hidden), dtype, generator, "cuda"))


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("hidden", (7, 768, 4096, 12288))
def test_fp32_weight_and_absent_parameters_gpu(backend, hidden, generator):
    check_add_layer_norm(backend, *add_layer_norm_inputs((37, hidden), torch.bfloat16, generator, "cuda", torch.float32))
    check_add_layer_norm(backend, *add_layer_norm_inputs((37, hidden), torch.bfloat16, generator, "cuda", affine=False))


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", (768, 1000, 12288))
def test_misaligned_and_strided_inputs_gpu(backend, hidden, dtype, generator):
    x, residual, weight, bias, grad_sum, grad_out = add_layer_norm_inputs((37, hidden), dtype, generator, "cuda")
    check_add_layer_norm(backend, x, misaligned(residual), weight, bias, grad_sum, grad_out)
    check_add_layer_norm(backend, x, residual, weight, bias, misaligned(grad_sum), grad_out)
    rows_strided = [t[::2] for t in (x, residual, grad_sum, grad_out)]  # every other row
    first = check_add_layer_norm(backend, rows_strided[0], rows_strided[1], weight, bias, *rows_strided[2:])
    again = check_add_layer_norm(
        backend, *(t.contiguous() for t in rows_strided[:2]), weight, bias, *(t.contiguous() for t in rows_strided[2:])
    )
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    transposed = [t[:, :33].t().contiguous().t() for t in (x, residual, grad_sum, grad_out)]  # strided last dim
    check_add_layer_norm(backend, transposed[0], transposed[1], weight[:33], bias[:33], *transposed[2:])


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("hidden", (768, 4096, 65536))
def test_backward_is_bitwise_reproducible_gpu(backend, hidden, generator):
    x, residual, weight, bias, grad_sum, grad_out = add_layer_norm_inputs((4096, hidden), torch.bfloat16, generator, "cuda")
    forward, backward = fused_ops(backend)
    summed, _, mean, rstd = forward(x, residual, weight, bias, EPS)
    first = backward(grad_sum, grad_out, summed, weight, mean, rstd)
    for _ in range(2):
        for a, b in zip(first, backward(grad_sum, grad_out, summed, weight, mean, rstd)):
            assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_public_function_runs_the_ops_gpu(backend, generator):
    x, residual, weight, bias, grad_sum, grad_out = add_layer_norm_inputs((257, 768), torch.bfloat16, generator, "cuda")
    leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    summed, out = llmkernels.add_layer_norm(*leaves, backend=backend)
    torch.autograd.backward((summed, out), (grad_sum, grad_out))
    forward, backward = fused_ops(backend)
    expected_sum, expected_out, mean, rstd = forward(x, residual, weight, bias, EPS)
    grad_x, grad_weight, grad_bias = backward(grad_sum, grad_out, expected_sum, weight, mean, rstd)
    assert torch.equal(summed, expected_sum) and torch.equal(out, expected_out)
    assert torch.equal(leaves[0].grad, grad_x) and torch.equal(leaves[1].grad, grad_x)
    assert torch.equal(leaves[2].grad, grad_weight.to(weight.dtype))
    assert torch.equal(leaves[3].grad, grad_bias.to(bias.dtype))


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck_gpu(backend, generator):
    x, residual, weight, bias, grad_sum, grad_out = add_layer_norm_inputs((5, 40), torch.float32, generator, "cuda")
    forward, backward = fused_ops(backend)
    summed, _, mean, rstd = forward(x, residual, weight, bias, EPS)
    torch.library.opcheck(forward, (x.requires_grad_(), residual.requires_grad_(), weight, bias, EPS))
    torch.library.opcheck(backward, (grad_sum, grad_out, summed, weight, mean, rstd))


@requires_cuda_kernels
@requires_cuda
def test_cuda_ops_bad_inputs_name_the_argument():
    x = torch.randn(4, 768, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    mean = rstd = torch.zeros(4, device="cuda")
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        ops.add_layer_norm_forward(x, x[:2], weight, None, EPS)
    with pytest.raises(RuntimeError, match="residual must have x's dtype"):
        ops.add_layer_norm_forward(x, x.float(), weight, None, EPS)
    with pytest.raises(RuntimeError, match="residual must be a CUDA tensor"):
        ops.add_layer_norm_forward(x, x.cpu(), weight, None, EPS)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(768,\)"):
        ops.add_layer_norm_forward(x, x, weight[:100], None, EPS)
    with pytest.raises(RuntimeError, match="grad_sum must have x's shape"):
        ops.add_layer_norm_backward(x[:2], x, x, weight, mean, rstd)
    with pytest.raises(RuntimeError, match="grad_sum must have x's dtype"):
        ops.add_layer_norm_backward(x.float(), x, x, weight, mean, rstd)


# --------------------------------------------------------------------- sanitizer subset
# The LayerNorm subset's shapes (every CUDA kernel shape), with the add, on both backends:
# for Triton one-tile rows of 7 to 8000 columns and looped rows of 12288 (the row-dot kernel).
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("rows,hidden,dtype,offset", SANITIZER_LAYER_NORM, ids=str)
def test_sanitizer_subset_add_layer_norm(backend, rows, hidden, dtype, offset, generator):
    x, residual, weight, bias, grad_sum, grad_out = add_layer_norm_inputs(
        (rows, hidden), dtype, generator, "cuda", param_dtype=torch.float32
    )
    if offset:
        residual = misaligned(residual)
    check_add_layer_norm(backend, x, residual, weight, bias, grad_sum, grad_out)
    check_add_layer_norm(backend, x, residual, None, None, grad_sum, grad_out)
