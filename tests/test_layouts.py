"""Exporting a run's edits in each benchmark's own layout, and scoring edits in those layouts: a run of
each benchmark's fixture (`benchmark_layouts`) through the runner with fake services, exported, the
files checked where the benchmark's scripts open them (paths written out here, from
`editstack.runner.layouts`' sources), then re-scored with ``--only score --edits OUT``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from PIL import Image

from editstack.errors import ConfigError
from editstack.runner.cli import main
from editstack.runner.config import load_config
from editstack.runner.layouts import export_run
from editstack.runner.pipeline import run
from editstack.runner.runfolder import RESULTS_NAME, EditOutcome, Failure, Journal, ItemRecord

from benchmark_layouts import (gedit_row, imgedit_singleturn, kris_category, kris_entry, rise_data, rise_entry,
                               write_image)
from fakes import FAIL_MARK, fake_services

Fixture = tuple[Path, dict[str, str]]  # the dataset, and each item's edit as the benchmark's scripts open it


@pytest.fixture
def services(sockdir: Path) -> Iterator[dict[str, str]]:
    with fake_services(str(sockdir)) as endpoints:
        yield endpoints


def _gedit(folder: Path) -> Fixture:
    write_image(folder / "images" / "k1.png")
    write_image(folder / "images" / "k2.jpg")
    rows = [gedit_row("k1"), gedit_row("k1", "cn"),
            gedit_row("k2", task_type="background_change", image="images/k2.jpg")]  # a JPEG source
    (folder / "gedit.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    # test_gedit_score.py: {save_path}/fullset/{group_name}/{instruction_language}/{key}.png
    return folder / "gedit.jsonl", {"k1-en": "fullset/color_alter/en/k1.png", "k1-cn": "fullset/color_alter/cn/k1.png",
                                    "k2-en": "fullset/background_change/en/k2.png"}


def _kris(folder: Path) -> Fixture:
    kris_category(folder, "physics", {"1": kris_entry("1.png"), "2": kris_entry("2.jpg")})
    kris_category(folder, "multi-element_composition", {"1": kris_entry(["a.png", "b.png"], "Put them together")})
    # metrics_*.py: os.path.join(RESULTS_DIR, model_name, category, f"{image_id}.jpg")
    return folder, {"physics-1": "physics/1.jpg", "physics-2": "physics/2.jpg",
                    "multi-element_composition-1": "multi-element_composition/1.jpg"}


def _rise(folder: Path) -> Fixture:
    rise_data(folder, [rise_entry("temporal_reasoning", 1, reference="Older."),
                       rise_entry("logical_reasoning", 2, reference_txt="Node 2.")])
    # gpt_eval.py: osp.join(output_dir, f'images/{category}'), then f"{index}.png"
    return folder, {"temporal_reasoning_1": "images/temporal_reasoning/temporal_reasoning_1.png",
                    "logical_reasoning_2": "images/logical_reasoning/logical_reasoning_2.png"}


def _imgedit(folder: Path) -> Fixture:
    imgedit_singleturn(folder, {"1082": {"id": "animal/1.jpg", "prompt": "Make it smoother", "edit_type": "adjust"},
                                "97": {"id": "for_add/2.jpg", "prompt": "Add a lamp", "edit_type": "add"}})
    # basic_bench.py: os.path.join(result_img_folder, f"{key}.png")
    return folder, {"1082": "1082.png", "97": "97.png"}


FIXTURES: dict[str, Callable[[Path], Fixture]] = {"gedit": _gedit, "kris": _kris, "rise": _rise, "imgedit": _imgedit}


def _run(tmp_path: Path, services: dict[str, str], dataset: Path, run_dir: str = "run", **overrides: object) -> int:
    # judged as VIEScore whatever the benchmark: where the edits are is tested here, each benchmark's
    # own judging in test_protocols.py
    return run(load_config(None, {"dataset": str(dataset), "run_dir": str(tmp_path / run_dir),
                                  "editor.endpoints": [services["editor"]], "scorer.endpoint": services["scorer"],
                                  "editor.deadline_s": 5, "scorer.deadline_s": 5, "scorer.protocol": "viescore",
                                  **overrides}))


def _records(run_dir: Path) -> dict[str, ItemRecord]:
    return Journal(run_dir / RESULTS_NAME).load().records


def _files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("layout", FIXTURES)
def test_an_exported_run_lies_where_the_benchmark_scripts_look_and_is_rescored_from_there(
        tmp_path, services, layout) -> None:
    dataset, expected = FIXTURES[layout](tmp_path / "data")
    assert _run(tmp_path, services, dataset) == 0
    out = tmp_path / "out"

    summary = export_run(tmp_path / "run", layout, out)

    assert sorted(summary.exported) == sorted(expected) and summary.no_edit == summary.unreadable == []
    sources = {path.replace(".png", "_SRCIMG.png") for path in expected.values()} if layout == "gedit" else set()
    assert _files(out) == set(expected.values()) | sources
    for name in _files(out):
        with Image.open(out / name) as image:
            assert image.format == ("JPEG" if name.endswith(".jpg") else "PNG"), name
    if layout != "kris":  # a PNG edit is copied as it is
        edits = {record.id: tmp_path / "run" / record.edit.path for record in _records(tmp_path / "run").values()}
        assert all((out / path).read_bytes() == edits[item].read_bytes() for item, path in expected.items())

    # scored from the layout: every item found there but the one whose file is gone, which names it
    gone, *kept = sorted(expected)
    (out / expected[gone]).unlink()
    assert _run(tmp_path, services, dataset, "rescored", only="score", edits=str(out)) == 1
    records = _records(tmp_path / "rescored")
    assert records[gone].status == "failed" and records[gone].error.stage == "edit"
    assert records[gone].error.message == f"item {gone!r} field 'edited': no file {(out / expected[gone]).resolve()}"
    assert {item: (records[item].status, records[item].edit.path) for item in kept} == {
        item: ("scored", str((out / expected[item]).resolve())) for item in kept}


def test_export_leaves_out_items_without_an_edit_and_lists_them(tmp_path, services, capsys) -> None:
    dataset = tmp_path / "KRIS_Bench"
    kris_category(dataset, "physics", {"1": kris_entry("1.png"), "2": kris_entry("2.png"),
                                       "3": kris_entry("3.png", f"please {FAIL_MARK}")})
    assert _run(tmp_path, services, dataset) == 1  # the judge failed physics-3; its edit is there
    journal = Journal(tmp_path / "run" / RESULTS_NAME)
    records = journal.load().records
    # physics-2 as an edit failure records it: no edit to export
    records["physics-2"] = msgspec.structs.replace(
        records["physics-2"], status="failed", score=None, edit=EditOutcome(status="failed"),
        error=Failure(stage="edit", code="model_error", message="item 'physics-2': out of memory"))
    journal.rewrite(records.values())
    out = tmp_path / "results" / "my-model"

    status = main(["export", str(tmp_path / "run"), "--layout", "kris", str(out)])

    assert status == 1
    printed = capsys.readouterr()
    assert f"exported 2 item(s) to {out} in the kris layout" in printed.out
    assert "left out 1 item(s) without an edit (their edit failed):\n  physics-2" in printed.err
    assert _files(out) == {"physics/1.jpg", "physics/3.jpg"}


def test_export_refuses_a_non_empty_folder_unless_told_and_a_run_of_another_benchmark(tmp_path, services) -> None:
    dataset, expected = _imgedit(tmp_path / "data")
    assert _run(tmp_path, services, dataset) == 0
    out = tmp_path / "out"
    write_image(out / "result.json.png")  # e.g. what an earlier evaluation left there

    with pytest.raises(ConfigError, match="is not empty"):
        export_run(tmp_path / "run", "imgedit", out)
    assert export_run(tmp_path / "run", "imgedit", out, overwrite=True).exported
    assert _files(out) == set(expected.values()) | {"result.json.png"}, "nothing else is removed"
    with pytest.raises(ConfigError, match="the kris layout holds kris items; the items of .* come from imgedit"):
        export_run(tmp_path / "run", "kris", tmp_path / "elsewhere")
    assert main(["export", str(tmp_path / "data"), "--layout", "imgedit", str(tmp_path / "other")]) == 2
    assert not (tmp_path / "other").exists()


def test_a_run_folder_of_benchmark_items_is_still_read_through_its_edits_tree(tmp_path, services) -> None:
    dataset, _ = _imgedit(tmp_path / "data")
    assert _run(tmp_path, services, dataset) == 0

    assert _run(tmp_path, services, dataset, "rescored", only="score", edits=str(tmp_path / "run")) == 0

    records = _records(tmp_path / "rescored")
    assert {item: record.edit.path for item, record in records.items()} == {
        item: str((tmp_path / "run" / "edits" / category / f"{item}.png").resolve())
        for item, category in (("1082", "adjust"), ("97", "add"))}
