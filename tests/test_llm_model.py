"""llm.config and llm.model: presets, parameter count, init, fused vs reference, KV cache."""

import math

import pytest
import torch
from numerics import GRAD_FACTOR, OUTPUT_FACTOR, assert_close_relative_to_max, assert_close_to_reference

from llm.config import PRESETS, GPTConfig
from llm.model import GPT


def tiny_config(**overrides):
    fields = dict(vocab_size=97, context_length=24, n_embd=32, n_layer=2, n_head=4, vocab_pad_multiple=64)
    return GPTConfig(**{**fields, **overrides})


def test_gpt2_preset_has_124m_parameters():
    model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.num_parameters() == 124_439_808
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, counted once


def test_presets_and_overrides():
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny"}
    config = GPTConfig.from_preset("gpt2-xl", use_fused=True, dropout=0.1)
    assert (config.n_layer, config.n_head, config.n_embd, config.use_fused) == (48, 25, 1600, True)
    with pytest.raises(ValueError, match="unknown preset 'gpt3'.*gpt2-medium"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_preset("gpt2", n_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)


def test_vocab_padding_slices_logits():
    model = GPT(tiny_config())
    assert model.transformer.wte.weight.shape[0] == 128
    logits, loss = model(torch.randint(0, 97, (2, 5)), torch.randint(0, 97, (2, 5)))
    assert logits.shape == (2, 5, 97)
    assert abs(loss.item() - math.log(97)) < 0.5  # near-uniform at init


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_embd=256, n_head=4, vocab_size=500, context_length=64))
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    expected = 0.02 / math.sqrt(2 * 8)
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - expected) < 0.001
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0


def test_context_overflow_is_a_clear_error():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="longer than the model's context_length 24"):
        model(torch.zeros(1, 25, dtype=torch.long))


# The fused model's config: head_dim 64 / 4 = 16, a size the Triton attention takes, so on
# CPU every fused op runs in Triton's interpreter (uses_triton_for_every_op checks it).
def fused_config(**overrides):
    return tiny_config(n_embd=64, **overrides)


FUSED_OPS = ("layer_norm", "add_layer_norm", "flash_attention", "bias_gelu", "gelu", "linear_cross_entropy")


@pytest.fixture
def backend_of_each_call(monkeypatch):
    """Records, for every llmkernels op the model calls, the backend that ran it: the one the
    call names, or for "auto" the first one llmkernels.explain finds no reason against."""
    llmkernels = pytest.importorskip("llmkernels")
    chosen = []

    def recording(op):
        function = getattr(llmkernels, op)

        def call(*args, backend="auto", **kwargs):
            reasons = llmkernels.explain(op, *args, **kwargs)
            chosen.append((op, backend if backend != "auto" else next(name for name, why in reasons.items() if why is None)))
            return function(*args, backend=backend, **kwargs)

        return call

    for op in FUSED_OPS:
        monkeypatch.setattr(llmkernels, op, recording(op))
    return chosen


def assert_triton_ran_every_op(chosen, expected_ops):
    assert {op for op, _ in chosen} == set(expected_ops), chosen
    assert {backend for _, backend in chosen} == {"triton"}, chosen


