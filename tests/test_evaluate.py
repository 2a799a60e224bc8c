"""llm-eval: before/after numbers in one report for each task; llm-generate: --stream,
the instruction template, classifiers refused, sampling options validated."""

import json

import pytest
import torch
from finetune_helpers import one_thread, save_tiny_checkpoint  # noqa: F401

import llm.generate
import llm.generate_cli
from llm.evaluate import main as eval_main
from llm.finetune import FinetuneConfig, finetune
from llm.generate import stream_text
from llm.generate_cli import main as generate_main
from llm.tokenizer import gpt2_tokenizer


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetuned")
    save_tiny_checkpoint(folder / "base.pt")
    rows = [f"{label}\t{word} number {i}" for i in range(30) for label, word in (("good", "nice"), ("bad", "awful"))]
    (folder / "reviews.tsv").write_text("\n".join(rows))
    records = [{"instruction": "Repeat the word.", "input": word, "output": word} for word in ["yes", "no", "up"] * 10]
    (folder / "records.json").write_text(json.dumps(records))
    common = dict(init_from=str(folder / "base.pt"), device="cpu", max_steps=2, eval_interval=2, batch_size=4,
                  progress=False, answer_count=3, answer_tokens=2)  # fmt: skip
    finetune(FinetuneConfig(task="classify", data=[str(folder / "reviews.tsv")], out_dir=str(folder / "classify"),
                            lora_rank=2, **common))  # fmt: skip
    finetune(FinetuneConfig(task="instruct", data=[str(folder / "records.json")], out_dir=str(folder / "instruct"),
                            **common))  # fmt: skip
    return folder


def test_eval_classifier_before_and_after(finetuned, tmp_path, capsys):
    eval_main(["--checkpoint", str(finetuned / "classify/ckpt.pt"), "--out-dir", str(tmp_path), "--device", "cpu"])
    table = capsys.readouterr().out
    assert "| test | accuracy |" in table and "confusion matrix, test, after" in table
    report = json.loads((tmp_path / "report.json").read_text())
    written = json.loads((finetuned / "classify/report.json").read_text())  # by llm-finetune
    for stage in ("before", "after"):  # llm-eval re-measures the fine-tune's own numbers
        for split in ("val", "test"):
            assert report[stage][split]["confusion"] == written[stage][split]["confusion"]
            assert report[stage][split]["loss"] == pytest.approx(written[stage][split]["loss"], rel=1e-5)
    assert report["models"]["before"] == str(finetuned / "base.pt") and (tmp_path / "confusion.png").is_file()

    # The same classifier from the base checkpoint plus its adapters alone.
    eval_main(["--checkpoint", str(finetuned / "base.pt"), "--adapters", str(finetuned / "classify/adapters"),
               "--out-dir", str(tmp_path / "adapters"), "--device", "cpu"])  # fmt: skip
    from_adapters = json.loads((tmp_path / "adapters/report.json").read_text())
    assert "before" not in from_adapters  # a new head has no "before" without the fine-tune's checkpoint
    assert from_adapters["after"]["test"]["confusion"] == written["after"]["test"]["confusion"]


def test_eval_instruct_answers_and_lm_perplexity(finetuned, tmp_path, capsys):
    eval_main(["--checkpoint", str(finetuned / "instruct/ckpt.pt"), "--out-dir", str(tmp_path), "--device", "cpu"])
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert len(answers) == 3 and all(a["expected"] in ("yes", "no", "up") and "after" in a for a in answers)
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0 <= report["after"]["test"]["exact_match"] <= 1 and "answers" not in report["after"]["test"]
    (tmp_path / "notes.txt").write_text("a plain text to measure the perplexity of. " * 200)
    eval_main(["--checkpoint", str(finetuned / "base.pt"), "--task", "lm", "--data", str(tmp_path / "notes.txt"),
               "--data-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "lm"), "--before", "none",
               "--device", "cpu"])  # fmt: skip
    report = json.loads((tmp_path / "lm/report.json").read_text())
    assert list(report) == ["task", "models", "after"] and report["after"]["val"]["perplexity"] > 1000  # untrained
    with pytest.raises(SystemExit):
        eval_main(["--checkpoint", str(finetuned / "base.pt"), "--task", "classify", "--device", "cpu"])
    assert "llm-eval: error: --task classify needs a classifier" in capsys.readouterr().err


