"""`editstack compare`: pairing by id, paired intervals, wins/ties/losses, refusing runs judged
differently, flags, unpaired items, and three self-contained files."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import msgspec
import pytest

from editstack.errors import ConfigError
from editstack.runner.cli import main
from editstack.runner.compare import LEADERBOARD_COLUMNS, write_leaderboard
from editstack.runner.config import RunConfig
from editstack.runner.report import TINY_BANNER
from editstack.runner.runfolder import (
    RESULTS_NAME,
    SCHEMA_VERSION,
    DatasetInfo,
    EmbeddedTiny,
    EditOutcome,
    Failure,
    ItemRecord,
    JudgeIdentity,
    Manifest,
    RunParams,
    write_manifest,
)
from editstack.wire.protocol import Verdict

AGGREGATION = "overall = sqrt(sc * pq)"
JUDGE = JudgeIdentity(model="Qwen/Qwen3-VL-8B-Instruct", revision="abc123", rubric_id="viescore", rubric_version="1",
                      mode="logits")
# id -> (category, overall score); None: the item failed at scoring
BASE = {"c1": ("color", 2.0), "c2": ("color", 4.0), "f1": ("color", None),
        "z1": ("zoom", 6.0), "z2": ("zoom", 8.0), "z3": ("zoom", 5.0)}


def _record(item_id: str, category: str, overall: float | None, judge: JudgeIdentity,
            aggregation: str) -> ItemRecord:
    score = None if overall is None else Verdict(
        rubric_id=judge.rubric_id, rubric_version=judge.rubric_version, mode="logits", sub_scores={"q": overall},
        sc=overall, pq=overall, overall=overall, aggregation=aggregation)
    return ItemRecord(
        schema=SCHEMA_VERSION, id=item_id, category=category, instruction=f"edit {item_id}", sources=["/data/x.png"],
        status="scored" if score else "failed", edit=EditOutcome(status="ok", path=f"edits/{category}/{item_id}.png"),
        score=score, error=None if score else Failure(stage="score", code="unparseable_reply", message="no number"),
        judge=judge, finished_at="2025-01-01T00:10:00+00:00")


def _fake_run(root: Path, name: str, items: dict[str, tuple[str, float | None]], *, judge: JudgeIdentity = JUDGE,
              aggregation: dict[str, str] | None = None, tiny: bool = False) -> Path:
    """A run folder through the run folder's own types; `aggregation` overrides the rule per item id."""
    run = root / name
    write_manifest(run, Manifest(
        schema=SCHEMA_VERSION, editstack_version="0.1.0", started_at="2025-01-01T00:00:00+00:00",
        dataset=DatasetInfo(spec="sample", items=len(items)), config=RunConfig(dataset="sample"),
        params=RunParams(seed=0, seed_rule="test"), embedded_tiny=EmbeddedTiny(editor=tiny)))
    records = [_record(i, category, overall, judge, (aggregation or {}).get(i, AGGREGATION))
               for i, (category, overall) in items.items()]
    (run / RESULTS_NAME).write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in records))
    return run


def _shifted(shift: float) -> dict[str, tuple[str, float | None]]:
    return {i: (category, None if overall is None else overall + shift) for i, (category, overall) in BASE.items()}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def _row(rows: list[dict[str, str]], category: str, kind: str, run: str, baseline: str = "base") -> dict[str, str]:
    [row] = [r for r in rows if (r["category"], r["kind"], r["run"]) == (category, kind, run)
             and r["baseline"] in ("", baseline)]
    return row


