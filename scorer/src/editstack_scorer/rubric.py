"""Rubrics (versioned prompt sets shipped as text files, and their aggregation) and the per-item outcomes.

A rubric asks sub-score questions in groups, each answered on the rubric's scale (0-10 or 1-5). A
group may need what only some items carry (a knowledge explanation, a reference image or text): it
is asked only of those. Two rules aggregate an item's sub-scores: `viescore` (groups sc and pq,
each the minimum of its sub-scores, as in VIEScore; overall = sqrt(sc * pq)) and `mean` (overall =
the mean of the sub-scores the item was asked; the benchmark's own tables are built from the
sub-scores by the runner). Every result carries the rubric id, its version, the hash of its text
and the rule as text, so a number is never read without what produced it. A user's folder of
rubric files (SCORER_RUBRIC_DIR) adds rubrics or replaces shipped ones by id.

Per-item outcome of `Judge.score`: a wire `Verdict`, or an `ItemFailure` carrying its error code
(bad_input, model_error, unparseable_reply; returned in its slot, not raised).

Torch-free, so the service's settings and tests import it without the model stack.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence, Set
from functools import cache
from importlib import resources
from pathlib import Path
from string import Template
from typing import Literal

import msgspec

from editstack.wire.protocol import JudgeMode, Verdict

MODES = ("logits", "generate")
DEFAULT_RUBRIC = "viescore"
# What an item may carry beyond its instruction; a group that needs one is asked only of items that have it.
NEEDS = ("explanation", "reference_image", "reference_text")
PLACEHOLDERS = ("instruction", "explanation", "reference_text")
VIESCORE_GROUPS = ("sc", "pq")


class UnknownRubricError(ValueError):
    """No rubric file ships under this id."""


def answer_distribution(first_digit: Sequence[float], zero_after_one: float,
                        scale: tuple[int, int] = (0, 10)) -> tuple[list[float], float]:
    """The answers lo..hi of `scale` from next-token probabilities: their renormalised distribution and mass.

    `first_digit[d]` is P(first answer token = "d"), d = 0..9; `zero_after_one` is P("0" | "1"), used
    only on a scale that reaches 10: "10" is two tokens, so P(10) = P("1") * P("0" | "1") and
    P(1) = P("1") * (1 - P("0" | "1")). On a 1-5 scale the answers are the five digits themselves.
    The mass is what the judge put on score answers at all; it must be > 0 to renormalise.
    """
    if len(first_digit) != 10:
        raise ValueError(f"need the probabilities of the 10 digits, got {len(first_digit)}")
    lo, hi = scale
    if hi == 10:
        one = first_digit[1]
        answers = [first_digit[0], one * (1 - zero_after_one), *first_digit[2:], one * zero_after_one][lo:]
    else:
        answers = list(first_digit[lo:hi + 1])
    mass = math.fsum(answers)
    if not mass > 0:  # underflow (or NaN): there is nothing to renormalise
        raise ValueError(f"no probability on the answers {lo}..{hi}")
    return [p / mass for p in answers], mass


def expected_score(distribution: Sequence[float], scale: tuple[int, int] = (0, 10)) -> float:
    """The expected answer under `distribution` over lo..hi; the bound only absorbs float rounding."""
    lo, hi = scale
    return min(lo + math.fsum(k * p for k, p in enumerate(distribution)), float(hi))


Need = Literal["explanation", "reference_image", "reference_text"]


class Group(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A group of sub-scores: the images its prompts show, its `generate`-mode prompt, what an item
    must carry for the group to be asked (`needs`, e.g. a knowledge explanation), and what makes
    another group ask in its place (`unless`: the item carries one of these)."""

    title: str
    images: tuple[Literal["source", "edited", "reference"], ...]
    prompt: str
    needs: tuple[Need, ...] = ()
    unless: tuple[Need, ...] = ()


