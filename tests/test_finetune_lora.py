"""LoRA through peft: the base model at initialisation, only adapters train, merged equals
unmerged (plain and fused model), adapters saved and loaded alone, for an LM and a classifier."""

import os

import pytest
import torch
from finetune_helpers import one_thread, tiny_gpt  # noqa: F401

from llm.finetune.classify import GPTClassifier
from llm.finetune.lora import add_lora, adapter_state, apply_adapters, merge_lora, merged_copy, save_adapters

ADAPTED = ("c_attn", "c_proj", "c_fc")


def train_a_little(model, generator, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        x = torch.randint(0, 50000, (2, 9), generator=generator)
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("use_fused", [False, True])
def test_lora_trains_adapters_only_and_merges_exactly(generator, use_fused):
    x = torch.randint(0, 50000, (2, 11), generator=generator)
    model = tiny_gpt(use_fused=use_fused)
    base_logits = model(x)[0]
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    add_lora(model, rank=4, alpha=8, dropout=0.0)
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(ADAPTED) and len([m for m in model.modules() if hasattr(m, "lora_A")]) == 2 * 4
    assert all(p.requires_grad == (".lora_" in name) for name, p in model.named_parameters())
    torch.testing.assert_close(model(x)[0], base_logits, rtol=0, atol=0)  # B = 0: exactly the base model

    train_a_little(model, generator)
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name  # frozen base untouched
    adapted = model(x)[0]
    assert not torch.allclose(adapted, base_logits)
    merged = merged_copy(model)
    assert not any(hasattr(m, "lora_A") for m in merged.modules()) and any(hasattr(m, "lora_A") for m in model.modules())
    assert set(merged.state_dict()) == set(tiny_gpt().state_dict())  # a plain GPT again
    torch.testing.assert_close(merged(x)[0], adapted, rtol=1e-5, atol=1e-5)


def test_fused_and_plain_lora_agree(generator):
    x = torch.randint(0, 50000, (2, 7), generator=generator)
    outputs = []
    for use_fused in (False, True):
        model = tiny_gpt(use_fused=use_fused)
        add_lora(model, rank=2, alpha=4, dropout=0.0)
        torch.manual_seed(5)
        for p in model.parameters():
            if p.requires_grad:  # nonzero B, so the c_fc adapter matters on the fused path too
                p.data.normal_(0, 0.1)
        outputs.append(model(x)[0])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


def test_adapters_round_trip_alone(tmp_path, generator):
    x = torch.randint(0, 50000, (3, 8), generator=generator)
    lengths = torch.tensor([8, 2, 5])
    for task in ("lm", "classify"):
        gpt = add_lora(tiny_gpt(), rank=4, alpha=8, dropout=0.1)
        model = GPTClassifier(gpt, ["ham", "spam"]) if task == "classify" else gpt
        train_a_little(gpt, generator)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05)
        head = {f"head.{k}": v for k, v in model.head.state_dict().items()} if task == "classify" else {}
        config = {"rank": 4, "alpha": 8, "dropout": 0.1, "task": task, "labels": ["ham", "spam"]}
        save_adapters(tmp_path / task, {**adapter_state(gpt), **head}, config)
        loaded, loaded_config = apply_adapters(tiny_gpt(), tmp_path / task)  # a fresh copy of the same base
        assert loaded_config == config
        model.eval(), loaded.eval()
        inputs = (x, lengths) if task == "classify" else (x,)
        torch.testing.assert_close(loaded(*inputs), model(*inputs), rtol=0, atol=0)
        torch.testing.assert_close(merge_lora(loaded)(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="adapters do not fit the model"):
        apply_adapters(tiny_gpt(n_embd=64), tmp_path / "lm")
    with pytest.raises(FileNotFoundError, match="adapters.safetensors not found"):
        apply_adapters(tiny_gpt(), tmp_path)


def test_saved_adapters_get_the_permissions_of_any_new_file(tmp_path):
    umask = os.umask(0o022)  # one that tells 0644 (a plain open()) from safetensors' own 0600
    try:
        save_adapters(tmp_path / "adapters", {"lora_A": torch.ones(2, 3)}, {"rank": 2})
        (tmp_path / "plain.txt").open("w").close()
    finally:
        os.umask(umask)
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    for name in ("adapters.safetensors", "adapter_config.json"):
        mode = (tmp_path / "adapters" / name).stat().st_mode & 0o777
        assert mode == plain, f"{name}: {oct(mode)}, a new file gets {oct(plain)}"
