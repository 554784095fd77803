"""Datasets: the sample benchmark, category selection, and loaders that report bad items and go on.

Fixtures (manifests, KRIS-Bench and GEdit-Bench layouts, images) are built in tmp_path with Pillow.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from editstack.runner.datasets import (
    MANIFEST_NAME,
    DatasetError,
    Item,
    Problem,
    load_dataset,
    load_gedit,
    load_kris,
    load_manifest,
    select,
)
from editstack.runner.sample import SAMPLE_VERSION, write_sample


def png_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(colour))
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(item_id: str, category: str = "cat", source: object = "images/a.png", **extra: object) -> str:
    return json.dumps({"id": item_id, "category": category, "instruction": "make it blue",
                       "source": source, **extra}, ensure_ascii=False)


@pytest.fixture(scope="module")
def sample_items(tmp_path_factory: pytest.TempPathFactory) -> list[Item]:
    items, problems = load_dataset("sample", cache_dir=tmp_path_factory.mktemp("cache"), strict=True)
    assert problems == []
    return items


# ---- the sample benchmark ----------------------------------------------------------------------

def test_sample_is_byte_identical_across_writes(tmp_path: Path) -> None:
    first = write_sample(tmp_path / "a", MANIFEST_NAME).parent
    second = write_sample(tmp_path / "b", MANIFEST_NAME).parent
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert len(files) > 10
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_sample_has_six_categories_of_four_items_in_english_and_chinese(sample_items: list[Item]) -> None:
    per_category = Counter(item.category for item in sample_items)
    assert len(per_category) >= 6
    assert min(per_category.values()) >= 4
    for category in per_category:
        assert {item.language for item in sample_items if item.category == category} == {"en", "zh"}
    for item in sample_items:
        assert item.source.is_file() and item.reference is not None and item.reference.is_file()
        assert item.metadata["sample_version"] == SAMPLE_VERSION
    chinese = next(item for item in sample_items if item.language == "zh")
    assert any("\u4e00" <= char <= "\u9fff" for char in chinese.instruction)


def test_sample_is_not_rewritten_while_its_version_marker_matches(tmp_path: Path) -> None:
    manifest = write_sample(tmp_path, MANIFEST_NAME)
    image = next((tmp_path / "images").glob("*.png"))
    image.write_bytes(b"changed by hand")
    assert write_sample(tmp_path, MANIFEST_NAME) == manifest
    assert image.read_bytes() == b"changed by hand"

    (tmp_path / ".editstack-sample").write_text("editstack sample benchmark, version 0\n")
    write_sample(tmp_path, MANIFEST_NAME)
    assert image.read_bytes().startswith(b"\x89PNG")


# ---- selection ---------------------------------------------------------------------------------

def test_physics_and_its_chinese_alias_select_the_same_items_and_only_those(sample_items: list[Item]) -> None:
    physics = select(sample_items, ["physics"])
    assert physics
    assert select(sample_items, ["物理"]) == physics
    assert select(sample_items, ["PHYSICS"]) == physics
    assert {item.category for item in physics} == {"physics"}
    assert len(physics) == sum(item.category == "physics" for item in sample_items)


def test_select_limits_overall_in_dataset_order(sample_items: list[Item]) -> None:
    assert select(sample_items, None, 5) == sample_items[:5]
    both = select(sample_items, ["物理", "color"], 3)
    assert both == [item for item in sample_items if item.category in ("color", "physics")][:3]
    assert select(sample_items, [], None) == sample_items


def test_select_rejects_a_category_the_dataset_does_not_have(sample_items: list[Item]) -> None:
    with pytest.raises(ValueError, match="phyiscs"):
        select(sample_items, ["physics", "phyiscs"])
    with pytest.raises(ValueError, match="limit"):
        select(sample_items, None, -1)


# ---- the manifest loader -----------------------------------------------------------------------

@pytest.fixture
def broken_manifest(tmp_path: Path) -> Path:
    write_png(tmp_path / "images" / "a.png")
    write_png(tmp_path / "images" / "b.png", (30, 30, 200))
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    truncated = png_bytes(size=64)
    (tmp_path / "images" / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    return write_lines(tmp_path / "manifest.jsonl", [
        "# a comment, then a blank line",
        "",
        record("cat-1", reference="images/b.png", language="en", metadata={"seed": 3}),  # line 3
        '{"id": "cat-2", "category": ',                                                   # line 4
        json.dumps({"id": "cat-3", "category": "cat", "source": "images/a.png"}),          # line 5
        record("cat-1", source="images/b.png"),                                            # line 6
        record("cat-4", source="images/x.png"),                                            # line 7
        record("cat-5", source="images/corrupt.png"),                                      # line 8
        record("cat-6", source=7),                                                         # line 9
        record("cat-7", language="cn"),                                                    # line 10
        record("cat-8", source="images/truncated.png"),                                    # line 11
        record("cat-9", refrence="images/b.png"),                                          # line 12
        record("cat-10", category="物理", language="zh", category_aliases=["physics"]),    # line 13
        "[1, 2]",                                                                          # line 14
    ])


def test_manifest_reports_each_broken_line_and_loads_the_rest(broken_manifest: Path) -> None:
    items, problems = load_manifest(broken_manifest)

    assert [item.id for item in items] == ["cat-1", "cat-10"]
    first = items[0]
    assert first.source == broken_manifest.parent.absolute() / "images" / "a.png"
    assert first.reference == broken_manifest.parent.absolute() / "images" / "b.png"
    assert (first.language, first.metadata) == ("en", {"seed": 3})
    assert items[1].category_aliases == ("physics",)

    found = {(p.line, p.item_id, p.field): p.cause for p in problems}
    assert all(p.where == broken_manifest for p in problems)
    assert set(found) == {
        (4, None, None), (5, "cat-3", "instruction"), (6, "cat-1", "id"), (7, "cat-4", "source"),
        (8, "cat-5", "source"), (9, "cat-6", "source"), (10, "cat-7", "language"),
        (11, "cat-8", "source"), (12, "cat-9", "refrence"), (14, None, None),
    }
    assert found[(4, None, None)].startswith("malformed JSON")
    assert found[(5, "cat-3", "instruction")] == "missing required field"
    assert found[(6, "cat-1", "id")] == "duplicate id (first at line 3)"
    assert found[(8, "cat-5", "source")].startswith("unreadable image images/corrupt.png")
    assert found[(9, "cat-6", "source")] == "expected a string, got number"
    assert "Chinese is 'zh'" in found[(10, "cat-7", "language")]
    assert found[(11, "cat-8", "source")].startswith("unreadable image images/truncated.png")
    assert found[(14, None, None)] == "expected a JSON object, got array"
    missing = next(p for p in problems if p.line == 7)
    assert str(missing) == f"{broken_manifest}:7 item 'cat-4' field 'source': file not found: images/x.png"


def test_strict_loading_raises_with_every_problem(broken_manifest: Path) -> None:
    with pytest.raises(DatasetError) as raised:
        load_manifest(broken_manifest, strict=True)
    assert len(raised.value.problems) == 10
    assert "file not found: images/x.png" in str(raised.value)


def test_unsafe_item_ids_and_categories_are_rejected_not_rewritten(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "a.png")
    manifest = write_lines(tmp_path / "manifest.jsonl", [
        record("../escape"), record("a/b"), record(""), record(".."), record("tab\there"),
        record(" padded"), record("ok", category="../up"), record("fine"),
    ])
    items, problems = load_manifest(manifest)
    assert [item.id for item in items] == ["fine"]
    assert [(p.line, p.field) for p in problems] == [
        (1, "id"), (2, "id"), (3, "id"), (4, "id"), (5, "id"), (6, "id"), (7, "category")]
    assert "path separator" in problems[0].cause and "is empty" in problems[2].cause

    for bad_id in ("x/y", "..", "", "a\\b"):
        with pytest.raises(ValueError):
            Item(bad_id, "cat", "do it", tmp_path / "images" / "a.png")


# ---- KRIS-Bench --------------------------------------------------------------------------------

def test_kris_folder_is_read_like_the_upstream_eval_scripts(tmp_path: Path) -> None:
    root = tmp_path / "KRIS_Bench"
    write_png(root / "physics" / "1.png")
    write_png(root / "physics" / "2.jpg")
    write_png(root / "physics" / "2_gt.png")
    (root / "physics" / "annotation.json").write_text(json.dumps({
        "1": {"ori_img": "1.png", "gt_img": "", "ins_en": "Add a weight", "explain_en": "It tilts"},
        "2": {"ori_img": "2.jpg", "gt_img": "2_gt.png", "ins_en": "Draw the top view", "explain_en": ""},
        "3": {"ori_img": "3.png", "ins_en": "Missing image"},
        "4": {"ori_img": "1.png", "instruction": "Older files say instruction", "explain": "and explain"},
    }))
    write_png(root / "temporal_prediction" / "1-2.jpg")
    (root / "temporal_prediction" / "annotation.json").write_text(json.dumps({
        "1": {"ori_img": ["1-2.jpg", "1-3.jpg", "1-4.jpg"], "gt_img": "1-1.jpg", "ins_en": "Predict frame 1"},
    }))
    (root / "broken").mkdir()
    (root / "broken" / "annotation.json").write_text("{not json")

    items, problems = load_dataset(root)

    assert [item.id for item in items] == ["physics-1", "physics-2", "physics-4"]
    one, two, four = items
    assert (one.category, one.instruction, one.language) == ("physics", "Add a weight", "en")
    assert one.source == (root / "physics" / "1.png").absolute() and one.reference is None
    assert one.metadata == {"key": "1", "explain": "It tilts"}
    assert two.reference == (root / "physics" / "2_gt.png").absolute() and two.metadata == {"key": "2"}
    assert (four.instruction, four.metadata["explain"]) == ("Older files say instruction", "and explain")
    found = {(p.where.parent.name, p.item_id, p.field): p.cause for p in problems}
    assert set(found) == {("broken", None, None), ("physics", "physics-3", "ori_img"),
                          ("temporal_prediction", "temporal_prediction-1", "ori_img")}
    assert found[("broken", None, None)].startswith("malformed JSON")
    assert "lists 3 images" in found[("temporal_prediction", "temporal_prediction-1", "ori_img")]
    assert load_kris(root)[0] == items


# ---- GEdit-Bench -------------------------------------------------------------------------------

def gedit_row(key: str, language: str = "en") -> dict[str, object]:
    instruction = "把球变成蓝色" if language == "cn" else "make it blue"
    return {"task_type": "color_alter", "key": key, "instruction": instruction,
            "instruction_language": language, "input_image": f"images/{key}.png",
            "input_image_raw": f"images/{key}.png", "Intersection_exist": True}


def test_gedit_jsonl_export_is_read_with_cn_as_chinese(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "k1.png")
    export = write_lines(tmp_path / "gedit.jsonl", [
        json.dumps(gedit_row("k1")),
        json.dumps(gedit_row("k1", "cn")),
        json.dumps(gedit_row("k2")),
        json.dumps(gedit_row("k1", "fr")),
    ])

    items, problems = load_dataset(export)

    assert [(item.id, item.category, item.language) for item in items] == [
        ("k1-en", "color_alter", "en"), ("k1-cn", "color_alter", "zh")]
    assert items[1].metadata == {"key": "k1", "instruction_language": "cn", "Intersection_exist": True}
    assert items[0].source == (tmp_path / "images" / "k1.png").absolute()
    assert [(p.line, p.item_id, p.field) for p in problems] == [
        (3, "k2", "input_image"), (4, "k1", "instruction_language")]
    assert load_gedit(export)[0] == items


def test_gedit_parquet_with_embedded_image_bytes_is_unpacked_once(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="pyarrow is optional; parquet needs it")
    import pyarrow.parquet as pq

    rows = [gedit_row("k1"), gedit_row("k2", "cn"), gedit_row("k3")]
    rows[0]["input_image"] = {"bytes": png_bytes(), "path": "k1.png"}
    rows[1]["input_image"] = {"bytes": png_bytes((0, 0, 255)), "path": None}
    rows[2]["input_image"] = {"bytes": b"garbage", "path": "k3.png"}
    for row in rows:
        row["input_image_raw"] = row["input_image"]
    export = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), export)
    cache = tmp_path / "cache"

    items, problems = load_dataset(export, cache_dir=cache)

    assert [(item.id, item.language) for item in items] == [("k1-en", "en"), ("k2-cn", "zh")]
    assert items[0].source.read_bytes() == png_bytes()
    assert items[0].source.is_relative_to(cache) and items[0].source.name == "k1-en.png"
    assert [(p.line, p.item_id, p.field) for p in problems] == [(3, "k3", "input_image")]
    first_written = items[0].source.stat().st_mtime_ns
    again, _ = load_gedit(export, cache_dir=cache)
    assert again == items and again[0].source.stat().st_mtime_ns == first_written


# ---- format detection --------------------------------------------------------------------------

def test_load_dataset_detects_the_format_and_an_explicit_format_overrides_it(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "k1.png")
    write_png(tmp_path / "images" / "a.png")
    write_lines(tmp_path / "manifest.jsonl", [record("cat-1")])
    export = write_lines(tmp_path / "rows.jsonl", [json.dumps(gedit_row("k1"))])

    assert [item.id for item in load_dataset(tmp_path)[0]] == ["cat-1"]
    assert [item.id for item in load_dataset(export)[0]] == ["k1-en"]
    # Read as a manifest, the GEdit row has none of the manifest's fields.
    items, problems = load_dataset(export, format="manifest")
    assert items == [] and problems[0].field == "task_type"

    for bad in (tmp_path / "nothing-here", tmp_path / "images" / "a.png"):
        with pytest.raises(DatasetError) as raised:
            load_dataset(bad)
        assert isinstance(raised.value.problems[0], Problem) and raised.value.problems[0].where == bad
    with pytest.raises(ValueError, match="format"):
        load_dataset(tmp_path, format="csv")
