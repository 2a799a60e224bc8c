"""Built-in fine-tuning datasets made from the package's own Shakespeare corpus (public
domain), so every task runs offline out of the box. Deterministic: the same records, in
the same splits, on every machine.

  shakespeare-genre     passage -> comedy / tragedy / history (the First Folio's grouping;
                        Pericles, not in the Folio, with the comedies), balanced classes
  shakespeare-play      passage -> which of the 37 plays, balanced classes
  shakespeare-instruct  instruction records: which play is this passage from, who speaks
                        these lines, continue the passage; and multi-turn conversations (a
                        system message, then both questions about one passage)

A passage is the start of one speech (at most PASSAGE_LINES lines). Speeches are found by
the plays' layout: a paragraph whose first line is the speaker's name (e.g. "HAMLET." or
"Ham."), then the lines spoken.
"""

from __future__ import annotations

import functools
import random
import re

from llm.data import DEFAULT_CORPUS_DIR, read_document
from llm.chat_template import Message
from llm.finetune.datasets import Conversation, Instruction, LabelledText

# file stem -> (title, genre)
PLAYS = {
    "alls_well_that_ends_well": ("All's Well That Ends Well", "comedy"),
    "antony_and_cleopatra": ("Antony and Cleopatra", "tragedy"),
    "as_you_like_it": ("As You Like It", "comedy"),
    "comedy_of_errors": ("The Comedy of Errors", "comedy"),
    "coriolanus": ("Coriolanus", "tragedy"),
    "cymbeline": ("Cymbeline", "tragedy"),
    "hamlet": ("Hamlet", "tragedy"),
    "henry_iv_part_1": ("Henry IV, Part 1", "history"),
    "henry_iv_part_2": ("Henry IV, Part 2", "history"),
    "henry_v": ("Henry V", "history"),
    "henry_vi_part_1": ("Henry VI, Part 1", "history"),
    "henry_vi_part_2": ("Henry VI, Part 2", "history"),
    "henry_vi_part_3": ("Henry VI, Part 3", "history"),
    "henry_viii": ("Henry VIII", "history"),
    "john": ("King John", "history"),
    "julius_caesar": ("Julius Caesar", "tragedy"),
    "lear": ("King Lear", "tragedy"),
    "loves_labours_lost": ("Love's Labour's Lost", "comedy"),
    "macbeth": ("Macbeth", "tragedy"),
    "measure_for_measure": ("Measure for Measure", "comedy"),
    "merchant_of_venice": ("The Merchant of Venice", "comedy"),
    "merry_wives_of_windsor": ("The Merry Wives of Windsor", "comedy"),
    "midsummer_nights_dream": ("A Midsummer Night's Dream", "comedy"),
    "much_ado_about_nothing": ("Much Ado About Nothing", "comedy"),
    "othello": ("Othello", "tragedy"),
    "pericles": ("Pericles", "comedy"),
    "richard_ii": ("Richard II", "history"),
    "richard_iii": ("Richard III", "history"),
    "romeo_and_juliet": ("Romeo and Juliet", "tragedy"),
    "taming_of_the_shrew": ("The Taming of the Shrew", "comedy"),
    "tempest": ("The Tempest", "comedy"),
    "timon_of_athens": ("Timon of Athens", "tragedy"),
    "tragedy_of_titus_andronicus": ("Titus Andronicus", "tragedy"),
    "troilus_and_cressida": ("Troilus and Cressida", "tragedy"),
    "twelfth_night": ("Twelfth Night", "comedy"),
    "two_gentlemen_of_verona": ("The Two Gentlemen of Verona", "comedy"),
    "winters_tale": ("The Winter's Tale", "comedy"),
}
BUILTIN_DATASETS = ("shakespeare-genre", "shakespeare-play", "shakespeare-instruct")
PASSAGE_LINES = 4
MIN_PASSAGE_CHARS = 80  # shorter speeches ("Ay, he.") say too little to classify
SPEAKER = re.compile(r"[A-Z][A-Za-z' ,&-]{0,30}\.?")
PLAY_START = re.compile(r"^(ACT|Act|INDUCTION|PROLOGUE)", re.MULTILINE)
NOT_SPEAKERS = ("ACT", "SCENE", "Scene", "Enter", "Exit", "Exeunt", "PERSONS", "DRAMATIS", "EPILOGUE", "PROLOGUE")


