"""Rubrics (versioned prompt sets shipped as text files, and their aggregation) and the per-item outcomes.

A rubric asks sub-score questions in two groups, semantic consistency (`sc`) and perceptual quality
(`pq`), each answered 0-10. A group's score is the minimum of its sub-scores (one failed aspect
sinks the group, as in VIEScore) and overall = sqrt(sc * pq). Every result carries the rubric id,
its version and the rule as text, so a number is never read without what produced it.

Per-item outcome of `Judge.score`: a wire `Verdict`, or an `ItemFailure` carrying its error code
(bad_input, model_error, unparseable_reply; returned in its slot, not raised).

Torch-free, so the service's settings and tests import it without the model stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from importlib import resources
from string import Template
from typing import Literal

import msgspec

from editstack.wire.protocol import JudgeMode, Verdict

MODES = ("logits", "generate")
GROUPS = ("sc", "pq")
DEFAULT_RUBRIC = "viescore"
SCORE_MIN, SCORE_MAX = 0, 10


class UnknownRubricError(ValueError):
    """No rubric file ships under this id."""


def answer_distribution(first_digit: Sequence[float], zero_after_one: float) -> tuple[list[float], float]:
    """The answers 0..10 from next-token probabilities: their renormalised distribution and their mass.

    `first_digit[d]` is P(first answer token = "d"), d = 0..9; `zero_after_one` is P("0" | "1").
    "10" is two tokens, so P(10) = P("1") * P("0" | "1") and P(1) = P("1") * (1 - P("0" | "1")).
    The mass is what the judge put on score answers at all; it must be > 0 to renormalise.
    """
    if len(first_digit) != 10:
        raise ValueError(f"need the probabilities of the 10 digits, got {len(first_digit)}")
    one = first_digit[1]
    answers = [first_digit[0], one * (1 - zero_after_one), *first_digit[2:], one * zero_after_one]
    mass = math.fsum(answers)
    if not mass > 0:  # underflow (or NaN): there is nothing to renormalise
        raise ValueError("no probability on the answers 0..10")
    return [p / mass for p in answers], mass


def expected_score(distribution: Sequence[float]) -> float:
    """The expected answer under `distribution` over 0..10; the bound only absorbs float rounding."""
    return min(math.fsum(k * p for k, p in enumerate(distribution)), float(SCORE_MAX))


class Group(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A group of sub-scores: the images its prompts show, and its `generate`-mode prompt."""

    title: str
    images: tuple[Literal["source", "edited"], ...]
    prompt: str


class Question(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One sub-score, asked on its own in `logits` mode."""

    name: str
    group: str
    prompt: str


class Rubric(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A versioned prompt set; its layout is documented at the top of `rubrics/viescore.txt`."""

    id: str
    version: str
    description: str
    system: str
    groups: dict[str, Group]
    questions: tuple[Question, ...]

    def sub_scores(self, group: str) -> tuple[str, ...]:
        """The names of the questions in `group`, in file order."""
        return tuple(q.name for q in self.questions if q.group == group)

    @property
    def aggregation(self) -> str:
        """The aggregation rule as text, written into every result."""
        groups = "; ".join(f"{g} = min({', '.join(self.sub_scores(g))})" for g in GROUPS)
        return f"{groups}; overall = sqrt(sc * pq)"

    def question_prompt(self, question: Question, instruction: str) -> str:
        """`question`'s logits-mode prompt for `instruction`."""
        return Template(question.prompt).substitute(instruction=instruction)

    def group_prompt(self, group: str, instruction: str) -> str:
        """`group`'s generate-mode prompt for `instruction`."""
        return Template(self.groups[group].prompt).substitute(instruction=instruction)

    def result(
        self,
        *,
        mode: JudgeMode,
        sub_scores: dict[str, float],
        raw: dict[str, list[float | str]],
        score_mass: dict[str, float] | None = None,
        attempts: int = 0,
    ) -> Verdict:
        """Aggregate `sub_scores` into a Verdict; they must be exactly this rubric's, each in 0..10."""
        expected = {q.name for q in self.questions}
        if set(sub_scores) != expected:
            raise ValueError(f"rubric {self.id!r} needs sub-scores {sorted(expected)}, got {sorted(sub_scores)}")
        for name, value in sub_scores.items():
            if not SCORE_MIN <= value <= SCORE_MAX:  # also rejects NaN
                raise ValueError(f"sub-score {name!r} = {value!r} is outside {SCORE_MIN}..{SCORE_MAX}")
        sc, pq = (min(sub_scores[n] for n in self.sub_scores(g)) for g in GROUPS)
        return Verdict(
            rubric_id=self.id,
            rubric_version=self.version,
            mode=mode,
            sub_scores=sub_scores,
            sc=sc,
            pq=pq,
            overall=math.sqrt(sc * pq),
            aggregation=self.aggregation,
            score_mass=score_mass or {},
            raw=raw,
            attempts=attempts,
        )


def known_rubrics() -> list[str]:
    """Ids of the rubrics shipped with the scorer, sorted."""
    folder = resources.files(__package__) / "rubrics"
    return sorted(f.name.removesuffix(".txt") for f in folder.iterdir() if f.name.endswith(".txt"))


@cache
def load_rubric(rubric_id: str) -> Rubric:
    """Read and check the shipped rubric `rubric_id`; raises UnknownRubricError naming the known ones."""
    known = known_rubrics()
    if rubric_id not in known:
        raise UnknownRubricError(f"unknown rubric {rubric_id!r}; known rubrics: {', '.join(known)}")
    name = f"rubrics/{rubric_id}.txt"
    try:
        rubric = msgspec.toml.decode((resources.files(__package__) / name).read_bytes(), type=Rubric)
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError too
        raise ValueError(f"rubric file {name}: {e}") from e
    _check(rubric, name)
    return rubric


def _check(rubric: Rubric, name: str) -> None:
    """Cross-field rules the schema cannot express; a shipped file that breaks one is a defect."""
    problems = []
    if rubric.id != name.removeprefix("rubrics/").removesuffix(".txt"):
        problems.append(f"id {rubric.id!r} differs from the file name")
    if tuple(rubric.groups) != GROUPS:
        problems.append(f"groups must be {list(GROUPS)} in that order, got {list(rubric.groups)}")
    names = [q.name for q in rubric.questions]
    if len(set(names)) != len(names):
        problems.append(f"question names repeat: {names}")
    for q in rubric.questions:
        if q.group not in GROUPS:
            problems.append(f"question {q.name!r} names unknown group {q.group!r}")
    for g, group in rubric.groups.items():
        if not rubric.sub_scores(g):
            problems.append(f"group {g!r} has no questions")
        if not group.images or len(set(group.images)) != len(group.images):
            problems.append(f"group {g!r} must show each of its images once, got {list(group.images)}")
        # the generate prompt must ask for exactly the keys the reply schema will require
        missing = [n for n in rubric.sub_scores(g) if f'"{n}"' not in group.prompt]
        if missing:
            problems.append(f"group {g!r} prompt does not ask for {missing}")
    prompts = {f"group {g!r}": group.prompt for g, group in rubric.groups.items()}
    prompts |= {f"question {q.name!r}": q.prompt for q in rubric.questions}
    for label, text in prompts.items():
        template = Template(text)
        if not template.is_valid() or set(template.get_identifiers()) - {"instruction"}:
            problems.append(f"{label} prompt may use only the placeholder $instruction")
    if problems:
        raise ValueError(f"rubric file {name}: " + "; ".join(problems))
