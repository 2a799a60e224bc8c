"""llmkernels as SDPA's flash-attention provider (llmkernels/integrations/sdpa.py).

No GPU here, so SDPA itself never takes the flash path; the tests instead ask the
dispatcher for the CUDA kernel it would run (torch.library.get_kernel) and call it with
CPU tensors: after activation that is our Python implementation, which then runs the
Triton kernels in the interpreter or the reference. Their results are held to the
numerics rule against SDPA's math backend in float64, the yardstick being SDPA's math
backend in float32. The implementations' signatures are compared with the schemas the
dispatcher holds, so a torch release that changes them fails here.
"""
import inspect
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from numerics import GRAD_FACTOR, assert_close_to_reference, max_abs_error, randn
from torch.nn.attention import SDPBackend, sdpa_kernel

import llmkernels
from llmkernels.integrations import sdpa

pytestmark = pytest.mark.skipif(not sdpa.registry_available(), reason="torch has no flash-attention provider registry")

OUR_FILE = "llmkernels/integrations/sdpa.py"
CUDA_KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def _cuda_kernel(op: str):
    return torch.library.get_kernel(f"aten::{op}", "CUDA")


def _routed_to_us(op: str) -> bool:
    """Whether the dispatcher's CUDA kernel of aten::<op> is the one registered in sdpa.py."""
    return OUR_FILE in repr(_cuda_kernel(op))


@pytest.fixture
def active_provider():
    llmkernels.activate_sdpa()
    yield
    llmkernels.deactivate_sdpa()


def test_import_registers_the_name_but_activates_nothing():
    code = ("import torch, llmkernels; from torch.nn import attention as a; "
            "print(a.list_flash_attention_impls(), a.current_flash_attention_impl(), "
            "repr(torch.library.get_kernel('aten::_scaled_dot_product_flash_attention', 'CUDA')))")
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'llmkernels'" in printed and " None " in printed and OUR_FILE not in printed, printed


@pytest.mark.parametrize("api", ["llmkernels", "torch"])
def test_activation_routes_both_flash_ops_and_restore_gives_them_back(api):
    assert not any(_routed_to_us(op) for op in sdpa.IMPLEMENTATIONS)
    if api == "torch":
        torch.nn.attention.activate_flash_attention_impl("llmkernels")
    else:
        llmkernels.activate_sdpa()
    try:
        assert torch.nn.attention.current_flash_attention_impl() == "llmkernels"
        assert all(_routed_to_us(op) for op in sdpa.IMPLEMENTATIONS)
        llmkernels.activate_sdpa()  # activating again replaces the registration, it does not stack
        assert all(_routed_to_us(op) for op in sdpa.IMPLEMENTATIONS)
    finally:
        if api == "torch":
            torch.nn.attention.restore_flash_attention_impl()
        else:
            llmkernels.deactivate_sdpa()
    assert torch.nn.attention.current_flash_attention_impl() is None
    assert not any(_routed_to_us(op) for op in sdpa.IMPLEMENTATIONS)


@pytest.mark.parametrize("op", sorted(sdpa.IMPLEMENTATIONS))
def test_signature_matches_the_aten_schema(op):
    schema = getattr(torch.ops.aten, op).default._schema
    parameters = list(inspect.signature(sdpa.IMPLEMENTATIONS[op]).parameters.values())
    assert [p.name for p in parameters] == [a.name for a in schema.arguments]
    for parameter, argument in zip(parameters, schema.arguments):
        kind = inspect.Parameter.KEYWORD_ONLY if argument.kwarg_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert parameter.kind == kind, f"{op}: {argument.name} kind"
        if argument.has_default_value():
            assert parameter.default == argument.default_value, f"{op}: {argument.name} default"
        else:
            assert parameter.default is inspect.Parameter.empty, f"{op}: {argument.name} has no default in aten"


