"""Comparing runs: a leaderboard of several run folders over the items every one of them scored.

    editstack compare RUN RUN [RUN ...] --out DIR [--allow-different-judges]

Files written into DIR, each atomically:

    leaderboard.md      the runs, what differs between them, each run's mean overall score per
                        category and overall, each pair's mean difference, the unpaired items
    leaderboard.html    the same, with per-category bars and their intervals drawn as inline SVG;
                        self-contained (no external file, script or style)
    leaderboard.csv     the tables as one long table; columns = LEADERBOARD_COLUMNS

Pairing: items are paired by id; an item takes part when every run scored it (failed items are
counted apart, never averaged in). The means are over these paired items only, so every run is
averaged over the same items and the runs' means compare; each run's own scored and failed counts
stand beside them. Items present in some runs only, or scored in some only, are counted and listed
as unpaired. For each pair of runs (the later one on the command line against the earlier, its
baseline) the mean difference run − baseline has a paired bootstrap interval, and wins, ties and
losses count the items where the run scored higher, within TIE_TOLERANCE, or lower.

A comparison of runs judged differently (model, revision, rubric id and version, mode, or a
record's aggregation rule) is refused unless `allow_different_judges`, and then flagged; runs whose
item sets or item categories differ are flagged. A flag is one line naming what differs.
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import logging
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import NamedTuple

from editstack.errors import ConfigError
from editstack.runner.files import write_atomic
from editstack.runner.report import ALL_CATEGORIES, TINY_BANNER, md_text  # one escaping rule for every Markdown table
from editstack.runner.runfolder import RESULTS_NAME, ItemRecord, Journal, read_manifest
from editstack.runner.stats import LEVEL, METHOD, RESAMPLES, SEED, bootstrap_ci, paired_bootstrap_ci

log = logging.getLogger(__name__)

TIE_TOLERANCE = 1e-9  # scores are means of 0–10 answers: closer than this is float noise, not a preference
_SHOWN_IDS = 5  # a flag names the first few ids that differ; the unpaired list names them all
_DASH = "–"


class LeaderboardPaths(NamedTuple):
    """The files `write_leaderboard` wrote."""

    markdown: Path
    html: Path
    csv: Path


@dataclass(frozen=True)
class _Run:
    """A run folder, read: a label for the tables, its last record per item id, unreadable lines."""

    label: str
    folder: Path
    records: dict[str, ItemRecord]
    problems: list[str]
    tiny: bool  # an embedded tiny random-weight model produced it: its numbers mean nothing

    def overall(self, item_id: str) -> float:
        return self.records[item_id].score.overall  # type: ignore[union-attr]  # paired items are scored

    def is_scored(self, item_id: str) -> bool:
        record = self.records.get(item_id)
        return record is not None and record.status == "scored" and record.score is not None


@dataclass(frozen=True)
class _Line:
    """One row of the leaderboard: a run's standing (kind "run") or a pair's difference (kind
    "difference": mean, interval, wins, ties, losses are of run − baseline)."""

    category: str
    kind: str
    run: str
    baseline: str | None
    items: int  # paired items
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    wins: int | None
    ties: int | None
    losses: int | None
    scored: int | None  # the run's own counts in the category, paired or not
    failed: int | None
    flags: str


LEADERBOARD_COLUMNS = tuple(f.name for f in fields(_Line))


def write_leaderboard(run_dirs: Sequence[Path], out_dir: Path, *,
                      allow_different_judges: bool = False) -> LeaderboardPaths:
    """Compare the run folders `run_dirs` and write leaderboard.md, .html and .csv into `out_dir`.
    RunFolderError when a folder is not a run folder; ConfigError when fewer than two distinct
    runs are given, or their judges differ and `allow_different_judges` is False."""
    runs = _read_runs([Path(d) for d in run_dirs])
    judge_flags = _judge_flags(runs)
    if judge_flags and not allow_different_judges:
        raise ConfigError("the runs were judged differently, so their scores do not compare:\n  "
                          + "\n  ".join(line for _, line in judge_flags)
                          + "\npass --allow-different-judges to compare them anyway (the tables flag it)")
    flags = [*judge_flags, *_item_flags(runs)]
    ids = sorted(set().union(*(run.records for run in runs)))
    paired = [i for i in ids if all(run.is_scored(i) for run in runs)]
    unpaired = sorted(set(ids) - set(paired))
    lines = _lines(runs, paired, flags)
    out = Path(out_dir)
    paths = LeaderboardPaths(out / "leaderboard.md", out / "leaderboard.html", out / "leaderboard.csv")
    write_atomic(paths.csv, _csv(lines))
    write_atomic(paths.markdown, _markdown(runs, lines, flags, paired, unpaired))
    write_atomic(paths.html, _html(runs, lines, flags, paired, unpaired))
    log.info("leaderboard of %d runs written to %s: %d paired item(s), %d unpaired, %d flag(s)",
             len(runs), out, len(paired), len(unpaired), len(flags))
    return paths


def _read_runs(folders: list[Path]) -> list[_Run]:
    if len(folders) < 2:
        raise ConfigError(f"compare needs at least two run folders, got {len(folders)}")
    if len({f.resolve() for f in folders}) < len(folders):
        raise ConfigError(f"a run folder is given twice: {', '.join(map(str, folders))}")
    names = [f.name for f in folders]
    labels = names if len(set(names)) == len(names) else [str(f) for f in folders]
    runs = []
    for label, folder in zip(labels, folders):
        manifest = read_manifest(folder)  # a folder without a readable manifest is not a run folder
        journal = Journal(folder / RESULTS_NAME).load()
        for problem in journal.problems:
            log.error("%s: %s", folder, problem)
        tiny = manifest.embedded_tiny.editor or manifest.embedded_tiny.scorer
        runs.append(_Run(label, folder, journal.records, journal.problems, tiny))
    return runs


# ---- what differs between the runs -------------------------------------------------------------
# A flag is (the labels of the runs it concerns, the line that names what differs).

_JUDGE_FIELDS = ("judge model", "judge revision", "rubric id", "rubric version", "judge mode", "aggregation")


def _judge(record: ItemRecord) -> tuple[str, ...]:
    judge, score = record.judge, record.score
    if judge is None:  # a scored record always names its judge; an older or hand-made one may not
        return ("(none)",) * 5 + (score.aggregation if score else "(none)",)
    return (judge.model, judge.revision or "(none)", judge.rubric_id, judge.rubric_version, judge.mode,
            score.aggregation if score else "(none)")


def _judge_flags(runs: Sequence[_Run]) -> list[tuple[frozenset[str], str]]:
    """A line per judge field on which a run's own scored records disagree, and per field on which
    two runs' records differ."""
    values = {run.label: [Counter(_judge(r)[n] for r in run.records.values() if run.is_scored(r.id))
                          for n in range(len(_JUDGE_FIELDS))] for run in runs}
    flags = []
    for run in runs:
        for name, counts in zip(_JUDGE_FIELDS, values[run.label]):
            if len(counts) > 1:
                flags.append((frozenset([run.label]), f"{run.label}: its records disagree on the {name}: "
                              + "; ".join(f"{v} ({n} item(s))" for v, n in counts.most_common())))
    for a, b in itertools.combinations(runs, 2):
        for name, mine, theirs in zip(_JUDGE_FIELDS, values[a.label], values[b.label]):
            if mine and theirs and mine.keys() != theirs.keys():
                flags.append((frozenset([a.label, b.label]),
                              f"{a.label} and {b.label}: the {name} differs: {', '.join(sorted(mine))} in {a.label}, "
                              f"{', '.join(sorted(theirs))} in {b.label}"))
    return flags


