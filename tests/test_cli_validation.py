"""Every bad option a careless user tried (issue 13) is refused before any work starts, in
one line on stderr that names the option and what it accepts, with exit status 2; --help
shows the command people type."""

import argparse
import subprocess
import sys

import pytest
import torch

from llm.checkpoint import save_checkpoint
from llm.config import GPTConfig
from llm.generate_cli import main as generate_main
from llm.model import GPT
from llm.tokenizer_cli import main as tokenizer_main
from llm.tokenizer import tokenizer_to_dict, train_bpe
from llm.train import main as train_main
from llm.train import parse_args, resume_command
from llm.weights import TOKENIZER_FILE, load_gpt2_with_tokenizer, save_hf
from llm.weights import main as export_main

MISSING = "/nonexistent-llm-test/missing.json"


def refused(main, argv, capsys) -> str:
    """main(argv) must exit with status 2 and one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return captured.err.strip()


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--max-steps", "0"], ["--max-steps", "expected an integer >= 1, got '0'"]),
        (["--max-steps", "-5"], ["--max-steps", "expected an integer >= 1, got '-5'"]),
        (["--grad-accum-steps", "0"], ["--grad-accum-steps", "expected an integer >= 1"]),
        (["--batch-size", "0"], ["--batch-size", "expected an integer >= 1, got '0'"]),
        (["--batch-size", "-1"], ["--batch-size", "expected an integer >= 1, got '-1'"]),
        (["--eval-interval", "0"], ["--eval-interval", "expected an integer >= 1"]),
        (["--lr", "nan"], ["--lr", "expected a number > 0"]),
        (["--dropout", "1"], ["--dropout", "expected a number in [0, 1)"]),
        (["--device", "gpu"], ["--device", "unknown device 'gpu'; expected auto, cpu, cuda or cuda:N"]),
        (["--tokenizer", MISSING], ["--tokenizer", "no such file", '"gpt2", "bpe:N"']),
        (["--tokenizer", "bpe:abc"], ["--tokenizer", "N in bpe:N must be an integer in [257, "]),
        (["--tokenizer", "bpe:10"], ["--tokenizer", "N in bpe:N must be an integer in [257, "]),
        (["--preset", "gpt5"], ["--preset", "invalid choice: 'gpt5'"]),
        (["--init-from", MISSING], ["--init-from", "no such file or folder"]),
        (["--resume", "--overwrite"], ["--overwrite: not allowed with argument --resume"]),
        (["--context-length", "100000"], ["--context-length 100000 is more than the tiny preset supports (128)"]),
        (["--preset", "gpt2", "--context-length", "2048"], ["--context-length 2048", "gpt2 preset supports (1024)"]),
        (["--min-lr", "0.1", "--lr", "0.01"], ["--min-lr 0.1 must not exceed --lr 0.01"]),
        (["--data", "/nonexistent-llm-test/*.txt"], ["data source", "matches no file or folder"]),
        (["--data-dir", __file__], ["--data-dir", "is a file; expected a folder"]),
    ],
)
def test_llm_train_refuses(argv, fragments, tmp_path, capsys):
    line = refused(train_main, argv + ["--out-dir", str(tmp_path / "out")], capsys)
    assert line.startswith("llm-train: error: ")
    for fragment in fragments:
        assert fragment in line
    assert not (tmp_path / "out").exists()  # refused before any work


def test_llm_train_checkpoint_cases(tmp_path, capsys):
    out = tmp_path / "out"
    recorded = {"preset": "tiny", "context_length": None, "tokenizer": None, "init_from": None}
    save_checkpoint(out / "ckpt.pt", {"model": {}, "model_config": {}, "tokenizer": {"name": "gpt2"}, "step": 5,
                                      "train_config": recorded})  # fmt: skip
    line = refused(train_main, ["--out-dir", str(out)], capsys)
    assert "already exists; pass --resume to continue it, --overwrite to replace it" in line
    line = refused(train_main, ["--out-dir", str(out), "--resume", "--preset", "gpt2"], capsys)
    assert "--preset gpt2 differs from the checkpoint's tiny" in line
    line = refused(train_main, ["--out-dir", str(out), "--resume", "--max-steps", "5"], capsys)
    assert "already at step 5; pass a larger --max-steps" in line
    line = refused(train_main, ["--out-dir", str(out / "ckpt.pt")], capsys)
    assert "--out-dir" in line and "ckpt.pt is a file; expected a folder" in line
    line = refused(train_main, ["--out-dir", str(tmp_path / "empty"), "--resume"], capsys)
    assert "--resume: no checkpoint at" in line


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--vocab-size", "10", "--train", "x.txt"], ["--vocab-size", "expected an integer in [257, 1048576], got '10'"]),
        (["--encode", "hi", "--tokenizer", MISSING], ["--tokenizer", "no such file"]),
        (["--encode", "hi", "--tokenizer", "bpe:abc"], ["--tokenizer", '"gpt2" or a tokenizer file']),
        ([], ["nothing to do"]),
        (["--train", "/nonexistent-llm-test/*.txt"], ["data source", "matches no file or folder"]),
    ],
)
def test_llm_tokenizer_refuses(argv, fragments, capsys):
    line = refused(tokenizer_main, argv, capsys)
    assert line.startswith("llm-tokenizer: error: ")
    for fragment in fragments:
        assert fragment in line


def tiny_model_and_tokenizer():
    tokenizer = train_bpe(["Hello, world. Hello there, world!"] * 4, vocab_size=280)
    config = GPTConfig(vocab_size=tokenizer.n_vocab, context_length=16, n_embd=16, n_layer=1, n_head=2)
    return GPT(config), tokenizer


def test_llm_export_writes_a_folder_that_loads_with_its_tokenizer(tmp_path, capsys):
    model, tokenizer = tiny_model_and_tokenizer()
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                           "tokenizer": tokenizer_to_dict(tokenizer), "step": 1})  # fmt: skip
    export_main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    assert "exported" in capsys.readouterr().out
    loaded, loaded_tokenizer = load_gpt2_with_tokenizer(tmp_path / "hf")
    assert loaded_tokenizer.encode("Hello, world") == tokenizer.encode("Hello, world")
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key

    line = refused(export_main, ["--checkpoint", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")], capsys)
    assert "already holds an export; pass --overwrite" in line
    line = refused(export_main, ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")], capsys)
    assert "--checkpoint" in line and "is a folder; expected a file" in line
    line = refused(export_main, ["--checkpoint", MISSING, "--out", str(tmp_path / "x")], capsys)
    assert "--checkpoint" in line and "no such file" in line


def test_an_export_without_its_tokenizer_is_refused_not_an_index_error(tmp_path):
    """A model with a small learned vocabulary cannot be driven by GPT-2's 50,257-token tokenizer."""
    model, tokenizer = tiny_model_and_tokenizer()
    save_hf(model, tmp_path, tokenizer)
    (tmp_path / TOKENIZER_FILE).unlink()
    with pytest.raises(ValueError, match=rf"{model.config.vocab_size} token embeddings but its tokenizer \(gpt2\) has 50257 tokens"):
        load_gpt2_with_tokenizer(tmp_path)


