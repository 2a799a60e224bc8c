"""Triton flash attention (llmkernels/triton/attention.py) against the float64 reference.

CPU lane: Triton's interpreter (TRITON_INTERPRET=1, set by conftest), float32 and float16,
B=1 and two heads (the interpreter is slow), ragged sequence lengths, head dims 64 and
128; grouped-query attention (H / Hkv = 1, 2, 4) and fewer queries than keys (a KV cache,
causal diagonal bottom-right). GPU lane: bfloat16/float16 at full sizes.

The yardstick for the numerics rule is attention written plainly in the kernel's
precision (scores, softmax and products all in that dtype), as in the flash-attention
test suite.
"""
import math

import pytest
import torch
from conftest import requires_cuda
from numerics import GRAD_FACTOR, assert_close_to_reference, randn

import llmkernels
from llmkernels import backends
from llmkernels.attention import causal_mask, flash_attention_reference
from llmkernels.triton.attention import supports_flash_attention

pytestmark = [pytest.mark.triton,  # lanes: see conftest
              pytest.mark.skipif(not backends.available_backends()["triton"][0], reason="Triton backend not usable")]

ops = torch.ops.llmkernels


def _plain_attention(q, k, v, causal, scale):
    """Attention in q's own precision, no upcasting: PyTorch's accuracy in that dtype."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, D)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _log_sum_exp64(q, k, causal, scale):
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    scores = (q.double() @ k.transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return torch.logsumexp(scores, dim=-1)  # (B, H, Sq)


def _check_attention(q, k, v, causal, generator, scale=None, floor=1e-5):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    grad_out = randn(q.shape, q.dtype, generator, q.device)
    out, lse = ops.triton_flash_attention_forward(q, k, v, causal, scale)
    grads = ops.triton_flash_attention_backward(grad_out, q, k, v, out, lse, causal, scale)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(lse.double(), _log_sum_exp64(q, k, causal, scale), atol=1e-4, rtol=1e-5)
    _assert_matches_reference(q, k, v, causal, scale, grad_out, out, grads, floor)


def _assert_matches_reference(q, k, v, causal, scale, grad_out, out, grads, floor=1e-5):
    """out and grads (dq, dk, dv for grad_out) of attention(q, k, v) against the float64
    reference, under the numerics rule, PyTorch's plain attention in q's dtype the yardstick."""
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = flash_attention_reference(*inputs64, causal, scale)
    grads64 = torch.autograd.grad(out64, inputs64, grad_out.double())
    inputs_p = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_p = _plain_attention(*inputs_p, causal, scale)
    grads_p = torch.autograd.grad(out_p, inputs_p, grad_out)

    assert out.dtype == q.dtype
    assert_close_to_reference(out, out_p, out64, floor=floor, name="attention out")
    for name, grad, grad_p, grad64, like in zip(("grad_q", "grad_k", "grad_v"), grads, grads_p, grads64, (q, k, v)):
        assert grad.dtype == like.dtype and grad.shape == like.shape
        assert_close_to_reference(grad, grad_p, grad64, factor=GRAD_FACTOR, floor=floor, name=name)


# ------------------------------------------------------------------- CPU lane
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq_len, head_dim", [(1, 64), (17, 64), (113, 64), (17, 128), (113, 128)])
def test_attention_matches_reference(seq_len, head_dim, causal, dtype, generator):
    q, k, v = (randn((1, 2, seq_len, head_dim), dtype, generator) for _ in range(3))
    _check_attention(q, k, v, causal, generator)


# (batch, heads, kv_heads, query_len, key_len): decoding one token after a cache, prefill of a
# chunk after a cache, and Sq == Sk, with H / Hkv = 1, 2, 4. The interpreter's blocks are
# 32 queries x 16 keys (forward, dQ) and 16 x 32 (dK/dV), so Sk - Sq = 23, 17 and 96 put
# the diagonal off the block grid, and 113 / 130 rows make ragged last blocks.
KV_CACHE_SHAPES = {
    "decode-mqa": (2, 2, 1, 1, 113),
    "chunk-gqa2": (1, 4, 2, 17, 40),
    "chunk-mha": (1, 2, 2, 17, 113),
    "prefill-gqa4": (1, 4, 1, 113, 130),
    "square-gqa2": (2, 4, 2, 17, 17),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", KV_CACHE_SHAPES.values(), ids=KV_CACHE_SHAPES.keys())
def test_grouped_query_and_kv_cache_shapes(shape, causal, dtype, generator):
    batch, heads, kv_heads, query_len, key_len = shape
    q = randn((batch, heads, query_len, 32), dtype, generator)
    k, v = (randn((batch, kv_heads, key_len, 32), dtype, generator) for _ in range(2))
    _check_attention(q, k, v, causal, generator)


def test_more_queries_than_keys_without_causal_mask(generator):
    q = randn((1, 2, 40, 16), torch.float32, generator)
    k, v = (randn((1, 1, 17, 16), torch.float32, generator) for _ in range(2))
    _check_attention(q, k, v, False, generator)


def test_public_api_runs_kv_cache_shapes_on_triton(generator):
    """auto picks Triton for GQA with a KV cache (the CUDA kernels need Sq == Sk), and
    autograd through it matches the reference."""
    q = randn((1, 4, 3, 16), torch.float32, generator).requires_grad_()
    k, v = (randn((1, 2, 21, 16), torch.float32, generator).requires_grad_() for _ in range(2))
    reasons = llmkernels.explain("flash_attention", q, k, v)
    assert reasons["triton"] is None
    assert backends.select_backend("flash_attention", "auto", q, k, v, 0.25) == "triton"
    out = llmkernels.flash_attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = flash_attention_reference(*inputs64, True, None)
    grads64 = torch.autograd.grad(out64.square().sum(), inputs64)
    torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-5)
    for grad, grad64 in zip(grads, grads64):
        torch.testing.assert_close(grad.double(), grad64, atol=1e-5, rtol=1e-5)


def test_strided_inputs_and_explicit_scale(generator):
    """q, k, v as views of a (B, S, 3, H, D) projection, transposed to (B, H, S, D)."""
    qkv = randn((1, 45, 3, 2, 32), torch.float32, generator)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views, not contiguous
    _check_attention(q, k, v, True, generator, scale=0.3)
    grad_out = randn((1, 45, 2, 32), torch.float32, generator).transpose(1, 2)  # strided grad_out
    out, lse = ops.triton_flash_attention_forward(q, k, v, False, 0.3)
    grads = ops.triton_flash_attention_backward(grad_out, q, k, v, out, lse, False, 0.3)
    contiguous = [t.contiguous() for t in (grad_out, q, k, v)]
    expected = ops.triton_flash_attention_backward(*contiguous, out, lse, False, 0.3)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


def test_large_scores_are_finite(generator):
    """Inputs x10: scores in the thousands, the online softmax must not overflow.

    The floor is larger here: the backward recomputes P = exp(s - lse) with s and lse near
    1e3, where one float32 ulp is 6e-5, so P carries ~1e-4 relative error (as in every
    flash attention that saves the log-sum-exp), which plain softmax does not."""
    q, k, v = (randn((1, 2, 50, 64), torch.float32, generator, scale=10.0) for _ in range(3))
    _check_attention(q, k, v, True, generator, floor=1e-3)


def test_public_api_with_triton_backend(generator):
    """llmkernels.flash_attention with backend="triton": forward and autograd through the ops."""
    q, k, v = (randn((1, 2, 23, 16), torch.float32, generator).requires_grad_() for _ in range(3))
    out = llmkernels.flash_attention(q, k, v, causal=True, backend="triton")
    grads = torch.autograd.grad((out * out).sum(), (q, k, v))
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = flash_attention_reference(*inputs64, True, None)
    grads64 = torch.autograd.grad((out64 * out64).sum(), inputs64)
    torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-5)
    for grad, grad64 in zip(grads, grads64):
        torch.testing.assert_close(grad.double(), grad64, atol=1e-5, rtol=1e-5)


def test_opcheck(generator):
    """Schema, fake (shape-only) implementation and tracing of the ops agree with eager."""
    q, k, v, grad_out = (randn((1, 2, 9, 16), torch.float32, generator) for _ in range(4))
    out, lse = ops.triton_flash_attention_forward(q, k, v, True, 0.25)
    torch.library.opcheck(ops.triton_flash_attention_forward, (q, k, v, True, 0.25))
    torch.library.opcheck(ops.triton_flash_attention_backward, (grad_out, q, k, v, out, lse, True, 0.25))
    k, v = (randn((1, 1, 14, 16), torch.float32, generator) for _ in range(2))  # one K/V head, a longer cache
    out, lse = ops.triton_flash_attention_forward(q, k, v, True, 0.25)
    torch.library.opcheck(ops.triton_flash_attention_forward, (q, k, v, True, 0.25))
    torch.library.opcheck(ops.triton_flash_attention_backward, (grad_out, q, k, v, out, lse, True, 0.25))


def test_supports_refuses_with_reason():
    q = torch.zeros(1, 2, 8, 96)
    assert "head_dim 96" in supports_flash_attention(q, q, q)
    q = torch.zeros(1, 3, 8, 64)
    kv = torch.zeros(1, 2, 8, 64)
    assert "multiple" in supports_flash_attention(q, kv, kv)
    assert "dtype" in supports_flash_attention(q.int(), q.int(), q.int())
    assert supports_flash_attention(q, q, q) is None
    cache = torch.zeros(1, 1, 20, 64)  # fewer queries than keys, one K/V head: taken
    assert supports_flash_attention(q, cache, cache, causal=True) is None
    assert "query length (20) <= key length (8)" in supports_flash_attention(cache, q[:, :1], q[:, :1], causal=True)
    assert supports_flash_attention(cache, q[:, :1], q[:, :1]) is None  # without the mask any lengths
    assert "no keys" in supports_flash_attention(q, cache[:, :, :0], cache[:, :, :0])


# ------------------------------------------------------------------- GPU lane
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq_len", [1, 17, 113, 1023, 1025])
def test_attention_gpu(seq_len, head_dim, causal, dtype, generator):
    q, k, v = (randn((2, 3, seq_len, head_dim), dtype, generator, "cuda") for _ in range(3))
    _check_attention(q, k, v, causal, generator)


@requires_cuda
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_grouped_query_attention_gpu(head_dim, generator):
    q = randn((2, 8, 1025, head_dim), torch.bfloat16, generator, "cuda")
    k, v = (randn((2, 2, 1025, head_dim), torch.bfloat16, generator, "cuda") for _ in range(2))
    _check_attention(q, k, v, True, generator)


@requires_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", KV_CACHE_SHAPES.values(), ids=KV_CACHE_SHAPES.keys())
def test_grouped_query_and_kv_cache_shapes_gpu(shape, causal, generator):
    _batch, heads, kv_heads, query_len, key_len = shape
    q = randn((2, heads, query_len, 64), torch.bfloat16, generator, "cuda")
    k, v = (randn((2, kv_heads, key_len + 1000, 64), torch.bfloat16, generator, "cuda") for _ in range(2))
    _check_attention(q, k, v, causal, generator)


@requires_cuda
def test_grouped_query_grads_are_bitwise_reproducible_gpu(generator):
    """dK, dV sum the group's query heads in a fixed order (no atomics)."""
    q, grad_out = (randn((2, 8, 1025, 64), torch.bfloat16, generator, "cuda") for _ in range(2))
    k, v = (randn((2, 2, 1100, 64), torch.bfloat16, generator, "cuda") for _ in range(2))
    out, lse = ops.triton_flash_attention_forward(q, k, v, True, 0.125)
    first = ops.triton_flash_attention_backward(grad_out, q, k, v, out, lse, True, 0.125)
    for _ in range(3):
        again = ops.triton_flash_attention_backward(grad_out, q, k, v, out, lse, True, 0.125)
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            assert torch.equal(a, b), f"{name} differs between identical runs"