def _flash_forward_backward(q, k, v, dropout_p, causal, scale, grad_out):
    """SDPA's flash path as autograd runs it: the dispatcher's CUDA forward kernel, then its
    backward kernel fed the forward's outputs (derivatives.yaml)."""
    outputs = _cuda_kernel(sdpa.FORWARD_OP).call_boxed(CUDA_KEYSET, q, k, v, dropout_p, causal, scale=scale)
    out, lse, cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, _debug_mask = outputs
    grads = _cuda_kernel(sdpa.BACKWARD_OP).call_boxed(
        CUDA_KEYSET, grad_out, q, k, v, out, lse, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, causal,
        rng_state, unused, scale=scale,
    )
    return outputs, grads


def test_return_tuples_match_the_aten_schema(active_provider, generator):
    q, k, v = (randn((1, 2, 5, 16), torch.float32, generator) for _ in range(3))
    outputs, grads = _flash_forward_backward(q, k, v, 0.0, True, None, torch.ones_like(q))
    for op, returned in ((sdpa.FORWARD_OP, outputs), (sdpa.BACKWARD_OP, grads)):
        returns = getattr(torch.ops.aten, op).default._schema.returns
        assert len(returned) == len(returns)
        for value, declared in zip(returned, returns):
            expected = int if str(declared.type) in ("int", "SymInt") else (torch.Tensor, type(None))
            assert isinstance(value, expected), f"{op}: {declared.name} is {type(value).__name__}"
    out, lse, _, _, max_q, max_k, rng_state, unused, debug_mask = outputs
    assert (lse.shape, lse.dtype, max_q, max_k) == ((1, 2, 5), torch.float32, 5, 5)
    assert (rng_state.shape, rng_state.dtype, unused.dtype, debug_mask.numel()) == ((2,), torch.uint64, torch.uint64, 0)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def _sdpa_math(q, k, v, causal, scale, mask_bottom_right):
    """SDPA's math backend with the flash path's causal mask (bottom-right aligned)."""
    query_len, key_len = q.shape[2], k.shape[2]
    mask = (torch.ones(query_len, key_len, dtype=torch.bool, device=q.device).tril(key_len - query_len)
            if mask_bottom_right else None)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])


def _first_backend(q, k, v, causal, scale=None) -> str:
    """What backend="auto" picks for this call, per llmkernels.explain."""
    return next(b for b, reason in llmkernels.explain("flash_attention", q, k, v, causal, scale).items() if reason is None)


def _record_backends(monkeypatch) -> list:
    """The backend of each forward and backward call the provider makes from now on."""
    used, choose = [], sdpa._chosen_backend
    monkeypatch.setattr(sdpa, "_chosen_backend", lambda *args: used.append(choose(*args)) or used[-1])
    return used


def _assert_like_sdpa_math(out, grads, q, k, v, grad_out, causal, scale, grad_floor=1e-5):
    """out and (dq, dk, dv) within the numerics rule: SDPA math in float64 the reference, in
    q's dtype the yardstick."""
    inputs64 = [t.double().requires_grad_() for t in (q, k, v)]
    out64 = _sdpa_math(*inputs64, causal, scale, causal)
    grads64 = torch.autograd.grad(out64, inputs64, grad_out.double())
    inputs_p = [t.clone().requires_grad_() for t in (q, k, v)]
    out_p = _sdpa_math(*inputs_p, causal, scale, causal)
    grads_p = torch.autograd.grad(out_p, inputs_p, grad_out)
    assert_close_to_reference(out, out_p, out64)
    for name, grad, grad_p, grad64 in zip("qkv", grads, grads_p, grads64):
        assert_close_to_reference(grad, grad_p, grad64, factor=GRAD_FACTOR, floor=grad_floor, name=f"grad_{name}")


