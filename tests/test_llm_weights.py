"""llm.weights: Hugging Face GPT-2 checkpoints in and out."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llm.checkpoint import load_model_state  # noqa: E402
from llm.weights import load_gpt2, load_hf_state_dict, read_hf_state_dict, save_hf  # noqa: E402


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=3)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_load_hf_checkpoint_matches_transformers(hf_model, tmp_path, safe_serialization):
    hf_model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    model = load_gpt2(tmp_path, vocab_pad_multiple=64).eval()
    idx = torch.randint(0, 101, (2, 19))
    with torch.no_grad():
        expected = hf_model(idx).logits
        actual, _ = model(idx)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_export_round_trip(hf_model, tmp_path):
    torch.manual_seed(1)
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_gpt2(tmp_path / "hf").eval()
    with torch.no_grad():  # make sure the export carries our values, not just the originals
        model.transformer.h[1].mlp.c_fc.weight.add_(0.1)
    save_hf(model, tmp_path / "ours")
    reloaded_hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    reloaded = load_gpt2(tmp_path / "ours").eval()
    idx = torch.randint(0, 101, (1, 32))
    with torch.no_grad():
        ours, _ = model(idx)
        torch.testing.assert_close(reloaded_hf(idx).logits, ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(idx)[0], ours, atol=0, rtol=0)


def test_shape_mismatch_names_the_key(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    state = read_hf_state_dict(tmp_path)
    state["transformer.h.1.attn.c_proj.weight"] = torch.zeros(48, 47)
    model = load_gpt2(tmp_path)
    with pytest.raises(ValueError, match=r"h\.1\.attn\.c_proj\.weight.*\(48, 47\).*\(48, 48\)"):
        load_hf_state_dict(model, state)
    del state["transformer.h.1.attn.c_proj.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_hf_state_dict(model, state)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        read_hf_state_dict(tmp_path.parent)


def test_load_model_state_reports_mismatch():
    from llm.config import GPTConfig
    from llm.model import GPT

    small = GPT(GPTConfig(vocab_size=50, context_length=8, n_embd=16, n_layer=1, n_head=2))
    other = GPT(GPTConfig(vocab_size=60, context_length=8, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="transformer.wte.weight: checkpoint \\(60, 16\\) vs model \\(50, 16\\)"):
        load_model_state(small, other.state_dict())


def test_exported_weights_get_the_same_permissions_as_their_siblings(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    save_hf(load_gpt2(tmp_path / "hf"), tmp_path / "ours")
    mode = (tmp_path / "ours/model.safetensors").stat().st_mode & 0o777
    assert mode == (tmp_path / "ours/config.json").stat().st_mode & 0o777, oct(mode)  # 0644 under umask 022