def test_the_resume_command_drops_what_starts_a_new_run():
    argv = ["--init-from", "gpt2 weights/", "--overwrite", "--max-steps", "9", "--init-from=x", "--lr", "1e-4"]
    assert resume_command(argv) == "llm-train --max-steps 9 --lr 1e-4 --resume"
    assert parse_args(["--max-steps", "9", "--lr", "1e-4", "--resume"]).resume  # and it parses


@pytest.mark.parametrize("main, prog", [(train_main, "llm-train"), (tokenizer_main, "llm-tokenizer"),
                                        (export_main, "llm-export"), (generate_main, "llm-generate")])  # fmt: skip
def test_help_shows_the_command_people_type(main, prog, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith(f"usage: {prog} ")


def test_python_m_llm_weights_help_prints_usage():
    result = subprocess.run([sys.executable, "-m", "llm.weights", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: llm-export ")


def test_llm_generate_refuses_and_reads_an_export(tmp_path, capsys):
    model, tokenizer = tiny_model_and_tokenizer()
    checkpoint = tmp_path / "ckpt.pt"
    save_checkpoint(checkpoint, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                 "tokenizer": tokenizer_to_dict(tokenizer), "step": 1})  # fmt: skip
    cases = [
        (["--checkpoint", str(checkpoint), "--max-new-tokens", "-5"], "--max-new-tokens: expected an integer >= 1"),
        (["--checkpoint", str(checkpoint), "--num-samples", "0"], "--num-samples: expected an integer >= 1"),
        (["--checkpoint", str(tmp_path)], "is a folder; expected a file"),
        (["--checkpoint", str(checkpoint), "--temperature", "-1"], "--temperature: expected a number >= 0"),
        (["--checkpoint", str(checkpoint), "--top-k", "0"], "--top-k: expected an integer >= 1"),
        (["--checkpoint", str(checkpoint), "--top-p", "0"], "--top-p: expected a number in (0, 1]"),
        (["--checkpoint", str(checkpoint), "--device", "gpu"], "--device: unknown device 'gpu'"),
    ]
    for argv, fragment in cases:
        line = refused(generate_main, argv, capsys)
        assert line.startswith("llm-generate: error: ") and fragment in line, line

    save_hf(model, tmp_path / "hf", tokenizer)  # what llm-export writes: loads with its own tokenizer
    generate_main(["--gpt2-weights", str(tmp_path / "hf"), "--prompt", "Hello", "--max-new-tokens", "3",
                   "--device", "cpu"])  # fmt: skip
    assert capsys.readouterr().out.startswith("Hello")


def test_llm_generate_checks_the_prompt_length_before_printing_anything(tmp_path, capsys):
    model, tokenizer = tiny_model_and_tokenizer()  # a context of 16 tokens
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                           "tokenizer": tokenizer_to_dict(tokenizer), "step": 1})  # fmt: skip
    line = refused(generate_main, ["--checkpoint", str(tmp_path / "ckpt.pt"), "--prompt", "Hello there " * 20,
                                   "--device", "cpu"], capsys)  # fmt: skip  (refused: nothing on stdout)
    assert line.startswith("llm-generate: error: --prompt is ") and "the model's context holds 16" in line


