"""Your own fine-tuning data, read strictly, and deterministic train/val/test splits.

- Labelled text (classification): CSV or TSV rows of (label, text). A tab in the first
  line means tab-separated, read literally (no quoting), so the SMS Spam Collection's
  `ham<TAB>Go until jurong point...` file reads as it is; otherwise comma-separated with
  CSV quoting. A first row "label,text" (any case) is a header and skipped.
- Instruction records: a JSON list of objects, or JSONL (one object per line), each either
  Alpaca's {"instruction", "input" (optional), "output"} strings or OpenAI's fine-tuning
  format {"messages": [{"role": "system" | "user" | "assistant", "content"}, ...]}, a
  conversation with at least one assistant message (the turns the model learns).
Malformed input raises ValueError naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from llm.chat_template import ROLES, Message
from llm.files import read_utf8

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class LabelledText:
    label: str
    text: str


@dataclass(frozen=True)
class Instruction:
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Conversation:
    """A multi-turn record: the model learns every assistant message."""

    messages: tuple[Message, ...]


def read_labelled_text(path: str | Path) -> list[LabelledText]:
    path = Path(path)
    text = _read_text(path)
    tab_separated = "\t" in text.split("\n", 1)[0]
    if tab_separated:
        rows = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        rows = csv.reader(io.StringIO(text))
    examples = []
    for row in rows:
        line = rows.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if line == 1 and [cell.strip().lower() for cell in row] == ["label", "text"]:
            continue  # header
        if len(row) < 2 or (tab_separated and len(row) > 2):
            raise ValueError(
                f"{path}, line {line}: expected 2 {'tab-separated ' if tab_separated else ''}fields "
                f"(label, text), found {len(row)}"
            )
        label, body = row[0].strip(), ",".join(row[1:])  # an unquoted comma in CSV text is text
        if not label:
            raise ValueError(f"{path}, line {line}: field 'label' is empty")
        if not body.strip():
            raise ValueError(f"{path}, line {line}: field 'text' is empty")
        examples.append(LabelledText(label, body.strip()))
    if not examples:
        raise ValueError(f"{path}: no (label, text) rows")
    return examples


def read_instructions(path: str | Path) -> list[Instruction | Conversation]:
    """Records from a .json list or from JSON lines (.jsonl, or any file not starting with '[')."""
    path = Path(path)
    text = _read_text(path)
    records = []
    for line, record in _json_records(path, text):
        where = f"{path}, line {line}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object with 'instruction' and 'output' (or 'messages'), "
                             f"found {type(record).__name__}")
        records.append(_conversation(where, record["messages"]) if "messages" in record else instruction_record(where, record))
    if not records:
        raise ValueError(f"{path}: no instruction records")
    return records


def instruction_record(where: str, record: dict) -> Instruction:
    """An Alpaca record {"instruction", "input"?, "output"} checked; errors begin with `where`."""
    for field_name in ("instruction", "output"):
        if field_name not in record:
            raise ValueError(f"{where}: field {field_name!r} is missing")
    for field_name in ("instruction", "input", "output"):
        if not isinstance(record.get(field_name, ""), str):
            raise ValueError(f"{where}: field {field_name!r} must be a string, "
                             f"found {type(record[field_name]).__name__}")
    if not record["instruction"].strip():
        raise ValueError(f"{where}: field 'instruction' is empty")
    return Instruction(record["instruction"], record.get("input", ""), record["output"])


def _conversation(where: str, messages) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    parsed = []
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise ValueError(f"{where}: messages[{i}] must be {{'role': one of {', '.join(ROLES)}, "
                             f"'content': a string}}, found {json.dumps(message)[:80]}")
        if message["role"] == "system" and i > 0:
            raise ValueError(f"{where}: messages[{i}]: a system message may only come first")
        parsed.append(Message(message["role"], message["content"]))
    if not any(m.role == "assistant" for m in parsed):
        raise ValueError(f"{where}: field 'messages' has no assistant message to learn from")
    return Conversation(tuple(parsed))


def _json_records(path: Path, text: str):
    """(line number, parsed value) for each record of a JSON list or of JSON lines."""
    if text.lstrip().startswith("["):
        decoder, position = json.JSONDecoder(), text.index("[") + 1
        while True:  # decode the list element by element to know each one's line
            position = _skip(text, position, " \t\r\n")
            if position < len(text) and text[position] == "]":
                return
            line = text.count("\n", 0, position) + 1
            try:
                value, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {text.count(chr(10), 0, error.pos) + 1}: invalid JSON ({error.msg})") from None
            yield line, value
            position = _skip(text, position, " \t\r\n")
            if position < len(text) and text[position] == ",":
                position += 1
            elif position >= len(text) or text[position] != "]":
                raise ValueError(f"{path}, line {text.count(chr(10), 0, position) + 1}: expected ',' or ']' "
                                 f"after a record")
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: invalid JSON ({error.msg})") from None


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return read_utf8(path)


def split_examples(examples: list, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list]:
    """{"train", "val", "test"}: a seeded shuffle cut into test, val and the rest (train),
    the same on every run and machine. Each held-out split gets at least one example."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val and test fractions must be in [0, 1) with a sum below 1, got "
                         f"{val_fraction} and {test_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    num_test = max(1, round(len(order) * test_fraction)) if test_fraction else 0
    num_val = max(1, round(len(order) * val_fraction)) if val_fraction else 0
    if num_test + num_val >= len(order):
        raise ValueError(f"{len(examples)} examples are too few to hold out {num_val} for validation "
                         f"and {num_test} for test and still train on some")
    cuts = {"test": order[:num_test], "val": order[num_test : num_test + num_val],
            "train": order[num_test + num_val :]}  # fmt: skip
    return {split: [examples[i] for i in sorted(cuts[split])] for split in SPLITS}