def test_runs_are_paired_by_id_and_a_constant_shift_has_an_exact_paired_interval(tmp_path: Path) -> None:
    base = _fake_run(tmp_path, "base", BASE)
    plus = _fake_run(tmp_path, "plus", _shifted(1.0))
    rows = _rows(write_leaderboard([base, plus], tmp_path / "out").csv)
    assert tuple(rows[0]) == LEADERBOARD_COLUMNS
    assert [(r["category"], r["kind"], r["run"]) for r in rows] == [
        (c, kind, run) for c in ("color", "zoom", "ALL") for kind, run in
        (("run", "base"), ("run", "plus"), ("difference", "plus"))]
    # f1 failed in both runs: counted in `failed`, never averaged in, not paired
    total = _row(rows, "ALL", "run", "base")
    assert (total["items"], float(total["mean"]), total["scored"], total["failed"]) == ("5", 5.0, "5", "1")
    assert float(total["ci_low"]) < 5.0 < float(total["ci_high"])
    assert (total["baseline"], total["wins"], total["flags"]) == ("", "", "")
    assert float(_row(rows, "color", "run", "plus")["mean"]) == 4.0  # (3 + 5) / 2 over c1, c2
    difference = _row(rows, "ALL", "difference", "plus")
    assert difference["baseline"] == "base" and difference["items"] == "5"
    assert [float(difference[k]) for k in ("mean", "ci_low", "ci_high")] == [1.0, 1.0, 1.0]
    assert (difference["wins"], difference["ties"], difference["losses"]) == ("5", "0", "0")
    assert difference["flags"] == ""


def test_wins_ties_and_losses_use_the_tie_tolerance(tmp_path: Path) -> None:
    base = _fake_run(tmp_path, "base", BASE)
    deltas = {"c1": 1.0, "c2": 0.0, "z1": -2.0, "z2": 1e-12, "z3": 3.0}
    other = _fake_run(tmp_path, "other", {i: (c, None if o is None else o + deltas[i]) for i, (c, o) in BASE.items()})
    rows = _rows(write_leaderboard([base, other], tmp_path / "out").csv)
    difference = _row(rows, "ALL", "difference", "other")
    assert (difference["wins"], difference["ties"], difference["losses"]) == ("2", "2", "1")
    assert float(difference["mean"]) == pytest.approx(2.0 / 5)
    assert float(difference["ci_low"]) < 0.4 < float(difference["ci_high"])
    zoom = _row(rows, "zoom", "difference", "other")
    assert (zoom["wins"], zoom["ties"], zoom["losses"]) == ("1", "1", "1")


def test_runs_judged_by_different_judges_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _fake_run(tmp_path, "base", BASE)
    other = _fake_run(tmp_path, "other", BASE, judge=msgspec.structs.replace(JUDGE, model="OpenGVLab/InternVL3-8B"))
    with pytest.raises(ConfigError, match="base and other: the judge model differs: Qwen/Qwen3-VL-8B-Instruct in base, "
                                          "OpenGVLab/InternVL3-8B in other"):
        write_leaderboard([base, other], tmp_path / "out")
    assert main(["compare", str(base), str(other), "--out", str(tmp_path / "out")]) == 2
    assert "--allow-different-judges" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "nothing is written for a refused comparison"


def test_a_record_with_another_aggregation_rule_is_a_different_judge(tmp_path: Path) -> None:
    base = _fake_run(tmp_path, "base", BASE)
    other = _fake_run(tmp_path, "other", BASE, aggregation={"z1": "overall = min(sc, pq)"})
    with pytest.raises(ConfigError) as refused:
        write_leaderboard([base, other], tmp_path / "out")
    assert f"other: its records disagree on the aggregation: {AGGREGATION} (4 item(s)); overall = min(sc, pq) (1 item(s))" \
        in str(refused.value)
    assert "base and other: the aggregation differs" in str(refused.value)


def test_different_judges_are_compared_and_flagged_when_allowed(tmp_path: Path) -> None:
    base = _fake_run(tmp_path, "base", BASE)
    plus = _fake_run(tmp_path, "plus", _shifted(1.0))
    other = _fake_run(tmp_path, "other", BASE, judge=msgspec.structs.replace(JUDGE, revision="def456", mode="generate"))
    paths = write_leaderboard([base, plus, other], tmp_path / "out", allow_different_judges=True)
    rows = _rows(paths.csv)
    flagged = _row(rows, "ALL", "difference", "other")
    assert [r["baseline"] for r in rows if r["category"] == "ALL" and r["kind"] == "difference"] == ["base", "base", "plus"]
    assert "base and other: the judge revision differs: abc123 in base, def456 in other" in flagged["flags"]
    assert "base and other: the judge mode differs" in flagged["flags"]
    assert "plus and other" not in flagged["flags"], "a pair's flags name only its own runs"
    assert _row(rows, "ALL", "difference", "plus")["flags"] == ""
    text = paths.markdown.read_text()
    assert "## Differences between the runs (4)" in text  # revision and mode, each against base and plus
    assert "- ⚠ plus and other: the judge mode differs: logits in plus, generate in other" in text