def _item_flags(runs: Sequence[_Run]) -> list[tuple[frozenset[str], str]]:
    """A line per pair of runs whose item sets differ, and per pair that puts an item in different
    categories (its rows would then mean different things)."""
    flags = []
    for a, b in itertools.combinations(runs, 2):
        only_a, only_b = sorted(a.records.keys() - b.records.keys()), sorted(b.records.keys() - a.records.keys())
        if only_a or only_b:
            flags.append((frozenset([a.label, b.label]), f"{a.label} and {b.label}: the item sets differ: "
                          f"{_ids(only_a)} only in {a.label}, {_ids(only_b)} only in {b.label}"))
        moved = sorted(i for i in a.records.keys() & b.records.keys()
                       if a.records[i].category != b.records[i].category)
        if moved:
            flags.append((frozenset([a.label, b.label]), f"{a.label} and {b.label}: {_ids(moved)} "
                          f"in different categories (the tables use {a.label}'s)"))
    return flags


def _ids(ids: Sequence[str]) -> str:
    if not ids:
        return "no item"
    shown = ", ".join(ids[:_SHOWN_IDS]) + (", …" if len(ids) > _SHOWN_IDS else "")
    return f"{len(ids)} item(s) ({shown})"


# ---- the numbers -------------------------------------------------------------------------------