@pytest.mark.triton_interpreter
def test_fused_matches_reference_on_cpu(backend_of_each_call):
    """Without targets the fused model returns the same logits; with targets it returns no
    logits (the loss goes through llmkernels.linear_cross_entropy) and the same loss and
    gradients, the padding rows of the tied vocabulary included. Every op runs Triton."""
    torch.manual_seed(0)
    reference = GPT(fused_config())
    fused = GPT(fused_config(use_fused=True))
    fused.load_state_dict(reference.state_dict())
    idx = torch.randint(0, 97, (3, 17))
    targets = torch.randint(0, 97, (3, 17))
    targets[:, ::4] = -1  # ignored positions
    torch.testing.assert_close(fused(idx)[0], reference(idx)[0], atol=1e-5, rtol=1e-5)
    logits_ref, loss_ref = reference(idx, targets)
    logits_fused, loss_fused = fused(idx, targets)
    assert logits_ref.shape == (3, 17, 97) and logits_fused is None
    torch.testing.assert_close(loss_fused, loss_ref, atol=1e-5, rtol=1e-5)
    loss_ref.backward()
    loss_fused.backward()
    for (name, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert_triton_ran_every_op(backend_of_each_call, ["layer_norm", "add_layer_norm", "flash_attention", "bias_gelu",
                                                      "linear_cross_entropy"])  # fmt: skip


@pytest.mark.triton_interpreter
def test_fused_loss_and_gradients_within_the_numerics_rule(backend_of_each_call):
    """The fused model's loss and every gradient against the unfused model in float64, no
    worse than 2x (loss) and 3x (gradients) the unfused model's own float32 error, with
    floors relative to the largest float64 gradient. Every op runs Triton."""
    torch.manual_seed(1)
    reference = GPT(fused_config())
    fused = GPT(fused_config(use_fused=True))
    fused.load_state_dict(reference.state_dict())
    reference64 = GPT(fused_config()).double()
    reference64.load_state_dict(reference.state_dict())
    idx, targets = torch.randint(0, 97, (2, 23)), torch.randint(0, 97, (2, 23))
    targets[0, 5:9] = -1
    losses = [model(idx, targets)[1] for model in (fused, reference, reference64)]
    for loss in losses:
        loss.backward()
    assert_close_to_reference(*losses, factor=OUTPUT_FACTOR, floor=1e-6 * losses[2].abs().item(), name="loss")
    parameters = zip(fused.named_parameters(), reference.parameters(), reference64.parameters())
    for (name, p_fused), p_ref, p_ref64 in parameters:
        floor = 1e-6 * p_ref64.grad.abs().max().item()
        assert_close_to_reference(p_fused.grad, p_ref.grad, p_ref64.grad, factor=GRAD_FACTOR, floor=floor, name=name)
    assert_triton_ran_every_op(backend_of_each_call, ["layer_norm", "add_layer_norm", "flash_attention", "bias_gelu",
                                                      "linear_cross_entropy"])  # fmt: skip


@pytest.mark.parametrize("use_fused", [False, True])
def test_kv_cache_matches_full_forward(use_fused):
    if use_fused:
        pytest.importorskip("llmkernels")
    torch.manual_seed(0)
    model = GPT(fused_config(use_fused=use_fused)).eval()
    idx = torch.randint(0, 97, (2, 12))
    full, _ = model(idx)
    cache = model.new_kv_cache(batch_size=2)
    prefill, _ = model(idx[:, :7], kv_cache=cache)  # 7 tokens at once
    chunk, _ = model(idx[:, 7:9], kv_cache=cache)  # 2 tokens against 7 cached
    steps = [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(9, 12)]  # one at a time
    torch.testing.assert_close(torch.cat([prefill, chunk, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 12


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.triton_interpreter),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_fused_training_step_has_no_graph_break(device):
    """A training step of the fused model (llmkernels.linear_cross_entropy for the loss) with
    its forward and loss under torch.compile(fullgraph=True) (any graph break raises) and
    the backward through it. On CPU the fused ops run in Triton's interpreter (aot_eager
    traces them as opaque ops); on a GPU inductor compiles the step around the kernels, in
    bf16 autocast as training runs it."""
    llmkernels = pytest.importorskip("llmkernels")
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = tiny_config(n_embd=64, use_fused=True)  # head_dim 16: the Triton attention takes it
    model = GPT(config).to(device)
    idx = torch.randint(0, 97, (2, 17), device=device)
    q = torch.randn(2, 4, 17, 16, device=device)
    assert llmkernels.explain("flash_attention", q, q, q)["triton"] is None or device == "cuda"

    def loss_of(model, idx):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits, loss = model(idx, idx)
        assert logits is None  # the loss came from llmkernels.linear_cross_entropy
        return loss

    eager_loss = loss_of(model, idx)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    # fullgraph covers the forward and loss; AOTAutograd traces the backward from it.
    compiled = torch.compile(loss_of, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    loss = compiled(model, idx)
    loss.backward()
    # Relative to each tensor's largest value: inductor reorders bf16 arithmetic on the GPU
    # (a few bf16 ulps); on CPU aot_eager runs the same float32 ops.
    rel = 2e-2 if device == "cuda" else 1e-5
    assert_close_relative_to_max(loss, eager_loss, rel=rel, name="loss")
    for (name, p), expected in zip(model.named_parameters(), eager_grads):
        assert_close_relative_to_max(p.grad, expected, rel=rel, name=name)