def test_stream_decodes_multibyte_characters_whole(monkeypatch):
    tokenizer = gpt2_tokenizer()
    ids = tokenizer.encode("café ☃")
    assert any(b"\xe2" in tokenizer.decode_single_token_bytes(t) for t in ids)  # a character split over tokens

    def fake_stream(model, prompt, max_new_tokens, **sampling):
        yield from (torch.tensor([[t]]) for t in [*ids, tokenizer.eot_token, 11])

    monkeypatch.setattr(llm.generate, "stream_tokens", fake_stream)
    model = torch.nn.Module()
    model.transformer = torch.nn.ModuleDict({"wte": torch.nn.Embedding(1, 1)})
    pieces = list(stream_text(model, tokenizer, [0], 10))
    assert "".join(pieces) == "café ☃" and "\ufffd" not in "".join(pieces) and len(pieces) >= 2


def test_generate_streams_applies_template_and_refuses_classifiers(finetuned, capsys, monkeypatch):
    printed = []
    real_print = print
    monkeypatch.setattr("builtins.print", lambda *a, **k: (printed.append(a), real_print(*a, **k)))
    common = ["--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"]
    generate_main(["--checkpoint", str(finetuned / "base.pt"), "--prompt", "Hello", "--stream", *common])
    streamed = capsys.readouterr().out
    assert len(printed) >= 6  # the prompt, then piece by piece
    printed.clear()
    generate_main(["--checkpoint", str(finetuned / "base.pt"), "--prompt", "Hello", *common])
    assert capsys.readouterr().out == streamed and len(printed) == 2  # the prompt, then the whole text

    seen = []
    monkeypatch.setattr(llm.generate_cli, "stream_text", lambda model, tokenizer, ids, *a, **k: seen.append(ids) or iter(["ok"]))
    generate_main(["--checkpoint", str(finetuned / "instruct/ckpt.pt"), "--prompt", "Repeat the word.",
                   "--input", "yes"])  # fmt: skip
    assert gpt2_tokenizer().decode(seen[0]).endswith("<|user|>\nRepeat the word.\n\nyes\n<|assistant|>\n")  # its chat template
    assert capsys.readouterr().out == "ok\n"  # only the response

    with pytest.raises(SystemExit):
        generate_main(["--checkpoint", str(finetuned / "classify/ckpt.pt")])
    assert "is a classifier (task classify)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, message",
    [
        (["--temperature", "-1"], "argument --temperature: expected a number >= 0, got '-1'"),
        (["--top-k", "0"], "argument --top-k: expected an integer >= 1, got '0'"),
        (["--top-p", "0"], r"argument --top-p: expected a number in (0, 1], got '0'"),
        (["--top-p", "1.5"], r"argument --top-p: expected a number in (0, 1], got '1.5'"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1, got '0'"),
        (["--num-samples", "0"], "argument --num-samples: expected an integer >= 1, got '0'"),
        (["--input", "x"], "--input: only instruction models (llm-finetune --task instruct) take an input"),
    ],
)
def test_generate_validates_options(finetuned, capsys, option, message):
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--checkpoint", str(finetuned / "base.pt"), "--device", "cpu", *option])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"llm-generate: error: {message}")


def test_eval_with_adapters_reports_in_the_adapters_folder_not_the_base_models(finetuned, capsys):
    eval_main(["--checkpoint", str(finetuned / "base.pt"), "--adapters", str(finetuned / "classify/adapters"),
               "--device", "cpu"])  # fmt: skip
    assert (finetuned / "classify/adapters/eval/report.json").is_file()
    assert not (finetuned / "eval").exists()  # the base model's folder
