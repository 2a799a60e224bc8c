"""llmkernels in Hugging Face transformers (llmkernels/integrations/transformers.py).

Small randomly initialised GPT-2 and Llama models built from local configs (no download),
dropout off, float32 on CPU: the patched model (or attn_implementation="llmkernels") against
the same weights unpatched, held to the numerics rule with the unpatched model in float64
as the reference and in float32 as the yardstick. Head dim 16, so under the Triton
interpreter the fused kernels run inside the models; a spy on the llmkernels ops records
which ran and, through llmkernels.explain, on which backend.
"""
import copy

import pytest
import torch
from numerics import GRAD_FACTOR, assert_close_to_reference

transformers = pytest.importorskip("transformers")

import llmkernels  # noqa: E402
from llmkernels.integrations import transformers as hf  # noqa: E402

VOCAB = 97
SEQ = 13


@pytest.fixture(autouse=True)
def restore_gpt2_class():
    """apply_llmkernels_to_gpt2 also patches GPT-2 models built later: undone after each test."""
    yield
    hf.revert_llmkernels_gpt2_class_patch()


@pytest.fixture
def calls(monkeypatch):
    """Records each llmkernels op the integration calls: {op: [(backend, details)]}."""
    recorded = {}

    def spy(name, describe):
        original = getattr(llmkernels, name)

        def wrapper(*args, **kwargs):
            reasons = llmkernels.explain(name, *args, **kwargs)
            backend = next(backend for backend, reason in reasons.items() if reason is None)
            recorded.setdefault(name, []).append((backend, describe(*args)))
            return original(*args, **kwargs)

        monkeypatch.setattr(llmkernels, name, wrapper)

    spy("flash_attention", lambda q, k, v: {"heads": q.shape[1], "kv_heads": k.shape[1],
                                             "query_len": q.shape[2], "key_len": k.shape[2]})
    for name in ("layer_norm", "gelu", "bias_gelu", "linear_cross_entropy"):
        spy(name, lambda *args: None)
    return recorded


def _gpt2(seed=0):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def _llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def _tokens(generator, batch=2, seq=SEQ):
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


def _loss_and_grads(model, ids):
    model.train()
    model.zero_grad()
    output = model(ids, labels=ids)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, grads


def _assert_like_unpatched(patched, stock, ids):
    """Eval logits, then training loss and every parameter's gradient, within the numerics rule."""
    stock64 = copy.deepcopy(stock).double()
    with torch.no_grad():
        logits = [m.eval()(ids).logits for m in (patched, stock, stock64)]
    assert_close_to_reference(*logits, name="logits")
    (patched_out, patched_grads), (stock_out, stock_grads), (out64, grads64) = (
        _loss_and_grads(m, ids) for m in (patched, stock, stock64))
    assert_close_to_reference(patched_out.loss, stock_out.loss, out64.loss, name="loss")
    assert patched_grads.keys() == grads64.keys()
    for name, grad64 in grads64.items():
        assert_close_to_reference(patched_grads[name], stock_grads[name], grad64, factor=GRAD_FACTOR, name=name)
    return patched_out


def test_patched_gpt2_matches_unpatched(calls, generator):
    stock = _gpt2()
    patched = copy.deepcopy(stock)
    hf.apply_llmkernels_to_gpt2(patched)
    ids = _tokens(generator)
    output = _assert_like_unpatched(patched, stock, ids)
    assert output.logits is None  # the training loss came without logits
    # The Trainer's token count across gradient accumulation: the summed loss divided by it.
    losses = [m(ids, labels=ids, num_items_in_batch=torch.tensor(7)).loss for m in (patched, stock)]
    assert_close_to_reference(*losses, _loss_and_grads(copy.deepcopy(stock).double(), ids)[0].loss * 24 / 7)
    assert set(calls) == {"flash_attention", "layer_norm", "bias_gelu", "linear_cross_entropy"}
    assert all(backend == "triton" for backend, _ in calls["flash_attention"]), calls["flash_attention"]


