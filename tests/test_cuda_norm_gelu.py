"""The hand-written CUDA LayerNorm and GELU kernels (csrc/layer_norm.cu, csrc/gelu.cu).

CPU lane (whenever llmkernels._C imports): the ops (add_layer_norm's too) carry the contract's
schemas, have CUDA kernels registered, and a CPU tensor is refused by the dispatcher with a clear
error.
GPU lane: forward and backward against the float64 reference under the numerics rule
(tests/numerics.py) over rows 1, 3, 1000 and hidden 1, 7, 768, 1000, 4096, 65536 (every
kernel shape: warp-per-row, block-per-row, looped, scalar) in bf16/fp16/fp32; fp32 weights
with low-precision input; absent weight/bias; misaligned and strided inputs; 1M rows;
bitwise reproducible backward; the public functions with autograd; clear errors.

Sanitizer subset (small exact-size tensors, every kernel of both files, all dtypes):
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        --kernel-name kns=llmkernels python -m pytest tests/test_cuda_norm_gelu.py -q -x -k sanitizer_subset
    and the same with --tool racecheck (then synccheck, initcheck). Without the caching
    allocator every tensor is its own allocation, so memcheck sees any read past its end;
    `--kernel-name kns=llmkernels` instruments only this project's kernels.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import llmkernels
from llmkernels.gelu import bias_gelu_reference, gelu_reference
from llmkernels.layer_norm import layer_norm_reference

from conftest import OP_SCHEMAS, requires_cuda_kernels, requires_extension
import numerics
from numerics import GRAD_FACTOR, OUTPUT_FACTOR, assert_close_to_reference

ROWS = (1, 3, 1000)
# 768/1000: warp per row (fp32: block per row); 4096: block per row; 65536: looped; 1, 7: scalar path
HIDDEN = (1, 7, 768, 1000, 4096, 65536)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
EPS = 1e-5
OUTPUT_FLOOR = 1e-5
GRAD_FLOOR = 1e-5

SCHEMAS = {name: schema for name, schema in OP_SCHEMAS.items() if not name.startswith("flash_attention")}
ops = torch.ops.llmkernels


randn = functools.partial(numerics.randn, device="cuda")  # randn(shape, dtype, generator, scale=, shift=)


def misaligned(t):
    """A copy of t that starts one element into its storage: not 16-byte aligned."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


def sum_floor(rows):
    """Floor for a sum over rows (grad_weight, grad_bias): fp32 rounding grows like sqrt(rows)."""
    return GRAD_FLOOR * max(1.0, rows**0.5)


