"""The benchmarks' own protocols: which rubric judges a benchmark's items, and how its published
table is built from the verdicts, in the benchmark's layout and scale.

    protocol  rubric    table                                                      published judge
    viescore  (the scorer's default, SCORER_RUBRIC: viescore unless set)
                        (the run's own tables: by category, language, group)       -
    gedit     viescore  SC, PQ, O (0-10) per task type, per language, full set     GPT-4.1
                        and intersection subset; average = mean of the task types
    kris      kris      VC, VQ, IF, KP on 0-100 ((s - 1) x 25) per category,       GPT-4o
                        knowledge group and type, and overall
    rise      rise      accuracy, score and dimensions (0-100) per category        GPT-4.1
    imgedit   imgedit   1-5 score per edit type; overall = mean of the types       GPT-4.1

Each rule's source is noted where it is applied. The dataset's reader chooses the protocol
(`protocol_for`); the run's `scorer.protocol` setting overrides it. A failed item is never a number:
tables count scored items beside the items they cover.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from editstack.runner.datasets import Reference
from editstack.runner.runfolder import ItemRecord

Cell = str | float | int | None


@dataclass(frozen=True)
class Table:
    """One table of a benchmark's report: a title, its column names and rows (the first cell names the row)."""

    title: str
    columns: list[str]
    rows: list[list[Cell]]
    note: str = ""


def _every_reference(category: str, references: Sequence[Reference]) -> list[Reference]:
    return list(references)


@dataclass(frozen=True)
class Protocol:
    """A benchmark's way of judging and reporting: its rubric, its tables, and which of an item's
    references its judge is given (by category)."""

    id: str
    rubric: str | None  # the scorer's rubric id; None: the scorer's default
    published_judge: str  # who judged the benchmark's published table, and where that is stated
    tables: Callable[[Sequence[ItemRecord]], list[Table]] = field(repr=False)
    judge_references: Callable[[str, Sequence[Reference]], list[Reference]] = field(default=_every_reference,
                                                                                   repr=False)


def _scored(records: Iterable[ItemRecord]) -> list[ItemRecord]:
    return [r for r in records if r.status == "scored" and r.score is not None]


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _percent(score: float | None) -> float | None:
    """A 1-5 score on the benchmarks' 0-100 scale: (s - 1) x 25."""
    return None if score is None else (score - 1) * 25


# ---- GEdit-Bench ------------------------------------------------------------------------------
# Step1X-Edit GEdit-Bench/calculate_statistics.py (commit 570eba6): per language, the mean of SC, PQ
# and O (O = sqrt(SC * PQ) per item, viescore/__init__.py) over each task type's items, and the
# average row the unweighted mean of the task types' means; the same again over the items whose
# Intersection_exist is true.

_GEDIT_LANGUAGES = (("en", "EN"), ("zh", "CN"))


def gedit_tables(records: Sequence[ItemRecord]) -> list[Table]:
    tables = []
    for language, label in _GEDIT_LANGUAGES:
        in_language = [r for r in records if r.language == language]
        if not in_language:
            continue
        for subset, chosen in (("full set", in_language),
                               ("intersection subset", [r for r in in_language if r.metadata.get("Intersection_exist")])):
            if chosen:
                tables.append(_gedit_table(f"GEdit-Bench {label}, {subset}", chosen))
    return tables


def _gedit_table(title: str, records: Sequence[ItemRecord]) -> Table:
    rows: list[list[Cell]] = []
    means: list[tuple[float, float, float]] = []
    for category in sorted({r.category for r in records}):
        items = [r for r in records if r.category == category]
        scored = _scored(items)
        row = [_mean([r.score.sc for r in scored]), _mean([r.score.pq for r in scored]),
               _mean([r.score.overall for r in scored])]
        rows.append([category, len(scored), len(items), *row])
        if scored:
            means.append(tuple(row))  # type: ignore[arg-type]
    average = [_mean([m[k] for m in means]) for k in range(3)]
    rows.append(["average (of the task types)", sum(r[1] for r in rows), sum(r[2] for r in rows), *average])
    return Table(title, ["task type", "scored", "items", "SC", "PQ", "O"], rows,
                 "0-10; O = sqrt(SC x PQ) per item; the average weighs each task type alike")


