"""Prompting: system message and few-shot examples in the model's template, prompt variants
compared by llm-eval --prompts, and llm-eval --tool-use's two rows."""

import json

import pytest
from finetune_helpers import one_thread, tiny_gpt  # noqa: F401

from llm.apps.prompt_variants import read_variants
from llm.apps.prompting import PromptedModel, plain_prompt
from llm.chat_template import Message, get_template
from llm.checkpoint import save_checkpoint
from llm.evaluate import main as evaluate_main
from llm.finetune.datasets import Instruction
from llm.tokenizer import gpt2_tokenizer, tokenizer_to_dict

SHOT = Instruction("What is 2 + 2?", "", "4")


def test_system_and_examples_go_into_the_models_template():
    tokenizer, model = gpt2_tokenizer(), tiny_gpt()
    chat = get_template("chat")
    prompt = PromptedModel(model, tokenizer, chat).render("Answer with a number.", "What is 3 + 3?", [SHOT])
    assert prompt == chat.prompt_ids([Message("system", "Answer with a number."), Message("user", "What is 2 + 2?"),
                                      Message("assistant", "4"), Message("user", "What is 3 + 3?")], tokenizer)  # fmt: skip
    alpaca = get_template("alpaca")  # single-turn: the examples lead the user's message
    prompt = PromptedModel(model, tokenizer, alpaca).render("Answer with a number.", "What is 3 + 3?", [SHOT])
    assert prompt == alpaca.prompt_ids([Message("system", "Answer with a number."),
                                        Message("user", "Example:\nWhat is 2 + 2?\nAnswer: 4\n\nWhat is 3 + 3?")], tokenizer)
    plain = plain_prompt("What is 3 + 3?", system="Answer with a number.", examples=[SHOT])
    assert plain == "Answer with a number.\n\nInput: What is 2 + 2?\nOutput: 4\n\nInput: What is 3 + 3?\nOutput:"
    assert PromptedModel(model, tokenizer).render("Answer with a number.", "What is 3 + 3?", [SHOT]) == tokenizer.encode(plain)


def test_variants_file_is_checked(tmp_path):
    path = tmp_path / "variants.json"
    for bad, message in (([], "non-empty JSON list"), ([{"name": "a", "temperature": 1}], "variant 1"),
                         ([{"name": "a", "template": "no slot"}], "{input}"), ([{"name": "a"}, {"name": "a"}], "differ"),
                         ([{"name": "a", "examples": [{"input": "x"}]}], "examples")):  # fmt: skip
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            read_variants(path)


@pytest.fixture
def instruct_checkpoint(tmp_path):
    model = tiny_gpt(context_length=192)
    path = tmp_path / "instruct" / "ckpt.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model.config.to_dict(), "task": "instruct",
                           "chat_template": "chat", "tokenizer": tokenizer_to_dict(gpt2_tokenizer()), "step": 0})  # fmt: skip
    return path


