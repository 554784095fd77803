"""Checking the judge: synthetic edits whose right answer a pixel check decides, scored by the judge.

For each edit type (`color`: make the red ball blue, `add`: add a yellow square in the top-left
corner, `remove`: remove the red ball) a case is a source scene and four candidates: the correct
edit, a wrong edit (ball green; a cyan square; the other object removed), an over-edit (the correct
edit with the background repainted) and the no-op (the source itself). For `quality` a case is one
correct colour edit, clean and degraded (blur, noise, JPEG at quality 15). Scenes are drawn with
Pillow from a seeded numpy generator, so a seed gives the same cases on every machine.

Each candidate is checked by pixels when the cases are built (`pixel_check`): the correct edit must
pass and every other candidate must fail, or building raises, so a case that cannot tell right from
wrong never reaches the judge. The judge then scores every candidate, and `run_judgecheck` reports
per edit type and dimension how often the right answer scored strictly higher than the other one
of its pair (ties counted apart; chance is 50 %), with a percentile-bootstrap interval over pairs,
and the no-op baseline (the judge's mean score for the unedited source). Failed items are counted
and listed, never scored: a pair with a failed member is left out.

Files written into `out_dir`, each atomically: judgecheck.md and judgecheck.json.
"""

from __future__ import annotations

import io
import json
import logging
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_args

import msgspec
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from editstack.errors import ConfigError
from editstack.runner.files import write_atomic
from editstack.runner.report import TINY_BANNER, md_text
from editstack.runner.stats import LEVEL, RESAMPLES, SEED, bootstrap_ci
from editstack.wire.codec import Blobs
from editstack.wire.protocol import JudgeMode, ScoreItem, ScoreRequest, Status, Verdict
from editstack.wire.transport import Client, check_endpoint

log = logging.getLogger(__name__)

MARKDOWN_NAME = "judgecheck.md"
JSON_NAME = "judgecheck.json"
SIZE_PX = 128
BATCH_ITEMS = 8  # items per score request: small, so one slow batch never nears the timeout
CHANCE = 0.5
TIE_TOLERANCE = 1e-9  # as in `editstack compare`
EDIT_TYPES = ("color", "add", "remove")  # judged on semantic consistency
QUALITY = "quality"  # judged on perceptual quality
SEMANTIC_ROLES = ("correct", "wrong", "over_edit", "noop")
QUALITY_ROLES = ("clean", "degraded")

RED, BLUE, GREEN = (210, 40, 40), (40, 70, 210), (40, 170, 60)
YELLOW, CYAN = (235, 215, 40), (40, 200, 220)
_COLOUR_TOLERANCE = 40.0  # Euclidean RGB distance of a region's mean colour from the one it should have
_UNCHANGED_TOLERANCE = 2.0  # mean absolute difference (0-255) outside the edited region
_NOISE_LIMIT = 0.8  # mean absolute high-frequency residual in flat background: clean < 0.3, degraded > 1.5

INSTRUCTIONS = {
    "color": "Make the red ball blue.",
    "add": "Add a yellow square in the top-left corner.",
    "remove": "Remove the red ball.",
    QUALITY: "Make the red ball blue.",
}
DESCRIPTIONS = {
    "color": "correct: ball blue · wrong: ball green · over-edit: ball blue and background repainted",
    "add": "correct: yellow square top left · wrong: cyan square · over-edit: yellow square and background repainted",
    "remove": "correct: ball gone · wrong: the green square gone instead · over-edit: ball gone and background repainted",
    QUALITY: "clean: the correct colour edit · degraded: the same edit blurred, noised and saved as JPEG quality 15",
}
# (dimension, right role, other role) compared per edit type
_SEMANTIC_PAIRS = tuple((dim, "correct", other) for other in ("wrong", "over_edit", "noop") for dim in ("sc", "overall"))
_QUALITY_PAIRS = (("pq", "clean", "degraded"), ("overall", "clean", "degraded"))


