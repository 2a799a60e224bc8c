"""Classification fine-tuning: the head's shape, the last real token read (padding changes
nothing), which parameters train, and the built-in genre task learned above chance."""

import torch
from finetune_helpers import one_thread, save_tiny_checkpoint, tiny_gpt  # noqa: F401

from llm.checkpoint import load_checkpoint, save_checkpoint
from llm.config import GPTConfig
from llm.finetune import FinetuneConfig, finetune
from llm.finetune.classify import GPTClassifier, classification_loss, collate_classification
from llm.finetune.loop import freeze_all_but_last
from llm.finetune.shakespeare import builtin_dataset
from llm.model import GPT
from llm.tokenizer import tokenizer_to_dict, train_bpe

PAD = 50256


def test_head_reads_the_last_real_token(generator):
    model = GPTClassifier(tiny_gpt(), ["a", "b", "c"]).eval()
    rows = [torch.randint(0, 50000, (n,), generator=generator).tolist() for n in (5, 9, 1)]
    x = collate_classification(rows, PAD)  # (3, 9)
    lengths = torch.tensor([len(r) for r in rows])
    logits = model(x, lengths)
    assert logits.shape == (3, 3)
    for i, row in enumerate(rows):  # each alone, unpadded, and padded further: the same logits
        alone = model(torch.tensor([row]), torch.tensor([len(row)]))
        padded = model(torch.tensor([row + [PAD] * 7]), torch.tensor([len(row)]))
        torch.testing.assert_close(alone[0], logits[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded[0], logits[i], atol=1e-5, rtol=1e-5)
    # Reading the wrong position would differ: the prediction depends on the length.
    assert not torch.allclose(model(x[:1], torch.tensor([4])), logits[:1])


def test_default_freezing_trains_last_block_final_norm_and_head(generator):
    gpt = tiny_gpt()
    model = GPTClassifier(gpt, ["a", "b"])
    freeze_all_but_last(gpt, 1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("gpt.transformer.h.1.", "gpt.transformer.ln_f.", "head."))}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        x = torch.randint(0, 50000, (4, 7), generator=generator)
        batch = x, torch.tensor([7, 3, 5, 1]), torch.tensor([0, 1, 1, 0])
        classification_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name  # frozen: bit-identical
    freeze_all_but_last(gpt, -1)
    assert all(p.requires_grad for p in gpt.parameters())


def test_builtin_genre_task_beats_chance(tmp_path):
    # A small BPE learned on the passages keeps the model tiny and fast on a CPU.
    tokenizer = train_bpe([e.text for e in builtin_dataset("shakespeare-genre")[::4]], 1024)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.n_vocab, context_length=48, n_embd=64, n_layer=1, n_head=2))
    save_checkpoint(tmp_path / "base.pt", {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                           "tokenizer": tokenizer_to_dict(tokenizer), "step": 0})  # fmt: skip
    result = finetune(FinetuneConfig(
        task="classify", init_from=str(tmp_path / "base.pt"), out_dir=str(tmp_path / "out"), device="cpu",
        trainable_blocks=-1, lr=1e-3, max_steps=300, batch_size=32, warmup_steps=5, eval_interval=300, progress=False,
    ))  # fmt: skip
    after = result["report"]["after"]["test"]
    assert after["examples"] == 600
    assert after["accuracy"] > after["majority_class_accuracy"] + 0.08  # seen: 0.51 vs 0.36
    assert result["report"]["after"]["val"]["loss"] < result["report"]["before"]["val"]["loss"]
    assert (tmp_path / "out/confusion.png").stat().st_size > 0
