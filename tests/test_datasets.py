"""Datasets: the sample benchmark, category selection, the alias table, and readers that report bad
items and go on.

Fixtures (manifests; KRIS-Bench, GEdit-Bench, RISEBench, ImgEdit and Hugging Face layouts; images)
are built in tmp_path by `benchmark_layouts`, in each benchmark's published layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from editstack.runner.categories import ALIASES, KRIS_GROUPS
from editstack.runner.datasets import (
    MANIFEST_NAME,
    DatasetError,
    Item,
    Problem,
    Reference,
    load_dataset,
    load_gedit,
    load_hf,
    load_imgedit,
    load_kris,
    load_manifest,
    load_rise,
    select,
    select_problems,
)
from editstack.runner.sample import SAMPLE_VERSION, write_sample

from benchmark_layouts import (
    datasets_cache,
    gedit_dataset,
    gedit_hf_snapshot,
    gedit_row,
    imgedit_singleturn,
    kris_category,
    kris_entry,
    rise_data,
    rise_entry,
    write_json,
)
from benchmark_layouts import image_bytes as png_bytes
from benchmark_layouts import write_image as write_png


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(item_id: str, category: str = "cat", source: object = "images/a.png", **extra: object) -> str:
    return json.dumps({"id": item_id, "category": category, "instruction": "make it blue",
                       "source": source, **extra}, ensure_ascii=False)


def image_reference(path: Path) -> Reference:
    return Reference(kind="image", value=str(path))


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
        assert len(item.sources) == 1 and item.sources[0].is_file()
        assert [r.kind for r in item.references] == ["image"] and Path(item.references[0].value).is_file()
        assert item.metadata["sample_version"] == SAMPLE_VERSION
        assert item.benchmark == "sample"
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


def test_select_limit_per_category_takes_the_first_n_of_every_category(sample_items: list[Item]) -> None:
    two_each = select(sample_items, None, limit_per_category=2)
    per_category = Counter(item.category for item in sample_items)
    assert Counter(item.category for item in two_each) == {category: 2 for category in per_category}
    for category in per_category:
        in_order = [i for i in sample_items if i.category == category]
        assert [i for i in two_each if i.category == category] == in_order[:2]
    # Both limits: per category first, then overall, in dataset order.
    first = {category: next(i for i in sample_items if i.category == category) for category in ("color", "physics")}
    assert select(sample_items, ["physics", "颜色"], 3, limit_per_category=1) == [first["color"], first["physics"]]
    assert select(sample_items, ["physics"], limit_per_category=0) == []


def test_select_rejects_a_category_the_dataset_does_not_have(sample_items: list[Item]) -> None:
    with pytest.raises(ValueError, match="phyiscs"):
        select(sample_items, ["physics", "phyiscs"])
    with pytest.raises(ValueError, match="limit"):
        select(sample_items, None, -1)
    with pytest.raises(ValueError, match="limit_per_category"):
        select(sample_items, None, None, -1)


# ---- the alias table ---------------------------------------------------------------------------

def test_every_category_and_group_has_a_chinese_name_and_no_name_means_two_things() -> None:
    for benchmark, table in ALIASES.items():
        owner: dict[str, str] = {}
        for canonical, others in table.items():
            assert any("\u4e00" <= char <= "\u9fff" for name in others for char in name), (benchmark, canonical)
            for name in (canonical, *others):
                assert owner.setdefault(name.casefold(), canonical) == canonical, (benchmark, name)
    for category, groups in KRIS_GROUPS.items():
        assert category in ALIASES["kris"] and all(group in ALIASES["kris"] for group in groups)
    assert len(KRIS_GROUPS) == 20  # the 20 folders of KRIS_Bench/ (22 tasks: temporal_prediction holds 3)


# ---- the manifest reader -----------------------------------------------------------------------

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
    assert first.sources == (broken_manifest.parent.absolute() / "images" / "a.png",)
    assert first.references == (image_reference(broken_manifest.parent.absolute() / "images" / "b.png"),)
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
    # Each problem knows the category its line names, so a runner can count a selection's problems.
    assert {p.line: p.category for p in problems} == {4: None, 5: "cat", 6: "cat", 7: "cat", 8: "cat", 9: "cat",
                                                       10: "cat", 11: "cat", 12: "cat", 14: None}


def test_strict_loading_raises_with_every_problem(broken_manifest: Path) -> None:
    with pytest.raises(DatasetError) as raised:
        load_manifest(broken_manifest, strict=True)
    assert len(raised.value.problems) == 10
    assert "file not found: images/x.png" in str(raised.value)


def test_manifest_takes_several_sources_and_every_kind_of_reference(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "expected.png"):
        write_png(tmp_path / "images" / name)
    both = {"kind": "image", "value": "images/expected.png"}
    manifest = write_lines(tmp_path / "manifest.jsonl", [
        json.dumps({"id": "multi", "category": "compose", "instruction": "put the cat of image 2 in image 1",
                    "sources": ["images/b.png", "images/a.png"], "groups": ["procedural"],
                    "references": [both, {"kind": "text", "value": "a cat on the sofa"},
                                   {"kind": "explanation", "value": "the cat keeps its colour"}]}),
        json.dumps({"id": "both-forms", "category": "c", "instruction": "x", "source": "images/a.png",
                    "sources": ["images/a.png"]}),
        json.dumps({"id": "no-source", "category": "c", "instruction": "x"}),
        json.dumps({"id": "empty", "category": "c", "instruction": "x", "sources": []}),
        json.dumps({"id": "bad-kind", "category": "c", "instruction": "x", "sources": ["images/a.png"],
                    "references": [{"kind": "mask", "value": "images/a.png"}]}),
        json.dumps({"id": "gone", "category": "c", "instruction": "x", "sources": ["images/a.png"],
                    "references": [{"kind": "image", "value": "images/gone.png"}]}),
        json.dumps({"id": "two-refs", "category": "c", "instruction": "x", "sources": ["images/a.png"],
                    "reference": "images/a.png", "references": []}),
    ])

    items, problems = load_manifest(manifest)

    base = tmp_path.absolute() / "images"
    assert [item.id for item in items] == ["multi"]
    assert items[0].sources == (base / "b.png", base / "a.png")
    assert items[0].references == (image_reference(base / "expected.png"),
                                   Reference(kind="text", value="a cat on the sofa"),
                                   Reference(kind="explanation", value="the cat keeps its colour"))
    assert items[0].groups == ("procedural",) and select(items, ["PROCEDURAL"]) == items
    assert [(p.item_id, p.field) for p in problems] == [
        ("both-forms", "source"), ("no-source", "sources"), ("empty", "sources"), ("bad-kind", "references"),
        ("gone", "references"), ("two-refs", "reference")]
    assert "not both" in problems[0].cause and "file not found: images/gone.png" in problems[4].cause


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
            Item(bad_id, "cat", "do it", (tmp_path / "images" / "a.png",))
    with pytest.raises(ValueError, match="no source"):
        Item("ok", "cat", "do it", ())


# ---- KRIS-Bench --------------------------------------------------------------------------------

def test_kris_folder_is_read_like_the_upstream_eval_scripts(tmp_path: Path) -> None:
    root = tmp_path / "KRIS_Bench"
    kris_category(root, "physics", {
        "1": {"ori_img": "1.png", "gt_img": "", "ins_en": "Add a weight", "explain_en": "It tilts"},
        "2": {"ori_img": "2.jpg", "gt_img": "2_gt.png", "ins_en": "Draw the top view", "explain_en": ""},
        "3": {"ori_img": "3.png", "ins_en": "Missing image"},
        "4": {"ori_img": "1.png", "instruction": "Older files say instruction", "explain": "and explain"},
    }, missing=("3.png",))
    kris_category(root, "temporal_prediction", {
        "1": {"ori_img": ["1-2.jpg", "1-3.jpg", "1-4.jpg"], "gt_img": "1-1.jpg", "ins_en": "Predict frame 1"},
        "2": {"ori_img": ["2-1.jpg", "2-2.jpg", "2-3.jpg"], "gt_img": "2-4.jpg", "ins_en": "Predict frame 4"},
    }, missing=("2-3.jpg",))
    (root / "broken").mkdir()
    (root / "broken" / "annotation.json").write_text("{not json")

    items, problems = load_dataset(root)

    folder = (root / "physics").absolute()
    assert [item.id for item in items] == ["physics-1", "physics-2", "physics-4", "temporal_prediction-1"]
    one, two, four, frames = items
    assert (one.category, one.instruction, one.language, one.benchmark) == ("physics", "Add a weight", "en", "kris")
    assert one.sources == (folder / "1.png",)
    assert one.references == (Reference(kind="explanation", value="It tilts"),) and one.metadata == {"key": "1"}
    assert two.references == (image_reference(folder / "2_gt.png"),) and two.metadata == {"key": "2"}
    assert four.instruction == "Older files say instruction"
    assert four.references == (Reference(kind="explanation", value="and explain"),)
    # Multi-image items load, their frames in the file's order, the missing frame as the reference.
    frames_folder = (root / "temporal_prediction").absolute()
    assert frames.sources == tuple(frames_folder / f"1-{n}.jpg" for n in (2, 3, 4))
    assert frames.references == (image_reference(frames_folder / "1-1.jpg"),)
    assert frames.metadata == {"key": "1", "target_frame": 1}
    found = {(p.where.parent.name, p.item_id, p.field): p.cause for p in problems}
    assert set(found) == {("broken", None, None), ("physics", "physics-3", "ori_img"),
                          ("temporal_prediction", "temporal_prediction-2", "ori_img")}
    assert found[("broken", None, None)].startswith("malformed JSON")
    assert found[("temporal_prediction", "temporal_prediction-2", "ori_img")] == "file not found: 2-3.jpg"
    assert {p.item_id: p.category for p in problems} == {None: "broken", "physics-3": "physics",
                                                         "temporal_prediction-2": "temporal_prediction"}
    assert load_kris(root)[0] == items


def test_kris_reads_all_22_tasks_with_their_knowledge_groups_and_chinese_names(tmp_path: Path) -> None:
    root = tmp_path / "KRIS_Bench"
    for category in KRIS_GROUPS:
        if category == "temporal_prediction":
            # The three temporal tasks: the frame to draw is 1 (reverse), 2-3 (intermediate) or 4 (forward);
            # item 4's gt_img is empty, so the frame is the one its ori_img lacks, as upstream works it out.
            kris_category(root, category, {
                "1": kris_entry(["1-2.jpg", "1-3.jpg", "1-4.jpg"], gt_img="1-1.jpg"),
                "2": kris_entry(["2-1.jpg", "2-3.jpg", "2-4.jpg"], gt_img="2-2.jpg"),
                "3": kris_entry(["3-1.jpg", "3-2.jpg", "3-3.jpg"], gt_img="3-4.jpg"),
                "4": kris_entry(["4-1.jpg", "4-2.jpg", "4-4.jpg"])})
        elif category == "multi-element_composition":
            kris_category(root, category, {"1": kris_entry(["1-1.jpg", "1-2.jpg"]),
                                           "2": kris_entry(["2-1.jpg", "2-2.jpeg", "2-3.JPG"])})
        else:
            kris_category(root, category, {"1": kris_entry("1.png", explain="why")})

    items, problems = load_dataset(root, strict=True)

    assert problems == [] and {item.category for item in items} == set(KRIS_GROUPS)
    by_id = {item.id: item for item in items}
    assert by_id["physics-1"].groups == ("conceptual", "natural_science")
    assert by_id["physics-1"].category_aliases == ("物理",)
    assert by_id["physics-1"].references == (Reference(kind="explanation", value="why"),)
    assert by_id["multi-element_composition-2"].groups == ("procedural", "instruction_decomposition")
    assert [p.name for p in by_id["multi-element_composition-2"].sources] == ["2-1.jpg", "2-2.jpeg", "2-3.JPG"]
    temporal = {item.metadata["key"]: (item.metadata["target_frame"], item.groups[-1])
                for item in items if item.category == "temporal_prediction"}
    assert temporal == {"1": (1, "reverse_prediction"), "2": (2, "intermediate_prediction"),
                        "3": (4, "forward_prediction"), "4": (3, "intermediate_prediction")}
    tasks = {item.category for item in items} - {"temporal_prediction"} | {g for _, g in temporal.values()}
    assert len(tasks) == 22

    assert select(items, ["物理"]) == select(items, ["physics"]) == [by_id["physics-1"]]
    natural = {"biology", "chemistry", "geography", "medicine", "mathematics", "physics"}
    assert {i.category for i in select(items, ["natural_science"])} == natural
    assert select(items, ["自然科学"]) == select(items, ["Natural Science"]) == select(items, ["natural_science"])
    assert {i.category for i in select(items, ["程序性知识"])} == {
        "abstract_reasoning", "rule-based_reasoning", "multi-element_composition", "multi-instruction_execution"}
    assert len(select(items, ["factual"])) == 7 + 4  # seven single-image categories, four temporal items
    assert [i.id for i in select(items, ["正向预测"])] == ["temporal_prediction-3"]
    with pytest.raises(ValueError, match="groups: .*natural_science \\(自然科学"):
        select(items, ["nature"])


def test_select_says_when_every_item_of_a_category_was_rejected(tmp_path: Path) -> None:
    root = tmp_path / "KRIS_Bench"
    kris_category(root, "physics", {"1": kris_entry("1.png"), "2": kris_entry("2.png")}, missing=("1.png", "2.png"))
    kris_category(root, "chemistry", {"1": kris_entry("1.png")})
    (root / "biology").mkdir()
    (root / "biology" / "annotation.json").write_text("[]")

    items, problems = load_dataset(root)

    assert [i.id for i in items] == ["chemistry-1"]
    with pytest.raises(ValueError) as raised:
        select(items, ["物理", "chemistry"], problems=problems)
    message = str(raised.value)
    assert "'物理' (physics) exists, but every item of it was rejected (2 problem(s)" in message
    assert "file not found: 1.png" in message and "no category" not in message
    with pytest.raises(ValueError, match="'biology' \\(biology\\) exists, but every item"):
        select(items, ["biology"], problems=problems)
    # The runner counts the problems of what it selected: a group reaches its rejected categories too.
    assert select_problems(problems, ["化学"]) == []
    assert {p.category for p in select_problems(problems, ["natural_science"])} == {"physics", "biology"}
    assert select_problems(problems, None) == problems


# ---- GEdit-Bench -------------------------------------------------------------------------------

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
    assert items[0].sources == ((tmp_path / "images" / "k1.png").absolute(),)
    assert items[0].category_aliases == ("颜色修改",) and items[0].benchmark == "gedit"
    assert [(p.line, p.item_id, p.field) for p in problems] == [
        (3, "k2", "input_image"), (4, "k1", "instruction_language")]
    assert load_gedit(export)[0] == items


def test_gedit_parquet_with_embedded_image_bytes_is_unpacked_once(tmp_path: Path) -> None:
    import pyarrow as pa
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
    assert items[0].sources[0].read_bytes() == png_bytes()
    assert items[0].sources[0].is_relative_to(cache) and items[0].sources[0].name == "k1-en.png"
    assert [(p.line, p.item_id, p.field) for p in problems] == [(3, "k3", "input_image")]
    first_written = items[0].sources[0].stat().st_mtime_ns
    again, _ = load_gedit(export, cache_dir=cache)
    assert again == items and again[0].sources[0].stat().st_mtime_ns == first_written


def test_gedit_hugging_face_data_folder_reads_every_shard_and_reports_a_missing_one(tmp_path: Path) -> None:
    rows = [gedit_row(f"k{n}", language, task, {"bytes": png_bytes((n, 0, 0)), "path": f"k{n}.png"})
            for n, task in enumerate(("background_change", "ps_human", "text_change"), 1) for language in ("en", "cn")]
    rows[3]["Intersection_exist"] = False
    snapshot = gedit_hf_snapshot(tmp_path / "GEdit-Bench", rows, shards=3)
    cache = tmp_path / "cache"

    items, problems = load_dataset(snapshot, cache_dir=cache, strict=True)

    assert [item.id for item in items] == ["k1-en", "k1-cn", "k2-en", "k2-cn", "k3-en", "k3-cn"]
    assert problems == [] and load_dataset(snapshot / "data", cache_dir=cache)[0] == items
    assert [item.metadata["Intersection_exist"] for item in items] == [True, True, True, False, True, True]
    assert items[2].category == "ps_human" and items[2].category_aliases == ("人像美化",)
    assert select(items, ["背景更换"]) == items[:2]
    assert items[4].sources[0].read_bytes() == png_bytes((3, 0, 0))

    (snapshot / "data" / "train-00001-of-00003.parquet").unlink()
    items, problems = load_gedit(snapshot, cache_dir=cache)
    assert [item.id for item in items] == ["k1-en", "k1-cn", "k3-en", "k3-cn"]
    assert [(p.where.name, p.cause) for p in problems] == [
        ("train-00001-of-00003.parquet", "shard missing: 2 of 3 are here, so the download is incomplete")]


def test_parquet_without_gedit_columns_is_refused_naming_the_columns_it_needs(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "x", "image": "a.png"}]), other)
    with pytest.raises(DatasetError) as raised:
        load_dataset(other)
    cause = raised.value.problems[0].cause
    assert "has columns prompt, image" in cause
    assert "lacks task_type, key, instruction, instruction_language, input_image" in cause


# ---- RISEBench ---------------------------------------------------------------------------------

def test_rise_data_total_json_keeps_text_and_image_references(tmp_path: Path) -> None:
    data = tmp_path / "data"
    entries = [
        rise_entry("temporal_reasoning", 1, reference="Rotten, blackened banana."),
        rise_entry("spatial_reasoning", 1, reference=None, reference_img="spatial_reasoning_images/1_ref.png"),
        rise_entry("logical_reasoning", 2, reference_txt="The path runs through node 2."),
        {**rise_entry("causal_reasoning", 3, reference="A melted candle."), "subtask": "State Transition",
         "consistency_free": True, "reasoning_img": None},
        rise_entry("logical_reasoning", 4, reference_img="logical_reasoning_images/4_ref.jpg"),
        {**rise_entry("causal_reasoning", 5), "instruction": ""},
    ]
    rise_data(data, entries, missing=("logical_reasoning_images/4_ref.jpg",))

    items, problems = load_dataset(data)

    base = data.absolute()
    assert [item.id for item in items] == ["temporal_reasoning_1", "spatial_reasoning_1", "logical_reasoning_2",
                                           "causal_reasoning_3"]
    assert all(item.benchmark == "rise" and item.language == "en" for item in items)
    assert items[0].sources == (base / "temporal_reasoning_images" / "1.png",)
    assert items[0].references == (Reference(kind="text", value="Rotten, blackened banana."),)
    assert items[1].references == (image_reference(base / "spatial_reasoning_images" / "1_ref.png"),)
    assert items[2].references == (Reference(kind="text", value="The path runs through node 2."),)
    assert items[3].groups == ("state_transition",)
    assert items[3].metadata == {"subtask": "State Transition", "consistency_free": True, "reasoning_img": None}
    assert [(p.line, p.item_id, p.field, p.category) for p in problems] == [
        (5, "logical_reasoning_4", "reference_img", "logical_reasoning"),
        (6, "causal_reasoning_5", "instruction", "causal_reasoning")]
    assert select(items, ["因果推理"]) == select(items, ["状态转变"]) == [items[3]]
    assert load_rise(data / "data_total.json")[0] == items


# ---- ImgEdit -----------------------------------------------------------------------------------

def test_imgedit_basic_edit_json_resolves_images_in_the_singleturn_folder(tmp_path: Path) -> None:
    entries = {
        "1082": {"id": "animal/000342021.jpg", "prompt": "Make the shell smooth.", "edit_type": "adjust"},
        "628": {"id": "daily object/000276684.jpg", "prompt": "Replace the boot with a mug.", "edit_type": "replace"},
        "97": {"id": "for_add/000236569.jpg", "prompt": "Add a chandelier.", "edit_type": "add"},
        "5": {"id": "style/gone.jpg", "prompt": "Make it ukiyo-e.", "edit_type": "style"},
    }
    singleturn = tmp_path / "Benchmark" / "singleturn"
    imgedit_singleturn(singleturn, entries, missing=("style/gone.jpg",))

    items, problems = load_dataset(singleturn)

    assert [(item.id, item.category, item.instruction) for item in items] == [
        ("1082", "adjust", "Make the shell smooth."), ("628", "replace", "Replace the boot with a mug."),
        ("97", "add", "Add a chandelier.")]
    assert items[1].sources == (singleturn.absolute() / "daily object" / "000276684.jpg",)
    assert items[1].metadata == {"key": "628", "image_id": "daily object/000276684.jpg"}
    assert items[0].category_aliases == ("属性调整",) and items[0].benchmark == "imgedit"
    assert [(p.item_id, p.field, p.category) for p in problems] == [("5", "id", "style")]
    # The repository's Benchmark/Basic/basic_edit.json, read against the unpacked images.
    basic = write_json(tmp_path / "ImgEdit" / "Benchmark" / "Basic" / "basic_edit.json", entries)
    assert load_imgedit(basic, image_root=singleturn)[0] == items
    assert load_dataset(basic)[1][0].cause == "file not found: animal/000342021.jpg"


# ---- Hugging Face datasets ---------------------------------------------------------------------

def test_saved_hugging_face_dataset_maps_gedit_columns_and_refuses_others(tmp_path: Path) -> None:
    rows = [gedit_row("k1", "en", "tone_transfer", {"bytes": png_bytes(), "path": "k1.png"}),
            gedit_row("k1", "cn", "tone_transfer", {"bytes": png_bytes(), "path": "k1.png"})]
    saved = tmp_path / "gedit-saved"
    gedit_dataset(rows).save_to_disk(str(saved))

    items, problems = load_dataset(saved, cache_dir=tmp_path / "cache", strict=True)

    assert [(i.id, i.language, i.category, i.benchmark) for i in items] == [
        ("k1-en", "en", "tone_transfer", "gedit"), ("k1-cn", "zh", "tone_transfer", "gedit")]
    assert items[0].sources[0].read_bytes() == png_bytes()
    assert items[0].sources[0].is_relative_to(tmp_path / "cache" / "hf")
    assert items[1].metadata == {"key": "k1", "instruction_language": "cn", "Intersection_exist": True}

    import datasets

    other = tmp_path / "other-saved"
    datasets.Dataset.from_list([{"prompt": "x", "edit_type": "add"}]).save_to_disk(str(other))
    with pytest.raises(DatasetError) as raised:
        load_hf(other)
    assert "lacks task_type, key, instruction, instruction_language, input_image" in raised.value.problems[0].cause


_OFFLINE_LOAD = """
import json, sys
from editstack.errors import DatasetError
from editstack.runner.datasets import load_dataset
items, problems = load_dataset(sys.argv[1], cache_dir=sys.argv[2])
out = {"items": [[i.id, i.category, i.language, str(i.sources[0])] for i in items], "problems": len(problems)}
try:
    load_dataset("hf:test-org/not-cached", cache_dir=sys.argv[2])
