"""Run reports, written from a run folder's manifest.json and results.jsonl.

    python -m editstack.runner.report RUN_DIR       rewrite the reports of an existing run folder

Files written into the run folder, each atomically (temp file + rename):

    report.md           run times, dataset, results per category and overall (each mean with its
                        interval), aggregation rule, models and versions, failed items, problems
                        found in the journal
    report.html         the same summary, then a link to each category's gallery pages
    gallery/<category>-<n>.html
                        a category's items (source | reference | edit | instruction | scores or error),
                        PAGE_ITEMS to a page, in id order; the images are thumbnail files
    thumbs/<hash>.jpg   one thumbnail per image (JPEG; PNG where the image has transparency), named by
                        the image's path as the records give it, so an image several items share
                        (a source) has one
    summary.csv         one row per category, then an "ALL" row; columns = SUMMARY_COLUMNS
    summary.json        the same rows as a top-level JSON list of objects (`pandas.read_json` reads it)
    summary.meta.json   one object about the rows: run times, dataset, models and versions, rubric,
                        aggregation, mode, how the intervals were made, journal problems (kept apart
                        so summary.json stays a table)
    benchmark.json      the benchmark's own tables, as its protocol builds them (runner/protocols.py:
                        GEdit-Bench, KRIS-Bench, RISEBench, ImgEdit): a list of {title, columns,
                        rows, note}; absent for the viescore protocol, which has no table of its own
    benchmark.csv       the same numbers, one per line: table, row, column, value

Counting: an item is the last journal record of its id. Failed items are counted, never averaged
in: sc_mean, pq_mean and overall_mean are means over scored items only (null/empty when there are
none), and the "ALL" row averages all scored items, not the category means. Items edited but not
scored (an edit-only run) count in `items` only.

Every mean has a 95 % percentile-bootstrap interval over its scored items (`stats.bootstrap_ci`:
2,000 resamples, seed 0 for every row, so a row's interval does not change when another category
is added): `<name>_ci_low`/`<name>_ci_high` in the summaries, after the columns that were there
before them. A mean over one item has the mean as its interval; no scored items: null.

Judge spread (only when some scored item was judged K > 1 times, `scorer.judge_repeats`): per
category and ALL, over the items with repeats, the mean per-item standard deviation of overall
across its repeats, and the judge's share of the variance: the mean within-item variance over the
variance of all the repeats' overalls pooled. Both variances divide by their count (population
variance), so with one K for all items the share is the within-item part of the law of total
variance, between 0 and 1; it is null when all the pooled values are equal.

The reports scale with the run: a thumbnail is made once, when its item finishes (`ThumbnailWriter`,
on the runner's behalf) or at the first report that misses it, and is reused while it is newer than
its image; a page is rendered one at a time (memory holds one page, never the gallery), and a file
that would come out the same is not rewritten, so a resume with nothing to do leaves the folder as
it was (apart from the run times).

The journal is append-only, so a crash can tear its last line: an unparseable last line is ignored
(with a warning). Any other unreadable line is an error: it is logged, listed in the reports, and
its item is not counted.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import html
import io
import itertools
import json
import logging
import re
import stat
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from PIL import Image

from editstack.errors import RunFolderError
from editstack.runner.files import write_atomic, write_if_changed
from editstack.runner.protocols import PROTOCOLS, Cell, Table
from editstack.runner.runfolder import RESULTS_NAME, ItemRecord, Journal, Manifest, read_manifest
from editstack.runner.stats import LEVEL, METHOD, RESAMPLES, SEED, bootstrap_ci
from editstack.wire.protocol import Status, Verdict

log = logging.getLogger(__name__)

_MEANS = ("sc", "pq", "overall")
# The columns that were there first keep their places; the intervals follow them.
SUMMARY_COLUMNS = ("category", "items", "scored", "failed", *(f"{name}_mean" for name in _MEANS),
                   *(f"{name}_ci_{end}" for name in _MEANS for end in ("low", "high")))
ALL_CATEGORIES = "ALL"
THUMBNAIL_PX = 256
THUMBS_NAME = "thumbs"
GALLERY_NAME = "gallery"
BENCHMARK_JSON, BENCHMARK_CSV = "benchmark.json", "benchmark.csv"  # a benchmark protocol's own tables
PAGE_ITEMS = 500  # ~0.8 KB of HTML an item (scripts/bench report): a page stays near 0.4 MB, quick to open
TINY_BANNER = "Scores mean nothing: random-weight tiny models"
_MESSAGE_CHARS = 200  # failure messages can hold whole tracebacks; tables show their start
_DASH = "–"


class ReportPaths(NamedTuple):
    """The files `write_reports` wrote."""

    markdown: Path
    html: Path
    summary_json: Path
    summary_csv: Path
    summary_meta: Path
    gallery: Path  # the folder of the gallery pages


# ---- reading and counting ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Row:
    """One line of the summary table."""

    category: str
    items: int
    scored: int
    failed: int
    sc_mean: float | None
    pq_mean: float | None
    overall_mean: float | None
    sc_ci_low: float | None
    sc_ci_high: float | None
    pq_ci_low: float | None
    pq_ci_high: float | None
    overall_ci_low: float | None
    overall_ci_high: float | None

    def estimate(self, name: str) -> str:
        """The mean `name` ("sc", "pq", "overall") and its interval as table text: 6.00 [4.00, 8.00]."""
        mean = getattr(self, f"{name}_mean")
        if mean is None:
            return _DASH
        return f"{mean:.2f} [{getattr(self, f'{name}_ci_low'):.2f}, {getattr(self, f'{name}_ci_high'):.2f}]"


@dataclass(frozen=True)
class _Spread:
    """The judge's own spread over one category's items judged more than once (see the module doc)."""

    category: str
    items: int  # scored items with repeats
    repeats: list[int]  # the repeat counts these items had, sorted
    mean_sd: float | None
    judge_share: float | None


@dataclass(frozen=True)
class _Run:
    """A run folder, read: its manifest, one record per item (sorted), and what could not be read."""

    folder: Path
    manifest: Manifest
    records: list[ItemRecord]
    problems: list[str]
    torn_last_line: bool


def write_reports(run_dir: Path) -> ReportPaths:
    """Write report.md, report.html, summary.json, summary.csv, summary.meta.json and the gallery
    pages (with the thumbnails they miss) into `run_dir`; a file that would not change is left alone."""
    run = _read_run(Path(run_dir))
    rows = _rows(run.records)
    breakdowns = _breakdowns(run.records)  # once: each of its rows takes a bootstrap over its items
    paths = ReportPaths(*(run.folder / name for name in ("report.md", "report.html", "summary.json", "summary.csv",
                                                         "summary.meta.json", GALLERY_NAME)))
    pages, written = _write_gallery(run, rows, paths.gallery)
    tables = PROTOCOLS[run.manifest.protocol].tables(run.records)
    files = {paths.summary_json: json.dumps([asdict(row) for row in rows], indent=1, ensure_ascii=False) + "\n",
             paths.summary_csv: _csv(rows),
             paths.summary_meta: json.dumps(_meta(run, breakdowns), indent=1, ensure_ascii=False) + "\n",
             paths.markdown: _markdown(run, rows, breakdowns, tables),
             paths.html: _html(run, rows, breakdowns, pages, tables)}
    if tables:
        files |= {run.folder / BENCHMARK_JSON: json.dumps([asdict(t) for t in tables], indent=1,
                                                          ensure_ascii=False) + "\n",
                  run.folder / BENCHMARK_CSV: _benchmark_csv(tables)}
    written += sum(write_if_changed(path, text) for path, text in files.items())
    log.info("reports of %s: %d items, %d journal problem(s); %d page(s) and summaries changed", run.folder,
             len(run.records), len(run.problems), written)
    return paths


def summary_table(summary_json: Path) -> str:
    """The summary rows (as `write_reports` wrote them) as a plain-text table for a terminal: items,
    scored and failed counted apart, the overall mean with its interval."""
    rows = [_Row(**row) for row in json.loads(Path(summary_json).read_text(encoding="utf-8"))]
    cells = [("category", "items", "scored", "failed", f"overall [{LEVEL:.0%} CI]"),
             *((row.category, str(row.items), str(row.scored), str(row.failed), row.estimate("overall"))
               for row in rows)]
    widths = [max(len(cell[k]) for cell in cells) for k in range(5)]
    return "\n".join("  ".join(text.ljust(w) if k == 0 else text.rjust(w) for k, (text, w) in enumerate(zip(cell, widths)))
                     for cell in cells)


def _read_run(folder: Path) -> _Run:
    manifest = read_manifest(folder)
    journal = Journal(folder / RESULTS_NAME).load()
    for problem in journal.problems:
        log.error("%s: %s", folder, problem)
    records = sorted(journal.records.values(), key=lambda r: (r.category, r.id))
    return _Run(folder, manifest, records, journal.problems, journal.torn_last_line)


def _rows(records: Sequence[ItemRecord]) -> list[_Row]:
    """A row per category (sorted), then the ALL row over every item."""
    categories = sorted({r.category for r in records})
    return [*(_row(c, [r for r in records if r.category == c]) for c in categories), _row(ALL_CATEGORIES, records)]


def _row(category: str, records: Sequence[ItemRecord]) -> _Row:
    scores = _scores(records)
    means: dict[str, float | None] = {}
    intervals: dict[str, float | None] = {}
    for name in _MEANS:
        values = [getattr(s, name) for s in scores if getattr(s, name) is not None]  # sc, pq: VIEScore rubrics only
        means[f"{name}_mean"] = statistics.fmean(values) if values else None
        low, high = bootstrap_ci(values) if values else (None, None)
        intervals |= {f"{name}_ci_low": low, f"{name}_ci_high": high}
    return _Row(category, len(records), len(scores), sum(r.status == "failed" for r in records), **means, **intervals)


def _breakdowns(records: Sequence[ItemRecord]) -> list[tuple[str, list[_Row]]]:
    """Rows by language and by group (a benchmark's groups of its categories, e.g. KRIS-Bench's
    knowledge types), each with its intervals, when the items have them. An item counts in every
    group it belongs to."""
    breakdowns = []
    if languages := sorted({r.language for r in records if r.language}):
        breakdowns.append(("language", [_row(lang, [r for r in records if r.language == lang]) for lang in languages]))
    if groups := sorted({g for r in records for g in r.groups}):
        breakdowns.append(("group", [_row(g, [r for r in records if g in r.groups]) for g in groups]))
    return breakdowns


def _scores(records: Iterable[ItemRecord]) -> list[Verdict]:
    return [r.score for r in records if r.status == "scored" and r.score is not None]


def _spreads(records: Sequence[ItemRecord]) -> list[_Spread]:
    """A spread per category (sorted), then ALL; empty when no scored item has repeats."""
    if not any(len(s.repeat_overall) > 1 for s in _scores(records)):
        return []
    categories = sorted({r.category for r in records})
    return [*(_spread(c, [r for r in records if r.category == c]) for c in categories),
            _spread(ALL_CATEGORIES, records)]


def _spread(category: str, records: Sequence[ItemRecord]) -> _Spread:
    repeated = [s.repeat_overall for s in _scores(records) if len(s.repeat_overall) > 1]
    if not repeated:
        return _Spread(category, 0, [], None, None)
    pooled = statistics.pvariance([x for overalls in repeated for x in overalls])
    within = statistics.fmean(statistics.pvariance(overalls) for overalls in repeated)
    return _Spread(category, len(repeated), sorted({len(o) for o in repeated}),
                   mean_sd=statistics.fmean(statistics.pstdev(overalls) for overalls in repeated),
                   judge_share=within / pooled if pooled > 0 else None)


def _spread_lines(spreads: Sequence[_Spread]) -> tuple[list[str], list[list[str]], str]:
    """The spread table as (header, rows of cells, note), shared by report.md and report.html."""
    header = ["category", "items with repeats", "repeats", "mean SD of overall", "judge share of variance"]
    cells = [[s.category, str(s.items), ", ".join(map(str, s.repeats)) or _DASH, _number(s.mean_sd),
              _DASH if s.judge_share is None else f"{s.judge_share:.0%}"] for s in spreads]
    note = ("Each item was judged several times (sampled, seeded); its scores above are the mean of its repeats. "
            "Mean SD: the average over items of the standard deviation of overall across an item's repeats. "
            "Judge share: the mean within-item variance over the variance of all repeats' overalls pooled "
            "(population variances): the part of the spread that is the judge's, not the items'.")
    return header, cells, note


# ---- what every report says about the run ------------------------------------------------------

def _banner(manifest: Manifest) -> str | None:
    flags = manifest.embedded_tiny
    tiny = [role for role, flag in (("editor", flags.editor), ("scorer", flags.scorer)) if flag]
    if not tiny:
        return None
    return f"{TINY_BANNER} (the embedded {' and '.join(tiny)}) produced this run; nothing here measures a real model."


def _facts(run: _Run) -> list[tuple[str, str]]:
    """(label, text) pairs about the run, shown at the top of report.md and report.html."""
    m = run.manifest
    scored = _scores(run.records)
    rubric = _agreement(_rubric_name(s.rubric_id, s.rubric_version, s.rubric_sha256) for s in scored) if scored else (
        _rubric_name(m.rubric.id, m.rubric.version, m.rubric.sha256) if m.rubric else _DASH)
    commit = f", git {m.git_commit[:12]}" if m.git_commit else ""
    facts = [
        ("Run", f"{m.started_at} → {m.finished_at or 'not finished'}{_duration(m.started_at, m.finished_at)}"),
        ("editstack", f"{m.editstack_version}{commit}"),
        ("Dataset", f"{m.dataset.spec}: {m.dataset.items} item(s) selected, {len(run.records)} with a result"
                    + (f", {len(m.dataset.problems)} skipped by the loader" if m.dataset.problems else "")),
        ("Protocol", _protocol_fact(m)),
        ("Aggregation", _agreement(s.aggregation for s in scored) if scored else "no scored items"),
        ("Rubric", rubric),
        ("Judge mode", _agreement(s.mode for s in scored) if scored else _DASH),
    ]
    if m.counts is not None and (m.counts.cache_hits or m.counts.cache_misses):
        facts.append(("Judge cache", f"{m.counts.cache_hits} hit(s), {m.counts.cache_misses} miss(es)"))
    for use in m.endpoints:  # several endpoints of a stage: each one's share, and what it handed back
        facts.append((f"{use.service.capitalize()} endpoint", f"{use.endpoint}: {use.items} item(s), "
                                                             f"{use.failed_attempts} failed attempt(s)"))
    if m.judge_usage is not None and m.judge_usage.calls:
        u = m.judge_usage
        facts.append(("Judge cost", f"{u.calls} call(s), {u.prompt_tokens} prompt and {u.completion_tokens} "
                                    f"completion token(s), {u.judge_s:.1f} s of judge time"))
    shown = {k: v for k, v in msgspec.structs.asdict(m.params).items()
             if k not in ("seed_rule", "from_editor_defaults") and v is not None}
    params = ", ".join(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}" for k, v in shown.items())
    if m.params.from_editor_defaults:
        params += f" ({', '.join(m.params.from_editor_defaults)}: the editor's defaults)"
    facts.append(("Edit parameters", params))
    for status in m.editors:
        facts.append(("Editor", _service(status, ("diffusers", "transformers", "torch"))))
    if m.scorer is not None:
        facts.append(("Scorer", _service(m.scorer, ("transformers", "torch"))))
    return facts


def _rubric_name(rubric_id: str, version: str, sha256: str) -> str:
    return f"{rubric_id} {version}" + (f" (sha256 {sha256[:12]})" if sha256 else "")


def _protocol_fact(m: Manifest) -> str:
    """The protocol, and whether the judge is the one the benchmark's published table used."""
    protocol = PROTOCOLS[m.protocol]
    if not protocol.published_judge:
        return f"{protocol.id} (editstack's own tables)"
    judge = m.scorer.model if m.scorer is not None else _DASH
    return (f"{protocol.id}: tables as the benchmark builds them. Its published table was judged by "
            f"{protocol.published_judge}; this run's judge is {judge}, so compare its numbers with runs of "
            "the same judge, not with that table")