# ---- cases -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    """Where a pixel check looks: `mask` (True inside) and the colour the region should have, or
    None when it should look like the background around it (a removal)."""

    mask: np.ndarray
    colour: tuple[int, int, int] | None


@dataclass(frozen=True)
class Case:
    """One source scene, its instruction and its candidates by role; `region` is what the edit changes,
    `flat` the background away from every object (where a clean image has no high-frequency detail)."""

    edit_type: str
    index: int
    instruction: str
    source: np.ndarray
    candidates: dict[str, np.ndarray]
    region: Region
    flat: np.ndarray

    def item_id(self, role: str) -> str:
        return f"{self.edit_type}-{self.index}-{role}"


@dataclass(frozen=True)
class _Scene:
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # left and right ends of a gradient
    ball: tuple[int, int, int, tuple[int, int, int]] | None  # centre x, centre y, radius, colour
    square: tuple[int, int, int, tuple[int, int, int]] | None  # left, top, side, colour


def _draw(scene: _Scene, size_px: int) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, size_px)[None, :, None]
    left, right = (np.asarray(c, dtype=np.float64) for c in scene.background)
    pixels = np.broadcast_to(left + (right - left) * ramp, (size_px, size_px, 3))
    image = Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    if scene.square is not None:
        x, y, side, colour = scene.square
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=colour)
    if scene.ball is not None:
        x, y, r, colour = scene.ball
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return np.asarray(image)


def _mask(scene: _Scene, size_px: int, which: str) -> np.ndarray:
    """Where the scene's `which` ("ball", "square") is drawn, exactly as `_draw` draws it."""
    mask = Image.new("L", (size_px, size_px), 0)
    draw = ImageDraw.Draw(mask)
    if which == "ball" and scene.ball is not None:
        x, y, r, _ = scene.ball
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    if which == "square" and scene.square is not None:
        x, y, side, _ = scene.square
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=255)
    return np.asarray(mask) > 0