def _lines(runs: Sequence[_Run], paired: Sequence[str], flags: Sequence[tuple[frozenset[str], str]]) -> list[_Line]:
    """Per category (sorted, every category any run has), then ALL: a line per run, then one per pair."""
    category = {}  # an item's category is the first run's that has it
    for run in reversed(runs):
        category |= {i: r.category for i, r in run.records.items()}
    groups = [(c, {c}) for c in sorted(set(category.values()))] + [(ALL_CATEGORIES, set(category.values()))]
    lines = []
    for name, members in groups:
        ids = [i for i in paired if category[i] in members]
        for run in runs:
            own = [r for r in run.records.values() if category[r.id] in members]
            values = [run.overall(i) for i in ids]
            low, high = bootstrap_ci(values) if values else (None, None)
            lines.append(_Line(name, "run", run.label, None, len(ids), statistics.fmean(values) if values else None,
                               low, high, None, None, None, sum(run.is_scored(r.id) for r in own),
                               sum(r.status == "failed" for r in own), _flags_of(flags, {run.label})))
        for baseline, run in itertools.combinations(runs, 2):
            before, after = [baseline.overall(i) for i in ids], [run.overall(i) for i in ids]
            differences = [y - x for x, y in zip(before, after)]
            low, high = paired_bootstrap_ci(before, after) if ids else (None, None)
            lines.append(_Line(name, "difference", run.label, baseline.label, len(ids),
                               statistics.fmean(differences) if ids else None, low, high,
                               sum(d > TIE_TOLERANCE for d in differences),
                               sum(abs(d) <= TIE_TOLERANCE for d in differences),
                               sum(d < -TIE_TOLERANCE for d in differences), None, None,
                               _flags_of(flags, {run.label, baseline.label})))
    return lines


def _flags_of(flags: Sequence[tuple[frozenset[str], str]], labels: set[str]) -> str:
    """The flags that concern only runs among `labels`, joined for one table cell."""
    return "; ".join(line for concerned, line in flags if concerned <= labels)


def _estimate(line: _Line) -> str:
    if line.mean is None:
        return _DASH
    sign = "+" if line.kind == "difference" else ""
    return f"{line.mean:{sign}.2f} [{line.ci_low:{sign}.2f}, {line.ci_high:{sign}.2f}]"


def _notes(runs: Sequence[_Run], paired: Sequence[str], unpaired: Sequence[str]) -> list[tuple[str, str]]:
    """(label, text) pairs said at the top of leaderboard.md and leaderboard.html."""
    return [
        *((f"Run {run.label}", str(run.folder)) for run in runs),
        ("Paired items", f"{len(paired)} (scored in every run); means and differences are over these only"),
        ("Unpaired items", f"{len(unpaired)} (present or scored in some runs only; listed below)"),
        ("Intervals", f"{LEVEL:.0%} confidence, {METHOD} ({RESAMPLES} resamples, seed {SEED}); differences "
                      "resample items as pairs"),
        ("Wins, ties, losses", f"items where the run scored above, within {TIE_TOLERANCE:g} of, or below its "
                               "baseline (the earlier run on the command line)"),
    ]


def _unpaired_lines(runs: Sequence[_Run], unpaired: Sequence[str]) -> list[str]:
    return [f"{i}: " + ", ".join(f"{run.label} {run.records[i].status if i in run.records else 'absent'}"
                                 for run in runs) for i in unpaired]


# ---- leaderboard.csv, leaderboard.md -----------------------------------------------------------