def _agreement(values: Iterable[str]) -> str:
    """The one value the records share, or each value with its count when they disagree."""
    counts = Counter(v or "(none)" for v in values)
    if len(counts) == 1:
        return next(iter(counts))
    return "records disagree: " + "; ".join(f"{value} ({n} item(s))" for value, n in counts.most_common())


def _service(status: Status, version_names: Sequence[str]) -> str:
    names = [*version_names, *sorted(status.versions.keys() - set(version_names))]
    versions = ", ".join(f"{name} {status.versions.get(name, _DASH)}" for name in names)
    served = f" ({status.backend}, {status.dtype})" if status.backend else ""
    return (f"{status.model}@{status.revision or _DASH}{served} on {', '.join(status.devices) or _DASH}, "
            f"{status.workers} worker(s); {versions}")


def _duration(started_at: str, finished_at: str | None) -> str:
    try:
        seconds = (dt.datetime.fromisoformat(finished_at) - dt.datetime.fromisoformat(started_at)).total_seconds()
    except (TypeError, ValueError):  # not finished, or a time that does not parse: no duration to give
        return ""
    minutes, secs = divmod(round(seconds), 60)
    return f" ({minutes // 60}h {minutes % 60:02d}m {secs:02d}s)"


def _number(value: float | None) -> str:
    return _DASH if value is None else f"{value:.2f}"