# (batch, heads, kv_heads, query_len, key_len, head_dim, causal): ragged lengths, GQA,
# a KV cache (query_len < key_len), and a head dim the fused kernels lack (24: reference).
CASES = [
    (1, 2, 2, 17, 17, 16, True),
    (2, 4, 2, 13, 13, 32, False),
    (1, 4, 1, 3, 19, 16, True),
    (1, 2, 2, 1, 9, 16, False),
    (1, 3, 3, 11, 11, 24, True),
]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("batch, heads, kv_heads, query_len, key_len, head_dim, causal", CASES)
def test_math_matches_sdpa(active_provider, monkeypatch, generator, backend,
                           batch, heads, kv_heads, query_len, key_len, head_dim, causal):
    if backend == "reference":
        monkeypatch.setenv("LLMKERNELS_BACKEND", "reference")
    q = randn((batch, heads, query_len, head_dim), torch.float32, generator)
    k, v = (randn((batch, kv_heads, key_len, head_dim), torch.float32, generator) for _ in range(2))
    grad_out = randn(q.shape, torch.float32, generator)
    scale = 0.3
    expected_backend = "reference" if backend == "reference" else _first_backend(q, k, v, causal, scale)
    if backend == "auto" and head_dim == 16 and query_len == key_len:
        assert expected_backend == "triton"  # the interpreter runs the fused kernel here
    used = _record_backends(monkeypatch)

    (out, lse, *_), grads = _flash_forward_backward(q, k, v, 0.0, causal, scale, grad_out)
    assert used == [expected_backend, expected_backend]  # forward and backward
    _assert_like_sdpa_math(out, grads, q, k, v, grad_out, causal, scale)
    scores64 = (q.double() @ k.double().repeat_interleave(heads // kv_heads, 1).transpose(-2, -1)) * scale
    if causal:
        scores64 = scores64.masked_fill(~torch.ones(query_len, key_len, dtype=torch.bool).tril(key_len - query_len),
                                        float("-inf"))
    assert max_abs_error(lse, torch.logsumexp(scores64, -1)) <= 1e-5


def test_dropout_runs_the_reference_and_the_backward_replays_its_mask(active_provider, generator):
    q, k, v = (randn((1, 2, 9, 16), torch.float32, generator) for _ in range(3))
    grad_out = randn(q.shape, torch.float32, generator)
    (out, lse, *_), (grad_q, grad_k, grad_v) = _flash_forward_backward(q, k, v, 0.5, True, None, grad_out)
    no_dropout = _sdpa_math(q, k, v, True, None, True)
    assert max_abs_error(out, no_dropout) > 0.1  # probabilities were dropped
    # out is linear in v (out = P_dropped @ v), so <grad_out, out> = <grad_v, v> holds only if
    # the backward dropped the same probabilities as the forward.
    assert torch.allclose((grad_out * out).sum(), (grad_v * v).sum(), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(grad_q).all() and torch.isfinite(grad_k).all()
    # The dropped attention matrix, read back from out = D @ v (v has full row rank: 9 keys, 16
    # dims): its zeros are the mask. With that mask, inverted dropout written out here in float64
    # (kept probabilities scaled by 1 / (1 - p)) must give the same out, dq, dk and dv.
    dropped = out.double() @ torch.linalg.pinv(v.double())  # (B, H, Sq, Sk)
    inputs64 = [t.double().requires_grad_() for t in (q, k, v)]
    scores = (inputs64[0] @ inputs64[1].transpose(-2, -1) * 16**-0.5).masked_fill(
        torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    out64 = (scores.softmax(-1) * (dropped.abs() > 1e-4) / (1 - 0.5)) @ inputs64[2]
    torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-4)
    grads64 = torch.autograd.grad(out64, inputs64, grad_out.double())
    for name, grad, grad64 in zip("qkv", (grad_q, grad_k, grad_v), grads64):
        torch.testing.assert_close(grad.double(), grad64, atol=1e-5, rtol=1e-4, msg=f"grad_{name}")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, seq_len", [(8, 8, 1025), (8, 2, 113)])
def test_sdpa_flash_path_runs_our_kernels_gpu(active_provider, monkeypatch, generator, dtype, heads, kv_heads, seq_len):
    q = randn((2, heads, seq_len, 64), dtype, generator, "cuda")
    k, v = (randn((2, kv_heads, seq_len, 64), dtype, generator, "cuda") for _ in range(2))
    grad_out = randn(q.shape, dtype, generator, "cuda")
    used = _record_backends(monkeypatch)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # PyTorch's flash path, now ours
        out = F.scaled_dot_product_attention(*inputs, is_causal=True, enable_gqa=kv_heads != heads)
    grads = torch.autograd.grad(out, inputs, grad_out)
    assert used == [_first_backend(q, k, v, True)] * 2  # forward and backward came to us
    _assert_like_sdpa_math(out, grads, q, k, v, grad_out, True, None, grad_floor=1e-4)
