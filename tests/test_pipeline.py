"""The runner against in-process fake services (the real transport, model-free workers): the records
it writes, their schema and provenance, failures kept apart from scores, and resume. Each test takes
a fraction of a second; test_runner.py runs the same paths against the real services."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
from PIL import Image

from editstack.errors import ConfigError, RunFolderError, ServiceNotReady
from editstack.runner.config import load_config
from editstack.runner.pipeline import run
from editstack.runner.runfolder import RESULTS_NAME, SCHEMA_VERSION, Journal, RunFolderLock, read_manifest

from editstack.service.echo import EchoWorker
from editstack.wire.codec import Limits
from fakes import (FAIL_MARK, FAKE_AGGREGATION, FakeScorerWorker, echo_status, fake_pq, fake_sc, fake_scorer_status,
                   fake_services, in_process_service)


@pytest.fixture
def sockets() -> Iterator[str]:
    folder = tempfile.mkdtemp(prefix="es-fake-", dir="/tmp")  # ipc paths must stay short
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def services(sockets) -> Iterator[dict[str, str]]:
    with fake_services(sockets) as endpoints:
        yield endpoints


def _dataset(folder: Path, instructions: dict[str, str]) -> Path:
    """A manifest of 32x32 items, one per (id, instruction), in two categories."""
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 40, 40)).save(folder / "red.png")
    lines = [json.dumps({"id": item_id, "category": "even" if n % 2 == 0 else "odd", "instruction": instruction,
                         "source": "red.png", "reference": "red.png", "metadata": {"n": n}})
             for n, (item_id, instruction) in enumerate(instructions.items())]
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def _config(tmp_path: Path, services: dict[str, str], dataset: Path, **overrides):
    return load_config(None, {"dataset": str(dataset), "run_dir": str(tmp_path / "run"),
                              "editor.endpoints": [services["editor"]], "scorer.endpoint": services["scorer"],
                              "editor.items_per_request": 3, "scorer.items_per_request": 2,
                              "editor.deadline_s": 5, "scorer.deadline_s": 5, **overrides})


def test_every_record_carries_the_schema_version_and_both_identities(tmp_path, services, capsys) -> None:
    dataset = _dataset(tmp_path / "data", {f"item-{n}": "make it blue" for n in range(7)})
    assert run(_config(tmp_path, services, dataset)) == 0
    # the run ends with its table on the terminal: counts apart, the overall mean with its interval
    table = capsys.readouterr().out
    assert "overall [95% CI]" in table and f"report: {tmp_path / 'run' / 'report.md'}" in table
    assert [line.split()[:4] for line in table.splitlines() if line.startswith("ALL")] == [["ALL", "7", "7", "0"]]
    contents = Journal(tmp_path / "run" / RESULTS_NAME).load()
    assert not contents.problems and len(contents.records) == 7
    for record in contents.records.values():
        assert record.schema == SCHEMA_VERSION and record.status == "scored" and record.error is None
        assert record.score.sc == fake_sc(record.id) and record.score.aggregation == FAKE_AGGREGATION
        assert (record.editor.model, record.editor.backend) == ("echo", "echo")
        assert (record.judge.model, record.judge.rubric_id, record.judge.rubric_version) == ("fake-judge", "fake", "1")
        assert record.references[0].kind == "image" and record.metadata["n"] in range(7)
        assert (tmp_path / "run" / record.edit.path).is_file()
    manifest = read_manifest(tmp_path / "run")
    assert manifest.counts.scored == 7 and manifest.rubric.id == "fake"
    assert manifest.params.steps == 4 and "steps" in manifest.params.from_editor_defaults
    assert (tmp_path / "run" / "report.md").is_file()


def test_a_judge_failure_is_recorded_with_its_stage_and_code_never_as_a_score(tmp_path, services) -> None:
    dataset = _dataset(tmp_path / "data", {"good": "make it blue", "bad": f"please {FAIL_MARK}"})
    assert run(_config(tmp_path, services, dataset)) == 1
    records = Journal(tmp_path / "run" / RESULTS_NAME).load().records
    bad = records["bad"]
    assert bad.status == "failed" and bad.score is None
    assert (bad.error.stage, bad.error.code) == ("score", "model_error") and "fake failure" in bad.error.message
    assert bad.judge.model == "fake-judge", "a failed item still names the judge that failed it"
    assert records["good"].status == "scored"


def test_resume_retries_failed_items_and_keeps_each_item_once(tmp_path, services) -> None:
    dataset = _dataset(tmp_path / "data", {"a": "make it blue", "b": f"please {FAIL_MARK}", "c": "add a cat"})
    assert run(_config(tmp_path, services, dataset)) == 1
    lines_before = (tmp_path / "run" / RESULTS_NAME).read_bytes().count(b"\n")
    # the item is fixed in the dataset: the resume retries it alone, and keeps the complete ones
    dataset.write_text(dataset.read_text().replace(FAIL_MARK, "be fine"))
    assert run(_config(tmp_path, services, dataset)) == 0
    lines = (tmp_path / "run" / RESULTS_NAME).read_bytes().split(b"\n")
    records = Journal(tmp_path / "run" / RESULTS_NAME).load().records
    assert lines_before == 3 and len([line for line in lines if line]) == 3
    assert {r.id: r.status for r in records.values()} == {"a": "scored", "b": "scored", "c": "scored"}


def test_a_run_with_no_service_answering_stops_with_one_line_each_and_writes_nothing(tmp_path) -> None:
    dataset = _dataset(tmp_path / "data", {"a": "make it blue"})
    nowhere = {"editor": f"ipc://{tmp_path}/e.sock", "scorer": f"ipc://{tmp_path}/s.sock"}
    started = time.monotonic()
    with pytest.raises(ServiceNotReady) as refused:
        run(_config(tmp_path, nowhere, dataset, connect_timeout_s=1))
    assert time.monotonic() - started < 10
    assert [line.split(":")[0] for line in refused.value.lines] == ["editor ipc", "scorer ipc"]
    assert all("no answer within 1s" in line for line in refused.value.lines)
    assert not (tmp_path / "run").exists(), "a run that cannot start leaves no folder"


def test_a_service_that_failed_to_load_stops_the_run_at_once_with_its_cause(tmp_path, sockets) -> None:
    def failed(server):
        return msgspec.structs.replace(fake_scorer_status(server), state="failed",
                                       error="hub unreachable: offline and Qwen/x is not cached")

    dataset = _dataset(tmp_path / "data", {"a": "make it blue"})
    with fake_services(sockets, scorer_status=failed) as services:
        started = time.monotonic()
        with pytest.raises(ServiceNotReady, match="failed to load fake-judge: hub unreachable"):
            run(_config(tmp_path, services, dataset))
    assert time.monotonic() - started < 5


def test_resuming_while_a_service_is_down_keeps_the_journal_as_it_was(tmp_path, sockets) -> None:
    dataset = _dataset(tmp_path / "data", {"a": "make it blue", "b": f"please {FAIL_MARK}"})
    with fake_services(sockets) as services:
        assert run(_config(tmp_path, services, dataset)) == 1
    journal = (tmp_path / "run" / RESULTS_NAME).read_bytes()
    with pytest.raises(ServiceNotReady):
        run(_config(tmp_path, services, dataset, connect_timeout_s=1))
    assert (tmp_path / "run" / RESULTS_NAME).read_bytes() == journal, "the failure record of b is still there"


def test_a_second_runner_on_a_folder_is_refused_naming_the_holder(tmp_path, services) -> None:
    dataset = _dataset(tmp_path / "data", {"a": "make it blue"})
    with RunFolderLock(tmp_path / "run"):
        with pytest.raises(RunFolderError, match=rf"being written by another runner \(pid {os.getpid()} on "):
            run(_config(tmp_path, services, dataset))
    # the holder is gone (as a killed runner's flock is): its lock file is taken over
    assert (tmp_path / "run" / ".lock").read_text().startswith(f"pid {os.getpid()}")
    assert run(_config(tmp_path, services, dataset)) == 0


def test_a_killed_writers_temporary_files_are_removed_on_resume(tmp_path, services) -> None:
    dataset = _dataset(tmp_path / "data", {"a": "make it blue"})
    leftover = tmp_path / "run" / "edits" / "even" / ".a.png.12345.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half an image")
    assert run(_config(tmp_path, services, dataset)) == 0
    assert not leftover.exists()


def test_a_stage_deadline_bounds_the_batch_across_retries(tmp_path, sockets) -> None:
    dataset = _dataset(tmp_path / "data", {"a": "make it blue", "b": "add a cat"})
    with fake_services(sockets, scorer_worker=FakeScorerWorker(delay_s=3)) as services:
        started = time.monotonic()
        code = run(_config(tmp_path, services, dataset, **{"scorer.timeout_s": 0.5, "scorer.retries": 20,
                                                            "scorer.deadline_s": 1.5}))
        elapsed = time.monotonic() - started
    assert code == 1 and elapsed < 6, f"{elapsed:.1f}s: 21 attempts of 0.5s were not bounded by the 1.5s deadline"
    records = Journal(tmp_path / "run" / RESULTS_NAME).load().records
    assert {r.error.code for r in records.values()} == {"service_unavailable"}


def test_a_reply_with_the_wrong_item_count_fails_that_batch_and_the_report_is_written(tmp_path, sockets) -> None:
    dataset = _dataset(tmp_path / "data", {f"i{n}": "make it blue" for n in range(4)})
    with fake_services(sockets, scorer_worker=FakeScorerWorker(drop_last=True)) as services:
        assert run(_config(tmp_path, services, dataset)) == 1
    records = Journal(tmp_path / "run" / RESULTS_NAME).load().records
    assert len(records) == 4 and all(r.status == "failed" for r in records.values())
    assert {(r.error.stage, r.error.code) for r in records.values()} == {("score", "bad_message")}
    assert "answered 1 result(s) for 2 item(s)" in records["i0"].error.message
    assert (tmp_path / "run" / "report.md").is_file()


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 192 KiB tmpfs: a disk that fills up (root may mount one; CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {done.stderr.decode()}")
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_run_with_one_line_and_leaves_no_temporary_file(tmp_path, services, small_disk) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)  # ~28 KB as PNG
    Image.fromarray(noise).save(folder / "noise.png")
    lines = [json.dumps({"id": f"n{n}", "category": "c", "instruction": "x", "source": "noise.png"}) for n in range(20)]
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    config = _config(tmp_path, services, folder / "manifest.jsonl", run_dir=str(small_disk / "run"))
    with pytest.raises(RunFolderError, match="disk full") as stopped:
        run(config)
    assert "\n" not in str(stopped.value)
    assert not list((small_disk / "run").rglob(".*.tmp")), "no temporary file is left behind"


def test_resuming_with_another_judge_is_refused_naming_what_changed(tmp_path, sockets) -> None:
    dataset = _dataset(tmp_path / "data", {"a": "make it blue", "b": f"please {FAIL_MARK}"})
    with fake_services(sockets) as services:
        assert run(_config(tmp_path, services, dataset)) == 1
    journal = (tmp_path / "run" / RESULTS_NAME).read_bytes()

    def other_judge(server):
        return msgspec.structs.replace(fake_scorer_status(server), model="other-judge", revision="r2")

    with fake_services(sockets, scorer_status=other_judge) as services:
        with pytest.raises(RunFolderError, match=r"another judge \(item 'a': model 'fake-judge' -> 'other-judge'; "
                                                 r"revision '' -> 'r2'\).*--only score --edits"):
            run(_config(tmp_path, services, dataset))
    with fake_services(sockets) as services:  # the same judge asked for another rubric is another judge too
        with pytest.raises(RunFolderError, match="rubric_id 'fake' -> 'viescore'"):
            run(_config(tmp_path, services, dataset, **{"scorer.rubric": "viescore"}))
    assert (tmp_path / "run" / RESULTS_NAME).read_bytes() == journal, "nothing was mixed in or dropped"


def test_judge_repeats_reach_the_scorer_and_the_report_shows_the_judges_spread(tmp_path, services) -> None:
    dataset = _dataset(tmp_path / "data", {f"item-{n}": "make it blue" for n in range(4)})
    assert run(_config(tmp_path, services, dataset, **{"scorer.mode": "generate", "scorer.judge_repeats": 3})) == 0
    records = Journal(tmp_path / "run" / RESULTS_NAME).load().records
    for record in records.values():
        sc = fake_sc(record.id)
        repeats = [(sc * fake_pq(r, 3)) ** 0.5 for r in range(3)]
        assert record.score.repeat_overall == pytest.approx(repeats)
        assert record.score.overall == pytest.approx(sum(repeats) / 3) and record.score.pq == pytest.approx(5.0)
        assert [s["pq"] for s in record.score.repeat_sub_scores] == [4.0, 5.0, 6.0]
        assert record.score.aggregation.endswith("the mean over 3 sampled repeats")
    meta = json.loads((tmp_path / "run" / "summary.meta.json").read_text())
    spread = {row["category"]: row for row in meta["judge_spread"]}
    assert list(spread) == ["even", "odd", "ALL"] and spread["ALL"]["items"] == 4 and spread["ALL"]["repeats"] == [3]
    assert 0 < spread["ALL"]["judge_share"] < 1
    assert "## Judge spread" in (tmp_path / "run" / "report.md").read_text()
    assert "<h2>Judge spread</h2>" in (tmp_path / "run" / "report.html").read_text()


# ---- work that moves between endpoints ---------------------------------------------------------

def _journal_lines(run_dir: Path) -> Counter:
    """How many journal lines each item id has (exactly once is the rule)."""
    lines = (run_dir / RESULTS_NAME).read_text().splitlines()
    return Counter(json.loads(line)["id"] for line in lines if line)


def _use(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {u.endpoint: (u.items, u.failed_attempts) for u in read_manifest(run_dir).endpoints}


def test_a_dead_editors_batch_moves_to_the_live_one_and_every_item_is_recorded_once(tmp_path, sockets) -> None:
    dataset = _dataset(tmp_path / "data", {f"i{n}": "make it blue" for n in range(24)})
    slow, fast = f"ipc://{sockets}/slow.sock", f"ipc://{sockets}/fast.sock"
    with fake_services(sockets) as services, \
            in_process_service(fast, echo_status, EchoWorker(Limits(), delay_s=0.25, delay_count=100)), \
            in_process_service(slow, echo_status, EchoWorker(Limits(), delay_s=0.6, delay_count=100)) as dying:
        # the slow editor dies while it holds its second batch (0.6 s to 1.2 s), a dozen batches before the end
        threading.Timer(0.9, dying.stopped.set).start()
        started = time.monotonic()
        code = run(_config(tmp_path, services, dataset, **{"editor.endpoints": [slow, fast],
                                                           "editor.items_per_request": 2, "editor.deadline_s": 30}))
        elapsed = time.monotonic() - started
    assert code == 0 and elapsed < 15, f"{elapsed:.1f}s: the batch waited for its endpoint instead of moving"
    assert _journal_lines(tmp_path / "run") == {f"i{n}": 1 for n in range(24)}
    records = Journal(tmp_path / "run" / RESULTS_NAME).load().records
    assert {r.status for r in records.values()} == {"scored"}
    use = _use(tmp_path / "run")
    assert use[slow] == (2, 1), "the slow editor served one batch, then failed with its second in flight"
    assert use[fast] == (22, 0) and use[services["scorer"]] == (24, 0)


def test_an_endpoint_that_comes_back_takes_work_again(tmp_path, sockets) -> None:
    dataset = _dataset(tmp_path / "data", {f"i{n}": "make it blue" for n in range(6)})
    editor = f"ipc://{sockets}/only.sock"
    with fake_services(sockets) as services:
        outage = in_process_service(editor, echo_status, EchoWorker(Limits(), delay_s=0.5, delay_count=100))
        outage.__enter__()
        stopped = threading.Event()

        def restart() -> None:  # down with a batch in flight, back 1.5 s later
            outage.__exit__(None, None, None)
            stopped.set()

        threading.Timer(0.8, restart).start()
        with contextlib.ExitStack() as stack:
            def back() -> None:
                stopped.wait(10)
                time.sleep(1.5)
                stack.enter_context(in_process_service(editor, echo_status, EchoWorker(Limits())))

            returning = threading.Thread(target=back)
            returning.start()
            code = run(_config(tmp_path, services, dataset, **{"editor.endpoints": [editor], "editor.items_per_request": 2,
                                                               "editor.deadline_s": 20}))
            returning.join(15)
    assert code == 0 and stopped.is_set()
    assert _journal_lines(tmp_path / "run") == {f"i{n}": 1 for n in range(6)}
    items, failed_attempts = _use(tmp_path / "run")[editor]
    assert items == 6 and failed_attempts >= 1


def test_several_scorers_share_the_items_and_each_is_scored_once(tmp_path, sockets) -> None:
    dataset = _dataset(tmp_path / "data", {f"i{n}": "make it blue" for n in range(10)})
    second = f"ipc://{sockets}/scorer2.sock"
    first_judge, second_judge = FakeScorerWorker(delay_s=0.2), FakeScorerWorker(delay_s=0.2)
    with fake_services(sockets, scorer_worker=first_judge) as services, \
            in_process_service(second, fake_scorer_status, second_judge):
        code = run(_config(tmp_path, services, dataset, **{"scorer.endpoints": [services["scorer"], second],
                                                           "scorer.items_per_request": 1}))
    assert code == 0 and _journal_lines(tmp_path / "run") == {f"i{n}": 1 for n in range(10)}
    assert first_judge.requests >= 1 and second_judge.requests >= 1
    assert set(first_judge.items).isdisjoint(second_judge.items) and len(first_judge.items) + len(second_judge.items) == 10
    use = _use(tmp_path / "run")
    assert use[services["scorer"]][0] == len(first_judge.items) and use[second][0] == len(second_judge.items)


def test_scorers_that_would_judge_differently_are_refused_before_anything_is_sent(tmp_path, sockets) -> None:
    dataset = _dataset(tmp_path / "data", {"i0": "make it blue"})
    second = f"ipc://{sockets}/scorer2.sock"

    def sharper(server):  # the same judge and rubric, shown larger images: its verdicts differ
        status = fake_scorer_status(server)
        return msgspec.structs.replace(status, score_defaults=msgspec.structs.replace(
            status.score_defaults, judge_image_px=2048 * 2048))

    first_judge, second_judge = FakeScorerWorker(), FakeScorerWorker()
    with fake_services(sockets, scorer_worker=first_judge) as services, \
            in_process_service(second, sharper, second_judge), pytest.raises(ConfigError) as refused:
        run(_config(tmp_path, services, dataset, **{"scorer.endpoints": [services["scorer"], second]}))
    assert "are different judges (judge_image_px None vs 4194304)" in str(refused.value)
    assert first_judge.requests == second_judge.requests == 0


def test_a_batch_no_endpoint_serves_fails_after_the_deadline_with_the_last_cause(tmp_path, sockets) -> None:
    dataset = _dataset(tmp_path / "data", {f"i{n}": "make it blue" for n in range(4)})
    editor = f"ipc://{sockets}/gone.sock"
    with fake_services(sockets) as services:
        with in_process_service(editor, echo_status, EchoWorker(Limits(), delay_s=0.5, delay_count=100)) as dying:
            threading.Timer(0.3, dying.stopped.set).start()
            started = time.monotonic()
            code = run(_config(tmp_path, services, dataset, **{"editor.endpoints": [editor], "editor.items_per_request": 2,
                                                               "editor.deadline_s": 2}))
            elapsed = time.monotonic() - started
    assert code == 1 and elapsed < 8
    records = Journal(tmp_path / "run" / RESULTS_NAME).load().records
    assert len(records) == 4 and {(r.error.stage, r.error.code) for r in records.values()} == {("edit", "service_unavailable")}
    assert all("no endpoint served it" in r.error.message for r in records.values())