@pytest.mark.parametrize("command, argv", [
    ("llm.evaluate", ["--checkpoint", MISSING]),
    ("llm.finetune.cli", ["--checkpoint", MISSING, "--out-dir", MISSING]),
    ("llm.rag", ["ask", "--index", MISSING, "--checkpoint", __file__, "question"]),
])
def test_every_command_checks_device_when_parsing(command, argv, capsys):
    """Refused by the option's type, before a checkpoint or an index is looked at."""
    import importlib

    line = refused(importlib.import_module(command).main, [*argv, "--device", "gpu"], capsys)
    assert "error: argument --device: unknown device 'gpu'; expected auto, cpu, cuda or cuda:N" in line, line


@pytest.mark.parametrize("argv, message", [
    (["--prompts", MISSING, "--adapters", MISSING], "--adapters: not used by --prompts"),
    (["--tool-use", "--data", "arithmetic-tools", "--batch-size", "2"], "--data, --batch-size: not used by --tool-use"),
    (["--max-new-tokens", "5"], "--max-new-tokens: not used by the task's report"),
    (["--tool-use", "--answer-count", "0"], "--answer-count: --tool-use needs at least 1 record to answer, got 0"),
])
def test_llm_eval_refuses_options_its_run_would_ignore(argv, message, capsys):
    from llm.evaluate import main as eval_main

    line = refused(eval_main, ["--checkpoint", MISSING, *argv], capsys)
    assert line.startswith(f"llm-eval: error: {message}"), line


def test_seeds_are_range_checked_and_the_whole_range_works(tmp_path, capsys):
    model, tokenizer = tiny_model_and_tokenizer()
    checkpoint = str(tmp_path / "ckpt.pt")
    save_checkpoint(checkpoint, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                 "tokenizer": tokenizer_to_dict(tokenizer), "step": 1})  # fmt: skip
    expected = "--seed: expected an integer in [0, 9223372036854775807]"
    for main, argv in [(generate_main, ["--checkpoint", checkpoint, "--seed", "99999999999999999999"]),
                       (generate_main, ["--checkpoint", checkpoint, "--seed", "-1"]),
                       (train_main, ["--seed", "-1"]), (train_main, ["--seed", str(2**63)])]:  # fmt: skip
        assert expected in refused(main, argv, capsys)
    # The largest seed, plus the sample index, is still one torch.manual_seed takes.
    generate_main(["--checkpoint", checkpoint, "--seed", str(2**63 - 1), "--num-samples", "2", "--max-new-tokens", "2",
                   "--device", "cpu"])  # fmt: skip
    assert capsys.readouterr().out.count("-" * 40) == 1


def test_training_text_that_is_not_utf8_is_refused_naming_file_and_byte(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me, ".encode("latin-1") * 50)
    line = refused(train_main, ["--data", str(tmp_path / "latin1.txt"), "--data-dir", str(tmp_path / "cache"),
                                "--out-dir", str(tmp_path / "out"), "--device", "cpu"], capsys)  # fmt: skip
    assert line == (f"llm-train: error: {tmp_path / 'latin1.txt'}: not UTF-8 text: byte 3 (0xe9) invalid continuation "
                    f"byte; convert it first, e.g. iconv -f latin1 -t utf-8 latin1.txt > latin1.utf8.txt")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_checkpoint_is_the_option_and_init_from_its_old_spelling(tmp_path):
    for spelling in ("--checkpoint", "--init-from"):
        assert parse_args([spelling, str(tmp_path)]).init_from == str(tmp_path)
    argv = ["--checkpoint", "gpt2", "--max-steps", "9", "--checkpoint=x", "--init-from", "y"]
    assert resume_command(argv) == "llm-train --max-steps 9 --resume"


def test_help_of_every_command_shows_each_options_range_and_default():
    from test_fuzz_cli import console_scripts, load_command

    from llm.cli import Bounded, has_default

    for name, target in sorted(console_scripts().items()):
        parser, _ = load_command(target)
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS:
                continue
            shown = " ".join(formatter._format_action(action).split())  # the option's --help lines, unwrapped
            if isinstance(action.type, Bounded):
                assert action.type.expected in shown, (name, shown)
            if has_default(action):
                assert "default" in shown, (name, shown)


def test_llm_extra_args_are_added_to_a_console_scripts_options_and_announced(monkeypatch, capsys):
    monkeypatch.setenv("LLM_EXTRA_ARGS", "--max-steps 0")
    monkeypatch.setattr(sys, "argv", ["llm-train", "--max-steps", "5"])
    with pytest.raises(SystemExit) as exited:
        train_main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "llm-train: adding LLM_EXTRA_ARGS: --max-steps 0" in err
    assert "argument --max-steps: expected an integer >= 1, got '0'" in err  # the extra option came last and won
