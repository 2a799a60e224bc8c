"""The hand-written CUDA flash attention (csrc/flash_attention.cu).

CPU lane (whenever llmkernels._C imports): the ops carry the contract's schemas and have
CUDA kernels registered. GPU lane: forward and backward against the float64 reference
under the numerics rule (tests/numerics.py) over ragged sequence lengths, both head dims,
both dtypes, causal and not; grouped-query attention (H / Hkv = 1, 2, 4, 12) with its
bitwise-reproducible dK/dV group sums; large inputs; bitwise reproducibility; strided and
misaligned inputs; the public function with autograd; clear errors for what the kernel
cannot take.

Sanitizer sweep (seq 17, 113, 128 only, and one grouped-query case; every kernel of the file, both
dtypes and head dims):
    LLMKERNELS_SANITIZER_SWEEP=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        --kernel-name kns=attention python -m pytest tests/test_cuda_attention.py -q -x -k reference_sweep
    and the same with --tool racecheck (then synccheck, initcheck); `--kernel-name kns=attention`
    instruments only this file's kernels, which keeps the run to minutes.
"""
import math
import os

import pytest
import torch

import llmkernels
from llmkernels import backends
from llmkernels.attention import causal_mask, flash_attention_reference

from conftest import OP_SCHEMAS, requires_cuda_kernels, requires_extension
from numerics import GRAD_FACTOR, OUTPUT_FACTOR, assert_close_to_reference, randn

SANITIZER_SWEEP = os.environ.get("LLMKERNELS_SANITIZER_SWEEP") == "1"
# Ragged lengths around the tile sizes (64, 128) and one long run; the sanitizer sweep
# keeps a ragged single tile, a ragged multi-tile and an exact tile.
SEQ_LENS = (17, 113, 128) if SANITIZER_SWEEP else (1, 17, 113, 128, 1023, 1024, 1025, 2048)
# Grouped-query attention: (H, Hkv) with H / Hkv = 1, 2, 4, 12; the sanitizer sweep keeps one
# grouped case (its dK/dV blocks switch query heads mid-pipeline) on ragged lengths.
GQA_HEADS = {"gqa2": (4, 2)} if SANITIZER_SWEEP else {"mha": (4, 4), "gqa2": (4, 2), "gqa4": (4, 1), "mqa12": (12, 1)}
GQA_SEQ_LENS = (17, 113) if SANITIZER_SWEEP else (1, 17, 113, 1025)
HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)
BATCH, HEADS = 2, 3  # small and odd
OUTPUT_FLOOR = 1e-5
GRAD_FLOOR = 1e-4  # dS = P * (dP - delta) cancels; fp32 summation order alone leaves ~1e-6

SCHEMAS = {name: schema for name, schema in OP_SCHEMAS.items() if name.startswith("flash_attention")}


def cuda_forward(q, k, v, causal, scale):
    return torch.ops.llmkernels.flash_attention_forward(q, k, v, causal, scale)


def cuda_backward(grad_out, q, k, v, out, lse, causal, scale):
    return torch.ops.llmkernels.flash_attention_backward(grad_out, q, k, v, out, lse, causal, scale)


def random_inputs(shape, dtype, generator, input_scale=1.0, kv_heads=None):
    """q, k, v, grad_out: fresh N(0, input_scale^2) values (grad_out N(0, 1)) on the GPU;
    q and grad_out of `shape` (B, H, S, D), k and v with kv_heads heads (default H)."""
    batch, heads, seq, head_dim = shape
    kv_shape = (batch, kv_heads or heads, seq, head_dim)
    q, k, v = (randn(s, dtype, generator, "cuda", scale=input_scale) for s in (shape, kv_shape, kv_shape))
    grad_out = randn(shape, dtype, generator, "cuda")
    return q, k, v, grad_out