def test_items_present_in_some_runs_only_are_flagged_and_listed_as_unpaired(tmp_path: Path) -> None:
    base = _fake_run(tmp_path, "base", BASE)
    plus = _fake_run(tmp_path, "plus", _shifted(1.0) | {"n1": ("new", 9.0)})
    paths = write_leaderboard([base, plus], tmp_path / "out")
    text = paths.markdown.read_text()
    assert "- ⚠ base and plus: the item sets differ: no item only in base, 1 item(s) (n1) only in plus" in text
    assert "**Unpaired items**: 2" in text
    assert "- f1: base failed, plus failed" in text and "- n1: base absent, plus scored" in text
    rows = _rows(paths.csv)
    assert "the item sets differ" in _row(rows, "ALL", "difference", "plus")["flags"]
    new = _row(rows, "new", "run", "plus")
    assert (new["items"], new["mean"], new["scored"]) == ("0", "", "1"), "no paired item: no mean"


def test_three_self_contained_files_are_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _fake_run(tmp_path, "base", BASE)
    plus = _fake_run(tmp_path, "plus", _shifted(1.0))
    out = tmp_path / "board"
    assert main(["compare", str(base), str(plus), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["leaderboard.csv", "leaderboard.html", "leaderboard.md"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in ("leaderboard.md", "leaderboard.html", "leaderboard.csv")]
    page = (out / "leaderboard.html").read_text()
    assert not re.search(r"https?:|src=|href=|url\(|<script|<link|@import", page)
    assert page.count("<svg") == 3, "one chart per category and one for ALL"
    assert "5.00 [" in page and "+1.00 [+1.00, +1.00]" in page
    text = (out / "leaderboard.md").read_text()
    assert "| ALL | plus | base | 5 | +1.00 [+1.00, +1.00] | 5 | 0 | 0 |  |" in text
    assert "95% confidence, percentile bootstrap over items (2000 resamples, seed 0)" in text


def test_summary_csv_reads_with_pandas(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas", reason="pandas is not installed in this test environment")
    paths = write_leaderboard([_fake_run(tmp_path, "base", BASE), _fake_run(tmp_path, "plus", _shifted(1.0))],
                              tmp_path / "out")
    frame = pd.read_csv(paths.csv)
    assert tuple(frame.columns) == LEADERBOARD_COLUMNS
    assert frame.loc[(frame["kind"] == "difference") & (frame["category"] == "ALL"), "mean"].item() == 1.0


def test_bad_input_exits_2_naming_the_cause(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _fake_run(tmp_path, "base", BASE)
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(base), str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "manifest.json: not found" in capsys.readouterr().err
    assert main(["compare", str(base), "--out", str(tmp_path / "out")]) == 2
    assert "at least two run folders" in capsys.readouterr().err
    assert main(["compare", str(base), str(tmp_path / "base"), "--out", str(tmp_path / "out")]) == 2
    assert "given twice" in capsys.readouterr().err


def test_runs_of_embedded_tiny_models_get_the_banner(tmp_path: Path) -> None:
    base = _fake_run(tmp_path, "base", BASE)
    tiny = _fake_run(tmp_path, "tiny", _shifted(1.0), tiny=True)
    paths = write_leaderboard([base, tiny], tmp_path / "board")
    for path in (paths.markdown, paths.html):
        text = path.read_text()
        assert TINY_BANNER in text and "produced tiny;" in text
        assert text.index(TINY_BANNER) < text.index("Mean overall score"), "the banner comes before any number"
    clean = write_leaderboard([base, _fake_run(tmp_path, "plus", _shifted(1.0))], tmp_path / "clean")
    assert TINY_BANNER not in clean.markdown.read_text()