@functools.lru_cache(maxsize=None)
def speeches(stem: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(speaker, spoken lines) for every speech of a play, in order; stage directions dropped."""
    text = read_document(DEFAULT_CORPUS_DIR / f"{stem}.txt.gz")
    text = text[PLAY_START.search(text).start() :]  # after the list of persons
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        if len(lines) < 2 or not SPEAKER.fullmatch(lines[0]) or lines[0].startswith(NOT_SPEAKERS):
            continue
        if not (lines[0].endswith(".") or lines[0].isupper()):
            continue  # a line of verse, not a name
        spoken = [line for line in lines[1:] if line and not line.startswith("[")]
        if spoken:
            found.append((speaker_name(lines[0]), tuple(spoken)))
    return tuple(found)


def speaker_name(heading: str) -> str:
    """ "SIR TOBY." -> "Sir Toby"; abbreviations as printed: "Ham." -> "Ham"."""
    name = heading.rstrip(".").strip()
    return name.title() if name.isupper() else name


def passages(stem: str) -> list[tuple[str, str]]:
    """(speaker, passage) for the speeches long enough to classify."""
    found = []
    for speaker, spoken in speeches(stem):
        passage = "\n".join(spoken[:PASSAGE_LINES])
        if len(passage) >= MIN_PASSAGE_CHARS:
            found.append((speaker, passage))
    return found


def classification_examples(by: str, per_class: int, seed: int) -> list[LabelledText]:
    """Passages labelled by "genre" or "play", per_class of each label drawn at random (seeded)."""
    rng = random.Random(seed)
    pools: dict[str, list[str]] = {}
    for stem, (title, genre) in PLAYS.items():
        pools.setdefault(genre if by == "genre" else title, []).extend(p for _, p in passages(stem))
    examples = []
    for label in sorted(pools):
        chosen = rng.sample(pools[label], min(per_class, len(pools[label])))
        examples.extend(LabelledText(label, passage) for passage in chosen)
    return examples


SYSTEM = "You answer questions about Shakespeare's plays."


def instruction_records(count: int, seed: int) -> list[Instruction | Conversation]:
    """`count` records, the four kinds in turn, from speeches drawn at random (seeded).
    Inputs are two lines at most, so that a prompt fits the tiny preset's 128-token context."""
    rng = random.Random(seed)
    pool = [(PLAYS[stem][0], speaker, spoken) for stem in PLAYS for speaker, spoken in speeches(stem)]
    pool = [entry for entry in pool if len(entry[2]) >= 2 and len(entry[2][0]) + len(entry[2][1]) <= 110]
    records = []
    for i in range(count):
        title, speaker, spoken = rng.choice(pool)
        if i % 4 == 0:
            records.append(Instruction("Which play is this passage from?", "\n".join(spoken[:2]), title))
        elif i % 4 == 1:
            records.append(Instruction("Who speaks these lines?", "\n".join(spoken[:2]), speaker))
        elif i % 4 == 2:
            records.append(Instruction("Continue the passage.", spoken[0], spoken[1]))
        else:  # a follow-up question: the second answer needs the first turn's passage
            records.append(Conversation((
                Message("system", SYSTEM),
                Message("user", "Which play is this passage from?\n\n" + "\n".join(spoken[:2])),
                Message("assistant", title),
                Message("user", "Who speaks these lines?"),
                Message("assistant", speaker),
            )))
    return records


def builtin_dataset(name: str, seed: int = 0) -> list:
    """The named built-in dataset's examples (LabelledText or Instruction records)."""
    if name == "shakespeare-genre":
        return classification_examples("genre", per_class=2000, seed=seed)
    if name == "shakespeare-play":
        return classification_examples("play", per_class=40, seed=seed)
    if name == "shakespeare-instruct":
        return instruction_records(1500, seed=seed)
    raise ValueError(f"unknown built-in dataset {name!r}; expected one of {', '.join(BUILTIN_DATASETS)}")
