"""llm.checkpoint: a checksum over the payload, so damaged or truncated files are refused
with one line naming the file; files from before the checksum still load."""

from pathlib import Path

import pytest
import torch

from llm.checkpoint import load_checkpoint, package_version, payload_digest, save_checkpoint
from llm.config import GPTConfig
from llm.files import write_text
from llm.model import GPT


@pytest.fixture
def checkpoint():
    model = GPT(GPTConfig(vocab_size=300, context_length=16, n_embd=32, n_layer=2, n_head=2))
    return {
        "model": model.state_dict(),
        "model_config": model.config.to_dict(),
        "tokenizer": {"name": "gpt2"},
        "step": 7,
        "history": {"train_loss": [3.5, 3.25], "val_loss": [[0, 4.0]]},
        "rng": [{"cpu": torch.get_rng_state()}],
    }


def assert_same(loaded, expected):
    assert payload_digest(loaded) == payload_digest(expected)
    for key, tensor in expected["model"].items():
        assert torch.equal(loaded["model"][key], tensor), key


def test_round_trip_carries_checksum_and_version(checkpoint, tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, checkpoint)
    on_disk = torch.load(path, weights_only=True)
    assert set(on_disk) == {"payload", "sha256", "llmkernels_version"}
    assert on_disk["sha256"] == payload_digest(checkpoint) and on_disk["llmkernels_version"] == package_version()
    assert_same(load_checkpoint(path), checkpoint)


def test_checksum_sees_every_value(checkpoint):
    digest = payload_digest(checkpoint)
    changed = dict(checkpoint, step=8)
    assert payload_digest(changed) != digest
    weights = dict(checkpoint["model"])
    name = next(iter(weights))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-7  # one float, barely changed
    assert payload_digest(dict(checkpoint, model=weights)) != digest


def test_old_checkpoint_without_checksum_still_loads(checkpoint, tmp_path):
    torch.save(checkpoint, tmp_path / "old.pt")  # how checkpoints were written before
    assert_same(load_checkpoint(tmp_path / "old.pt"), checkpoint)


@pytest.mark.parametrize("where", [0.02, 0.3, 0.55, 0.8, 0.97])
def test_flipped_bytes_are_refused_naming_the_file(checkpoint, tmp_path, where):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, checkpoint)
    data = bytearray(path.read_bytes())
    start = int(len(data) * where)
    span = range(start, min(start + 4096, len(data)))
    for i in span:
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert "damaged" in message or "corrupt" in message or "not an llm checkpoint" in message


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_file_is_refused(checkpoint, tmp_path, keep):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, checkpoint)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="corrupt or not a checkpoint") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_a_folder_or_a_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="is a folder; expected a file such as .*ckpt.pt"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_flipped_weight_bytes_that_torch_load_accepts_fail_the_checksum(checkpoint, tmp_path):
    """Bytes inside a tensor's storage load without complaint from torch; only the checksum sees them."""
    marker = torch.arange(1024, dtype=torch.float32) + 0.5
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, dict(checkpoint, marker=marker))
    data = bytearray(path.read_bytes())
    start = data.find(marker.numpy().tobytes())
    assert start > 0
    data[start + 100 : start + 200] = bytes(b ^ 0xFF for b in data[start + 100 : start + 200])
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["payload"]["marker"], marker)  # torch takes it
    with pytest.raises(ValueError, match=f"checkpoint {path} is damaged"):
        load_checkpoint(path)


def test_interrupted_write_leaves_the_old_checkpoint_byte_identical(checkpoint, tmp_path, monkeypatch):
    """A save that dies half-way (disk full, a kill) leaves the previous file exactly as it was,
    and no temporary file behind."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, checkpoint)
    before = path.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, destination):
        real_save(obj, destination)
        data = Path(destination).read_bytes()
        Path(destination).write_bytes(data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, dict(checkpoint, step=8))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert load_checkpoint(path)["step"] == 7


def test_interrupted_text_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_text(path, "old")
    real_write_text = Path.write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_text(path, "new contents")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


class RunsCodeWhenUnpickled:
    """An object whose unpickling calls a function: Path(marker).touch() here, anything in an attack."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare-dict", "with-checksum"])
def test_a_checkpoint_carrying_a_pickled_callable_is_refused_without_running_it(checkpoint, tmp_path, wrapped):
    marker = tmp_path / "code-ran"
    payload = dict(checkpoint, extra=RunsCodeWhenUnpickled(marker))
    if wrapped:  # as save_checkpoint writes it, the digest taken over the harmless payload
        payload = {"payload": payload, "sha256": payload_digest(checkpoint), "llmkernels_version": "0"}
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="corrupt or not a checkpoint") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)
    assert not marker.exists()
