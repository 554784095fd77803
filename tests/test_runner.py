"""The runner end to end: the real editor and scorer services in their own environments (tiny
models), the runner as a real process, the run folder checked file by file."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from editstack.runner.datasets import load_dataset, select

from conftest import ServiceProcess, service_python

SAMPLE_ITEMS = 24
PHYSICS_ITEMS = 4


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """One editor and one scorer for the module's tests, on ipc sockets in a short folder."""
    home = Path(tempfile.mkdtemp(prefix="es-run-", dir="/tmp"))
    models = tmp_path_factory.mktemp("models")
    started = {
        "editor": ServiceProcess([service_python("editor"), "-m", "editstack_editor"], f"ipc://{home}/editor.sock",
                                 env={"EDITOR_ENDPOINT": f"ipc://{home}/editor.sock", "EDITOR_TINY_DIR": str(models / "editor"),
                                      "EDITOR_CONDITION_MAX_PX": str(64 * 64), "EDITOR_WIDTH": "64", "EDITOR_HEIGHT": "64",
                                      "EDITOR_STEPS": "2"},
                                 log=models / "editor.log"),
        "scorer": _scorer_process(home / "scorer.sock", models),
    }
    for service in started.values():
        service.start()
    for service in started.values():
        service.wait_ready(180)
    yield {name: s.endpoint for name, s in started.items()} | {"home": home, "models": models}
    for service in started.values():
        service.stop()
    shutil.rmtree(home, ignore_errors=True)


def _scorer_process(socket: Path, models: Path) -> ServiceProcess:
    endpoint = f"ipc://{socket}"
    return ServiceProcess([service_python("scorer"), "-m", "editstack_scorer"], endpoint,
                          env={"SCORER_ENDPOINT": endpoint, "SCORER_TINY_DIR": str(models / "scorer")},
                          log=models / f"{socket.stem}.log")