def test_llama_with_llmkernels_attention_matches_sdpa(calls, generator):
    stock = _llama()
    patched = copy.deepcopy(stock)
    patched.set_attn_implementation("llmkernels")
    _assert_like_unpatched(patched, stock, _tokens(generator))
    assert {(d["heads"], d["kv_heads"]) for _, d in calls["flash_attention"]} == {(4, 2)}  # GQA, no repeat_kv


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_generate_with_the_cache_matches_unpatched(build, calls, generator):
    stock = build().eval()
    patched = copy.deepcopy(stock)
    if isinstance(patched, transformers.GPT2LMHeadModel):
        hf.apply_llmkernels_to_gpt2(patched)
    else:
        patched.set_attn_implementation("llmkernels")
    prompt = _tokens(generator, batch=1, seq=7)
    expected = stock.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(patched.generate(prompt, max_new_tokens=6, do_sample=False), expected)
    shapes = [(d["query_len"], d["key_len"]) for _, d in calls["flash_attention"]]
    assert (7, 7) in shapes and (1, 12) in shapes  # the prefill, and a decode step over the cache (Sq < Sk)


def test_padding_mask_falls_back_to_sdpa(calls, generator):
    stock = _gpt2().eval()
    patched = copy.deepcopy(stock)
    hf.apply_llmkernels_to_gpt2(patched, layer_norm=False, gelu=False, fused_linear_cross_entropy=False)
    ids = _tokens(generator)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :4] = 0  # left padding in the first row
    with torch.no_grad():
        logits = [m(ids, attention_mask=attention_mask).logits for m in (patched, stock, copy.deepcopy(stock).double())]
    assert_close_to_reference(*logits, name="logits")
    assert calls == {}  # the mask went to transformers' SDPA attention, and nothing else was patched


def test_one_trainer_step(calls, tmp_path, generator):
    model = _gpt2()
    hf.apply_llmkernels_to_gpt2(model)
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    ids = _tokens(generator, batch=4)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    arguments = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                               learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                               disable_tqdm=True)
    result = transformers.Trainer(model=model, args=arguments, train_dataset=dataset).train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, before)
    assert "linear_cross_entropy" in calls and "flash_attention" in calls


def test_peft_lora_on_a_patched_model(calls, generator):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                           task_type="CAUSAL_LM")
    stock = peft.get_peft_model(_gpt2(), lora)
    for name, parameter in stock.named_parameters():
        if "lora_B" in name:  # nonzero, so the adapters change the outputs being compared
            torch.nn.init.normal_(parameter, std=0.02, generator=generator)
    patched = copy.deepcopy(stock)
    hf.apply_llmkernels_to_gpt2(patched)  # through the peft wrapper
    _assert_like_unpatched(patched, stock, _tokens(generator))
    assert "linear_cross_entropy" in calls and "layer_norm" in calls
    assert "gelu" in calls and "bias_gelu" not in calls  # c_fc is an adapter now: its forward, then the GELU


def test_gpt2_models_built_later_are_patched_until_the_class_patch_is_reverted(tmp_path):
    _gpt2().save_pretrained(tmp_path)
    hf.apply_llmkernels_to_gpt2(layer_norm=False)
    for model in (_gpt2(), transformers.GPT2LMHeadModel.from_pretrained(tmp_path)):
        assert model.config._attn_implementation == "llmkernels"
        assert model.forward.__func__ is hf._gpt2_lm_forward
        assert model.transformer.h[0].mlp.forward.__func__ is hf._gpt2_mlp_forward
        assert "forward" not in vars(model.transformer.ln_f)  # layer_norm=False left LayerNorm alone
    patched = model
    hf.revert_llmkernels_gpt2_class_patch()
    stock = _gpt2()
    assert stock.config._attn_implementation != "llmkernels"
    assert not any("forward" in vars(module) for module in stock.modules())  # nothing bound per instance
    assert patched.forward.__func__ is hf._gpt2_lm_forward  # the models already patched stay patched


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="model must be a transformers GPT-2 model"):
        hf.apply_llmkernels_to_gpt2(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="gelu must be a bool"):
        hf.apply_llmkernels_to_gpt2(gelu="no")