except DatasetError as exc:
    out["not_cached"] = str(exc.problems[0])
print(json.dumps(out))
"""


def test_hugging_face_dataset_by_id_loads_offline_from_the_datasets_cache(tmp_path: Path) -> None:
    rows = [gedit_row("k7", "en", "subject-add", {"bytes": png_bytes((0, 9, 0)), "path": "k7.png"})]
    datasets_cache(tmp_path / "hf" / "datasets", "test-org/gedit-mini", gedit_dataset(rows))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}

    # A process of its own: the datasets library reads these variables once, when it is imported.
    done = subprocess.run([sys.executable, "-c", _OFFLINE_LOAD, "hf:test-org/gedit-mini@main", str(tmp_path / "cache")],
                          env=env, capture_output=True, text=True, timeout=120, check=True)

    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["problems"] == 0 and [row[:3] for row in out["items"]] == [["k7-en", "subject-add", "en"]]
    assert Path(out["items"][0][3]).read_bytes() == png_bytes((0, 9, 0))
    assert out["not_cached"].startswith("hf:test-org/not-cached: cannot load: ")


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

    # A .json file by its shape: RISEBench's array, ImgEdit's object; a KRIS annotation gets a hint.
    write_png(tmp_path / "rise" / "spatial_reasoning_images" / "1.png")
    rise = write_json(tmp_path / "rise" / "my_subset.json", [rise_entry("spatial_reasoning", 1, reference="x")])
    assert [item.benchmark for item in load_dataset(rise)[0]] == ["rise"]
    edits = write_json(tmp_path / "edits.json", {"1": {"id": "images/a.png", "prompt": "p", "edit_type": "add"}})
    assert [item.benchmark for item in load_dataset(edits)[0]] == ["imgedit"]
    annotation = write_json(tmp_path / "annotation.json", {"1": kris_entry("1.png")})
    with pytest.raises(DatasetError, match="give the folder holding <category>/annotation.json"):
        load_dataset(annotation)

    for bad in (tmp_path / "nothing-here", tmp_path / "images" / "a.png", tmp_path / "images"):
        with pytest.raises(DatasetError) as raised:
            load_dataset(bad)
        assert isinstance(raised.value.problems[0], Problem) and raised.value.problems[0].where == bad
    with pytest.raises(ValueError, match="format"):
        load_dataset(tmp_path, format="csv")
    with pytest.raises(DatasetError, match="ORG/NAME"):
        load_dataset("hf:no-slash")
