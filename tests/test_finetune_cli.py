"""llm-finetune end to end at tiny size on CPU, for every task; exact resume of a fine-tune,
also after SIGINT / SIGTERM; an existing checkpoint replaced only when asked; llm-train
refusing to resume one; one-line errors for bad input."""

import json
import re
import signal

import pytest
import torch
from finetune_helpers import one_thread, save_tiny_checkpoint  # noqa: F401
from test_llm_train import signal_during_step

from llm.checkpoint import load_checkpoint, model_from_checkpoint
from llm.finetune import FinetuneConfig, finetune
from llm.finetune import main as finetune_main
from llm.train import main as train_main

WORDS = {"spam": "free prize win cash now claim", "ham": "see you at dinner tonight love"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune-data")
    save_tiny_checkpoint(folder / "base.pt")
    rows = [f"{label}\t{' '.join(WORDS[label].split()[i % 3 :])} {i}" for i in range(40) for label in WORDS]
    (folder / "sms.tsv").write_text("\n".join(rows) + "\n")
    records = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(30)]
    records += [{"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{i} and 2?"},
                              {"role": "assistant", "content": str(i + 2)}]} for i in range(10)]  # OpenAI's format
    (folder / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (folder / "notes.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return folder


def run(files, out, *options):
    finetune_main(["--init-from", str(files / "base.pt"), "--out-dir", str(out), "--device", "cpu", "--no-progress",
                   "--batch-size", "4", "--max-steps", "4", "--eval-interval", "2", "--warmup-steps", "1",
                   "--lr", "1e-3", *options])  # fmt: skip
    return load_checkpoint(out / "ckpt.pt")


def test_classify_with_lora_end_to_end(files, tmp_path, capsys):
    checkpoint = run(files, tmp_path, "--task", "classify", "--data", str(files / "sms.tsv"), "--lora-rank", "4")
    assert "| test | accuracy |" in capsys.readouterr().out
    assert checkpoint["task"] == "classify" and checkpoint["classifier"]["labels"] == ["ham", "spam"]
    assert checkpoint["finetune_config"]["lora_rank"] == 4 and checkpoint["step"] == 4
    model_from_checkpoint(checkpoint)  # merged: a plain GPT loads
    assert not any("lora" in key for key in checkpoint["model"])
    for name in ("adapters/adapters.safetensors", "adapters/adapter_config.json", "report.json", "report.md",
                 "confusion.png", "loss.png"):  # fmt: skip
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"task", "models", "before", "after"} and report["after"]["test"]["examples"] == 8


def test_instruct_and_lm_end_to_end(files, tmp_path):
    checkpoint = run(files, tmp_path / "instruct", "--task", "instruct", "--data", str(files / "records.jsonl"),
                     "--answer-count", "2", "--answer-tokens", "3")  # fmt: skip
    assert checkpoint["task"] == "instruct" and checkpoint["chat_template"] == "chat"  # how to prompt it
    answers = json.loads((tmp_path / "instruct/answers.json").read_text())
    assert len(answers) == 2 and set(answers[0]) == {"instruction", "input", "expected", "before", "after"}
    checkpoint = run(files, tmp_path / "lm", "--task", "lm", "--data", str(files / "notes.txt"), "--lora-rank", "2",
                     "--data-dir", str(tmp_path / "cache"), "--context-length", "32")  # fmt: skip
    assert checkpoint["task"] == "lm" and checkpoint["model_config"]["context_length"] == 32
    report = json.loads((tmp_path / "lm/report.json").read_text())
    assert report["after"]["val"]["perplexity"] > 1


# A classifier with LoRA and dropout, so the resumed run must restore the RNG, the data position,
# the optimizer, the adapters and the head to match.
RESUMABLE = ("--task", "classify", "--data", "sms.tsv", "--lora-rank", "2", "--dropout", "0.1")


def resumable(files):
    return [str(files / o) if o == "sms.tsv" else o for o in RESUMABLE]


@pytest.fixture(scope="module")
def straight(files, tmp_path_factory):
    """The final checkpoint of an uninterrupted 4-step fine-tune (evaluations at steps 2 and 4)."""
    return run(files, tmp_path_factory.mktemp("straight"), *resumable(files))


def assert_same_fine_tune(resumed, straight):
    assert resumed["step"] == 4 and resumed["history"] == straight["history"]  # bit-identical losses
    for key in straight["model"]:
        assert torch.equal(resumed["model"][key], straight["model"][key]), key
    assert torch.equal(resumed["classifier"]["head"]["weight"], straight["classifier"]["head"]["weight"])


def test_resume_continues_the_fine_tune_exactly(files, tmp_path, capsys, straight):
    options = resumable(files)
    finetune_main([*options, "--init-from", str(files / "base.pt"), "--out-dir", str(tmp_path / "resumed"),
                   "--device", "cpu", "--no-progress", "--batch-size", "4", "--max-steps", "2", "--eval-interval", "2",
                   "--warmup-steps", "1", "--lr", "1e-3"])  # fmt: skip
    finetune_main(["--resume", "--out-dir", str(tmp_path / "resumed"), "--max-steps", "4", "--no-progress"])
    resumed = load_checkpoint(tmp_path / "resumed/ckpt.pt")
    assert resumed["finetune_config"]["data"] == [str(files / "sms.tsv")]
    assert_same_fine_tune(resumed, straight)

    # A fine-tune's settings stay: changing them on --resume is refused, and llm-train refuses it.
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(["--resume", "--out-dir", str(tmp_path / "resumed"), "--lr", "0.1"])
    assert exit_info.value.code == 2
    assert "--lr: cannot change when resuming" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--resume", "--out-dir", str(tmp_path / "resumed"), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert re.search(r"is a fine-tune .task classify.; continue it with llm-finetune --resume", capsys.readouterr().err)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--task", "classify", "--data", "BAD"], r"BAD, line 2: expected 2 tab-separated fields"),
        (["--task", "instruct", "--data", "sms.tsv"], r"sms.tsv, line 1: invalid JSON"),
        (["--task", "classify", "--data", "shakespeare-instruct"], "is not a dataset for --task classify"),
        (["--lora-rank", "-1"], "argument --lora-rank: expected an integer >= 0, got '-1'"),
        (["--trainable-blocks", "some"], "argument --trainable-blocks: expected an integer >= 0, got 'some'"),
        (["--trainable-blocks", "3"], r"--trainable-blocks must be in \[0, 2\] or 'all', got 3"),
        (["--lr", "0"], "argument --lr: expected a number > 0, got '0'"),
        (["--resume"], r"--resume: no checkpoint at .*out/ckpt.pt"),
        (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
        (["--progress", "sometimes"], "argument --progress: invalid choice: 'sometimes'"),
    ],
)
def test_bad_input_is_one_line(files, tmp_path, capsys, options, message):
    (tmp_path / "BAD").write_text("ham\tfine\nspam\n")
    options = [str(files / o) if o == "sms.tsv" else str(tmp_path / o) if o == "BAD" else o for o in options]
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(["--init-from", str(files / "base.pt"), "--out-dir", str(tmp_path / "out"), "--device", "cpu",
                       "--max-steps", "1", "--no-progress", *options])  # fmt: skip
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("llm-finetune: error: ") and re.search(message, error), error


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resuming_matches_an_uninterrupted_fine_tune(
    files, tmp_path, monkeypatch, capsys, straight, signum
):
    out = tmp_path / "out"
    signal_during_step(monkeypatch, 3, signum)  # between the evaluations at steps 2 and 4
    with pytest.raises(SystemExit) as stopped:
        finetune_main(["--init-from", str(files / "base.pt"), "--out-dir", str(out), "--device", "cpu",
                       "--batch-size", "4", "--max-steps", "4", "--eval-interval", "2", "--warmup-steps", "1",
                       "--lr", "1e-3", *resumable(files)])  # fmt: skip
    assert stopped.value.code == 128 + signum
    captured = capsys.readouterr()
    assert "step 2: val loss" in captured.out  # evaluation lines print without a bar (stderr is no terminal)
    message = captured.err.strip()
    assert "\n" not in message and "Traceback" not in message
    assert message == (
        f"llm-finetune: interrupted by {signal.Signals(signum).name} at step 3; checkpoint saved to {out / 'ckpt.pt'}; "
        f"continue with: llm-finetune --resume --out-dir {out}"
    )
    assert load_checkpoint(out / "ckpt.pt")["step"] == 3
    assert not list(out.glob(".*tmp"))  # written atomically
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    monkeypatch.undo()
    finetune_main(["--resume", "--out-dir", str(out)])  # the printed command, --progress auto
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "step 4: val loss" in captured.out
    assert_same_fine_tune(load_checkpoint(out / "ckpt.pt"), straight)