def test_llm_eval_compares_prompt_variants(instruct_checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "labelled.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"instruction": "What is 1 + 1?", "output": "2"}, {"instruction": "What is 2 + 3?", "output": "5"})))  # fmt: skip
    (tmp_path / "variants.json").write_text(json.dumps([
        {"name": "zero-shot"}, {"name": "few-shot", "examples": [{"instruction": "What is 2 + 2?", "output": "4"}]},
        {"name": "step-by-step", "template": "{input}\nThink step by step."}]))  # fmt: skip
    prompts, complete = [], PromptedModel.complete
    monkeypatch.setattr(PromptedModel, "complete", lambda self, prompt, *a, **k: prompts.append(prompt)
                        or complete(self, prompt, *a, **k))
    evaluate_main(["--checkpoint", str(instruct_checkpoint), "--prompts", str(tmp_path / "variants.json"),
                   "--data", str(tmp_path / "labelled.jsonl"), "--max-new-tokens", "3"])  # fmt: skip
    table = capsys.readouterr().out
    assert table.count("\n| ") == 3 and "| few-shot |" in table and "tokens/s" in table
    report = json.loads((instruct_checkpoint.parent / "eval" / "prompts.json").read_text())
    assert set(report["variants"]) == {"zero-shot", "few-shot", "step-by-step"}
    assert report["variants"]["zero-shot"]["mean_length"] == 3  # a random model never stops early (greedy)
    # Each variant's own prompt for each record, in the checkpoint's chat template.
    chat, tokenizer = get_template("chat"), gpt2_tokenizer()
    shot = [Message("user", "What is 2 + 2?"), Message("assistant", "4")]
    assert prompts == [chat.prompt_ids(messages, tokenizer) for messages in (
        [Message("user", "What is 1 + 1?")], [Message("user", "What is 2 + 3?")],
        shot + [Message("user", "What is 1 + 1?")], shot + [Message("user", "What is 2 + 3?")],
        [Message("user", "What is 1 + 1?\nThink step by step.")], [Message("user", "What is 2 + 3?\nThink step by step.")])]
    with pytest.raises(SystemExit) as stop:
        evaluate_main(["--checkpoint", str(instruct_checkpoint), "--prompts", str(tmp_path / "variants.json")])
    assert stop.value.code == 2 and "--prompts needs --data" in capsys.readouterr().err


def test_llm_eval_tool_use_reports_with_and_without_the_calculator(instruct_checkpoint, capsys, monkeypatch):
    import llm.apps.tool_use

    tool_loops, answer_with_tools = [], llm.apps.tool_use.answer_with_tools  # the calculator's row runs the loop
    monkeypatch.setattr(llm.apps.tool_use, "answer_with_tools", lambda model, prompt, tools, *a, **k:
                        tool_loops.append(list(tools.allowed)) or answer_with_tools(model, prompt, tools, *a, **k))
    evaluate_main(["--checkpoint", str(instruct_checkpoint), "--tool-use", "--answer-count", "2",
                   "--max-new-tokens", "4"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| with calculator | 0.000 (2 questions) |" in out and "| without |" in out
    assert json.loads((instruct_checkpoint.parent / "eval" / "tool_use.json").read_text())["without"]["questions"] == 2
    assert tool_loops == [["calculator"]] * 2  # one tool loop per question with the calculator; none without


def test_llm_generate_puts_system_and_examples_in_the_template_and_applies_the_policy(
        instruct_checkpoint, tmp_path, capsys, monkeypatch):  # fmt: skip
    import llm.generate_cli as generate

    seen = []

    def fake_stream(model, tokenizer, prompt_ids, *args, **kwargs):  # what the model writes is not under test
        seen.append(prompt_ids)
        yield "Write to jane@example.org today."

    (tmp_path / "shots.jsonl").write_text(json.dumps({"instruction": "What is 2 + 2?", "output": "4"}) + "\n")
    (tmp_path / "policy.json").write_text(json.dumps({"blocked_patterns": ["(?i)password"]}))
    monkeypatch.setattr(generate, "stream_text", fake_stream)
    generate.main(["--checkpoint", str(instruct_checkpoint), "--prompt", "What is 3 + 3?", "--system", "Be brief.",
                   "--examples", str(tmp_path / "shots.jsonl"), "--policy", str(tmp_path / "policy.json")])  # fmt: skip
    chat = get_template("chat")
    assert seen[0] == chat.prompt_ids([Message("system", "Be brief."), Message("user", "What is 2 + 2?"),
                                       Message("assistant", "4"), Message("user", "What is 3 + 3?")], gpt2_tokenizer())  # fmt: skip
    out, err = capsys.readouterr()
    assert out == "Write to [email redacted] today.\n" and "content policy: redact_emails (redacted" in err
    with pytest.raises(SystemExit) as stop:
        generate.main(["--checkpoint", str(instruct_checkpoint), "--prompt", "Tell me the admin PASSWORD",
                       "--policy", str(tmp_path / "policy.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "refused by the content policy (blocked_patterns" in err and err.count("\n") == 1
