"""Guardrails: a policy file the runtime enforces, whatever the prompt or the documents say.

    {"max_input_chars": 2000,
     "blocked_patterns": ["(?i)credit card number"],
     "injection_phrases": ["ignore previous instructions", "reveal your system prompt"],
     "redact_emails": true, "redact_phones": true,
     "max_tool_calls": 3}

Rules (each intervention is reported with its rule's name, and logged):
  max_input_chars    a longer input is refused
  blocked_patterns   regular expressions: an input matching one is refused; output from the
                     first match on is withheld
  injection_phrases  an input containing one is refused; a retrieved source containing one is
                     dropped before it reaches the prompt (documents are data, not instructions)
  redact_emails / redact_phones   e-mail addresses / phone numbers in the output are replaced
  max_tool_calls     calls beyond this many per answer are not run
A refused input raises PolicyViolation (a ValueError: commands print it as one line and exit 2,
llm-serve answers HTTP 400 with code "content_policy"); a filtered output ends with
finish_reason "content_filter".
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_INJECTION_PHRASES = (
    "ignore previous instructions", "ignore all previous instructions", "ignore the above", "disregard the above",
    "disregard previous instructions", "forget your instructions", "reveal your system prompt", "you are now in",
    "new instructions:",
)  # fmt: skip
EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# A phone number: an optional +country code, then groups of digits with separators
# (555-123-4567, (555) 123-4567, +44 20 7946 0958); 7 digits at least, and not an ISO date.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?|\d{2,4}[\s.-])\d{2,4}(?:[\s.-]\d{2,4}){1,3}(?![\w-])")
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
REDACTED_EMAIL, REDACTED_PHONE = "[email redacted]", "[phone redacted]"
WITHHELD = "[withheld by the content policy]"


@dataclass
class Policy:
    max_input_chars: int = 8000
    blocked_patterns: list[str] = field(default_factory=list)
    injection_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_INJECTION_PHRASES))
    redact_emails: bool = True
    redact_phones: bool = True
    max_tool_calls: int = 3

    def __post_init__(self) -> None:
        for name in ("max_input_chars", "max_tool_calls"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "max_input_chars" else 0):
                raise ValueError(f"policy {name}: expected an integer >= {1 if name == 'max_input_chars' else 0}, got {value!r}")
        for name in ("blocked_patterns", "injection_phrases"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"policy {name}: expected a list of non-empty strings")
        for name in ("redact_emails", "redact_phones"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"policy {name}: expected true or false")
        try:
            self.compiled = [re.compile(p) for p in self.blocked_patterns]
        except re.error as error:
            raise ValueError(f"policy blocked_patterns: {error.pattern!r} is not a regular expression ({error})") from None


def load_policy(path: str | None) -> Policy:
    """The policy in a JSON file; None = the default policy."""
    if path is None:
        return Policy()
    if not Path(path).is_file():
        raise FileNotFoundError(f"policy file not found: {path}")
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"policy file {path}: not valid JSON ({error})") from None
    known = {f.name for f in dataclasses.fields(Policy)}
    if not isinstance(values, dict) or set(values) - known:
        unknown = sorted(set(values) - known) if isinstance(values, dict) else "not an object"
        raise ValueError(f"policy file {path}: unknown setting(s) {unknown}; expected some of {sorted(known)}")
    return Policy(**values)


@dataclass(frozen=True)
class Intervention:
    rule: str  # the policy setting that fired
    action: str  # refused, dropped_source, withheld, redacted, stopped
    detail: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class PolicyViolation(ValueError):
    """A refused input; str() is the refusal people see."""

    def __init__(self, intervention: Intervention):
        self.intervention = intervention
        super().__init__(f"refused by the content policy ({intervention.rule}: {intervention.detail})")


class Guardrails:
    def __init__(self, policy: Policy | None = None):
        self.policy = policy or Policy()

    def injection_phrase(self, text: str) -> str | None:
        folded = " ".join(text.casefold().split())
        return next((p for p in self.policy.injection_phrases if " ".join(p.casefold().split()) in folded), None)

    def check_input(self, text: str) -> None:
        """Raise PolicyViolation if the input breaks a rule."""
        if len(text) > self.policy.max_input_chars:
            raise PolicyViolation(Intervention("max_input_chars", "refused",
                                               f"{len(text)} characters, at most {self.policy.max_input_chars}"))
        for pattern in self.policy.compiled:
            if pattern.search(text):
                raise PolicyViolation(Intervention("blocked_patterns", "refused", f"matches {pattern.pattern!r}"))
        phrase = self.injection_phrase(text)
        if phrase:
            raise PolicyViolation(Intervention("injection_phrases", "refused", f"contains {phrase!r}"))

    def screen_sources(self, hits: list) -> tuple[list, list[Intervention]]:
        """Retrieved hits without those that carry injection phrases, and what was dropped."""
        kept, dropped = [], []
        for hit in hits:
            phrase = self.injection_phrase(hit.chunk.text)
            if phrase:
                dropped.append(Intervention("injection_phrases", "dropped_source",
                                            f"{hit.chunk.source}:{hit.chunk.start}-{hit.chunk.end} contains {phrase!r}"))
            else:
                kept.append(hit)
        return kept, dropped

    def filter_output(self, text: str) -> tuple[str, list[Intervention]]:
        """The output with blocked content withheld and contact details redacted."""
        interventions = []
        for pattern in self.policy.compiled:
            match = pattern.search(text)
            if match:
                text = text[: match.start()] + WITHHELD
                interventions.append(Intervention("blocked_patterns", "withheld", f"matches {pattern.pattern!r}"))
        if self.policy.redact_emails:
            text, count = EMAIL.subn(REDACTED_EMAIL, text)
            if count:
                interventions.append(Intervention("redact_emails", "redacted", f"{count} replaced"))
        if self.policy.redact_phones:
            phones = [m for m in PHONE.finditer(text) if is_phone_number(m.group())]
            for match in reversed(phones):
                text = text[: match.start()] + REDACTED_PHONE + text[match.end() :]
            if phones:
                interventions.append(Intervention("redact_phones", "redacted", f"{len(phones)} replaced"))
        return text, interventions


def is_phone_number(candidate: str) -> bool:
    return sum(c.isdigit() for c in candidate) >= 7 and not ISO_DATE.fullmatch(candidate)