def test_an_existing_checkpoint_is_replaced_only_when_asked(files, tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"a step-1300 checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        run(files, tmp_path, "--task", "classify", "--data", str(files / "sms.tsv"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"llm-finetune: error: {tmp_path / 'ckpt.pt'} already exists; pass --resume to continue it, "
        f"--overwrite to replace it, or another --out-dir\n"
    )
    assert (tmp_path / "ckpt.pt").read_bytes() == b"a step-1300 checkpoint"
    checkpoint = run(files, tmp_path, "--task", "classify", "--data", str(files / "sms.tsv"), "--overwrite",
                     "--max-steps", "1", "--progress", "on")  # fmt: skip
    assert checkpoint["step"] == 1 and "\r" in capsys.readouterr().err  # --progress on: the bar draws anyway


def test_lm_fine_tune_of_gpt2_weights(files, tmp_path):
    import transformers
    config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    result = finetune(FinetuneConfig(
        task="lm", init_from=str(tmp_path / "gpt2"), data=[str(files / "notes.txt")], out_dir=str(tmp_path / "ft"),
        data_dir=str(tmp_path / "cache"), context_length=32, batch_size=4, max_steps=6, lr=3e-3, eval_interval=6,
        eval_batches=2, device="cpu", progress=False,
    ))  # fmt: skip
    history = result["history"]["val_loss"]
    assert history[-1][1] < history[0][1]
    checkpoint = load_checkpoint(tmp_path / "ft/ckpt.pt")
    assert checkpoint["model_config"]["context_length"] == 32 and checkpoint["tokenizer"] == {"name": "gpt2"}