def _short(text: str, limit: int = _MESSAGE_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


# ---- summary.csv, summary.meta.json ------------------------------------------------------------

def _csv(rows: Sequence[_Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for row in rows:
        writer.writerow(["" if value is None else value for value in asdict(row).values()])
    return out.getvalue()


def _benchmark_csv(tables: Sequence[Table]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("table", "row", "column", "value"))
    for table in tables:
        for row in table.rows:
            writer.writerows((table.title, row[0], column, "" if value is None else value)
                             for column, value in zip(table.columns[1:], row[1:], strict=True))
    return out.getvalue()


def _cell(value: Cell) -> str:
    if value is None:
        return _DASH
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _meta(run: _Run, breakdowns: Sequence[tuple[str, list[_Row]]]) -> dict[str, Any]:
    m = run.manifest
    scored = _scores(run.records)
    return {
        "run": run.folder.name,
        "editstack_version": m.editstack_version,
        "git_commit": m.git_commit,
        "started_at": m.started_at,
        "finished_at": m.finished_at,
        "dataset": msgspec.to_builtins(m.dataset),
        "embedded_tiny": msgspec.to_builtins(m.embedded_tiny),
        "rubric": msgspec.to_builtins(m.rubric),
        # value -> number of scored items; more than one key means the records disagree
        "aggregation": Counter(s.aggregation for s in scored),
        "mode": Counter(s.mode for s in scored),
        "rubric_in_records": Counter(f"{s.rubric_id} {s.rubric_version}" for s in scored),
        "interval": _INTERVAL,
        # null when no item was judged more than once; "repeats" lists the K values the items had
        "judge_spread": [asdict(s) for s in _spreads(run.records)] or None,
        "params": msgspec.to_builtins(m.params),
        "editors": msgspec.to_builtins(m.editors),
        "scorer": msgspec.to_builtins(m.scorer),
        "journal": {"items": len(run.records), "problems": run.problems, "torn_last_line_ignored": run.torn_last_line},
        # the same rows as summary.json, by language and by group instead of category
        **{f"by_{kind}": [asdict(row) for row in table] for kind, table in breakdowns},
    }


# ---- report.md ---------------------------------------------------------------------------------

def _markdown(run: _Run, rows: Sequence[_Row], breakdowns: Sequence[tuple[str, list[_Row]]],
              tables: Sequence[Table]) -> str:
    lines = [f"# editstack report: {md_text(run.folder.name)}", ""]
    if banner := _banner(run.manifest):
        lines += [f"> **⚠ {md_text(banner)}**", ""]
    lines += [f"- **{label}**: {md_text(text)}" for label, text in _facts(run)]
    lines += ["", "## Results", "", *_md_table("category", rows, total=True)]
    lines += ["", _counting_note(rows[-1]), "", _interval_note()]
    for table in tables:
        lines += ["", f"## {md_text(table.title)}", "", "| " + " | ".join(md_text(c) for c in table.columns) + " |",
                  "|---|" + "--:|" * (len(table.columns) - 1)]
        lines += ["| " + " | ".join(md_text(_cell(c)) for c in row) + " |" for row in table.rows]
        lines += ["", md_text(table.note)]
    for kind, table in breakdowns:
        lines += ["", f"## By {kind}", "", *_md_table(kind, table, total=False)]
    if spreads := _spreads(run.records):
        header, cells, note = _spread_lines(spreads)
        lines += ["", "## Judge spread", "", "| " + " | ".join(header) + " |", "|---|" + "--:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(f"**{c}**" if k == 0 and row is cells[-1] else md_text(c) for k, c in enumerate(row))
                  + " |" for row in cells]
        lines += ["", note]
    if failures := [(r, r.error) for r in run.records if r.status == "failed" and r.error is not None]:
        lines += ["", f"## Failed items ({len(failures)})", "", "| item | category | stage | code | message |",
                  "|---|---|---|---|---|"]
        lines += [f"| {md_text(r.id)} | {md_text(r.category)} | {md_text(e.stage)} | {md_text(e.code)} | {md_text(_short(e.message))} |"
                  for r, e in failures]
    if problems := _problems(run):
        lines += ["", f"## Problems ({len(problems)})", ""] + [f"- {md_text(p)}" for p in problems]
    if unselected := run.manifest.dataset.unselected_problems:
        lines += ["", f"<details><summary>{len(unselected)} dataset problem(s) in items outside this run's "
                  "selection</summary>", "", *(f"- {md_text(p)}" for p in unselected), "", "</details>"]
    return "\n".join(lines) + "\n"


_TABLE_COLUMNS = ("items", "scored", "failed", "mean SC [95 % CI]", "mean PQ [95 % CI]", "mean overall [95 % CI]")


def _cells(row: _Row) -> list[str]:
    return [str(row.items), str(row.scored), str(row.failed), *(row.estimate(n) for n in _MEANS)]


def _md_table(first: str, rows: Sequence[_Row], *, total: bool) -> list[str]:
    """A summary table in Markdown; `total`: the last row is the ALL row, in bold."""
    lines = [f"| {first} | " + " | ".join(_TABLE_COLUMNS) + " |", "|---|" + "--:|" * len(_TABLE_COLUMNS)]
    for row in rows:
        name = f"**{ALL_CATEGORIES}**" if total and row is rows[-1] else md_text(row.category)
        lines.append(f"| {name} | " + " | ".join(_cells(row)) + " |")
    return lines


def _html_table(first: str, rows: Sequence[_Row], *, total: bool) -> str:
    """The same table in HTML; `total`: the last row is the ALL row."""
    esc = html.escape
    head = "".join(f"<th>{esc(name)}</th>" for name in (first, *_TABLE_COLUMNS))
    body = "".join(f'<tr{" class=all" if total and row is rows[-1] else ""}><td>{esc(row.category)}</td>'
                   + "".join(f'<td class="n">{esc(cell)}</td>' for cell in _cells(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _counting_note(total: _Row) -> str:
    note = ("Means are over scored items only: failed items are counted, never averaged in. "
            f"{ALL_CATEGORIES} averages every scored item, not the category means.")
    edited = total.items - total.scored - total.failed
    return note + (f" {edited} item(s) were edited but not scored." if edited else "")


_INTERVAL = {"method": METHOD, "level": LEVEL, "resamples": RESAMPLES, "seed": SEED,
             "one_item": "the interval is the mean"}


def _interval_note() -> str:
    return (f"Intervals: {LEVEL:.0%} confidence, {METHOD} ({RESAMPLES} resamples, seed {SEED}). A mean over "
            "one item has the mean as its interval: one item shows no spread, which is not certainty.")


def _problems(run: _Run) -> list[str]:
    """Journal lines that could not be read, then the items the dataset loader skipped."""
    return [*run.problems, *(f"dataset: {p}" for p in run.manifest.dataset.problems)]


def md_text(text: str) -> str:
    """Text safe inside a Markdown table cell or list item: one line, pipes escaped, and no raw HTML
    (Markdown renderers pass tags through: an item id like <img onerror=...> would run)."""
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|")


# ---- report.html -------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left;overflow-wrap:anywhere}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.all td{font-weight:bold}
.banner{background:#b00020;color:#fff;padding:.8em 1em;font-weight:bold;font-size:1.1em;border-radius:4px}
.ph{width:128px;height:128px;display:flex;align-items:center;justify-content:center;background:#eee;color:#777}
.gallery td{max-width:320px}
.scores b{font-size:1.1em}
.sub{color:#555;font-size:.9em}
.err{color:#b00020}
.facts{list-style:none;padding:0}
"""


def _html_head(title: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>")


def _html_banner(manifest: Manifest) -> str:
    """The tiny-model banner, on the report and on every gallery page (they all show scores)."""
    banner = _banner(manifest)
    return f'<p class="banner">⚠ {html.escape(banner)}</p>' if banner else ""


def _html(run: _Run, rows: Sequence[_Row], breakdowns: Sequence[tuple[str, list[_Row]]],
          pages: dict[str, list[str]], tables: Sequence[Table]) -> str:
    esc = html.escape
    title = f"editstack report: {run.folder.name}"
    parts = [_html_head(title), f"<h1>{esc(title)}</h1>", _html_banner(run.manifest)]
    parts.append('<ul class="facts">' + "".join(f"<li><b>{esc(label)}</b>: {esc(text)}</li>"
                                                for label, text in _facts(run)) + "</ul>")
    parts.append(_html_table("category", rows, total=True))
    parts.append(f"<p>{esc(_counting_note(rows[-1]))}</p><p>{esc(_interval_note())}</p>")
    for table in tables:
        parts.append(f"<h2>{esc(table.title)}</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in table.columns)
                     + "</tr>" + "".join("<tr>" + "".join(f'<td{"" if k == 0 else " class=n"}>{esc(_cell(c))}</td>'
                                                        for k, c in enumerate(row)) + "</tr>" for row in table.rows)
                     + f"</table><p>{esc(table.note)}</p>")
    for kind, table in breakdowns:
        parts.append(f"<h2>By {kind}</h2>{_html_table(kind, table, total=False)}")
    if spreads := _spreads(run.records):
        header, cells, note = _spread_lines(spreads)
        parts.append("<h2>Judge spread</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
                     + "".join("<tr>" + "".join(f'<td{"" if k == 0 else " class=n"}>{esc(c)}</td>'
                                                 for k, c in enumerate(row)) + "</tr>" for row in cells)
                     + f"</table><p>{esc(note)}</p>")
    if problems := _problems(run):
        parts.append(f"<h2>Problems ({len(problems)})</h2><ul>" + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul>")
    parts.append("<h2>Gallery</h2><p>Each item's source, references, edit, instruction and scores or error, "
                 f"{PAGE_ITEMS} items to a page.</p><table><tr><th>category</th><th>items</th><th>pages</th></tr>"
                 + "".join(f'<tr><td>{esc(row.category)}</td><td class="n">{row.items}</td><td>'
                           + " ".join(f'<a href="{GALLERY_NAME}/{esc(name)}">{n}</a>'
                                      for n, name in enumerate(pages[row.category], 1)) + "</td></tr>"
                           for row in rows[:-1]) + "</table>")
    if unselected := run.manifest.dataset.unselected_problems:
        parts.append(f"<details><summary>{len(unselected)} dataset problem(s) in items outside this run's "
                     "selection</summary><ul>" + "".join(f"<li>{esc(p)}</li>" for p in unselected) + "</ul></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ---- the gallery -------------------------------------------------------------------------------

def _write_gallery(run: _Run, rows: Sequence[_Row], folder: Path) -> tuple[dict[str, list[str]], int]:
    """Write the gallery pages that changed, and remove those no category has any more; the page
    names by category, and how many pages were written. One page is in memory at a time."""
    thumbnails = _Thumbnails(run.folder)
    pages: dict[str, list[str]] = {}
    written = 0
    by_category = itertools.groupby(run.records, key=lambda record: record.category)  # records: sorted
    for row, (category, group) in zip(rows[:-1], by_category, strict=True):
        records = list(group)
        chunks = [records[start:start + PAGE_ITEMS] for start in range(0, len(records), PAGE_ITEMS)]
        pages[category] = names = _page_names(category, len(chunks))
        for number, (name, chunk) in enumerate(zip(names, chunks, strict=True)):
            written += write_if_changed(folder / name, _gallery_page(run, row, names, number, chunk, thumbnails))
    current = {name for names in pages.values() for name in names}
    for page in folder.glob("*.html"):
        if page.name not in current:
            page.unlink()
    return pages, written


def _page_names(category: str, count: int) -> list[str]:
    """The file names of a category's `count` gallery pages: its letters and digits, and a hash of
    it, so that names that differ only in other characters (or have none else: 物理) never collide."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", category).strip("-")[:40]
    stem = f"{slug}-{_digest(category)[:8]}" if slug else _digest(category)[:8]
    return [f"{stem}-{n}.html" for n in range(1, count + 1)]


def _gallery_page(run: _Run, row: _Row, names: Sequence[str], number: int, records: Sequence[ItemRecord],
                  thumbnails: _Thumbnails) -> str:
    """Page `number` (from 0) of a category's gallery: its `records`, and links to the report and to
    the category's other pages."""
    esc = html.escape
    several = len(names) > 1
    title = f"editstack report: {run.folder.name}: {row.category}" + (f" ({number + 1}/{len(names)})" if several else "")
    pages = " ".join(f"<b>{k}</b>" if k == number + 1 else f'<a href="{esc(name)}">{k}</a>'
                     for k, name in enumerate(names, 1))
    parts = [_html_head(title), f'<p><a href="../report.html">← {esc(run.folder.name)}: report</a></p>',
             f"<h1>{esc(row.category)}</h1>", _html_banner(run.manifest),
             f"<p>{row.items} item(s), {row.scored} scored, {row.failed} failed" + (f"; page {pages}" if several else "")
             + "</p>",
             '<table class="gallery"><tr><th>source</th><th>reference</th><th>edit</th><th>instruction</th>'
             "<th>scores</th></tr>"]
    for record in records:
        language = f" <span class=sub>[{esc(record.language)}]</span>" if record.language else ""
        sources = "".join(thumbnails.cell(source) for source in record.sources)
        parts.append(f"<tr><td>{sources}</td><td>{_references_cell(record, thumbnails)}</td>"
                     f"<td>{thumbnails.cell(record.edit.path)}</td>"
                     f"<td><b>{esc(record.id)}</b>{language}<br>{esc(record.instruction)}</td>"
                     f"<td>{_outcome_cell(record)}</td></tr>")
    parts.append("</table></body></html>\n")
    return "\n".join(parts)


def _references_cell(record: ItemRecord, thumbnails: _Thumbnails) -> str:
    """What the edit is judged against: reference images as thumbnails, texts and explanations as text."""
    cells = [thumbnails.cell(r.value) if r.kind == "image"
             else f'<div class="sub"><i>{html.escape(r.kind)}</i>: {html.escape(_short(r.value))}</div>'
             for r in record.references]
    return "".join(cells) or _DASH


def _outcome_cell(record: ItemRecord) -> str:
    esc = html.escape
    if record.status == "scored" and record.score is not None:
        s = record.score
        subs = " · ".join(f"{esc(name)} {value:.2f}" for name, value in s.sub_scores.items())
        groups = f"SC <b>{_number(s.sc)}</b> · PQ <b>{_number(s.pq)}</b> · " if s.sc is not None else ""
        return (f'<div class="scores">{groups}overall <b>{_number(s.overall)}</b></div><div class="sub">{subs}</div>')
    if record.status == "failed" and record.error is not None:
        e = record.error
        return (f'<div class="err">failed at {esc(e.stage)}: {esc(e.code)}</div>'
                f'<div class="sub">{esc(_short(e.message, 3 * _MESSAGE_CHARS))}</div>')
    return '<div class="sub">edited, not scored</div>'


# ---- thumbnails --------------------------------------------------------------------------------

class ThumbnailWriter:
    """Makes each finished item's thumbnails while the run goes on, on a thread of its own so no stage
    waits for them; the report then finds them made. A thumbnail that cannot be made is logged and
    left to the report's placeholder: it never fails the item."""

    def __init__(self, run_dir: Path) -> None:
        self._thumbnails = _Thumbnails(Path(run_dir))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thumbnails")

    def add(self, record: ItemRecord) -> None:
        """Queue the thumbnails of `record`'s images (thread-safe)."""
        self._executor.submit(self._make, record)

    def close(self) -> None:
        """Wait for the queued thumbnails."""
        self._executor.shutdown(wait=True)

    def _make(self, record: ItemRecord) -> None:
        try:
            for image in _images(record):
                self._thumbnails.cell(image)
        except Exception:  # a defect: the executor would keep it in a Future nobody reads, so say it here
            log.exception("report: the thumbnails of item %r were not made", record.id)


def _images(record: ItemRecord) -> Iterator[str]:
    """The images a gallery row shows, as the record names them (relative to the run folder, or absolute)."""
    if record.edit.path:
        yield record.edit.path
    yield from record.sources
    yield from (r.value for r in record.references if r.kind == "image")


class _Thumbnails:
    """The thumbnail files under <run>/thumbs, one per image, named by a hash of the image's path:
    made when missing or older than their image, reused otherwise."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.folder = run_dir / THUMBS_NAME
        self._cells: dict[str, str] = {}  # sources are often shared (one image, several instructions)

    def cell(self, image: str | None) -> str:
        """`image` as a gallery page shows it: its thumbnail (made if need be), or a placeholder saying
        why there is none."""
        if image is None:
            return _placeholder("no edit")
        if image not in self._cells:
            self._cells[image] = self._cell(image)
        return self._cells[image]

    def _cell(self, image: str) -> str:
        path = self.run_dir / image  # an absolute path stays absolute
        try:
            info = path.stat()
        except OSError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            log.warning("report: image %s is missing", path)
            return _placeholder("missing")
        key = _digest(image)
        name = next((thumb.name for thumb in (self.folder / f"{key}.jpg", self.folder / f"{key}.png")
                     if _fresh(thumb, info.st_mtime_ns)), None)
        if name is None:
            try:
                data, extension = _thumbnail(path)
            except Exception as exc:  # Pillow raises OSError, SyntaxError, DecompressionBombError... for bad files
                log.warning("report: image %s is unreadable: %s", path, exc)
                return _placeholder("unreadable")
            name = f"{key}.{extension}"
            try:
                # no fsync: a thumbnail is made again from its image, and one a crash emptied is not fresh
                write_atomic(self.folder / name, data, durable=False)
            except OSError as exc:
                log.warning("report: the thumbnail of %s was not written: %s", path, exc)
                return _placeholder(f"no thumbnail: {exc.strerror or exc}")
        return (f'<img src="../{THUMBS_NAME}/{name}" alt="{html.escape(path.name)}" title="{html.escape(str(path))}" '
                'loading="lazy">')


def _fresh(thumb: Path, image_mtime_ns: int) -> bool:
    """A thumbnail made since its image last changed (an empty one, left by a crash, is not)."""
    try:
        info = thumb.stat()
    except OSError:
        return False
    return info.st_size > 0 and info.st_mtime_ns >= image_mtime_ns


def _thumbnail(path: Path) -> tuple[bytes, str]:
    """The thumbnail of the image at `path`: its bytes and file extension."""
    with Image.open(path) as image:
        image.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))  # JPEG sources decode at reduced size: fast
        alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        thumb = image.convert("RGBA" if alpha else "RGB")
    thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    # JPEG keeps a gallery of thousands of items small; PNG only where transparency must survive.
    out = io.BytesIO()
    if alpha:
        thumb.save(out, format="PNG")
        return out.getvalue(), "png"
    thumb.save(out, format="JPEG", quality=85)
    return out.getvalue(), "jpg"


def _placeholder(reason: str) -> str:
    return f'<div class="ph">{html.escape(reason)}</div>'


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


# ---- command line ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Rewrite the reports of a run folder; exit 0 when written, 2 when it is not a run folder."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m editstack.runner.report",
                                     description="Rewrite a run folder's reports from its manifest.json and results.jsonl.")
    parser.add_argument("run_dir", type=Path, help="a run folder (runs/<name>)")
    args = parser.parse_args(argv)
    try:
        paths = write_reports(args.run_dir)
    except RunFolderError as exc:
        print(f"editstack.runner.report: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