@requires_cuda
def test_attention_gpt2_shape_gpu(generator):
    """The benchmark shape: B16 H12 S1024 D64, from a fused qkv projection (strided views)."""
    qkv = randn((16, 1024, 3, 12, 64), torch.bfloat16, generator, "cuda")
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views
    _check_attention(q, k, v, True, generator)


@requires_cuda
def test_attention_compile_fullgraph(generator):
    """The op in one torch.compile graph (no graph break), forward and backward, holds to
    the float64 reference under the numerics rule."""
    q, k, v = (randn((2, 4, 129, 64), torch.bfloat16, generator, "cuda").requires_grad_() for _ in range(3))
    grad_out = randn(q.shape, q.dtype, generator, "cuda")

    def f(q, k, v):
        return ops.triton_flash_attention_forward(q, k, v, True, 0.125)[0]

    out = torch.compile(f, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    _assert_matches_reference(q, k, v, True, 0.125, grad_out, out, grads)


# --------------------------------------------------------------------- sanitizer subset
# scripts/gpu_session.py runs these under compute-sanitizer memcheck and racecheck: every
# kernel (forward, backward delta, grad K/V, grad Q) on ragged tiles (17 and 113 rows: a
# partial last block), both head dims, causal and not; the GPU lane's shapes and dtype, so the
# Triton cache it leaves serves them.
@requires_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq_len", [17, 113])
def test_sanitizer_subset_attention(seq_len, head_dim, causal, generator):
    q, k, v = (randn((2, 3, seq_len, head_dim), torch.bfloat16, generator, "cuda") for _ in range(3))
    _check_attention(q, k, v, causal, generator)