# ---- KRIS-Bench -------------------------------------------------------------------------------
# Kris_Bench metrics_*.py keep each item's 1-5 scores; the repository has no summarising script.
# This follows the one most used with it (ByteDance-Seed/Bagel eval/gen/kris/summarize.py): every
# score as (s - 1) x 25; per category and per group each dimension's mean over the items; AVG the
# mean of every dimension value of every item (so a knowledge item, with four, weighs 4/3). Bagel
# gives the knowledge types and the overall as AVG only; their dimension means are shown too.

# metrics_knowledge.py judges these ten categories with the explanation (and knowledge plausibility);
# metrics_view_change.py alone shows the ground-truth image; the other scripts use neither.
KRIS_KNOWLEDGE_CATEGORIES = frozenset({"abstract_reasoning", "mathematics", "practical_knowledge", "medicine",
                                       "rule-based_reasoning", "biology", "geography", "chemistry", "humanities",
                                       "physics"})


def kris_references(category: str, references: Sequence[Reference]) -> list[Reference]:
    """What KRIS-Bench's scripts give the judge of a `category` item."""
    return [r for r in references if (r.kind == "explanation" and category in KRIS_KNOWLEDGE_CATEGORIES)
            or (r.kind == "image" and category == "viewpoint_change")]


_KRIS_DIMENSIONS = (("VC", "visual_consistency"), ("VQ", "visual_quality"), ("IF", "instruction_following"),
                    ("KP", "knowledge_plausibility"))


def kris_tables(records: Sequence[ItemRecord]) -> list[Table]:
    by_category = _kris_rows(records, lambda r: [r.category])
    by_group = _kris_rows(records, lambda r: r.groups[1:2])
    by_type = _kris_rows(records, lambda r: r.groups[:1])
    overall = _kris_rows(records, lambda r: ["overall"])
    columns = ["", "scored", "items", *(short for short, _ in _KRIS_DIMENSIONS), "AVG"]
    note = "0-100: (score - 1) x 25 of the judge's 1-5; AVG pools every dimension of every item"
    return [Table("KRIS-Bench by category", ["category", *columns[1:]], by_category, note),
            Table("KRIS-Bench by knowledge group", ["group", *columns[1:]], by_group, note),
            Table("KRIS-Bench by knowledge type, and overall", ["knowledge type", *columns[1:]], by_type + overall,
                  note)]


def _kris_rows(records: Sequence[ItemRecord], keys: Callable[[ItemRecord], list[str]]) -> list[list[Cell]]:
    names = sorted({key for r in records for key in keys(r)})
    rows: list[list[Cell]] = []
    for name in names:
        items = [r for r in records if name in keys(r)]
        scored = _scored(items)
        columns = [[r.score.sub_scores[dim] for r in scored if dim in r.score.sub_scores] for _, dim in _KRIS_DIMENSIONS]
        rows.append([name, len(scored), len(items), *(_percent(_mean(values)) for values in columns),
                     _percent(_mean([v for values in columns for v in values]))])
    return rows


# ---- RISEBench --------------------------------------------------------------------------------
# RISEBench gpt_eval.py (commit 5f22651): an item's score weighs its dimensions (temporal, causal,
# spatial: 0.3 AC + 0.5 IR + 0.2 VP, or 0.2 VP + 0.8 IR when consistency_free; logical: 0.3 AC +
# 0.7 IR, no VP), halved (at least 1) when IR is 1; an item is accurate when every dimension it has is
# 5 (`calculate_completion`); per category and overall the plain mean over items; "score" and the
# dimensions shown as 25 x (s - 1). Logits mode has no integer answers: there an item's accuracy is
# the probability the judge gives to 5 on every one of its dimensions.

# RISEBench's category values (gpt_eval.py), its table's order
_RISE_CATEGORIES = ("temporal_reasoning", "causal_reasoning", "spatial_reasoning", "logical_reasoning")
_RISE_LOGICAL = "logical_reasoning"


def rise_tables(records: Sequence[ItemRecord]) -> list[Table]:
    categories = [c for c in _RISE_CATEGORIES if any(r.category == c for r in records)]
    categories += sorted({r.category for r in records} - set(categories))
    rows = [_rise_row(c, [r for r in records if r.category == c]) for c in categories]
    rows.append(_rise_row("overall", list(records)))
    return [Table("RISEBench", ["category", "scored", "items", "accuracy %", "score", "IR", "AC", "VP"], rows,
                  "accuracy: share of items at full marks on every dimension; score and dimensions 0-100, "
                  "25 x (s - 1) of the judge's 1-5; logical items have no VP")]