def _csv(lines: Sequence[_Line]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(LEADERBOARD_COLUMNS)
    writer.writerows(["" if value is None else value for value in astuple(line)] for line in lines)
    return out.getvalue()


def _banner(runs: Sequence[_Run]) -> str | None:
    tiny = [run.label for run in runs if run.tiny]
    if not tiny:
        return None
    return (f"{TINY_BANNER}: embedded tiny models produced {', '.join(tiny)}; "
            "no difference here measures a real model.")


def _markdown(runs: Sequence[_Run], lines: Sequence[_Line], flags: Sequence[tuple[frozenset[str], str]],
              paired: Sequence[str], unpaired: Sequence[str]) -> str:
    md = md_text
    out = ["# editstack leaderboard", ""]
    if banner := _banner(runs):
        out += [f"> **⚠ {md(banner)}**", ""]
    out += [f"- **{md(label)}**: {md(text)}" for label, text in _notes(runs, paired, unpaired)]
    out += ["", f"## Differences between the runs ({len(flags)})", ""]
    out += [f"- ⚠ {md(line)}" for _, line in flags] or ["None: one judge, one aggregation rule, one item set."]
    out += ["", "## Mean overall score", "", "| category | run | paired items | mean overall [95 % CI] | scored | failed |",
            "|---|---|--:|--:|--:|--:|"]
    out += [f"| {md(l.category)} | {md(l.run)} | {l.items} | {_estimate(l)} | {l.scored} | {l.failed} |"
            for l in lines if l.kind == "run"]
    out += ["", "## Differences (run − baseline)", "",
            "| category | run | baseline | paired items | mean difference [95 % CI] | wins | ties | losses | flags |",
            "|---|---|---|--:|--:|--:|--:|--:|---|"]
    out += [f"| {md(l.category)} | {md(l.run)} | {md(l.baseline or '')} | {l.items} | {_estimate(l)} | {l.wins} "
            f"| {l.ties} | {l.losses} | {'⚠ ' + md(l.flags) if l.flags else ''} |" for l in lines if l.kind == "difference"]
    if unpaired:
        out += ["", f"## Unpaired items ({len(unpaired)})", "", "<details><summary>each with its status in every run"
                "</summary>", "", *(f"- {md(line)}" for line in _unpaired_lines(runs, unpaired)), "", "</details>"]
    if problems := [f"{run.label}: {p}" for run in runs for p in run.problems]:
        out += ["", f"## Problems ({len(problems)})", "", *(f"- {md(p)}" for p in problems)]
    return "\n".join(out) + "\n"


# ---- leaderboard.html --------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.flag{color:#b00020}
.banner{background:#b00020;color:#fff;padding:.8em 1em;font-weight:bold;border-radius:4px}
ul.notes{list-style:none;padding:0}
svg text{font:12px system-ui,sans-serif}
"""
_LABEL_PX, _PLOT_PX, _VALUE_PX, _BAR_PX = 180, 420, 150, 22


def _bars(lines: Sequence[_Line]) -> str:
    """Horizontal bars of the runs' means with their intervals as whiskers, on a 0–10 axis (wider if an
    interval reaches past it). Drawn by hand as inline SVG: the page stays one self-contained file,
    and a few dozen lines do not earn editstack a plotting dependency."""
    esc = html.escape
    low = min([0.0, *(l.ci_low for l in lines if l.ci_low is not None)])
    high = max([10.0, *(l.ci_high for l in lines if l.ci_high is not None)])

    def x(value: float) -> float:
        return _LABEL_PX + _PLOT_PX * (value - low) / (high - low)

    height = _BAR_PX * len(lines) + 20
    parts = [f'<svg width="{_LABEL_PX + _PLOT_PX + _VALUE_PX}" height="{height}" role="img">',
             f'<line x1="{x(0):.1f}" y1="0" x2="{x(0):.1f}" y2="{height - 18}" stroke="#999"/>']
    for tick in range(int(low), int(high) + 1, 2):
        parts.append(f'<text x="{x(tick):.1f}" y="{height - 4}" text-anchor="middle" fill="#777">{tick}</text>')
    for n, line in enumerate(lines):
        top, middle = n * _BAR_PX + 3, n * _BAR_PX + _BAR_PX / 2
        parts.append(f'<text x="{_LABEL_PX - 6}" y="{middle + 4:.1f}" text-anchor="end">{esc(line.run)}</text>')
        if line.mean is None:
            parts.append(f'<text x="{x(0) + 4:.1f}" y="{middle + 4:.1f}" fill="#777">no paired item</text>')
            continue
        parts.append(f'<rect x="{min(x(0), x(line.mean)):.1f}" y="{top}" width="{abs(x(line.mean) - x(0)):.1f}" '
                     f'height="{_BAR_PX - 6}" fill="#4a78b5"/>')
        left, right = x(line.ci_low), x(line.ci_high)  # type: ignore[arg-type]  # a mean always has its interval
        parts += [f'<line x1="{left:.1f}" y1="{middle}" x2="{right:.1f}" y2="{middle}" stroke="#111" stroke-width="1.5"/>',
                  *(f'<line x1="{end:.1f}" y1="{top + 3}" x2="{end:.1f}" y2="{top + _BAR_PX - 9}" stroke="#111" '
                    'stroke-width="1.5"/>' for end in (left, right)),
                  f'<text x="{_LABEL_PX + _PLOT_PX + 6}" y="{middle + 4:.1f}">{esc(_estimate(line))}</text>']
    parts.append("</svg>")
    return "".join(parts)


def _html(runs: Sequence[_Run], lines: Sequence[_Line], flags: Sequence[tuple[frozenset[str], str]],
          paired: Sequence[str], unpaired: Sequence[str]) -> str:
    esc = html.escape

    def cells(values: Sequence[object]) -> str:
        return "".join(f'<td class="n">{esc(str(v))}</td>' if isinstance(v, int | float) else f"<td>{esc(str(v))}</td>"
                       for v in values)

    parts = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>editstack leaderboard</title>'
             f"<style>{_CSS}</style></head><body><h1>editstack leaderboard</h1>",
             f'<p class="banner">⚠ {esc(banner)}</p>' if (banner := _banner(runs)) else "",
             '<ul class="notes">' + "".join(f"<li><b>{esc(label)}</b>: {esc(text)}</li>"
                                           for label, text in _notes(runs, paired, unpaired)) + "</ul>",
             f"<h2>Differences between the runs ({len(flags)})</h2>",
             ("<ul>" + "".join(f'<li class="flag">⚠ {esc(line)}</li>' for _, line in flags) + "</ul>") if flags
             else "<p>None: one judge, one aggregation rule, one item set.</p>",
             "<h2>Mean overall score</h2>"]
    run_lines = [l for l in lines if l.kind == "run"]
    for category in dict.fromkeys(l.category for l in run_lines):
        shown = [l for l in run_lines if l.category == category]
        parts.append(f"<h3>{esc(category)}: {shown[0].items} paired item(s)</h3>{_bars(shown)}")
    parts.append("<table><tr><th>category</th><th>run</th><th>paired items</th><th>mean overall [95 % CI]</th>"
                 "<th>scored</th><th>failed</th></tr>")
    parts += [f"<tr>{cells([l.category, l.run, l.items, _estimate(l), l.scored, l.failed])}</tr>" for l in run_lines]
    parts.append("</table><h2>Differences (run − baseline)</h2><table><tr><th>category</th><th>run</th>"
                 "<th>baseline</th><th>paired items</th><th>mean difference [95 % CI]</th><th>wins</th><th>ties</th>"
                 "<th>losses</th><th>flags</th></tr>")
    parts += [f"<tr>{cells([l.category, l.run, l.baseline, l.items, _estimate(l), l.wins, l.ties, l.losses])}"
              f'<td class="flag">{"⚠ " + esc(l.flags) if l.flags else ""}</td></tr>'
              for l in lines if l.kind == "difference"]
    parts.append("</table>")
    if unpaired:
        parts.append(f"<h2>Unpaired items ({len(unpaired)})</h2><details><summary>each with its status in every run"
                     "</summary><ul>" + "".join(f"<li>{esc(line)}</li>" for line in _unpaired_lines(runs, unpaired))
                     + "</ul></details>")
    if problems := [f"{run.label}: {p}" for run in runs for p in run.problems]:
        parts.append(f"<h2>Problems ({len(problems)})</h2><ul>" + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
