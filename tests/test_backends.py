"""LLMKERNELS_BACKEND names a backend for every op: an op that backend has no kernel for at
all (linear_cross_entropy has no CUDA kernel) falls back as "auto" does and explain() says
so; a call the named backend has a kernel for but cannot take still raises. So a GPT with
use_fused=True trains under LLMKERNELS_BACKEND=cuda.

Without a GPU, "cuda usable" is simulated: the CUDA backend is marked usable and its ops
are served by the Triton kernels (the same schemas, llmkernels::triton_*), which run here
in Triton's interpreter."""
import dataclasses

import pytest
import torch

import llmkernels
from llmkernels import backends

from conftest import requires_cuda


def lce_inputs(generator, device="cpu", dtype=torch.float32):
    x = torch.randn(13, 32, generator=generator).to(device, dtype)
    weight = torch.randn(97, 32, generator=generator).to(device, dtype)
    targets = torch.randint(0, 97, (13,), generator=generator).to(device)
    return x, weight, targets


@pytest.fixture
def cuda_marked_usable(monkeypatch):
    """The CUDA backend counts as usable; a call it takes runs the Triton kernel of the same op."""
    monkeypatch.setitem(backends._STATUS, "cuda", (True, ""))
    monkeypatch.setitem(backends.FUSED_OP_PREFIX, "cuda", "triton_")
    for op, entry in list(backends.OPS.items()):
        def unsupported(backend, *args, _triton=entry.unsupported, **kwargs):
            return _triton("triton" if backend == "cuda" else backend, *args, **kwargs)

        monkeypatch.setitem(backends.OPS, op, dataclasses.replace(entry, unsupported=unsupported))


@pytest.fixture
def chosen(monkeypatch):
    """{op: [backend chosen for each call]}, recorded from the dispatcher."""
    choices = {}
    select = backends.select_backend

    def recording(op, backend, *args, **kwargs):
        name = select(op, backend, *args, **kwargs)
        choices.setdefault(op, []).append(name)
        return name

    monkeypatch.setattr(backends, "select_backend", recording)
    return choices


def auto_choice(op, *args):
    return next(name for name, reason in llmkernels.explain(op, *args).items() if reason is None)


def test_an_op_without_a_kernel_in_the_named_backend_falls_back_as_auto_does(cuda_marked_usable, monkeypatch, generator):
    x, weight, targets = lce_inputs(generator)
    expected = auto_choice("linear_cross_entropy", x, weight, targets)
    assert expected in ("triton", "reference")
    monkeypatch.setenv(backends.BACKEND_ENV_VAR, "cuda")
    assert backends.select_backend("linear_cross_entropy", "auto", x, weight, None) == expected
    reasons = llmkernels.explain("linear_cross_entropy", x, weight, targets)
    assert reasons["cuda"] == ("there is no cuda kernel for linear_cross_entropy "
                               "(LLMKERNELS_BACKEND=cuda: this op falls back as 'auto' does)")
    loss = llmkernels.linear_cross_entropy(x, weight, targets)
    reference = llmkernels.linear_cross_entropy_reference(x.double(), weight.double(), targets)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-4, atol=1e-5)


def test_a_call_the_named_backend_has_a_kernel_for_but_cannot_take_still_raises(cuda_marked_usable, monkeypatch,
                                                                               generator):
    monkeypatch.setenv(backends.BACKEND_ENV_VAR, "cuda")
    x = torch.randn(3, 8, generator=generator)
    with pytest.raises(llmkernels.BackendUnavailableError, match="gelu: backend 'cuda' cannot run this call: "
                                                                 "the fused kernels implement approximate='tanh' only"):
        llmkernels.gelu(x, approximate="none")


def test_an_explicit_backend_argument_without_a_kernel_for_the_op_raises(generator):
    x, weight, targets = lce_inputs(generator)
    with pytest.raises(llmkernels.BackendUnavailableError,
                       match="linear_cross_entropy: backend 'cuda' cannot run this call: there is no cuda kernel"):
        llmkernels.linear_cross_entropy(x, weight, targets, backend="cuda")
    assert "falls back" not in llmkernels.explain("linear_cross_entropy", x, weight, targets)["cuda"]


def test_register_op_needs_the_reference_backend():
    with pytest.raises(ValueError, match="including 'reference'"):
        backends.register_op("made_up", lambda: (), lambda backend: None, kernels=("triton",))
    assert "made_up" not in backends.OPS


def train_steps(device, steps=2, dtype=None):
    """Losses of a few AdamW steps of a small fused GPT (head_dim 16: Triton attention takes it)."""
    from llm.config import GPTConfig
    from llm.model import GPT

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, context_length=24, n_embd=64, n_layer=2, n_head=4, vocab_pad_multiple=64,
                       use_fused=True)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 97, (2, 17), device=device)
    losses = []
    for _ in range(steps):
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_training_with_use_fused_under_llmkernels_backend_cuda(cuda_marked_usable, chosen, monkeypatch):
    auto_losses = train_steps("cpu")
    auto_chosen = {op: set(names) for op, names in chosen.items()}
    chosen.clear()
    monkeypatch.setenv(backends.BACKEND_ENV_VAR, "cuda")
    losses = train_steps("cpu")
    assert losses == auto_losses  # the same kernels (the Triton ones stand in for CUDA), the same steps
    assert {op: set(names) for op, names in chosen.items()} == {
        op: {"cuda"} if op != "linear_cross_entropy" else names for op, names in auto_chosen.items()}
    assert chosen["linear_cross_entropy"] and auto_chosen["linear_cross_entropy"] <= {"triton", "reference"}


@requires_cuda
@pytest.mark.skipif(not backends.CUDA_EXTENSION_LOADED, reason="the CUDA extension is not built here "
                    "(test_op_boundary's extension guard fails the GPU lane for that)")
def test_training_with_use_fused_under_llmkernels_backend_cuda_on_the_gpu(chosen, monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV_VAR, "cuda")
    losses = train_steps("cuda", dtype=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert set(chosen["linear_cross_entropy"]) == {"triton"}
    assert set(chosen.get("layer_norm", []) + chosen.get("add_layer_norm", [])) == {"cuda"}


def test_the_build_stamp_tells_a_stale_extension_from_a_current_one(tmp_path):
    from llmkernels import build_stamp

    csrc, extension_dir = tmp_path / "csrc", tmp_path / "pkg"
    csrc.mkdir()
    extension_dir.mkdir()
    (csrc / "gelu.cu").write_text("// v1")
    assert "no build stamp" in build_stamp.staleness(extension_dir, csrc)
    build_stamp.write_stamp(extension_dir, csrc)
    assert build_stamp.staleness(extension_dir, csrc) == ""
    (csrc / "layer_norm.cuh").write_text("// a new header counts too")
    assert "other sources" in build_stamp.staleness(extension_dir, csrc)