def repeat_kv_heads(t, heads):
    """(B, Hkv, S, D) -> (B, H, S, D): each K/V head repeated for the query heads of its group."""
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def attention_in_low_precision(q, k, v, causal, scale):
    """Plain PyTorch attention computed in q's own dtype (every op rounds to bf16/fp16):
    the "PyTorch in the same precision" side of the numerics rule."""
    k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])  # (B, H, S, D)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, S, S) in q.dtype
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def out_and_grads(attention, q, k, v, grad_out, causal, scale):
    """(out, dq, dk, dv) of `attention` at (q, k, v) for the upstream gradient grad_out."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, causal, scale)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return (out.detach(), *grads)


def check_against_reference(q, k, v, grad_out, causal, scale):
    """Runs the CUDA forward and backward ops and checks out, lse, dq, dk, dv."""
    out, lse = cuda_forward(q, k, v, causal, scale)
    grads = cuda_backward(grad_out, q, k, v, out, lse, causal, scale)
    expected = out_and_grads(flash_attention_reference, q.double(), k.double(), v.double(), grad_out.double(), causal, scale)
    low_precision = out_and_grads(attention_in_low_precision, q, k, v, grad_out, causal, scale)
    for name, actual, reference, torch_low, like in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), expected, low_precision, (q, q, k, v)
    ):
        assert actual.dtype == q.dtype and actual.shape == like.shape, name
        is_output = name == "out"
        assert_close_to_reference(
            actual,
            torch_low,
            reference,
            factor=OUTPUT_FACTOR if is_output else GRAD_FACTOR,
            floor=OUTPUT_FLOOR if is_output else GRAD_FLOOR,
            name=f"{name} (seq {q.shape[2]}, head_dim {q.shape[3]}, heads {q.shape[1]}/{k.shape[1]}, {q.dtype}, "
                 f"causal={causal})",
        )
    # lse: natural-log log-sum-exp of the scaled scores, float32 (B, H, S)
    scores = (q.double() @ repeat_kv_heads(k.double(), q.shape[1]).transpose(-2, -1)) * scale
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), atol=1e-3, rtol=1e-4)
    return out, lse, grads


# ----------------------------------------------------------------------------- CPU lane
@requires_extension
def test_ops_have_the_contract_schemas_and_cuda_kernels():
    for name, schema in SCHEMAS.items():
        op = getattr(torch.ops.llmkernels, name).default
        assert str(op._schema) == schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), f"{name} has no CUDA kernel"


def test_cuda_support_check_refuses_kv_cache_lengths_and_takes_grouped_heads(generator):
    """The CUDA kernels take Hkv dividing H but need Sq == Sk; `auto` leaves KV-cache
    shapes to Triton or the reference. (The length check comes before the device check,
    so it runs on CPU tensors.)"""
    unsupported = backends.OPS["flash_attention"].unsupported  # what explain() asks per backend
    q = randn((1, 4, 3, 64), torch.float16, generator)
    cache = randn((1, 2, 40, 64), torch.float16, generator)
    assert "query length 3 differs from key length 40" in unsupported("cuda", q, cache, cache, 0.125)
    grouped = randn((1, 2, 3, 64), torch.float16, generator)
    assert "CUDA tensors" in unsupported("cuda", q, grouped, grouped, 0.125)  # the heads are fine


# ----------------------------------------------------------------------------- GPU lane
@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "full"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seq", SEQ_LENS)
def test_reference_sweep(seq, head_dim, dtype, causal, generator):
    q, k, v, grad_out = random_inputs((BATCH, HEADS, seq, head_dim), dtype, generator)
    check_against_reference(q, k, v, grad_out, causal, 1.0 / math.sqrt(head_dim))


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "full"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads, kv_heads", GQA_HEADS.values(), ids=GQA_HEADS.keys())
@pytest.mark.parametrize("seq", GQA_SEQ_LENS)
def test_grouped_query_reference_sweep(seq, heads, kv_heads, head_dim, dtype, causal, generator):
    # Query head h reads K/V head h // (H / Hkv); dK, dV sum over the group's query heads.
    q, k, v, grad_out = random_inputs((BATCH, heads, seq, head_dim), dtype, generator, kv_heads=kv_heads)
    check_against_reference(q, k, v, grad_out, causal, 1.0 / math.sqrt(head_dim))


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_grouped_query_grads_are_bitwise_identical_and_explain_picks_cuda(head_dim, generator):
    # The dK/dV block of a K/V head loops over its 4 query heads in a fixed order, no atomics.
    q, k, v, grad_out = random_inputs((BATCH, 8, 1025, head_dim), torch.bfloat16, generator, kv_heads=2)
    assert llmkernels.explain("flash_attention", q, k, v)["cuda"] is None
    out, lse = cuda_forward(q, k, v, True, 0.125)
    first = cuda_backward(grad_out, q, k, v, out, lse, True, 0.125)
    for _ in range(3):
        again = cuda_backward(grad_out, q, k, v, out, lse, True, 0.125)
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            assert torch.equal(a, b), f"{name} differs between identical runs"


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "full"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seq", (113, 1025))
def test_large_inputs_and_custom_scale_stay_finite_and_accurate(seq, head_dim, dtype, causal, generator):
    # x5 inputs: scores with standard deviation ~25, very peaked softmax rows.
    q, k, v, grad_out = random_inputs((BATCH, HEADS, seq, head_dim), dtype, generator, input_scale=5.0)
    check_against_reference(q, k, v, grad_out, causal, 1.0 / math.sqrt(head_dim))
    check_against_reference(q / 5, k / 5, v / 5, grad_out, causal, 0.3)


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_repeated_runs_are_bitwise_identical(head_dim, generator):
    # No atomics anywhere (dQ has its own kernel), so the backward is reproducible too.
    q, k, v, grad_out = random_inputs((BATCH, HEADS, 1025, head_dim), torch.bfloat16, generator)
    first = cuda_forward(q, k, v, True, 0.125)
    first_grads = cuda_backward(grad_out, q, k, v, *first, True, 0.125)
    for _ in range(3):
        again = cuda_forward(q, k, v, True, 0.125)
        again_grads = cuda_backward(grad_out, q, k, v, *again, True, 0.125)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (*first, *first_grads), (*again, *again_grads)):
            assert torch.equal(a, b), f"{name} differs between identical runs"


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_and_misaligned_inputs_match_contiguous_ones(dtype, generator):
    batch, heads, seq, head_dim = BATCH, HEADS, 113, 64
    # A fused QKV projection (B, S, 3, H, D) viewed as (B, H, S, D): strided, no copy.
    qkv = torch.randn(batch, seq, 3, heads, head_dim, generator=generator).to("cuda", dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    # grad_out one element into its storage: rows not 16-byte aligned, copied by the host.
    storage = torch.randn(batch * heads * seq * head_dim + 1, generator=generator).to("cuda", dtype)
    grad_out = storage[1:].view(batch, heads, seq, head_dim)
    contiguous = [t.contiguous() for t in (q, k, v, grad_out)]

    out, lse = cuda_forward(q, k, v, True, 0.125)
    expected_out, expected_lse = cuda_forward(*contiguous[:3], True, 0.125)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    grads = cuda_backward(grad_out, q, k, v, out, lse, True, 0.125)
    expected_grads = cuda_backward(contiguous[3], *contiguous[:3], expected_out, expected_lse, True, 0.125)
    for name, a, b in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert torch.equal(a, b), f"{name} depends on the input strides"
    check_against_reference(q, k, v, grad_out, True, 0.125)


@requires_cuda_kernels
@pytest.mark.gpu
def test_zero_stride_operands_match_contiguous_ones(generator):
    # loss = out.sum() hands backward a grad_out of ones with every stride 0 (the last dim
    # is not contiguous: the host must copy it); k and v shared across the batch by
    # expand() have batch stride 0, which the kernels read in place.
    shape = (BATCH, HEADS, 113, 64)
    q, k, v, _ = random_inputs(shape, torch.bfloat16, generator)
    k, v = k[:1].expand(shape), v[:1].expand(shape)
    grad_out = torch.ones((), device="cuda", dtype=torch.bfloat16).expand(shape)
    out, lse = cuda_forward(q, k, v, True, 0.125)
    expected_out, expected_lse = cuda_forward(q, k.contiguous(), v.contiguous(), True, 0.125)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    grads = cuda_backward(grad_out, q, k, v, out, lse, True, 0.125)
    expected_grads = cuda_backward(grad_out.contiguous(), q, k.contiguous(), v.contiguous(), out, lse, True, 0.125)
    for name, a, b in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert torch.equal(a, b), f"{name} depends on zero strides"
    check_against_reference(q, k, v, grad_out, True, 0.125)


@requires_cuda_kernels
@pytest.mark.gpu
def test_tensors_past_2_to_the_31_elements_are_indexed_in_64_bits():
    # (2, 8200, 1024, 128) holds 2.15e9 > 2^31 elements: a 32-bit element offset anywhere
    # (input rows, output stores, lse/delta) would wrap in batch 1's last heads. Batch 1
    # repeats batch 0's inputs, so every output must repeat bitwise (heads are independent,
    # same code path), and the last heads must equal a standalone run on just them.
    batch, heads, seq, head_dim = 2, 8200, 1024, 128
    assert batch * heads * seq * head_dim > 2**31
    tensor_bytes = batch * heads * seq * head_dim * 2
    if torch.cuda.mem_get_info()[0] < 9 * tensor_bytes:  # q, k, v, out, dq, dk, dv + slack
        pytest.skip("needs ~40 GB of free GPU memory")
    cuda_generator = torch.Generator(device="cuda").manual_seed(1234)

    def repeated_over_batch():
        one = torch.randn((1, heads, seq, head_dim), device="cuda", dtype=torch.bfloat16, generator=cuda_generator)
        return one.expand(batch, -1, -1, -1).contiguous()

    q, k, v = repeated_over_batch(), repeated_over_batch(), repeated_over_batch()
    grad_out = torch.randn((1, heads, seq, head_dim), device="cuda", dtype=torch.bfloat16, generator=cuda_generator)
    grad_out = grad_out.expand(batch, -1, -1, -1)  # batch stride 0, read in place
    out, lse = cuda_forward(q, k, v, True, 0.125)
    grads = cuda_backward(grad_out, q, k, v, out, lse, True, 0.125)
    torch.cuda.synchronize()
    tail = (slice(1, 2), slice(heads - 2, heads))  # batch 1, last two heads: past 2^31
    tail_out, tail_lse = cuda_forward(q[tail].contiguous(), k[tail].contiguous(), v[tail].contiguous(), True, 0.125)
    tail_grads = cuda_backward(
        grad_out[tail].contiguous(), q[tail].contiguous(), k[tail].contiguous(), v[tail].contiguous(),
        tail_out, tail_lse, True, 0.125,
    )
    for name, full, alone in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (tail_out, tail_lse, *tail_grads)):
        assert torch.equal(full[0], full[1]), f"{name}: batch 1 differs from batch 0 (same inputs)"
        assert torch.equal(full[tail], alone), f"{name}: the last heads differ from a standalone run"
        assert torch.isfinite(alone).all(), name


@requires_cuda_kernels
@pytest.mark.gpu
def test_public_function_with_autograd_runs_the_cuda_ops(generator):
    q, k, v, grad_out = random_inputs((BATCH, HEADS, 257, 64), torch.bfloat16, generator)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = llmkernels.flash_attention(*leaves, causal=True, backend="cuda")
    out.backward(grad_out)
    scale = 1.0 / math.sqrt(64)
    expected_out, lse = cuda_forward(q, k, v, True, scale)
    expected_grads = cuda_backward(grad_out, q, k, v, expected_out, lse, True, scale)
    assert torch.equal(out.detach(), expected_out)
    for name, leaf, expected in zip("qkv", leaves, expected_grads):
        assert torch.equal(leaf.grad, expected), f"grad of {name}"


@requires_cuda_kernels
@pytest.mark.gpu
def test_unsupported_head_dim_is_refused_and_auto_falls_back(generator):
    q, k, v, _ = random_inputs((1, 2, 33, 96), torch.float16, generator)
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128, got 96"):
        cuda_forward(q, k, v, True, 0.1)
    with pytest.raises(llmkernels.BackendUnavailableError, match="head_dim"):
        llmkernels.flash_attention(q, k, v, backend="cuda")
    out = llmkernels.flash_attention(q, k, v)  # auto: falls back to a backend that can
    expected = flash_attention_reference(q.double(), k.double(), v.double(), True, 1.0 / math.sqrt(96))
    assert (out.double() - expected).abs().max().item() < 1e-2


@requires_cuda_kernels
@pytest.mark.gpu
def test_more_heads_than_the_grid_holds_falls_back(generator):
    q = torch.randn((1, 65536, 2, 64), generator=generator).to("cuda", torch.float16)  # grid y holds 65535
    assert "must each be <= 65535" in llmkernels.explain("flash_attention", q, q, q)["cuda"]
    expected = flash_attention_reference(q, q, q, True, 0.125)
    torch.testing.assert_close(llmkernels.flash_attention(q, q, q), expected, atol=2e-3, rtol=2e-3)


@requires_cuda_kernels
@pytest.mark.gpu
def test_bad_inputs_are_clear_errors_naming_the_argument(generator):
    q, k, v, grad_out = random_inputs((1, 2, 33, 64), torch.float16, generator)
    with pytest.raises(RuntimeError, match="k must have q's dtype"):
        cuda_forward(q, k.bfloat16(), v, True, 0.1)
    with pytest.raises(RuntimeError, match="v must have k's shape"):
        cuda_forward(q, k, v[:, :, :20], True, 0.1)
    with pytest.raises(RuntimeError, match="k must have shape \\(B, Hkv, S, D\\)"):
        cuda_forward(q, k[:, :, :20], v[:, :, :20], True, 0.1)  # a KV cache: Sk != Sq
    with pytest.raises(RuntimeError, match="Hkv dividing q's H"):
        cuda_forward(torch.cat([q, q[:, :1]], dim=1), k, v, True, 0.1)  # 3 query heads, 2 K/V heads
    with pytest.raises(RuntimeError, match="v must be a CUDA tensor"):
        cuda_forward(q, k, v.cpu(), True, 0.1)
    with pytest.raises(RuntimeError, match="q must be bfloat16 or float16"):
        cuda_forward(q.float(), k.float(), v.float(), True, 0.1)
    out, lse = cuda_forward(q, k, v, True, 0.1)
    with pytest.raises(RuntimeError, match="grad_out must have q's dtype"):
        cuda_backward(grad_out.float(), q, k, v, out, lse, True, 0.1)
    with pytest.raises(RuntimeError, match="lse must be float32"):
        cuda_backward(grad_out, q, k, v, out, lse.half(), True, 0.1)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        cuda_backward(grad_out, q, k, v, out, lse[:, :1], True, 0.1)
    many_heads = torch.zeros((1, 65536, 1, 64), device="cuda", dtype=torch.float16)  # grid y holds 65535
    with pytest.raises(RuntimeError, match="batch and heads must each be <= 65535"):
        cuda_forward(many_heads, many_heads, many_heads, True, 0.1)
