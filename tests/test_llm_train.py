"""llm.train / llm.generate on CPU: exact resume, DDP (gloo, 2 processes),
checkpoint errors, generation with and without the KV cache."""

import os
import shutil
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from llm.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from llm.data import BatchLoader
from llm.generate import complete, generate
from llm.generate_cli import main as generate_main
from llm.train import TrainConfig, build_optimizer, learning_rate, train
from llm.train import main as train_main

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (folder / f"play{i}.txt").write_text(TEXT * (4 + i))
    return folder


def tiny_run(corpus, tmp_path, **overrides):
    fields = dict(
        preset="tiny",
        data=[str(corpus)],
        data_dir=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "out"),
        tokenizer="bpe:300",
        context_length=32,
        batch_size=4,
        max_steps=6,
        warmup_steps=2,
        eval_interval=3,
        eval_batches=2,
        sample_tokens=8,
        progress=False,
        device="cpu",
    )
    return TrainConfig(**{**fields, **overrides})


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)
    assert learning_rate(200, cfg) == pytest.approx(0.1)


def test_optimizer_decays_only_matrices():
    from llm.config import GPTConfig
    from llm.model import GPT

    model = GPT(GPTConfig(vocab_size=50, context_length=8, n_embd=16, n_layer=1, n_head=2))
    decay, no_decay = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu").param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_parameters()


def test_training_learns_and_resumes_exactly(corpus, tmp_path):
    full = train(tiny_run(corpus, tmp_path / "full", max_steps=8, eval_interval=4))
    assert full["val_loss"][-1][1] < full["val_loss"][0][1] - 0.5
    assert (tmp_path / "full/out/loss.png").stat().st_size > 0

    first_half = train(tiny_run(corpus, tmp_path / "resumed", max_steps=4, lr_decay_steps=8, eval_interval=4))
    assert first_half["train_loss"] == full["train_loss"][:4]
    resumed = train(tiny_run(corpus, tmp_path / "resumed", max_steps=8, eval_interval=4, resume=True))
    assert resumed["train_loss"] == full["train_loss"]  # bit-identical loss sequence
    assert resumed["val_loss"] == full["val_loss"]

    checkpoint = load_checkpoint(tmp_path / "resumed/out/ckpt.pt")
    assert checkpoint["step"] == 8 and set(checkpoint["data"]) == {"epoch", "batch_index"}
    assert not list((tmp_path / "resumed/out").glob(".*tmp"))


def test_bad_checkpoints(corpus, tmp_path):
    cfg = tiny_run(corpus, tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/ckpt.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or not a checkpoint"):
        train(cfg)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "out/ckpt.pt")
    with pytest.raises(ValueError, match="not an llm checkpoint"):
        train(cfg)
    with pytest.raises(ValueError, match="unknown preset"):
        train(tiny_run(corpus, tmp_path, preset="gpt5"))


