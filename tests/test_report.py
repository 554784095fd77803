"""Run reports: the tables' numbers, the tiny-model banner, a gallery of pages per category with
thumbnail files, rewrites that leave unchanged files alone, pandas-readable summaries, and a journal
whose last line a crash tore."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from PIL import Image

from editstack.errors import RunFolderError
from editstack.runner.config import RunConfig
from editstack.runner import report
from editstack.runner.report import TINY_BANNER, ThumbnailWriter, write_reports
from editstack.runner.runfolder import (
    SCHEMA_VERSION,
    DatasetInfo,
    EditOutcome,
    EmbeddedTiny,
    Failure,
    ItemRecord,
    JudgeIdentity,
    Manifest,
    RubricInfo,
    RunParams,
    write_manifest,
)
from editstack.wire.protocol import Identity, Status, Verdict

AGGREGATION = "overall = sqrt(sc * pq)"
LONG_MESSAGE = "judge reply did not parse: " + "x" * 1000
EDITOR = Identity(model="Qwen/Qwen-Image-Edit", revision="abc123", dtype="bfloat16", backend="diffusers/QwenImageEditPipeline")
JUDGE = JudgeIdentity(model="Qwen/Qwen3-VL-8B-Instruct", revision="abc123", dtype="bfloat16",
                      backend="transformers/Qwen3VLForConditionalGeneration", rubric_id="viescore", rubric_version="1",
                      mode="logits")


def _status(service: str, identity: Identity, versions: dict[str, str]) -> Status:
    return Status(service=service, state="ready", model=identity.model, revision=identity.revision,
                  dtype=identity.dtype, backend=identity.backend, devices=["cuda:0"], versions=versions, workers=1)


def _record(item_id: str, category: str, status: str, *, sc: float | None = None, pq: float | None = None,
            error: tuple[str, str, str] | None = None, edit_path: str | None = None,
            aggregation: str = AGGREGATION, source: Path) -> ItemRecord:
    """A results.jsonl record as the runner makes it: scored (sc, pq) or failed at a stage (error)."""
    stage, code, message = error or (None, None, None)
    edit_failed = stage == "edit"
    score = None
    if sc is not None and pq is not None:
        score = Verdict(rubric_id="viescore", rubric_version="1", mode="logits", sub_scores={"follows": sc, "natural": pq},
                        sc=sc, pq=pq, overall=math.sqrt(sc * pq), aggregation=aggregation, attempts=1)
    return ItemRecord(
        schema=SCHEMA_VERSION, id=item_id, category=category, language="en",
        instruction=f"edit {item_id} <nicely> & well\u2028(line separator)", sources=[str(source)], status=status,
        edit=EditOutcome(status="failed" if edit_failed else "ok",
                         path=None if edit_failed else (edit_path or f"edits/{category}/{item_id}.png"), seed=7),
        score=score, error=Failure(stage=stage, code=code, message=message) if stage else None,
        editor=EDITOR, judge=JUDGE if stage != "edit" else None, finished_at="2025-01-01T00:10:00+00:00",
    )


def _line(record: ItemRecord | dict[str, Any]) -> str:
    """A journal line as the runner writes it (UTF-8, U+2028 raw inside the line)."""
    return msgspec.json.encode(record).decode()


def _fake_run(root: Path, *, tiny_editor: bool = False, tiny_scorer: bool = False,
              extra_lines: list[str] | None = None) -> Path:
    """A fake run folder for testing the report: three categories, scored and failed items, a
    superseded record, a missing edit file and a results.jsonl whose last line a crash tore; every
    instruction holds a raw U+2028, as the runner writes it.

        color  c1 scored (4, 6)   c2 scored (8, 10)   c3 failed at score
        style  s1 failed at edit
        zoom   z1 scored (2, 4), its edit file missing   z2 failed, then scored (10, 10)

    `extra_lines` go into the journal before the torn line.
    """
    run = root / "run"
    source = root / "data" / "wide.png"
    source.parent.mkdir(parents=True)
    Image.new("RGB", (600, 300), (200, 40, 40)).save(source)
    for category, item_id in (("color", "c1"), ("color", "c2"), ("color", "c3"), ("zoom", "z2")):
        path = run / "edits" / category / f"{item_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (300, 600), (40, 40, 200)).save(path)
    write_manifest(run, Manifest(
        schema=SCHEMA_VERSION, editstack_version="0.1.0", git_commit="0123456789abcdef",
        started_at="2025-01-01T00:00:00+00:00", finished_at="2025-01-01T01:02:03+00:00",
        dataset=DatasetInfo(spec="sample", items=6), config=RunConfig(dataset="sample"),
        editors=[_status("editor", EDITOR, {"diffusers": "0.35.1", "transformers": "4.57.1", "torch": "2.8.0"})],
        scorer=_status("scorer", JUDGE, {"transformers": "5.0.0", "torch": "2.8.0"}),
        rubric=RubricInfo("viescore", "1"), params=RunParams(steps=4, seed=0, seed_rule="test"),
        embedded_tiny=EmbeddedTiny(editor=tiny_editor, scorer=tiny_scorer),
    ))
    records = [
        _record("c1", "color", "scored", sc=4, pq=6, source=source),
        _record("z2", "zoom", "failed", error=("edit", "service_unavailable", "editor gone"), source=source),
        _record("c2", "color", "scored", sc=8, pq=10, source=source),
        _record("c3", "color", "failed", error=("score", "unparseable_reply", LONG_MESSAGE), source=source),
        _record("s1", "style", "failed", error=("edit", "bad_image", "item 's1' field 'source': unreadable"), source=source),
        _record("z1", "zoom", "scored", sc=2, pq=4, source=source),
        _record("z2", "zoom", "scored", sc=10, pq=10, source=source),  # the retry: replaces the failure above
    ]
    lines = [_line(r) for r in records] + (extra_lines or [])
    torn = _line(_record("z3", "zoom", "scored", sc=1, pq=1, source=source))[:40]
    (run / "results.jsonl").write_text("\n".join(lines) + "\n" + torn, encoding="utf-8")
    return run


def _summary(run: Path) -> dict[str, dict[str, Any]]:
    return {row["category"]: row for row in json.loads((run / "summary.json").read_text())}


def _gallery(run: Path) -> dict[str, list[str]]:
    """The gallery pages report.html links to, by category (in the order it lists them): their texts."""
    index = (run / "report.html").read_text()
    rows = re.findall(r"<tr><td>([^<]*)</td><td class=\"n\">\d+</td><td>(.*?)</td></tr>", index.split("<h2>Gallery</h2>")[1])
    return {category: [(run / href).read_text() for href in re.findall(r'href="([^"]+)"', links)]
            for category, links in rows}


def _stamps(run: Path) -> dict[str, tuple[int, int]]:
    """Every file of the run folder with its inode and mtime: a rewrite (temp file + rename) changes both."""
    return {str(p.relative_to(run)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def test_summary_counts_failures_and_averages_scored_items_only(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    write_reports(run)
    rows = _summary(run)
    assert list(rows) == ["color", "style", "zoom", "ALL"]
    # two items: a resample is both, either one or the other, so the 95 % interval spans the two values
    assert rows["color"] == {"category": "color", "items": 3, "scored": 2, "failed": 1, "sc_mean": 6.0, "pq_mean": 8.0,
                             "overall_mean": pytest.approx((math.sqrt(24) + math.sqrt(80)) / 2),
                             "sc_ci_low": 4.0, "sc_ci_high": 8.0, "pq_ci_low": 6.0, "pq_ci_high": 10.0,
                             "overall_ci_low": pytest.approx(math.sqrt(24)), "overall_ci_high": pytest.approx(math.sqrt(80))}
    assert rows["style"] == {"category": "style", "items": 1, "scored": 0, "failed": 1,
                             "sc_mean": None, "pq_mean": None, "overall_mean": None,
                             "sc_ci_low": None, "sc_ci_high": None, "pq_ci_low": None, "pq_ci_high": None,
                             "overall_ci_low": None, "overall_ci_high": None}
    # z2's later record (scored) replaces its earlier failure; the torn z3 line is not an item
    assert (rows["zoom"]["items"], rows["zoom"]["scored"], rows["zoom"]["failed"]) == (2, 2, 0)
    total = rows["ALL"]
    assert (total["items"], total["scored"], total["failed"]) == (6, 4, 2)
    assert total["sc_mean"] == pytest.approx((4 + 8 + 2 + 10) / 4)
    assert total["pq_mean"] == pytest.approx((6 + 10 + 4 + 10) / 4)
    assert total["overall_mean"] == pytest.approx((math.sqrt(24) + math.sqrt(80) + math.sqrt(8) + 10) / 4)
    for name in ("sc", "pq", "overall"):
        assert total[f"{name}_ci_low"] < total[f"{name}_mean"] < total[f"{name}_ci_high"], name


def test_a_mean_over_one_item_has_the_mean_as_its_interval(tmp_path: Path) -> None:
    one = _record("s2", "style", "scored", sc=5, pq=5, source=tmp_path / "x.png")
    run = _fake_run(tmp_path, extra_lines=[_line(one)])
    write_reports(run)
    style = _summary(run)["style"]
    assert (style["scored"], style["sc_mean"], style["sc_ci_low"], style["sc_ci_high"]) == (1, 5.0, 5.0, 5.0)


def test_reports_state_how_the_intervals_were_made(tmp_path: Path) -> None:
    paths = write_reports(_fake_run(tmp_path))
    for path in (paths.markdown, paths.html):
        assert "95% confidence, percentile bootstrap over items (2000 resamples, seed 0)" in path.read_text(), path.name
    assert json.loads(paths.summary_meta.read_text())["interval"] == {
        "method": "percentile bootstrap over items", "level": 0.95, "resamples": 2000, "seed": 0,
        "one_item": "the interval is the mean"}


def test_markdown_report_tables_models_and_failed_items(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    text = write_reports(run).markdown.read_text()
    overall_color = (math.sqrt(24) + math.sqrt(80)) / 2
    assert (f"| color | 3 | 2 | 1 | 6.00 [4.00, 8.00] | 8.00 [6.00, 10.00] "
            f"| {overall_color:.2f} [{math.sqrt(24):.2f}, {math.sqrt(80):.2f}] |") in text
    assert "| style | 1 | 0 | 1 | – | – | – |" in text
    assert "| **ALL** | 6 | 4 | 2 | 6.00 [" in text and "| 7.50 [" in text
    assert f"**Aggregation**: {AGGREGATION}" in text
    assert "Qwen/Qwen-Image-Edit@abc123 (diffusers/QwenImageEditPipeline, bfloat16) on cuda:0" in text
    assert "diffusers 0.35.1, transformers 4.57.1, torch 2.8.0" in text
    assert "Qwen/Qwen3-VL-8B-Instruct@abc123" in text and "transformers 5.0.0" in text
    assert "**Rubric**: viescore 1" in text and "**Judge mode**: logits" in text
    assert "(1h 02m 03s)" in text
    failed = text.split("## Failed items (2)")[1]
    assert "| s1 | style | edit | bad_image |" in failed
    assert "| c3 | color | score | unparseable_reply | judge reply did not parse: xxx" in failed
    assert "x" * 300 not in failed, "a long failure message is cut"
    assert "z2" not in failed, "a retried item that then scored is not a failure"
    assert TINY_BANNER not in text


def test_records_that_disagree_on_the_aggregation_rule_are_reported(tmp_path: Path) -> None:
    other = _record("s2", "style", "scored", sc=5, pq=5, aggregation="overall = min(sc, pq)", source=tmp_path / "x.png")
    run = _fake_run(tmp_path, extra_lines=[_line(other)])
    text = write_reports(run).markdown.read_text()
    assert f"**Aggregation**: records disagree: {AGGREGATION} (4 item(s)); overall = min(sc, pq) (1 item(s))" in text
    meta = json.loads((run / "summary.meta.json").read_text())
    assert meta["aggregation"] == {AGGREGATION: 4, "overall = min(sc, pq)": 1}


@pytest.mark.parametrize(("tiny_editor", "tiny_scorer"), [(False, False), (True, False), (False, True), (True, True)])
def test_banner_appears_only_when_embedded_tiny_models_produced_the_run(tmp_path: Path, tiny_editor: bool,
                                                                       tiny_scorer: bool) -> None:
    paths = write_reports(_fake_run(tmp_path, tiny_editor=tiny_editor, tiny_scorer=tiny_scorer))
    for path in (paths.markdown, paths.html):
        text = path.read_text()
        assert (TINY_BANNER in text) == (tiny_editor or tiny_scorer), path.name
        if tiny_editor or tiny_scorer:
            assert text.index(TINY_BANNER) < text.index("mean SC"), "the banner comes before any result"
    assert json.loads(paths.summary_meta.read_text())["embedded_tiny"] == {"editor": tiny_editor, "scorer": tiny_scorer}


def test_gallery_pages_show_thumbnail_files_and_a_placeholder_for_a_missing_edit(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    index = write_reports(run).html.read_text()
    assert index.index("mean overall") < index.index("<h2>Gallery</h2>"), "the summary table comes first"
    gallery = _gallery(run)
    assert list(gallery) == ["color", "style", "zoom"] and all(len(pages) == 1 for pages in gallery.values())
    pages = [page for pages in gallery.values() for page in pages]
    thumbs = [src for page in pages for src in re.findall(r'src="([^"]*)"', page)]
    # 6 items: 6 sources; edits of c1, c2, c3, z2 exist, s1 failed before editing, z1's file is missing
    assert len(thumbs) == 6 + 4 and all(src.startswith("../thumbs/") for src in thumbs)
    for page in [index, *pages]:
        assert "data:" not in page and "http" not in page and "url(" not in page
    # the source the six items share is one file
    assert len(set(thumbs)) == 1 + 4 and sorted(p.name for p in (run / "thumbs").iterdir()) == sorted(
        src.removeprefix("../thumbs/") for src in set(thumbs))
    for src in set(thumbs):
        with Image.open(run / "gallery" / src) as thumb:
            assert thumb.format == "JPEG" and {thumb.size} <= {(256, 128), (128, 256)}
    assert sum(page.count('<div class="ph">missing</div>') for page in pages) == 1
    assert gallery["style"][0].count('<div class="ph">no edit</div>') == 1
    [color] = gallery["color"]
    assert "edit c1 &lt;nicely&gt; &amp; well" in color, "text is escaped"
    assert "failed at score: unparseable_reply" in color and "SC <b>4.00</b> · PQ <b>6.00</b>" in color
    assert '<a href="../report.html">' in color


def test_a_category_over_the_page_bound_gets_numbered_pages_all_linked(tmp_path: Path, monkeypatch) -> None:
    run = _fake_run(tmp_path)
    monkeypatch.setattr(report, "PAGE_ITEMS", 2)
    write_reports(run)
    first, second = _gallery(run)["color"]
    assert "<b>c1</b>" in first and "<b>c2</b>" in first and "<b>c3</b>" not in first
    assert "<b>c3</b>" in second and "<b>c1</b>" not in second
    names = sorted(p.name for p in (run / "gallery").glob("color-*.html"))
    assert len(names) == 2 and f'href="{names[1]}"' in first and f'href="{names[0]}"' in second
    assert (len(_gallery(run)["zoom"]), len(_gallery(run)["style"])) == (1, 1)
    monkeypatch.setattr(report, "PAGE_ITEMS", 500)
    write_reports(run)
    assert len(_gallery(run)["color"]) == 1 and len(list((run / "gallery").glob("color-*.html"))) == 1, \
        "a page no category has any more is removed"


def test_a_second_write_with_nothing_changed_rewrites_no_file(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    write_reports(run)
    before = _stamps(run)
    write_reports(run)
    assert _stamps(run) == before


def test_a_new_item_rewrites_its_own_category_page_only(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    write_reports(run)
    before = _stamps(run)
    extra = _record("z9", "zoom", "failed", error=("edit", "bad_image", "unreadable"), source=tmp_path / "data" / "wide.png")
    text = (run / "results.jsonl").read_text()
    (run / "results.jsonl").write_text(text[:text.rindex("\n") + 1] + _line(extra) + "\n")
    write_reports(run)
    changed = {name for name, stamp in _stamps(run).items() if before.get(name) != stamp}
    assert {name for name in changed if name.startswith("gallery/")} == {
        next(name for name in before if name.startswith("gallery/zoom-"))}
    assert not any(name.startswith("thumbs/") for name in changed), "its source's thumbnail was made already"
    assert "summary.json" in changed and "<b>z9</b>" in _gallery(run)["zoom"][0]


def test_a_thumbnail_is_reused_while_newer_than_its_image_and_made_again_after(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    write_reports(run)
    before = _stamps(run)
    edit = run / "edits" / "color" / "c1.png"
    Image.new("RGB", (300, 600), (0, 200, 0)).save(edit)
    later = max(mtime_ns for _, mtime_ns in before.values()) + 10**9  # newer than any thumbnail
    os.utime(edit, ns=(later, later))
    write_reports(run)
    changed = {name for name, stamp in _stamps(run).items() if before.get(name) != stamp}
    # the page names the same thumbnail file, so only the thumbnail itself is new
    assert changed == {"edits/color/c1.png", next(name for name in changed if name.startswith("thumbs/"))}
    [thumb] = [name for name in changed if name.startswith("thumbs/")]
    with Image.open(run / thumb) as image:
        assert image.convert("RGB").getpixel((64, 128))[1] > 150, "the new edit's thumbnail"


def test_thumbnail_writer_makes_an_items_thumbnails_that_the_report_then_reuses(tmp_path: Path, caplog) -> None:
    run = _fake_run(tmp_path)
    (run / "edits" / "zoom" / "z1.png").write_bytes(b"not a png")
    records = {r.id: r for r in report._read_run(run).records}
    writer = ThumbnailWriter(run)
    for item_id in ("c1", "z1"):
        writer.add(records[item_id])
    writer.close()
    made = _stamps(run)
    assert len([name for name in made if name.startswith("thumbs/")]) == 2, "c1's edit and the shared source"
    assert "edits/zoom/z1.png is unreadable" in caplog.text
    write_reports(run)
    assert all(_stamps(run)[name] == stamp for name, stamp in made.items() if name.startswith("thumbs/"))
    assert '<div class="ph">unreadable</div>' in _gallery(run)["zoom"][0], "a thumbnail failure is a placeholder"


def test_torn_last_line_is_ignored_but_a_bad_middle_line_is_reported(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, extra_lines=['{"id": "broken", "categ'])
    paths = write_reports(run)
    assert _summary(run)["ALL"]["items"] == 6
    meta = json.loads(paths.summary_meta.read_text())
    assert meta["journal"]["torn_last_line_ignored"] is True
    [problem] = meta["journal"]["problems"]
    assert problem.startswith("results.jsonl line 8: not a JSON record")
    assert "## Problems (1)" in paths.markdown.read_text()
    assert "results.jsonl line 8" in paths.html.read_text()


def test_scored_record_without_a_score_is_a_problem_never_a_number(tmp_path: Path) -> None:
    bad = msgspec.to_builtins(_record("c9", "color", "scored", sc=1, pq=1, source=tmp_path / "x.png")) | {"score": None}
    run = _fake_run(tmp_path, extra_lines=[_line(bad)])
    write_reports(run)
    assert _summary(run)["color"]["items"] == 3
    [problem] = json.loads((run / "summary.meta.json").read_text())["journal"]["problems"]
    assert "item 'c9'" in problem and "score is null" in problem


def test_summary_files_read_with_pandas_as_they_are(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas", reason="pandas is not installed in this test environment")
    run = _fake_run(tmp_path)
    paths = write_reports(run)
    for frame in (pd.read_csv(paths.summary_csv), pd.read_json(paths.summary_json)):
        assert list(frame.columns) == ["category", "items", "scored", "failed", "sc_mean", "pq_mean", "overall_mean",
                                       "sc_ci_low", "sc_ci_high", "pq_ci_low", "pq_ci_high",
                                       "overall_ci_low", "overall_ci_high"]
        assert list(frame["category"]) == ["color", "style", "zoom", "ALL"]
        assert list(frame["failed"]) == [1, 1, 0, 2]
        assert frame["sc_mean"].iloc[0] == pytest.approx(6.0)
        assert frame["sc_ci_low"].iloc[0] == pytest.approx(4.0) and frame["sc_ci_high"].iloc[0] == pytest.approx(8.0)
        assert pd.isna(frame["sc_mean"].iloc[1]), "no scored items: no mean"
        assert pd.isna(frame["sc_ci_low"].iloc[1]) and pd.isna(frame["overall_ci_high"].iloc[1]), "nor an interval"


def test_reports_are_written_atomically_and_rewritten_identically(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    paths = write_reports(run)
    assert {path.name for path in paths} == {"report.md", "report.html", "summary.json", "summary.csv",
                                             "summary.meta.json", "gallery"}
    first = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    for path in (run / "gallery").iterdir():
        path.unlink()
    for path in paths[:-1]:
        path.unlink()
    write_reports(run)
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == first
    leftovers = [p.name for p in run.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def test_command_rewrites_the_reports_of_a_run_folder(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    done = subprocess.run([sys.executable, "-m", "editstack.runner.report", str(run)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (run / "report.html").is_file() and str(run / "report.md") in done.stdout
    assert len(_gallery(run)) == 3
    refused = subprocess.run([sys.executable, "-m", "editstack.runner.report", str(tmp_path / "data")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "manifest.json: not found" in refused.stderr


def test_folder_without_a_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match="manifest.json: not found"):
        write_reports(tmp_path)


def test_items_edited_but_not_scored_count_in_items_only(tmp_path: Path) -> None:
    edited = _record("c4", "color", "edited", source=tmp_path / "x.png")
    run = _fake_run(tmp_path, extra_lines=[_line(edited)])
    paths = write_reports(run)
    color = _summary(run)["color"]
    assert (color["items"], color["scored"], color["failed"], color["sc_mean"]) == (4, 2, 1, 6.0)
    assert "1 item(s) were edited but not scored" in paths.markdown.read_text()
    assert "edited, not scored" in _gallery(run)["color"][0]


def test_markdown_report_escapes_html_in_ids_and_categories(tmp_path: Path) -> None:
    hostile = _record("<img src=x onerror=alert(1)>", "<b>cat</b>", "failed",
                      error=("edit", "bad_image", "<script>x</script>"), source=tmp_path / "x.png")
    run = _fake_run(tmp_path, extra_lines=[_line(hostile)])
    text = write_reports(run).markdown.read_text()
    assert "<img" not in text and "<script>" not in text and "<b>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "&lt;b&gt;cat&lt;/b&gt;" in text


def _repeated(item_id: str, category: str, overalls: list[float], source: Path) -> str:
    """A journal line of an item judged len(overalls) times, each repeat's overall as given."""
    record = _record(item_id, category, "scored", sc=5, pq=5, source=source)
    score = msgspec.structs.replace(record.score, overall=sum(overalls) / len(overalls), repeat_overall=overalls,
                                    repeat_sub_scores=[{"follows": 5.0, "natural": 5.0} for _ in overalls])
    return _line(msgspec.structs.replace(record, score=score))