def _config(tmp_path: Path, services: dict, **overrides) -> Path:
    config = {
        "dataset": "sample",
        "run_dir": str(tmp_path / "run"),
        "editor": {"endpoints": [services["editor"]], "items_per_request": 4, "timeout_s": 60, "deadline_s": 60},
        "scorer": {"endpoint": services["scorer"], "items_per_request": 4, "timeout_s": 60, "deadline_s": 60},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            config[section][name] = value
        else:
            config[key] = value
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def _run(config: Path, *flags: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(config.parent / "cache")}
    return subprocess.run([sys.executable, "-m", "editstack.runner.cli", "run", "--config", str(config), *flags],
                          capture_output=True, text=True, timeout=timeout_s, env=env)


def _start(config: Path, **popen) -> subprocess.Popen:
    """The runner as a background process (for tests that kill something under it)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(config.parent / "cache")}
    return subprocess.Popen([sys.executable, "-m", "editstack.runner.cli", "run", "--config", str(config)], env=env, **popen)


def _wait_for_records(run_dir: Path, count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(_records(run_dir)) < count:
        time.sleep(0.05)


def _records(run_dir: Path) -> list[dict]:
    if not (run_dir / "results.jsonl").exists():
        return []
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_bytes().split(b"\n") if line.strip()]


def test_full_run_of_the_sample_writes_every_artefact_with_every_item_scored(tmp_path, services) -> None:
    import pandas as pd

    result = _run(_config(tmp_path, services))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    records = _records(run)
    assert len(records) == SAMPLE_ITEMS and len({r["id"] for r in records}) == SAMPLE_ITEMS
    assert all(r["status"] == "scored" and r["error"] is None for r in records)
    for record in records:
        assert (run / record["edit"]["path"]).is_file()
        assert Image.open(run / record["edit"]["path"]).size == (64, 64)
        assert 0 <= record["score"]["overall"] <= 10 and record["score"]["raw"]
        assert record["schema"] == 1 and record["editor"]["backend"] == "diffusers/QwenImageEditPlusPipeline"
        assert record["editor"]["embedded_tiny"] and record["judge"]["embedded_tiny"]
        assert (record["judge"]["rubric_id"], record["judge"]["rubric_version"]) == ("viescore", "1")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["editors"][0]["versions"]["diffusers"] == "0.39.0"
    assert manifest["scorer"]["versions"]["transformers"].startswith("5.")
    assert (manifest["rubric"]["id"], manifest["rubric"]["version"], len(manifest["rubric"]["sha256"])) == \
        ("viescore", "1", 64)
    assert manifest["embedded_tiny"] == {"editor": True, "scorer": True}
    assert manifest["finished_at"] and manifest["counts"]["scored"] == SAMPLE_ITEMS
    timings = manifest["timings"]
    assert 0 < timings["edit_busy_s"] <= timings["wall_s"] and 0 < timings["score_busy_s"] <= timings["wall_s"]
    assert yaml.safe_load((run / "config.yaml").read_text())["editor"]["endpoints"] == [services["editor"]]
    report = (run / "report.md").read_text()
    assert "Scores mean nothing" in report and "sqrt(sc * pq)" in report
    # the gallery's pages, linked from report.html, show a thumbnail file of every source and edit
    pages = re.findall(r'href="(gallery/[^"]+)"', (run / "report.html").read_text())
    thumbnails = [src for page in pages for src in re.findall(r'src="\.\./(thumbs/[^"]+)"', (run / page).read_text())]
    assert len(thumbnails) >= 2 * SAMPLE_ITEMS and all((run / t).is_file() for t in thumbnails)
    summary = pd.read_csv(run / "summary.csv")
    assert summary.set_index("category").loc["ALL", "scored"] == SAMPLE_ITEMS
    assert len(pd.read_json(run / "summary.json")) == len(summary)

    again = _run(_config(tmp_path, services))  # a second run of the same folder does nothing twice
    assert again.returncode == 0 and len(_records(run)) == SAMPLE_ITEMS


def test_categories_filter_in_chinese_runs_only_physics(tmp_path, services) -> None:
    result = _run(_config(tmp_path, services), "--categories", "物理")
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(tmp_path / "run")
    assert len(records) == PHYSICS_ITEMS and {r["category"] for r in records} == {"physics"}


def test_runner_killed_with_sigkill_resumes_to_a_complete_run_with_each_item_once(tmp_path, services) -> None:
    config = _config(tmp_path, services, editor__items_per_request=2, scorer__items_per_request=2)
    runner = _start(config, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_records(tmp_path / "run", 4)
    runner.send_signal(signal.SIGKILL)
    runner.wait(10)
    done_before = len(_records(tmp_path / "run"))
    assert 4 <= done_before < SAMPLE_ITEMS, "the runner was not killed mid-run"
    result = _run(config)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = Counter(r["id"] for r in _records(tmp_path / "run"))
    assert len(counts) == SAMPLE_ITEMS and set(counts.values()) == {1}


def test_scorer_killed_and_restarted_mid_run_loses_and_duplicates_nothing(tmp_path, services) -> None:
    scorer = _scorer_process(services["home"] / "flaky.sock", services["models"]).start()
    scorer.wait_ready(120)
    config = _config(tmp_path, {**services, "scorer": scorer.endpoint}, scorer__items_per_request=2,
                     scorer__timeout_s=5, scorer__deadline_s=120)
    runner = _start(config, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_records(tmp_path / "run", 2)
    scorer.stop(signal.SIGKILL)
    time.sleep(2)
    scorer.start()  # the same endpoint, as compose's restart policy would bring it back
    try:
        _, stderr = runner.communicate(timeout=300)
    finally:
        scorer.stop()
    assert runner.returncode == 0, stderr[-3000:]
    records = _records(tmp_path / "run")
    assert Counter(r["id"] for r in records) == Counter({r["id"]: 1 for r in records}) and len(records) == SAMPLE_ITEMS
    assert all(r["status"] == "scored" for r in records)
    assert "retrying" in stderr


def test_scorer_gone_for_good_records_failures_writes_the_report_and_exits_non_zero(tmp_path, services) -> None:
    scorer = _scorer_process(services["home"] / "doomed.sock", services["models"]).start()
    scorer.wait_ready(120)
    config = _config(tmp_path, {**services, "scorer": scorer.endpoint}, limit=8, scorer__items_per_request=2,
                     scorer__timeout_s=2, scorer__retries=0, scorer__deadline_s=4)
    runner = _start(config, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_records(tmp_path / "run", 1)
    scorer.stop(signal.SIGKILL)
    _, stderr = runner.communicate(timeout=300)
    assert runner.returncode == 1, stderr[-3000:]
    records = _records(tmp_path / "run")
    failed = [r for r in records if r["status"] == "failed"]
    assert len(records) == 8 and failed
    for record in failed:
        assert record["error"]["stage"] == "score" and record["error"]["code"] == "service_unavailable"
        assert record["score"] is None
    report = (tmp_path / "run" / "report.md").read_text()
    assert "service_unavailable" in report


def test_score_only_scores_an_existing_edits_folder_without_an_editor(tmp_path, services) -> None:
    edits = tmp_path / "other-tool"
    sample_items = select(load_dataset("sample", cache_dir=tmp_path / "cache" / "editstack")[0], limit=7)
    for item in sample_items[:6]:
        (edits / item.category).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((48, 48, 3), 120, np.uint8)).save(edits / item.category / f"{item.id}.png")
    elsewhere = "ipc:///nonexistent/scorer.sock"  # the file's scorers; --scorer names the one to use instead
    config = _config(tmp_path, {"editor": "ipc:///nonexistent/editor.sock", "scorer": elsewhere}, limit=7,
                     scorer__endpoints=[elsewhere])
    result = _run(config, "--only", "score", "--edits", str(edits), "--run-dir", str(tmp_path / "scored"),
                  "--scorer", services["scorer"])
    assert result.returncode == 1  # the 7th item has no edit
    records = {r["id"]: r for r in _records(tmp_path / "scored")}
    assert len(records) == 7, result.stderr[-3000:]
    assert [r["status"] for r in records.values()].count("scored") == 6
    missing = records[sample_items[6].id]
    assert missing["status"] == "failed" and missing["error"]["code"] == "missing_image"
    assert all(r["edit"]["status"] == "existing" for r in records.values())


def test_broken_manifest_reports_item_errors_and_scores_the_rest(tmp_path, services) -> None:
    folder = tmp_path / "bench"
    (folder / "images").mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(folder / "images" / "ok.png")
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    lines = [
        {"id": "good-1", "category": "color", "instruction": "make it red", "source": "images/ok.png"},
        "{not json",
        {"id": "missing", "category": "color", "instruction": "make it red", "source": "images/nope.png"},
        {"id": "corrupt", "category": "color", "instruction": "make it red", "source": "images/corrupt.png"},
        {"id": "good-2", "category": "add", "instruction": "添加一只猫", "language": "zh", "source": "images/ok.png"},
    ]
    (folder / "manifest.jsonl").write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    result = _run(_config(tmp_path, services, dataset=str(folder / "manifest.jsonl")))
    assert result.returncode == 1  # dataset problems make the run incomplete
    for cause in ("manifest.jsonl:2", "'missing' field 'source'", "'corrupt' field 'source'"):
        assert cause in result.stderr
    records = _records(tmp_path / "run")
    assert sorted(r["id"] for r in records) == ["good-1", "good-2"] and all(r["status"] == "scored" for r in records)
    assert "manifest.jsonl:2" in (tmp_path / "run" / "report.md").read_text()


def test_kris_folder_and_gedit_export_run_through_the_services(tmp_path, services) -> None:
    kris = tmp_path / "KRIS_Bench" / "physics"
    kris.mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(kris / "1.jpg")
    (kris / "annotation.json").write_text(json.dumps(
        {"1": {"ori_img": "1.jpg", "gt_img": "", "ins_en": "let the ball fall", "explain_en": "gravity"}}))
    gedit = tmp_path / "gedit"
    (gedit / "images").mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 30, np.uint8)).save(gedit / "images" / "k1.png")
    (gedit / "rows.jsonl").write_text(json.dumps({"key": "k1", "task_type": "color_alter", "instruction": "变红",
                                                  "instruction_language": "cn", "input_image": "images/k1.png"}) + "\n")
    for spec, run_dir in ((tmp_path / "KRIS_Bench", "kris"), (gedit / "rows.jsonl", "gedit")):
        result = _run(_config(tmp_path, services, dataset=str(spec), run_dir=str(tmp_path / run_dir)))
        assert result.returncode == 0, result.stderr[-3000:]
        [record] = _records(tmp_path / run_dir)
        assert record["status"] == "scored"
    assert record["category"] == "color_alter" and record["language"] == "zh"


def test_a_multi_image_kris_item_is_edited_and_scored_and_only_selected_problems_count(tmp_path, services) -> None:
    from benchmark_layouts import kris_category, kris_entry

    root = tmp_path / "KRIS_Bench"
    kris_category(root, "multi-element_composition", {
        "1": kris_entry(["1-a.jpg", "1-b.jpg", "1-c.jpg"], "put the three objects in one scene", gt_img="1-gt.jpg",
                        explain="the objects keep their colours")})
    # a broken item in a category this run does not select: listed, never counted against the run
    kris_category(root, "count_change", {"1": kris_entry("1.jpg", "add one more")}, missing=("1.jpg",))
    config = _config(tmp_path, services, dataset=str(root), run_dir=str(tmp_path / "kris"))
    result = _run(config, "--categories", "多元素组合")  # its Chinese name
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = _records(tmp_path / "kris")
    assert record["status"] == "scored" and len(record["sources"]) == 3
    assert {r["kind"] for r in record["references"]} == {"image", "explanation"}
    manifest = json.loads((tmp_path / "kris" / "manifest.json").read_text())
    assert manifest["dataset"]["problems"] == [] and len(manifest["dataset"]["unselected_problems"]) == 1
    report = (tmp_path / "kris" / "report.md").read_text()
    assert "outside this run's selection" in report
    assert report.index("## Results") < report.index("outside this run's selection")
