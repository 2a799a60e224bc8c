"""llm.tokenizer: GPT-2's exact ids offline; BPE training, save and reload."""

import pytest

from llm.tokenizer import END_OF_TEXT, gpt2_tokenizer, load_tokenizer, save_tokenizer, train_bpe
from llm.tokenizer_cli import main

CORPUS = ["To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"] * 20 + [
    "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles.\n"
] * 10


def test_gpt2_ids():
    enc = gpt2_tokenizer()
    assert enc.encode("Hello, world") == [15496, 11, 995]
    assert enc.encode(END_OF_TEXT, allowed_special="all") == [50256]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    text = "  Ünïcödé — tabs\tand 123 numbers don't break"
    assert enc.decode(enc.encode(text)) == text


def test_train_bpe_round_trips_and_compresses(tmp_path):
    enc = train_bpe(CORPUS, vocab_size=300)
    assert enc.n_vocab == 300 and enc.eot_token == 299
    text = "To be, or not to be: ÿ unseen bytes \x00 still work"
    assert enc.decode(enc.encode(text)) == text
    sample = CORPUS[0]
    assert len(enc.encode(sample)) < len(sample.encode()) / 2  # merges learned
    assert train_bpe(CORPUS, vocab_size=300).encode(sample) == enc.encode(sample)  # deterministic

    path = tmp_path / "tok.json"
    save_tokenizer(enc, path)
    reloaded = load_tokenizer(path)
    assert reloaded.encode(sample) == enc.encode(sample)
    assert reloaded.eot_token == enc.eot_token
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]  # no temporary files left


def test_bad_tokenizer_input(tmp_path):
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe(["", ""], vocab_size=300)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        load_tokenizer(bad)


def test_tokenizer_cli(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("".join(CORPUS))
    main(["--train", str(tmp_path / "a.txt"), "--vocab-size", "280", "--out", str(tmp_path / "gpt2.json")])
    main(["--encode", "To be", "--tokenizer", str(tmp_path / "gpt2.json")])
    ids = eval(capsys.readouterr().out.splitlines()[-1])
    assert load_tokenizer(tmp_path / "gpt2.json").decode(ids) == "To be" and len(ids) < 5
    assert load_tokenizer(tmp_path / "gpt2.json").n_vocab == 280  # a learned tokenizer, even if named gpt2