class Question(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One sub-score, asked on its own in `logits` mode."""

    name: str
    group: str
    prompt: str


class Rubric(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A versioned prompt set; its layout is documented at the top of `rubrics/viescore.txt`.
    `sha256` is the hash of the file's bytes, set when it is read."""

    id: str
    version: str
    description: str
    system: str
    groups: dict[str, Group]
    questions: tuple[Question, ...]
    scale: tuple[int, int] = (0, 10)
    aggregation_rule: Literal["viescore", "mean"] = "viescore"
    sha256: str = ""

    def sub_scores(self, group: str) -> tuple[str, ...]:
        """The names of the questions in `group`, in file order."""
        return tuple(q.name for q in self.questions if q.group == group)

    def asked(self, has: Set[str]) -> tuple[str, ...]:
        """The groups asked of an item that carries `has` (a subset of NEEDS), in file order."""
        return tuple(name for name, group in self.groups.items()
                     if set(group.needs) <= has and not set(group.unless) & has)

    @property
    def aggregation(self) -> str:
        """The aggregation rule as text, written into every result."""
        if self.aggregation_rule == "viescore":
            groups = "; ".join(f"{g} = min({', '.join(self.sub_scores(g))})" for g in VIESCORE_GROUPS)
            return f"{groups}; overall = sqrt(sc * pq)"
        lo, hi = self.scale
        return f"overall = mean of the sub-scores the item was asked ({lo}-{hi})"

    def question_prompt(self, question: Question, context: Mapping[str, str]) -> str:
        """`question`'s logits-mode prompt, its placeholders filled from `context`."""
        return Template(question.prompt).substitute(context)

    def group_prompt(self, group: str, context: Mapping[str, str]) -> str:
        """`group`'s generate-mode prompt, its placeholders filled from `context`."""
        return Template(self.groups[group].prompt).substitute(context)

    def result(
        self,
        *,
        mode: JudgeMode,
        sub_scores: dict[str, float],
        raw: dict[str, list[float | str]],
        asked: Sequence[str] | None = None,
        score_mass: dict[str, float] | None = None,
        attempts: int = 0,
        visual_tokens: int = 0,
    ) -> Verdict:
        """Aggregate `sub_scores` into a Verdict; they must be exactly those of the `asked` groups
        (default: every group), each within the rubric's scale."""
        asked = tuple(self.groups) if asked is None else tuple(asked)
        expected = {q.name for q in self.questions if q.group in asked}
        if set(sub_scores) != expected:
            raise ValueError(f"rubric {self.id!r} needs sub-scores {sorted(expected)}, got {sorted(sub_scores)}")
        lo, hi = self.scale
        for name, value in sub_scores.items():
            if not lo <= value <= hi:  # also rejects NaN
                raise ValueError(f"sub-score {name!r} = {value!r} is outside {lo}..{hi}")
        sc = pq = None
        if self.aggregation_rule == "viescore":
            sc, pq = (min(sub_scores[n] for n in self.sub_scores(g)) for g in VIESCORE_GROUPS)
            overall = math.sqrt(sc * pq)
        else:
            overall = math.fsum(sub_scores.values()) / len(sub_scores)
        return Verdict(
            rubric_id=self.id,
            rubric_version=self.version,
            rubric_sha256=self.sha256,
            scale=self.scale,
            mode=mode,
            sub_scores=sub_scores,
            sc=sc,
            pq=pq,
            overall=overall,
            aggregation=self.aggregation,
            score_mass=score_mass or {},
            raw=raw,
            attempts=attempts,
            visual_tokens=visual_tokens,
        )


def known_rubrics(folder: str = "") -> list[str]:
    """Ids of the rubrics shipped with the scorer and of those in `folder` (a user's own), sorted."""
    shipped = resources.files(__package__) / "rubrics"
    names = {f.name.removesuffix(".txt") for f in shipped.iterdir() if f.name.endswith(".txt")}
    if folder:
        names |= {f.stem for f in Path(folder).expanduser().glob("*.toml")}
    return sorted(names)


@cache
def load_rubric(rubric_id: str, folder: str = "") -> Rubric:
    """Read and check rubric `rubric_id`: `folder`/<id>.toml where a user put one there (it replaces
    the shipped rubric of that id), else the shipped file. Raises UnknownRubricError naming the known
    ones, or ValueError naming the file and what is wrong with it."""
    own = Path(folder).expanduser() / f"{rubric_id}.toml" if folder else None
    if own is not None and own.is_file():
        name, data = str(own), own.read_bytes()
    elif rubric_id in known_rubrics():
        name = f"rubrics/{rubric_id}.txt"
        data = (resources.files(__package__) / name).read_bytes()
    else:
        raise UnknownRubricError(f"unknown rubric {rubric_id!r}; known rubrics: {', '.join(known_rubrics(folder))}")
    try:
        rubric = msgspec.toml.decode(data, type=Rubric)
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError too
        raise ValueError(f"rubric file {name}: {e}") from e
    if rubric.sha256:
        raise ValueError(f"rubric file {name}: sha256 is computed from the file, not written in it")
    _check(rubric, rubric_id, name)
    return msgspec.structs.replace(rubric, sha256=hashlib.sha256(data).hexdigest())


def _check(rubric: Rubric, rubric_id: str, name: str) -> None:
    """Cross-field rules the schema cannot express; a shipped file that breaks one is a defect."""
    problems = []
    if rubric.id != rubric_id:
        problems.append(f"id {rubric.id!r} differs from the file name")
    lo, hi = rubric.scale
    if lo not in (0, 1) or not lo < hi <= 10:
        # logits mode reads single-digit answers, and 10 as "1" then "0"
        problems.append(f"scale must run from 0 or 1 up to at most 10, got {list(rubric.scale)}")
    if rubric.aggregation_rule == "viescore" and tuple(rubric.groups) != VIESCORE_GROUPS:
        problems.append(f"the viescore rule needs groups {list(VIESCORE_GROUPS)} in that order, "
                        f"got {list(rubric.groups)}")
    # a sub-score may be asked by several groups (variants for items with and without a reference),
    # but never twice of one item: checked for every combination of what an item may carry
    for has in ({n for n, bit in zip(NEEDS, f"{k:03b}", strict=True) if bit == "1"} for k in range(2 ** len(NEEDS))):
        names = [q.name for q in rubric.questions if q.group in rubric.asked(has)]
        if len(set(names)) != len(names):
            problems.append(f"an item with {sorted(has) or 'nothing'} beside its instruction would be asked "
                            f"{sorted(n for n in set(names) if names.count(n) > 1)} twice")
    for q in rubric.questions:
        if q.group not in rubric.groups:
            problems.append(f"question {q.name!r} names unknown group {q.group!r}")
    for g, group in rubric.groups.items():
        if not rubric.sub_scores(g):
            problems.append(f"group {g!r} has no questions")
        if not group.images or len(set(group.images)) != len(group.images):
            problems.append(f"group {g!r} must show each of its images once, got {list(group.images)}")
        if "reference" in group.images and "reference_image" not in group.needs:
            problems.append(f"group {g!r} shows the reference image, so it must need reference_image")
        # the generate prompt must ask for exactly the keys the reply schema will require
        missing = [n for n in rubric.sub_scores(g) if f'"{n}"' not in group.prompt]
        if missing:
            problems.append(f"group {g!r} prompt does not ask for {missing}")
    prompts = {f"group {g!r}": (group.prompt, group.needs) for g, group in rubric.groups.items()}
    prompts |= {f"question {q.name!r}": (q.prompt, rubric.groups[q.group].needs) for q in rubric.questions
                if q.group in rubric.groups}
    for label, (text, needs) in prompts.items():
        template = Template(text)
        # a prompt may use what every item has, and what its group needs
        allowed = {"instruction"} | {n for n in needs if n in PLACEHOLDERS}
        if not template.is_valid() or set(template.get_identifiers()) - allowed:
            problems.append(f"{label} prompt may use only the placeholders {sorted(allowed)}")
    if problems:
        raise ValueError(f"rubric file {name}: " + "; ".join(problems))