# ------------------------------------------------------------------------------ LayerNorm
def layer_norm_low_precision(x, weight, bias, eps):
    """PyTorch's own LayerNorm in x's dtype (parameters rounded to it): the "PyTorch in the
    same precision" side of the numerics rule."""
    weight = None if weight is None else weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def out_and_grads(layer_norm, x, weight, bias, grad_out, eps):
    """(out, grad_x, grad_weight, grad_bias) of `layer_norm`; absent parameters get None grads."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    out = layer_norm(*leaves, eps)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out.to(out.dtype)))
    return (out.detach(), *(None if t is None else next(grads) for t in leaves))


def check_layer_norm(x, weight, bias, grad_out, eps=EPS):
    """Runs the CUDA forward and backward ops on (x, weight, bias) and checks every output
    against the float64 reference; returns the op outputs."""
    out, mean, rstd = ops.layer_norm_forward(x, weight, bias, eps)
    grad_x, grad_weight, grad_bias = ops.layer_norm_backward(grad_out, x, weight, mean, rstd)
    rows, hidden = x.numel() // x.shape[-1], x.shape[-1]
    label = f"(rows {rows}, hidden {hidden}, {x.dtype}, weight {None if weight is None else weight.dtype})"

    x64 = x.double()
    mean64 = x64.mean(-1).reshape(-1)
    rstd64 = torch.rsqrt(x64.var(-1, unbiased=False) + eps).reshape(-1)
    assert mean.dtype == torch.float32 and mean.shape == (rows,)
    assert rstd.dtype == torch.float32 and rstd.shape == (rows,)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5, msg=f"mean {label}")
    torch.testing.assert_close(rstd.double(), rstd64, rtol=1e-5, atol=1e-5, msg=f"rstd {label}")

    as64 = [None if t is None else t.double() for t in (x, weight, bias)]
    expected = out_and_grads(layer_norm_reference, *as64, grad_out.double(), eps)
    torch_low = out_and_grads(layer_norm_low_precision, x, weight, bias, grad_out, eps)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert grad_x.dtype == x.dtype and grad_x.shape == x.shape
    for name, actual, reference, low in zip(("out", "grad_x"), (out, grad_x), expected[:2], torch_low[:2]):
        is_output = name == "out"
        assert_close_to_reference(
            actual,
            low,
            reference,
            factor=OUTPUT_FACTOR if is_output else GRAD_FACTOR,
            floor=OUTPUT_FLOOR if is_output else GRAD_FLOOR,
            name=f"{name} {label}",
        )
    # grad_weight = sum(grad_out * xhat), grad_bias = sum(grad_out): always computed, float32
    grad_out64 = grad_out.double().reshape(rows, hidden)
    xhat64 = (x64.reshape(rows, hidden) - mean64[:, None]) * rstd64[:, None]
    low_weight, low_bias = torch_low[2], torch_low[3]
    for name, actual, reference, low in (
        ("grad_weight", grad_weight, (grad_out64 * xhat64).sum(0), low_weight),
        ("grad_bias", grad_bias, grad_out64.sum(0), low_bias),
    ):
        assert actual.dtype == torch.float32 and actual.shape == (hidden,), name
        if low is None:  # no PyTorch counterpart when the parameter is absent: float32 accuracy
            low = reference.float()
        assert_close_to_reference(actual, low, reference, factor=GRAD_FACTOR, floor=sum_floor(rows), name=f"{name} {label}")
    return out, mean, rstd, grad_x, grad_weight, grad_bias


def layer_norm_inputs(rows, hidden, dtype, generator, param_dtype=None):
    param_dtype = param_dtype or dtype
    x = randn((rows, hidden), dtype, generator, scale=2.0, shift=0.5)
    weight = randn((hidden,), param_dtype, generator, shift=1.0)
    bias = randn((hidden,), param_dtype, generator)
    grad_out = randn((rows, hidden), dtype, generator)
    return x, weight, bias, grad_out


# ----------------------------------------------------------------------------------- GELU
def gelu_out_and_grad(gelu, x, grad_out):
    leaf = x.detach().clone().requires_grad_()
    out = gelu(leaf)
    (grad,) = torch.autograd.grad(out, leaf, grad_out.to(out.dtype))
    return out.detach(), grad


def check_gelu(x, grad_out):
    out = ops.gelu_forward(x)
    grad_x = ops.gelu_backward(grad_out, x)
    label = f"(shape {tuple(x.shape)}, {x.dtype})"
    expected = gelu_out_and_grad(gelu_reference, x.double(), grad_out.double())
    torch_low = gelu_out_and_grad(lambda t: F.gelu(t, approximate="tanh"), x, grad_out)
    for name, actual, reference, low, factor in (
        ("out", out, expected[0], torch_low[0], OUTPUT_FACTOR),
        ("grad_x", grad_x, expected[1], torch_low[1], GRAD_FACTOR),
    ):
        assert actual.dtype == x.dtype and actual.shape == x.shape, name
        assert_close_to_reference(actual, low, reference, factor=factor, floor=OUTPUT_FLOOR, name=f"{name} {label}")
    return out, grad_x


def bias_gelu_out_and_grads(bias_gelu, x, bias, grad_out):
    leaves = [x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
    out = bias_gelu(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return (out.detach(), *grads)


def check_bias_gelu(x, bias, grad_out):
    out = ops.bias_gelu_forward(x, bias)
    grad_x, grad_bias = ops.bias_gelu_backward(grad_out, x, bias)
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    label = f"(shape {tuple(x.shape)}, {x.dtype}, bias {bias.dtype})"
    expected = bias_gelu_out_and_grads(bias_gelu_reference, x.double(), bias.double(), grad_out.double())
    torch_low = bias_gelu_out_and_grads(
        lambda t, b: F.gelu(t + b.to(t.dtype), approximate="tanh"), x, bias, grad_out
    )
    assert out.dtype == x.dtype and grad_x.dtype == x.dtype
    assert grad_bias.dtype == torch.float32 and grad_bias.shape == (hidden,)
    for name, actual, reference, low, factor, floor in (
        ("out", out, expected[0], torch_low[0], OUTPUT_FACTOR, OUTPUT_FLOOR),
        ("grad_x", grad_x, expected[1], torch_low[1], GRAD_FACTOR, GRAD_FLOOR),
        ("grad_bias", grad_bias, expected[2], torch_low[2], GRAD_FACTOR, sum_floor(rows)),
    ):
        assert_close_to_reference(actual, low, reference, factor=factor, floor=floor, name=f"{name} {label}")
    return out, grad_x, grad_bias


# ----------------------------------------------------------------------------- CPU lane
@requires_extension
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_ops_have_the_contract_schemas_and_cuda_kernels(name):
    op = getattr(ops, name).default
    assert str(op._schema) == SCHEMAS[name]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), f"{name} has no CUDA kernel"


CPU_CALLS = {
    "gelu_forward": lambda x, w: ops.gelu_forward(x),
    "gelu_backward": lambda x, w: ops.gelu_backward(x, x),
    "bias_gelu_forward": lambda x, w: ops.bias_gelu_forward(x, w),
    "bias_gelu_backward": lambda x, w: ops.bias_gelu_backward(x, x, w),
    "layer_norm_forward": lambda x, w: ops.layer_norm_forward(x, w, w, EPS),
    "layer_norm_backward": lambda x, w: ops.layer_norm_backward(x, x, w, x[:, 0].float(), x[:, 0].float()),
}


@requires_extension
@pytest.mark.parametrize("name", sorted(CPU_CALLS))
def test_cpu_tensors_are_refused_by_the_dispatcher(name):
    x, weight = torch.randn(3, 8), torch.randn(8)
    with pytest.raises(NotImplementedError, match="with arguments from the .CPU. backend"):
        CPU_CALLS[name](x, weight)


# ----------------------------------------------------------------------------- GPU lane
@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_layer_norm_matches_reference(rows, hidden, dtype, generator):
    check_layer_norm(*layer_norm_inputs(rows, hidden, dtype, generator))


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("hidden", (7, 768, 1000, 4096, 65536))
def test_layer_norm_fp32_weight_with_low_precision_input(hidden, dtype, generator):
    check_layer_norm(*layer_norm_inputs(37, hidden, dtype, generator, param_dtype=torch.float32))


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("affine", ("none", "weight", "bias", "fp16-weight-bf16-input"))
@pytest.mark.parametrize("hidden", (7, 768, 4096, 12288))
def test_layer_norm_optional_and_mixed_parameters(affine, hidden, generator):
    dtype = torch.bfloat16
    x, weight, bias, grad_out = layer_norm_inputs(37, hidden, dtype, generator)
    if affine == "none":
        weight = bias = None
    elif affine == "weight":
        bias = None
    elif affine == "bias":
        weight = None
    else:  # neither x's dtype nor float32: converted to float32 inside the op
        weight, bias = weight.half(), bias.half()
    check_layer_norm(x, weight, bias, grad_out)


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", (768, 1000, 4096, 12288))
def test_layer_norm_misaligned_inputs_take_the_scalar_path(hidden, dtype, generator):
    x, weight, bias, grad_out = layer_norm_inputs(37, hidden, dtype, generator)
    check_layer_norm(misaligned(x), weight, bias, grad_out)
    check_layer_norm(x, misaligned(weight), misaligned(bias), misaligned(grad_out))


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_layer_norm_strided_and_batched_inputs(dtype, generator):
    # (hidden, rows) transposed: the last dim is not contiguous; the op copies it once.
    x = randn((768, 33), dtype, generator).t()
    assert not x.is_contiguous()
    _, weight, bias, grad_out = layer_norm_inputs(33, 768, dtype, generator)
    strided = check_layer_norm(x, weight, bias, grad_out.t().contiguous().t())
    contiguous = check_layer_norm(x.contiguous(), weight, bias, grad_out.contiguous())
    for a, b in zip(strided, contiguous):
        assert torch.equal(a, b)
    # (batch, seq, hidden): rows are all leading dimensions
    x3, grad_out3 = randn((2, 5, 768), dtype, generator), randn((2, 5, 768), dtype, generator)
    out, mean, _, grad_x, _, _ = check_layer_norm(x3, weight, bias, grad_out3)
    assert out.shape == (2, 5, 768) and mean.shape == (10,) and grad_x.shape == (2, 5, 768)


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize(
    "hidden,dtype",
    [
        # bf16/fp16 (8 per vector): warp-per-row 1 and 4 vectors per lane (8, 1024); block-per-row
        # with 1, 2, 4 vectors per thread, each just past a step (1032, 2056, 4104: 129 threads
        # needed, 160 launched, the last warp nearly idle) and at a full block (2048, 8192); the
        # first looped vectorised size (8200).
        *[(h, torch.bfloat16) for h in (8, 1024, 1032, 2048, 2056, 4104, 8192, 8200)],
        (1032, torch.float16),
        # fp32 (4 per vector): the same boundaries at half the element counts.
        *[(h, torch.float32) for h in (4, 512, 516, 1024, 1028, 2052, 4096, 4100)],
    ],
    ids=str,
)
def test_layer_norm_kernel_shape_boundaries(hidden, dtype, generator):
    # 9 rows: the warp-per-row block has one warp with a row and seven idle, then a second block.
    check_layer_norm(*layer_norm_inputs(9, hidden, dtype, generator))
    if dtype != torch.float32:
        check_layer_norm(*layer_norm_inputs(9, hidden, dtype, generator, param_dtype=torch.float32))


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("hidden", (8200, 12289))
def test_layer_norm_looped_kernels_grid_stride(hidden, generator):
    # 3000 rows exceed the looped kernels' resident grid (~8 blocks per SM), so each block walks
    # several rows (8200: vectorised; 12289: scalar path).
    check_layer_norm(*layer_norm_inputs(3000, hidden, torch.bfloat16, generator))


@requires_cuda_kernels
@pytest.mark.gpu
def test_kernels_index_past_int32():
    # More than 2^31 elements: every row/element offset must be computed in 64 bits. Rows and
    # elements are computed independently of which block or thread handles them, so the tail
    # of the big tensor must equal the same op run on a copy of that tail alone, bit for bit.
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~25 GB of GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(1234)
    tail = 5
    for hidden in (4096, 16384):  # block-per-row, looped
        rows = (1 << 31) // hidden + 3
        x = torch.randn((rows, hidden), device="cuda", dtype=torch.bfloat16, generator=gen)
        grad_out = torch.randn((rows, hidden), device="cuda", dtype=torch.bfloat16, generator=gen)
        weight = torch.randn((hidden,), device="cuda", dtype=torch.bfloat16, generator=gen)
        out, mean, rstd = ops.layer_norm_forward(x, weight, None, EPS)
        small = ops.layer_norm_forward(x[-tail:].clone(), weight, None, EPS)
        for name, big_t, small_t in zip(("out", "mean", "rstd"), (out, mean, rstd), small):
            assert torch.equal(big_t[-tail:], small_t), f"{name} (hidden {hidden})"
        del out
        grad_x = ops.layer_norm_backward(grad_out, x, weight, mean, rstd)[0]
        small_grad_x = ops.layer_norm_backward(
            grad_out[-tail:].clone(), x[-tail:].clone(), weight, mean[-tail:].clone(), rstd[-tail:].clone()
        )[0]
        assert torch.equal(grad_x[-tail:], small_grad_x), f"grad_x (hidden {hidden})"
        del x, grad_out, grad_x
    n = (1 << 31) + 8 * 3 + 5  # vector body past 2^31 plus a scalar tail
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad_out = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    # the last 1005 elements: 125 vectors + the 5-element scalar tail, in both calls
    last = 1005
    assert torch.equal(ops.gelu_forward(x)[-last:], ops.gelu_forward(x[-last:].clone()))
    assert torch.equal(
        ops.gelu_backward(grad_out, x)[-last:], ops.gelu_backward(grad_out[-last:].clone(), x[-last:].clone())
    )
    hidden = 768
    rows = n // hidden
    x2, grad_out2 = x[: rows * hidden].view(rows, hidden), grad_out[: rows * hidden].view(rows, hidden)
    bias = torch.randn((hidden,), device="cuda", dtype=torch.bfloat16, generator=gen)
    assert torch.equal(ops.bias_gelu_forward(x2, bias)[-tail:], ops.bias_gelu_forward(x2[-tail:].clone(), bias))
    assert torch.equal(
        ops.bias_gelu_backward(grad_out2, x2, bias)[0][-tail:],
        ops.bias_gelu_backward(grad_out2[-tail:].clone(), x2[-tail:].clone(), bias)[0],
    )


@requires_cuda_kernels
@pytest.mark.gpu
def test_layer_norm_million_rows(generator):
    # 2^20 rows of 8: far more rows than a grid holds blocks; grid-stride loops cover them.
    check_layer_norm(*layer_norm_inputs(1 << 20, 8, torch.bfloat16, generator))


@requires_cuda_kernels
@pytest.mark.gpu
def test_layer_norm_empty_input():
    x = torch.empty(0, 768, device="cuda", dtype=torch.bfloat16)
    out, mean, rstd = ops.layer_norm_forward(x, None, None, EPS)
    assert out.shape == (0, 768) and mean.shape == (0,) and rstd.shape == (0,)
    grad_x, grad_weight, grad_bias = ops.layer_norm_backward(x, x, None, mean, rstd)
    assert grad_x.shape == (0, 768)
    assert torch.equal(grad_weight, torch.zeros(768, device="cuda"))
    assert torch.equal(grad_bias, torch.zeros(768, device="cuda"))
    # hidden 0: no rows, as the fake implementation (llmkernels/layer_norm.py) says
    x0 = torch.empty(4, 0, device="cuda", dtype=torch.bfloat16)
    out, mean, rstd = ops.layer_norm_forward(x0, None, None, EPS)
    assert out.shape == (4, 0) and mean.shape == (0,) and rstd.shape == (0,)
    grad_x, grad_weight, grad_bias = ops.layer_norm_backward(x0, x0, None, mean, rstd)
    assert grad_x.shape == (4, 0) and grad_weight.shape == (0,) and grad_bias.shape == (0,)
    assert ops.bias_gelu_backward(x0, x0, torch.empty(0, device="cuda", dtype=torch.bfloat16))[1].shape == (0,)


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("hidden", (7, 768, 1024, 4096, 65536))
def test_layer_norm_repeated_runs_are_bitwise_identical(hidden, generator):
    # grad_weight/grad_bias: per-block partial sums reduced in a fixed order, no atomics.
    x, weight, bias, grad_out = layer_norm_inputs(1000, hidden, torch.bfloat16, generator)
    first = ops.layer_norm_forward(x, weight, bias, EPS)
    first_grads = ops.layer_norm_backward(grad_out, x, weight, first[1], first[2])
    for _ in range(3):
        again = ops.layer_norm_forward(x, weight, bias, EPS)
        again_grads = ops.layer_norm_backward(grad_out, x, weight, again[1], again[2])
        names = ("out", "mean", "rstd", "grad_x", "grad_weight", "grad_bias")
        for name, a, b in zip(names, (*first, *first_grads), (*again, *again_grads)):
            assert torch.equal(a, b), f"{name} differs between identical runs (hidden {hidden})"


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("param_dtype", (torch.bfloat16, torch.float32), ids=str)
def test_layer_norm_public_function_with_autograd_runs_the_cuda_ops(param_dtype, generator):
    x, weight, bias, grad_out = layer_norm_inputs(257, 768, torch.bfloat16, generator, param_dtype)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = llmkernels.layer_norm(*leaves, eps=EPS, backend="cuda")
    out.backward(grad_out)
    expected_out, mean, rstd = ops.layer_norm_forward(x, weight, bias, EPS)
    grad_x, grad_weight, grad_bias = ops.layer_norm_backward(grad_out, x, weight, mean, rstd)
    assert torch.equal(out.detach(), expected_out)
    assert torch.equal(leaves[0].grad, grad_x)
    assert torch.equal(leaves[1].grad, grad_weight.to(param_dtype))
    assert torch.equal(leaves[2].grad, grad_bias.to(param_dtype))


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_gelu_matches_reference(rows, hidden, dtype, generator):
    check_gelu(randn((rows, hidden), dtype, generator, scale=3.0), randn((rows, hidden), dtype, generator))


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_bias_gelu_matches_reference(rows, hidden, dtype, generator):
    x, grad_out = randn((rows, hidden), dtype, generator, scale=3.0), randn((rows, hidden), dtype, generator)
    check_bias_gelu(x, randn((hidden,), dtype, generator), grad_out)


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("hidden", (7, 768, 3072))
def test_bias_gelu_fp32_bias_with_low_precision_input(hidden, dtype, generator):
    x, grad_out = randn((37, hidden), dtype, generator, scale=3.0), randn((37, hidden), dtype, generator)
    check_bias_gelu(x, randn((hidden,), torch.float32, generator), grad_out)


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_saturates_without_overflow(dtype, generator):
    # tanh's argument overflows exp() for |x| >~ 10; the kernels must saturate, not produce NaN.
    big = 1e4 if dtype == torch.float16 else 1e12
    values = torch.tensor([-big, -1e3, -30.0, -12.0, -9.0, -5.0, -0.5, 0.0, 0.5, 5.0, 9.0, 12.0, 30.0, 1e3, big])
    x = values.repeat(8).to("cuda", dtype)  # 120 elements: vector body and scalar tail
    grad_out = randn(x.shape, dtype, generator)
    out, grad_x = check_gelu(x, grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(grad_x).all()
    check_bias_gelu(x.view(8, 15), randn((15,), dtype, generator) * 0.1, randn((8, 15), dtype, generator))


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_misaligned_and_strided_inputs(dtype, generator):
    x, grad_out = randn((37, 768), dtype, generator, scale=3.0), randn((37, 768), dtype, generator)
    bias = randn((768,), dtype, generator)
    check_gelu(misaligned(x), grad_out)
    check_gelu(x, misaligned(grad_out))
    check_bias_gelu(misaligned(x), bias, grad_out)
    check_bias_gelu(x, misaligned(bias), misaligned(grad_out))
    strided_x = randn((768, 37), dtype, generator, scale=3.0).t()
    strided_grad = randn((768, 37), dtype, generator).t()
    check_gelu(strided_x, strided_grad)
    check_bias_gelu(strided_x, bias, strided_grad)
    # odd total size: the vector loop plus a scalar tail
    check_gelu(randn((3, 7, 5), dtype, generator), randn((3, 7, 5), dtype, generator))


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("hidden", (7, 768, 3072))
def test_bias_gelu_backward_is_bitwise_reproducible(hidden, generator):
    x, grad_out = randn((4096, hidden), torch.bfloat16, generator), randn((4096, hidden), torch.bfloat16, generator)
    bias = randn((hidden,), torch.bfloat16, generator)
    first = ops.bias_gelu_backward(grad_out, x, bias)
    for _ in range(3):
        again = ops.bias_gelu_backward(grad_out, x, bias)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@requires_cuda_kernels
@pytest.mark.gpu
def test_gelu_public_functions_with_autograd_run_the_cuda_ops(generator):
    x, grad_out = randn((257, 768), torch.bfloat16, generator), randn((257, 768), torch.bfloat16, generator)
    bias = randn((768,), torch.bfloat16, generator)
    leaf = x.clone().requires_grad_()
    out = llmkernels.gelu(leaf, approximate="tanh", backend="cuda")
    out.backward(grad_out)
    assert torch.equal(out.detach(), ops.gelu_forward(x))
    assert torch.equal(leaf.grad, ops.gelu_backward(grad_out, x))

    leaves = [x.clone().requires_grad_(), bias.clone().requires_grad_()]
    out = llmkernels.bias_gelu(*leaves, backend="cuda")
    out.backward(grad_out)
    grad_x, grad_bias = ops.bias_gelu_backward(grad_out, x, bias)
    assert torch.equal(out.detach(), ops.bias_gelu_forward(x, bias))
    assert torch.equal(leaves[0].grad, grad_x)
    assert torch.equal(leaves[1].grad, grad_bias.to(bias.dtype))


@requires_cuda_kernels
@pytest.mark.gpu
def test_bad_inputs_raise_errors_naming_the_argument():
    x = torch.randn(4, 768, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    mean = rstd = torch.zeros(4, device="cuda")
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ops.layer_norm_forward(x.double(), None, None, EPS)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(768,\)"):
        ops.layer_norm_forward(x, weight[:100], None, EPS)
    with pytest.raises(RuntimeError, match="bias must be a CUDA tensor"):
        ops.layer_norm_forward(x, weight, weight.cpu(), EPS)
    with pytest.raises(RuntimeError, match="grad_out must have x's shape"):
        ops.layer_norm_backward(x[:2], x, weight, mean, rstd)
    with pytest.raises(RuntimeError, match="mean must be float32"):
        ops.layer_norm_backward(x, x, weight, mean.half(), rstd)
    with pytest.raises(RuntimeError, match="rstd must have one value per row"):
        ops.layer_norm_backward(x, x, weight, mean, rstd[:3])
    with pytest.raises(RuntimeError, match="grad_out must have x's dtype"):
        ops.gelu_backward(x.float(), x)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(768,\)"):
        ops.bias_gelu_forward(x, weight[:7])


# ------------------------------------------------------------------------- sanitizer subset
# Small, exact-size tensors reaching every kernel shape: warp-per-row with 1, 3, 4 vectors per
# lane (200, 768, 1000), block-per-row with 1, 2, 4 vectors per thread (768 fp32, 3000, 8000),
# looped vectorised (12288 fp32), looped scalar (7, and a misaligned view), elementwise vector
# body + scalar tail, column tiles with a partial last tile.
SANITIZER_LAYER_NORM = [
    (3, 7, torch.bfloat16, False),
    (3, 200, torch.bfloat16, False),
    (5, 768, torch.bfloat16, False),
    (5, 768, torch.float32, False),
    (4, 1000, torch.float16, False),
    (3, 3000, torch.bfloat16, False),
    (2, 8000, torch.bfloat16, False),
    (2, 12288, torch.float32, False),
    (3, 768, torch.bfloat16, True),
]


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("rows,hidden,dtype,offset", SANITIZER_LAYER_NORM, ids=str)
def test_sanitizer_subset_layer_norm(rows, hidden, dtype, offset, generator):
    x, weight, bias, grad_out = layer_norm_inputs(rows, hidden, dtype, generator, param_dtype=torch.float32)
    if offset:
        x = misaligned(x)
    check_layer_norm(x, weight, bias, grad_out)
    check_layer_norm(x, None, None, grad_out)


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("rows,hidden", ((3, 7), (5, 768), (9, 1000), (2, 300)), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sanitizer_subset_gelu(rows, hidden, dtype, generator):
    x, grad_out = randn((rows, hidden), dtype, generator, scale=3.0), randn((rows, hidden), dtype, generator)
    check_gelu(x, grad_out)
    check_bias_gelu(x, randn((hidden,), dtype, generator), grad_out)
    check_bias_gelu(misaligned(x), randn((hidden,), torch.float32, generator), grad_out)