def test_generation_cache_cli_and_errors(corpus, tmp_path, capsys):
    train_main(
        ["--data", str(corpus), "--data-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out"),
         "--tokenizer", "bpe:300", "--context-length", "32", "--batch-size", "4", "--max-steps", "3",
         "--eval-interval", "3", "--eval-batches", "1", "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "validation loss" in out and "step 3: val loss" in out and "--- sample ---" in out  # even with --no-progress
    model, tokenizer = model_from_checkpoint(load_checkpoint(tmp_path / "out/ckpt.pt"))
    prompt = torch.tensor([tokenizer.encode("First Citizen:")] * 2)
    n = 32 - prompt.shape[1]  # fill the context exactly
    cached = generate(model, prompt, n, temperature=0, use_cache=True)
    uncached = generate(model, prompt, n, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (2, 32)
    longer = generate(model, prompt, 40, temperature=0)  # past the context: the cache is refilled
    assert torch.equal(longer[:, :32], cached) and longer.shape[1] == prompt.shape[1] + 40

    generator = torch.Generator().manual_seed(0)
    sampled = generate(model, prompt, 5, temperature=1.0, top_k=5, top_p=0.9, generator=generator)
    assert sampled.shape == (2, prompt.shape[1] + 5)
    assert complete(model, tokenizer, "All:", 5, seed=1) == complete(model, tokenizer, "All:", 5, seed=1)
    with pytest.raises(ValueError, match="longer than the model's context_length 32"):
        generate(model, torch.zeros(1, 33, dtype=torch.long), 1)

    generate_main(["--checkpoint", str(tmp_path / "out/ckpt.pt"), "--prompt", "All:", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.startswith("All:")


def cli_args(corpus, run_dir, cache_dir, max_steps):
    """The command line of tiny_run (same model, data and schedule)."""
    return [
        "--data", str(corpus), "--data-dir", str(cache_dir), "--out-dir", str(run_dir / "out"), "--preset", "tiny",
        "--tokenizer", "bpe:300", "--context-length", "32", "--batch-size", "4", "--max-steps", str(max_steps),
        "--warmup-steps", "2", "--eval-interval", "4", "--eval-batches", "2", "--sample-tokens", "8", "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """A 6-step run with evaluations at steps 4 and 6, its history and final checkpoint."""
    root = tmp_path_factory.mktemp("uninterrupted")
    history = train(tiny_run(corpus, root, max_steps=6, eval_interval=4, data_dir=str(root.parent / "shared-cache")))
    return history, load_checkpoint(root / "out/ckpt.pt")


def signal_during_step(monkeypatch, step: int, signum: int) -> None:
    """Deliver a real signal to this process while training step `step` (1-based) fetches its batch."""
    fetch = BatchLoader.next_batch
    calls = []

    def next_batch(self, device="cpu"):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signum)
        return fetch(self, device)

    monkeypatch.setattr(BatchLoader, "next_batch", next_batch)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resuming_matches_an_uninterrupted_run(
    corpus, tmp_path, monkeypatch, capsys, uninterrupted, signum
):
    expected_history, expected = uninterrupted
    argv = cli_args(corpus, tmp_path, tmp_path.parent / "shared-cache", max_steps=6)
    signal_during_step(monkeypatch, 3, signum)
    with pytest.raises(SystemExit) as stopped:
        train_main(argv)
    assert stopped.value.code == 128 + signum
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "Traceback" not in message
    assert f"interrupted by {signal.Signals(signum).name} at step 3" in message
    assert "continue with: llm-train" in message and message.endswith("--resume")
    assert load_checkpoint(tmp_path / "out/ckpt.pt")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    monkeypatch.undo()
    argv.remove("--preset")  # a resumed run takes the preset (and the rest of the model) from its checkpoint
    argv.remove("tiny")
    train_main(argv + ["--resume"])  # --progress auto: no bar when stderr is not a terminal
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "step 6: val loss" in captured.out
    resumed = load_checkpoint(tmp_path / "out/ckpt.pt")
    assert resumed["history"] == expected["history"]
    assert resumed["history"]["train_loss"] == expected_history["train_loss"]  # bit-identical losses
    for key, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key
    assert resumed["train_config"]["preset"] == "tiny"


def test_an_existing_checkpoint_is_replaced_only_when_asked(corpus, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/ckpt.pt").write_bytes(b"a step-1300 checkpoint")
    with pytest.raises(FileExistsError, match="already exists; pass --resume to continue it, --overwrite to replace"):
        train(tiny_run(corpus, tmp_path, max_steps=1))
    assert (tmp_path / "out/ckpt.pt").read_bytes() == b"a step-1300 checkpoint"
    train(tiny_run(corpus, tmp_path, max_steps=1, eval_batches=1, sample_tokens=1, overwrite=True))
    assert load_checkpoint(tmp_path / "out/ckpt.pt")["step"] == 1


def test_resume_refuses_what_contradicts_the_checkpoint(corpus, tmp_path):
    path = tmp_path / "out/ckpt.pt"
    recorded = {"preset": "tiny", "context_length": 32, "tokenizer": "bpe:300", "init_from": None}
    fake = {"model": {}, "model_config": {}, "tokenizer": {"name": "gpt2"}, "step": 3, "train_config": recorded}
    save_checkpoint(path, fake)
    cases = [
        ({"preset": "gpt2"}, "--preset gpt2 differs from the checkpoint's tiny"),
        ({"context_length": 64}, "--context-length 64 differs from the checkpoint's 32"),
        ({"max_steps": 3}, "--max-steps 3: .* is already at step 3"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            train(tiny_run(corpus, tmp_path, resume=True, **{"tokenizer": None, "context_length": None, **overrides}))
    save_checkpoint(path, dict(fake, task="classify"))
    with pytest.raises(ValueError, match="is a fine-tune \\(task classify\\); continue it with llm-finetune --resume"):
        train(tiny_run(corpus, tmp_path, resume=True, preset=None, tokenizer=None, context_length=None))


def _ddp_worker(rank, world_size, port, cfg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    train(cfg)
    torch.distributed.destroy_process_group()


def test_ddp_matches_gradient_accumulation(corpus, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    single = tiny_run(corpus, tmp_path / "single", max_steps=3, grad_accum_steps=2, eval_interval=3)
    history = train(single)
    ddp = tiny_run(corpus, tmp_path / "ddp", max_steps=3, data_dir=single.data_dir, eval_interval=3)
    mp.spawn(_ddp_worker, args=(2, port, ddp), nprocs=2, join=True)

    expected, actual = load_checkpoint(tmp_path / "single/out/ckpt.pt"), load_checkpoint(tmp_path / "ddp/out/ckpt.pt")
    assert actual["history"]["train_loss"] == pytest.approx(history["train_loss"], rel=1e-5)
    for key, tensor in expected["model"].items():
        torch.testing.assert_close(actual["model"][key], tensor, atol=1e-4, rtol=1e-4, msg=key)
    assert len(actual["rng"]) == 2  # both ranks' RNG states, written by rank 0 only


def recorded_saves(monkeypatch, copy_step: int | None = None, copy_to=None) -> list[int]:
    """The steps llm.train saves checkpoints at, as they happen; the checkpoint of copy_step is
    copied to copy_to (what a run killed just after it would leave behind)."""
    import llm.train

    saves, write = [], llm.train.save_checkpoint

    def save_checkpoint(path, checkpoint):
        write(path, checkpoint)
        saves.append(checkpoint["step"])
        if checkpoint["step"] == copy_step:
            shutil.copy(path, copy_to)

    monkeypatch.setattr(llm.train, "save_checkpoint", save_checkpoint)
    return saves


def test_checkpoints_are_saved_every_save_interval_besides_evaluations(corpus, tmp_path, monkeypatch):
    saves = recorded_saves(monkeypatch)
    cache = str(tmp_path.parent / "shared-cache")
    train(tiny_run(corpus, tmp_path / "often", max_steps=3, eval_interval=100, save_interval=1e-9, data_dir=cache))
    assert saves == [1, 2, 3]  # every step (the interval is tiny), once each
    saves.clear()
    train(tiny_run(corpus, tmp_path / "default", max_steps=3, eval_interval=100, data_dir=cache))
    assert saves == [3]  # 300 s between interval saves: only the last evaluation's within 3 quick steps


def test_a_checkpoint_saved_by_the_clock_resumes_exactly(corpus, tmp_path, monkeypatch, uninterrupted):
    """A run killed outright (no signal handler runs) keeps the last interval's checkpoint, and
    resuming from it gives the uninterrupted run's losses and weights."""
    expected_history, expected = uninterrupted
    recorded_saves(monkeypatch, copy_step=2, copy_to=tmp_path / "step-2.pt")
    cache = str(tmp_path.parent / "shared-cache")
    train(tiny_run(corpus, tmp_path / "often", max_steps=6, eval_interval=4, save_interval=1e-9, data_dir=cache))
    (tmp_path / "killed/out").mkdir(parents=True)
    shutil.copy(tmp_path / "step-2.pt", tmp_path / "killed/out/ckpt.pt")
    history = train(tiny_run(corpus, tmp_path / "killed", max_steps=6, eval_interval=4, data_dir=cache, resume=True))
    assert history["train_loss"] == expected_history["train_loss"]  # bit-identical
    resumed = load_checkpoint(tmp_path / "killed/out/ckpt.pt")
    for key, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key
