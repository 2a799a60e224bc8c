"""Instruction fine-tuning: the template, <|endoftext|> after the response, padding to the
batch's longest row, truncation to the context, and a loss that sees response tokens only."""

import torch
import torch.nn.functional as F
from finetune_helpers import one_thread, tiny_gpt  # noqa: F401

from llm.finetune.datasets import Instruction
from llm.chat_template import get_template
from llm.finetune.instruct import IGNORE, InstructionSet, collate_instructions, encode_record
from llm.tokenizer import gpt2_tokenizer

PAD = 50256


def test_record_encoding_uses_the_template_and_ends_with_eot():
    tokenizer = gpt2_tokenizer()
    record = Instruction("Name the play.", "To be, or not to be", "Hamlet")
    for name in ("chat", "alpaca"):
        template = get_template(name)
        ids, trained = encode_record(record, tokenizer, template)
        prompt_length = trained.index(True)
        assert ids[:prompt_length] == template.prompt_ids(template.instruction_messages(record.instruction, record.input),
                                                          tokenizer)
        assert tokenizer.decode(ids[prompt_length:]) == "Hamlet<|endoftext|>" and ids[-1] == tokenizer.eot_token
        assert all(trained[prompt_length:])


def test_collate_pads_to_longest_masks_prompt_and_truncates():
    rows = [([1, 2, 3, 4, 5], [False, False, True, True, True]), ([6, 7, 8], [False, True, True])]  # (ids, trained)
    x, y = collate_instructions(rows, context=16, pad_token=PAD)
    # Padded to the longest row (5 tokens -> 4 positions), not to the context of 16.
    assert x.tolist() == [[1, 2, 3, 4], [6, 7, PAD, PAD]]
    # Row 0: targets 2 (a prompt token) masked, then 3, 4, 5. Row 1: prompt is [6] alone,
    # so 7 is already response; padding never trains.
    assert y.tolist() == [[IGNORE, 3, 4, 5], [7, 8, IGNORE, IGNORE]]
    x, y = collate_instructions(rows, context=16, pad_token=PAD, train_on_prompt=True)
    assert y.tolist() == [[2, 3, 4, 5], [7, 8, IGNORE, IGNORE]]
    # Longer than the context: cut to context + 1 tokens, so T = context.
    x, y = collate_instructions([(list(range(10, 30)), [False] * 3 + [True] * 17)], context=6, pad_token=PAD)
    assert x.tolist() == [[10, 11, 12, 13, 14, 15]] and y.tolist() == [[IGNORE, IGNORE, 13, 14, 15, 16]]


def test_records_whose_prompt_fills_the_context_are_dropped():
    tokenizer = gpt2_tokenizer()
    records = [Instruction("Say yes.", "", "yes"), Instruction("word " * 80, "", "no")]
    data = InstructionSet(records, tokenizer, context=48, train_on_prompt=False, template=get_template("alpaca"))
    assert data.num_windows == 1 and data.dropped == 1 and data.records == records[:1]


def test_masked_positions_contribute_exactly_zero(generator):
    model = tiny_gpt()
    ids = torch.randint(0, 50257, (2, 12), generator=generator).tolist()
    rows = [(ids[0], [False] * 5 + [True] * 7), (ids[1][:9], [False] * 7 + [True] * 2)]  # 5 and 7 prompt tokens
    x, y = collate_instructions(rows, context=32, pad_token=PAD)
    trained = y != IGNORE  # (B, T)
    assert trained.sum() == (11 - 4) + (8 - 6)

    logits, loss = model(x, y)
    expected = F.cross_entropy(logits[trained].float(), y[trained])
    torch.testing.assert_close(loss, expected)

    # The gradient reaching the logits of masked positions is exactly zero.
    logits = logits.detach().requires_grad_()
    F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE).backward()
    assert torch.all(logits.grad[~trained] == 0) and torch.all(logits.grad[trained].abs().sum(-1) > 0)

    # Padding inputs change nothing either (they come after every trained position), and
    # training on the prompt does change the gradients.
    def gradients(inputs, targets):
        model.zero_grad()
        model(inputs, targets)[1].backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    other_padding = x.clone()
    other_padding[1, 8:] = 123
    reference = gradients(x, y)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(reference, gradients(other_padding, y)))
    with_prompt = collate_instructions(rows, 32, PAD, train_on_prompt=True)[1]
    assert not all(torch.allclose(a, b) for a, b in zip(reference, gradients(x, with_prompt)))