def test_judge_spread_is_the_mean_per_item_sd_and_the_within_item_share_of_the_variance(tmp_path: Path) -> None:
    source = tmp_path / "x.png"
    run = _fake_run(tmp_path, extra_lines=[_repeated("r1", "color", [2, 4], source),
                                           _repeated("r2", "color", [6, 8], source),
                                           _repeated("r3", "zoom", [5, 5], source)])
    paths = write_reports(run)
    spread = {row["category"]: row for row in json.loads(paths.summary_meta.read_text())["judge_spread"]}
    # color: SDs 1 and 1; within-item variance 1; all four repeats {2, 4, 6, 8} have variance 5
    assert spread["color"] == {"category": "color", "items": 2, "repeats": [2], "mean_sd": 1.0,
                               "judge_share": pytest.approx(0.2)}
    # zoom: the judge agreed with itself, and nothing varies at all: no share to give
    assert spread["zoom"] == {"category": "zoom", "items": 1, "repeats": [2], "mean_sd": 0.0, "judge_share": None}
    # the items judged once (c1, c2, z1, ...) are not part of the spread; style has no item with repeats
    assert (spread["style"]["items"], spread["style"]["mean_sd"], spread["style"]["judge_share"]) == (0, None, None)
    # ALL: SDs 1, 1, 0; within 2/3; {2, 4, 6, 8, 5, 5} has variance 20/6
    assert spread["ALL"]["mean_sd"] == pytest.approx(2 / 3) and spread["ALL"]["judge_share"] == pytest.approx(0.2)
    markdown = paths.markdown.read_text()
    assert "## Judge spread" in markdown and "| **ALL** | 3 | 2 | 0.67 | 20% |" in markdown
    assert "| color | 2 | 2 | 1.00 | 20% |" in markdown and "| zoom | 1 | 2 | 0.00 | – |" in markdown
    assert "<h2>Judge spread</h2>" in paths.html.read_text()


def test_a_run_judged_once_per_item_has_no_judge_spread(tmp_path: Path) -> None:
    paths = write_reports(_fake_run(tmp_path))
    assert json.loads(paths.summary_meta.read_text())["judge_spread"] is None
    assert "Judge spread" not in paths.markdown.read_text() and "Judge spread" not in paths.html.read_text()


def test_means_by_language_and_by_group_carry_their_intervals(tmp_path: Path) -> None:
    grouped = [msgspec.structs.replace(_record(f"g{n}", "physics", "scored", sc=s, pq=s, source=tmp_path / "x.png"),
                                       language="zh", groups=["natural_science"]) for n, s in enumerate((2.0, 4.0))]
    run = _fake_run(tmp_path, extra_lines=[_line(r) for r in grouped])
    text = write_reports(run).markdown.read_text()
    assert "## By language" in text and "## By group" in text
    assert "| natural_science | 2 | 2 | 0 | 3.00 [2.00, 4.00] |" in text
    meta = json.loads((run / "summary.meta.json").read_text())
    assert [row["category"] for row in meta["by_language"]] == ["en", "zh"]
    assert meta["by_group"][0]["overall_ci_low"] == 2.0 and meta["by_group"][0]["overall_ci_high"] == 4.0