def _rise_dimensions(record: ItemRecord) -> dict[str, str]:
    """The dimensions RISEBench scores this item on, by short name."""
    dims = {"IR": "instruction_reasoning"}
    if not (record.category != _RISE_LOGICAL and record.metadata.get("consistency_free")):
        dims["AC"] = "appearance_consistency"
    if record.category != _RISE_LOGICAL:
        dims["VP"] = "visual_plausibility"
    return dims


def rise_item_score(record: ItemRecord) -> float:
    """RISEBench's weighted 1-5 score of one scored item (gpt_eval.py `calculate_score`)."""
    s = record.score.sub_scores
    ir = s["instruction_reasoning"]
    if record.category == _RISE_LOGICAL:
        score = 0.3 * s["appearance_consistency"] + 0.7 * ir
    elif record.metadata.get("consistency_free"):
        score = 0.2 * s["visual_plausibility"] + 0.8 * ir
    else:
        score = 0.3 * s["appearance_consistency"] + 0.5 * ir + 0.2 * s["visual_plausibility"]
    return max(1.0, score / 2) if ir == 1 else score


def rise_item_accuracy(record: ItemRecord) -> float:
    """1 or 0 where the judge answered in integers; in logits mode, P(5) on every dimension."""
    dims = _rise_dimensions(record).values()
    verdict = record.score
    if verdict.mode == "logits":
        return math.prod(float(verdict.raw[dim][-1]) for dim in dims)  # raw: P(1..5); the last is P(5)
    return float(all(verdict.sub_scores[dim] == 5 for dim in dims))


def _rise_row(name: str, items: Sequence[ItemRecord]) -> list[Cell]:
    scored = _scored(items)
    dims = [[r.score.sub_scores[_rise_dimensions(r)[short]] for r in scored if short in _rise_dimensions(r)]
            for short in ("IR", "AC", "VP")]
    accuracy = _mean([rise_item_accuracy(r) for r in scored])
    return [name, len(scored), len(items), None if accuracy is None else 100 * accuracy,
            _percent(_mean([rise_item_score(r) for r in scored])), *(_percent(_mean(d)) for d in dims)]


# ---- ImgEdit ----------------------------------------------------------------------------------
# ImgEdit Benchmark/Basic step1_get_avgscore.py: an item's score is the mean of its three 1-5 scores;
# step2_typescore.py: a type's score the mean of its items'. The paper's Table 4 overall averages the
# types (9 of its 12 rows match the unweighted mean of the type columns).


def imgedit_tables(records: Sequence[ItemRecord]) -> list[Table]:
    rows: list[list[Cell]] = []
    for category in sorted({r.category for r in records}):
        items = [r for r in records if r.category == category]
        scored = _scored(items)
        rows.append([category, len(scored), len(items), _mean([r.score.overall for r in scored])])
    means = [row[3] for row in rows if row[3] is not None]
    rows.append(["overall (mean of the types)", sum(r[1] for r in rows), sum(r[2] for r in rows), _mean(means)])
    return [Table("ImgEdit", ["edit type", "scored", "items", "score"], rows,
                  "1-5; an item's score is the mean of its three; overall weighs each type alike")]


PROTOCOLS: dict[str, Protocol] = {p.id: p for p in (
    Protocol("viescore", None, "", lambda records: []),
    Protocol("gedit", "viescore", "GPT-4.1 (Step1X-Edit GEdit-Bench/EVAL.md)", gedit_tables),
    Protocol("kris", "kris", "GPT-4o (Kris_Bench README and metrics scripts)", kris_tables, kris_references),
    Protocol("rise", "rise", "GPT-4.1 (RISEBench README, gpt_eval.py)", rise_tables),
    Protocol("imgedit", "imgedit", "GPT-4.1 (ImgEdit README leaderboard caption)", imgedit_tables),
)}


def protocol_for(benchmark: str) -> str:
    """The protocol a dataset's reader implies: the benchmark's own, else viescore."""
    return benchmark if benchmark in PROTOCOLS else "viescore"
