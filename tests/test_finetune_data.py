"""Fine-tuning data: user files read strictly (errors name file, line and field), built-in
Shakespeare datasets and splits deterministic."""

import json
from collections import Counter

import pytest
from finetune_helpers import one_thread  # noqa: F401

from llm.finetune.datasets import Instruction, LabelledText, read_instructions, read_labelled_text, split_examples
from llm.finetune.shakespeare import PLAYS, builtin_dataset, passages


def test_sms_spam_collection_reads_as_it_is(tmp_path):
    # The file's own layout: label TAB text, no header, quotes and commas inside the text.
    path = tmp_path / "SMSSpamCollection"
    path.write_text('ham\tGo until jurong point, crazy.. Available only in bugis n great world la e buffet...\n'
                    'spam\tFree entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121\n'
                    'ham\t"Hello" he said, "how r u?\n', encoding="utf-8")  # fmt: skip
    examples = read_labelled_text(path)
    assert [e.label for e in examples] == ["ham", "spam", "ham"]
    assert examples[0].text.startswith("Go until jurong point, crazy..")
    assert examples[2].text == '"Hello" he said, "how r u?'


def test_csv_with_header_and_quoted_commas(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('label,text\npos,"Great, really great"\nneg,bad\n\n', encoding="utf-8")
    assert read_labelled_text(path) == [LabelledText("pos", "Great, really great"), LabelledText("neg", "bad")]


def assert_refused(read, path, content: str, message: str) -> None:
    """A data file holding `content` is refused by `read` with a ValueError matching `message`."""
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("ham\thello\nspam\n", r"x.tsv, line 2: expected 2 tab-separated fields \(label, text\), found 1"),
        ("ham\thello\nspam\tfree\textra\n", r"x.tsv, line 2: expected 2 tab-separated fields .* found 3"),
        ("ham\thello\n\tno label\n", r"x.tsv, line 2: field 'label' is empty"),
        ("ham\thello\nham\thi\nspam\t  \n", r"x.tsv, line 3: field 'text' is empty"),
        ("", r"x.tsv: no \(label, text\) rows"),
    ],
)
def test_malformed_labelled_text(tmp_path, content, message):
    assert_refused(read_labelled_text, tmp_path / "x.tsv", content, message)


def test_instructions_from_json_and_jsonl(tmp_path):
    records = [{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Greet.", "output": "Hi"}]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    expected = [Instruction("Add.", "1 2", "3"), Instruction("Greet.", "", "Hi")]
    assert read_instructions(tmp_path / "a.json") == expected
    assert read_instructions(tmp_path / "a.jsonl") == expected


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', r"r.jsonl, line 2: field 'output' is missing"),
        ('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": 3}\n',
         r"r.jsonl, line 3: field 'output' must be a string, found int"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n', r"r.jsonl, line 2: invalid JSON"),
        ('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a",\n  "input": ["x"], "output": "b"}\n]',
         r"r.jsonl, line 3: field 'input' must be a string, found list"),
        ('[\n {"instruction": "a", "output": "b"},\n "just text"\n]', r"r.jsonl, line 3: expected an object"),
        ('[\n {"instruction": " ", "output": "b"}\n]', r"r.jsonl, line 2: field 'instruction' is empty"),
        ('[\n {"instruction": "a", "output": "b"}\n {"instruction": "a", "output": "b"}\n]',
         r"r.jsonl, line 3: expected ',' or '\]'"),
    ],
)  # fmt: skip
def test_malformed_instructions(tmp_path, content, message):
    assert_refused(read_instructions, tmp_path / "r.jsonl", content, message)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_instructions(tmp_path / "nope.json")
    (tmp_path / "latin1.tsv").write_bytes(b"ham\tok\nspam\tcaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1.tsv, line 2: not UTF-8"):
        read_labelled_text(tmp_path / "latin1.tsv")


def test_splits_are_deterministic_disjoint_and_complete():
    items = list(range(103))
    splits = split_examples(items, 0.1, 0.2, seed=0)
    assert splits == split_examples(items, 0.1, 0.2, seed=0)
    assert splits != split_examples(items, 0.1, 0.2, seed=1)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [72, 10, 21]
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == items
    with pytest.raises(ValueError, match="too few"):
        split_examples([1, 2], 0.1, 0.1, seed=0)


def test_builtin_datasets_are_deterministic_and_sound():
    assert all(len(passages(stem)) >= 60 for stem in PLAYS)  # the speech parser finds every play's text
    genre = builtin_dataset("shakespeare-genre")
    assert genre == builtin_dataset("shakespeare-genre")
    assert Counter(e.label for e in genre) == {"comedy": 2000, "history": 2000, "tragedy": 2000}
    assert len({e.text for e in genre}) > 0.99 * len(genre)
    plays = builtin_dataset("shakespeare-play")
    assert len(Counter(e.label for e in plays)) == 37
    records = builtin_dataset("shakespeare-instruct")
    assert records == builtin_dataset("shakespeare-instruct") and len(records) == 1500
    kinds = Counter(getattr(r, "instruction", "conversation") for r in records)
    assert kinds == {"Which play is this passage from?": 375, "Who speaks these lines?": 375, "Continue the passage.": 375,
                     "conversation": 375}  # multi-turn: a system message and two questions about one passage
    titles = {title for title, _ in PLAYS.values()}
    assert all(r.output in titles for r in records if getattr(r, "instruction", "").startswith("Which play"))
    assert all(r.messages[2].content in titles for r in records if kinds.get(getattr(r, "instruction", None)) is None)
    assert all(r.output and r.input for r in records if hasattr(r, "output"))
    with pytest.raises(ValueError, match="unknown built-in dataset"):
        builtin_dataset("shakespeare-sonnets")