def _grow(mask: np.ndarray, px: int) -> np.ndarray:
    image = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    return np.asarray(image.filter(ImageFilter.MaxFilter(2 * px + 1))) > 0


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
    noisy = np.clip(blurred + rng.normal(0.0, 24.0, image.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, format="JPEG", quality=15)
    return np.asarray(Image.open(out).convert("RGB"))


def _case(edit_type: str, index: int, seed: int, size_px: int) -> Case:
    rng = np.random.default_rng([seed, (*EDIT_TYPES, QUALITY).index(edit_type), index])
    s = size_px
    pale = lambda: tuple(int(v) for v in rng.integers(150, 236, 3))  # noqa: E731
    background = (pale(), pale())
    repainted = tuple(tuple(255 - v for v in c) for c in background)  # the over-edit's background: dark
    r = int(rng.integers(s // 8, s // 5 + 1))
    ball = (int(rng.integers(int(0.6 * s), s - r - 3)), int(rng.integers(int(0.6 * s), s - r - 3)), r)
    side = int(rng.integers(s // 5, s // 4 + 1))
    corner = (int(rng.integers(3, s // 8)), int(rng.integers(3, s // 8)), side)

    def scene(ball_colour=None, square_colour=None, bg=background) -> np.ndarray:
        return _draw(_Scene(bg, None if ball_colour is None else (*ball, ball_colour),
                            None if square_colour is None else (*corner, square_colour)), s)

    if edit_type in ("color", QUALITY):
        source = scene(RED)
        correct = scene(BLUE)
        candidates = ({"correct": correct, "wrong": scene(GREEN), "over_edit": scene(BLUE, bg=repainted), "noop": source}
                      if edit_type == "color" else {"clean": correct, "degraded": _degrade(correct, rng)})
        region = Region(_mask(_Scene(background, (*ball, RED), None), s, "ball"), BLUE)
    elif edit_type == "add":
        source = scene(RED)
        candidates = {"correct": scene(RED, YELLOW), "wrong": scene(RED, CYAN),
                      "over_edit": scene(RED, YELLOW, bg=repainted), "noop": source}
        region = Region(_mask(_Scene(background, None, (*corner, YELLOW)), s, "square"), YELLOW)
    elif edit_type == "remove":
        source = scene(RED, GREEN)
        candidates = {"correct": scene(None, GREEN), "wrong": scene(RED, None),
                      "over_edit": scene(None, GREEN, bg=repainted), "noop": source}
        region = Region(_mask(_Scene(background, (*ball, RED), None), s, "ball"), None)
    else:
        raise ConfigError(f"edit_type {edit_type!r}: expected one of {', '.join((*EDIT_TYPES, QUALITY))}")
    objects = _mask(_Scene(background, (*ball, RED), (*corner, RED)), s, "ball") | \
        _mask(_Scene(background, (*ball, RED), (*corner, RED)), s, "square")
    flat = ~_grow(objects, 3)
    flat[:3, :] = flat[-3:, :] = flat[:, :3] = flat[:, -3:] = False
    return Case(edit_type, index, INSTRUCTIONS[edit_type], source, candidates, region, flat)


def pixel_check(case: Case, image: np.ndarray) -> list[str]:
    """What `image` gets wrong as an answer to `case`, by pixels; empty when it is the right answer.

    The edited region's mean colour must be the asked-for one (or, for a removal, the background's
    around it); outside the region the source must be unchanged; for `quality` the flat background
    must carry no noise."""
    problems = []
    pixels = image.astype(np.float64)
    inside = pixels[case.region.mask].mean(axis=0)
    if case.region.colour is not None:
        target = np.asarray(case.region.colour, dtype=np.float64)
        what = f"colour {tuple(case.region.colour)}"
    else:
        ring = _grow(case.region.mask, 4) & ~case.region.mask & case.flat
        target, what = pixels[ring].mean(axis=0), "the surrounding background"
    if (distance := float(np.linalg.norm(inside - target))) > _COLOUR_TOLERANCE:
        problems.append(f"region's mean colour is {distance:.0f} from {what}")
    if case.edit_type == QUALITY:
        if (noise := _noise_level(pixels, case.flat)) > _NOISE_LIMIT:
            problems.append(f"flat background has a noise level of {noise:.1f}")
    else:
        outside = ~_grow(case.region.mask, 1)
        if (change := float(np.abs(pixels[outside] - case.source[outside]).mean())) > _UNCHANGED_TOLERANCE:
            problems.append(f"outside the region the source changed by {change:.1f} on average")
    return problems


def _noise_level(pixels: np.ndarray, flat: np.ndarray) -> float:
    """Mean absolute difference from the 3x3 box average, over `flat` (a linear gradient has none)."""
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = pixels.shape[:2]
    box = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0
    return float(np.abs(pixels - box)[flat].mean())


def build_cases(cases_per_type: int = 4, seed: int = 0, size_px: int = SIZE_PX) -> list[Case]:
    """`cases_per_type` cases of every edit type and of quality, each checked by pixels: ValueError
    naming the case and role when a right answer fails its check or another candidate passes it."""
    if cases_per_type < 1:
        raise ConfigError(f"cases_per_type: expected at least 1, got {cases_per_type}")
    if size_px < 32:
        raise ConfigError(f"size_px: expected at least 32, got {size_px}")
    cases = [_case(edit_type, k, seed, size_px) for edit_type in (*EDIT_TYPES, QUALITY) for k in range(cases_per_type)]
    for case in cases:
        for role, image in case.candidates.items():
            problems = pixel_check(case, image)
            if role in ("correct", "clean") and problems:
                raise ValueError(f"case {case.item_id(role)}: the right answer fails its pixel check: {'; '.join(problems)}")
            if role not in ("correct", "clean") and not problems:
                raise ValueError(f"case {case.item_id(role)}: a wrong answer passes the pixel check")
    return cases


# ---- accuracy ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Accuracy:
    """How often the right answer scored strictly higher over `pairs` (right, other) scores; ties
    and reversals counted apart; `share` = higher / pairs with its bootstrap interval (None: no pairs)."""

    pairs: int
    higher: int
    ties: int
    lower: int
    share: float | None
    ci_low: float | None
    ci_high: float | None


def accuracy(pairs: Sequence[tuple[float, float]]) -> Accuracy:
    """The Accuracy of (right answer's score, other answer's score) pairs; the interval is
    `stats.bootstrap_ci` over the pairs' 0/1 outcomes (1: the right answer scored strictly higher)."""
    outcomes = [1.0 if right - other > TIE_TOLERANCE else 0.0 for right, other in pairs]
    ties = sum(abs(right - other) <= TIE_TOLERANCE for right, other in pairs)
    if not outcomes:
        return Accuracy(0, 0, 0, 0, None, None, None)
    higher = int(sum(outcomes))
    low, high = bootstrap_ci(outcomes)
    return Accuracy(len(outcomes), higher, ties, len(outcomes) - higher - ties, higher / len(outcomes), low, high)


@dataclass(frozen=True)
class AccuracyRow:
    edit_type: str
    dimension: str
    right: str
    other: str
    accuracy: Accuracy


@dataclass(frozen=True)
class BaselineRow:
    """The judge's mean scores for the unedited source and for the correct edit of one edit type."""

    edit_type: str
    noop_items: int
    noop_sc: float | None
    noop_overall: float | None
    correct_items: int
    correct_sc: float | None
    correct_overall: float | None


def accuracy_rows(cases: Sequence[Case], verdicts: dict[str, Verdict]) -> list[AccuracyRow]:
    """Per edit type, dimension and pair of roles, the Accuracy over the cases where both were scored."""
    rows = []
    for edit_type in (*EDIT_TYPES, QUALITY):
        typed = [c for c in cases if c.edit_type == edit_type]
        for dimension, right, other in (_QUALITY_PAIRS if edit_type == QUALITY else _SEMANTIC_PAIRS):
            pairs = [(getattr(verdicts[c.item_id(right)], dimension), getattr(verdicts[c.item_id(other)], dimension))
                     for c in typed if c.item_id(right) in verdicts and c.item_id(other) in verdicts]
            rows.append(AccuracyRow(edit_type, dimension, right, other, accuracy(pairs)))
    return rows


def baseline_rows(cases: Sequence[Case], verdicts: dict[str, Verdict]) -> list[BaselineRow]:
    rows = []
    for edit_type in EDIT_TYPES:
        scored = {role: [verdicts[c.item_id(role)] for c in cases if c.edit_type == edit_type and c.item_id(role) in verdicts]
                  for role in ("noop", "correct")}
        mean = lambda vs, name: statistics.fmean(getattr(v, name) for v in vs) if vs else None  # noqa: E731
        rows.append(BaselineRow(edit_type, len(scored["noop"]), mean(scored["noop"], "sc"), mean(scored["noop"], "overall"),
                                len(scored["correct"]), mean(scored["correct"], "sc"), mean(scored["correct"], "overall")))
    return rows


# ---- running -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Failure:
    id: str
    code: str
    message: str


def _items(cases: Sequence[Case]) -> Iterator[tuple[str, Case, np.ndarray]]:
    for case in cases:
        for role, image in case.candidates.items():
            yield case.item_id(role), case, image


def run_judgecheck(endpoint: str, out_dir: Path, *, mode: str | None = None, rubric: str | None = None,
                   timeout_s: float = 300, cases_per_type: int = 4, seed: int = 0) -> Path:
    """Build the cases, have the scorer at `endpoint` judge them (in batches of BATCH_ITEMS, each
    attempt waiting up to timeout_s), write judgecheck.md and judgecheck.json into `out_dir`, and
    return the markdown's path. ConfigError for an unusable argument; ServiceUnavailable and
    RemoteError from the scorer propagate."""
    try:
        check_endpoint(endpoint)
    except ValueError as exc:
        raise ConfigError(f"endpoint: {exc}") from None
    if mode is not None and mode not in get_args(JudgeMode):
        raise ConfigError(f"mode: expected one of {', '.join(get_args(JudgeMode))}, got {mode!r}")
    if rubric is not None and not rubric.strip():
        raise ConfigError("rubric: expected a rubric id, got an empty string")
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s: expected a positive number of seconds, got {timeout_s}")
    cases = build_cases(cases_per_type, seed)

    verdicts: dict[str, Verdict] = {}
    failures: list[_Failure] = []
    items = list(_items(cases))
    with Client(endpoint, timeout_s=timeout_s) as client:
        status = client.ping()
        if status.score_defaults is None:
            raise ConfigError(f"endpoint {endpoint}: a {status.service} service answers there, not a scorer")
        for start in range(0, len(items), BATCH_ITEMS):
            batch, blobs = items[start:start + BATCH_ITEMS], Blobs()
            request = ScoreRequest([ScoreItem(id=item_id, instruction=case.instruction, sources=[blobs.add(case.source)],
                                              edited=blobs.add(image)) for item_id, case, image in batch],
                                   mode=mode, rubric=rubric)
            reply = client.score(request, blobs)
            for result in reply.items:
                if result.verdict is not None:
                    verdicts[result.id] = result.verdict
                else:
                    error = result.error
                    failures.append(_Failure(result.id, error.code if error else "internal",
                                             error.message if error else "neither a verdict nor an error"))
            log.info("judgecheck: %d of %d items judged", min(start + BATCH_ITEMS, len(items)), len(items))

    summary = _summary(status, cases, verdicts, failures, mode=mode, rubric=rubric, cases_per_type=cases_per_type,
                       seed=seed)
    write_atomic(out_dir / JSON_NAME, json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    return write_atomic(out_dir / MARKDOWN_NAME, _markdown(summary))


def _summary(status: Status, cases: Sequence[Case], verdicts: dict[str, Verdict], failures: list[_Failure], *,
             mode: str | None, rubric: str | None, cases_per_type: int, seed: int) -> dict:
    defaults = status.score_defaults
    judged = sorted({(v.rubric_id, v.rubric_version, v.mode, v.aggregation) for v in verdicts.values()})
    return {
        "judge": {**msgspec.to_builtins(status.identity()),
                  "rubric": [f"{r} {v}" for r, v, _, _ in judged] or [rubric or f"{defaults.rubric_id} {defaults.rubric_version}"],
                  "mode": sorted({m for _, _, m, _ in judged}) or [mode or defaults.mode],
                  "aggregation": sorted({a for _, _, _, a in judged}) or [defaults.aggregation]},
        "cases": {"per_type": cases_per_type, "seed": seed, "size_px": SIZE_PX,
                  "edit_types": {t: {"instruction": INSTRUCTIONS[t], "candidates": DESCRIPTIONS[t]}
                                 for t in (*EDIT_TYPES, QUALITY)}},
        "items": {"sent": sum(len(c.candidates) for c in cases), "scored": len(verdicts), "failed": len(failures)},
        "chance": CHANCE,
        "interval": {"method": "percentile bootstrap over pairs", "level": LEVEL, "resamples": RESAMPLES, "seed": SEED},
        "accuracy": [{**{k: v for k, v in asdict(row).items() if k != "accuracy"}, **asdict(row.accuracy)}
                     for row in accuracy_rows(cases, verdicts)],
        "noop_baseline": [asdict(row) for row in baseline_rows(cases, verdicts)],
        "failed": [asdict(f) for f in failures],
    }


def _percent(share: float | None) -> str:
    return "–" if share is None else f"{share:.0%}"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _markdown(summary: dict) -> str:
    judge, items = summary["judge"], summary["items"]
    lines = ["# Judge check", ""]
    if judge["embedded_tiny"]:
        lines += [f"> ⚠ **{TINY_BANNER}**: the embedded tiny judge has random weights, so every figure below is near "
                  "chance (50 %) by construction. These tables show that the check works, not how good a judge is.", ""]
    lines += [f"- Judge: {md_text(judge['model'])}@{md_text(judge['revision'] or '-')} "
              f"({md_text(judge['backend'] or '-')}, {md_text(judge['dtype'] or '-')})",
              f"- Rubric: {md_text(', '.join(judge['rubric']))}; mode {md_text(', '.join(judge['mode']))}; "
              f"aggregation: {md_text(' / '.join(judge['aggregation']))}",
              f"- Cases: {summary['cases']['per_type']} per edit type, seed {summary['cases']['seed']}, "
              f"{summary['cases']['size_px']} px; items sent {items['sent']}, scored {items['scored']}, "
              f"failed {items['failed']}",
              "", "## Does the judge rank the right answer higher?", "",
              "| edit type | dimension | right answer | vs | pairs | right scored higher [95 % CI] | ties | lower |",
              "|---|---|---|---|---|---|---|---|"]
    for row in summary["accuracy"]:
        interval = "" if row["share"] is None else f" [{row['ci_low']:.0%}, {row['ci_high']:.0%}]"
        lines.append(f"| {row['edit_type']} | {row['dimension']} | {row['right']} | {row['other']} | {row['pairs']} | "
                     f"{_percent(row['share'])}{interval} | {row['ties']} | {row['lower']} |")
    lines += ["", "Chance is 50 %. A pair is one case's two candidates, both scored; ties (within 1e-9) count "
              "neither way. Intervals: 95 % percentile bootstrap over pairs (2000 resamples, seed 0).",
              "", "## No-op baseline", "",
              "| edit type | no-op items | no-op mean SC | no-op mean overall | correct items | correct mean SC | "
              "correct mean overall |", "|---|---|---|---|---|---|---|"]
    for row in summary["noop_baseline"]:
        lines.append(f"| {row['edit_type']} | {row['noop_items']} | {_number(row['noop_sc'])} | "
                     f"{_number(row['noop_overall'])} | {row['correct_items']} | {_number(row['correct_sc'])} | "
                     f"{_number(row['correct_overall'])} |")
    lines += ["", "The no-op is the source returned unchanged: a judge that follows the instruction scores it low.",
              "", "## Cases", "", "| edit type | instruction | candidates |", "|---|---|---|"]
    lines += [f"| {t} | {md_text(d['instruction'])} | {md_text(d['candidates'])} |"
              for t, d in summary["cases"]["edit_types"].items()]
    if summary["failed"]:
        lines += ["", f"## Failed items ({len(summary['failed'])})", "", "| item | code | message |", "|---|---|---|"]
        lines += [f"| {md_text(f['id'])} | {md_text(f['code'])} | {md_text(f['message'][:200])} |" for f in summary["failed"]]
    return "\n".join(lines) + "\n"
