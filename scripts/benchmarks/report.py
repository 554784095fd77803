"""Report benchmark: the report at the end of a large run, with its thumbnails made as items finished,
against rebuilding every page and thumbnail from scratch.

Builds a synthetic run folder of --items items (512² PNG edits, one file per item; --sources distinct
512² sources shared among the items; records, journal and manifest written through runfolder's
types, as a run writes them; 1 % failed at edit, 2 % at score), then measures, each step in a
process of its own (the peak RSS is that process's own; the time leaves out its imports):
  baseline  write_reports with no thumbnail and no page yet: every page and thumbnail from scratch
  end       what a run's end leaves to do: every thumbnail made already but the last item's (its
            edit is newer than its thumbnail), no page yet: ThumbnailWriter for the last item, then
            write_reports
  resume    a resume with nothing to do, as the runner does it minus the services: take the lock,
            load and keep the journal, write the manifest (a new finish time), write_reports
The last line is the summary BENCHMARKS.md quotes: ratio = write_s / baseline_write_s.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
from PIL import Image

from editstack.runner.config import RunConfig
from editstack.runner.report import ThumbnailWriter, write_reports
from editstack.runner.runfolder import (
    RESULTS_NAME,
    SCHEMA_VERSION,
    Counts,
    DatasetInfo,
    EditOutcome,
    Elapsed,
    Failure,
    ItemRecord,
    Journal,
    JudgeIdentity,
    Manifest,
    RubricInfo,
    RunFolderLock,
    RunParams,
    Timings,
    read_manifest,
    write_manifest,
)
from editstack.wire.protocol import Identity, Status, Verdict

from harness import load_average, machine, short_dir

SIDE = 512
EDIT_VARIANTS = 200  # distinct edit images, each written to many items' own files: encoding is the slow part
CATEGORIES = ("background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
              "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer")  # GEdit-Bench's
QUESTIONS = ("editing_success", "over_editing", "naturalness", "artifacts")
EDITOR = Identity(model="Qwen/Qwen-Image-Edit-2509", revision="abc123", dtype="bfloat16",
                  backend="diffusers/QwenImageEditPlusPipeline")
JUDGE = JudgeIdentity(model="Qwen/Qwen3-VL-8B-Instruct", revision="def456", dtype="bfloat16",
                      backend="transformers/Qwen3VLForConditionalGeneration", rubric_id="viescore",
                      rubric_version="1", mode="logits")
LAST_RECORD = "last-record.json"


def _png(rng: np.random.Generator) -> bytes:
    """A random-ish 512² PNG: smooth random colour fields with grain, about as costly to decode as a photo's."""
    field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((SIDE, SIDE), Image.BICUBIC)
    grain = rng.integers(0, 12, (SIDE, SIDE, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.asarray(field) // 2 * 2 + grain).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _record(n: int, category: str, source: Path, rng: np.random.Generator) -> ItemRecord:
    item_id = f"{category}-{n:05d}"
    zh = n % 2 == 1
    instruction = ("把背景换成黄昏时分的海滩，保持人物的姿势和光线一致" if zh else
                   "Replace the background with a beach at sunset, keeping the person's pose and the lighting consistent")
    common = dict(schema=SCHEMA_VERSION, id=item_id, category=category, instruction=instruction,
                  language="zh" if zh else "en", sources=[str(source)], metadata={"key": item_id, "task_type": category},
                  benchmark="gedit", editor=EDITOR, finished_at="2026-01-01T06:00:00+00:00")
    if n % 100 == 7:
        return ItemRecord(**common, status="failed", edit=EditOutcome(status="failed", seed=n),
                          error=Failure(stage="edit", code="model_error", message="CUDA out of memory. Tried to allocate "
                                        "2.00 GiB (GPU 0; 79.11 GiB total capacity)"), elapsed=Elapsed(edit_s=3.2))
    edit = EditOutcome(status="ok", path=f"edits/{category}/{item_id}.png", seed=n)
    if n % 50 == 3:
        return ItemRecord(**common, status="failed", edit=edit, judge=JUDGE, elapsed=Elapsed(edit_s=9.1, score_s=0.8),
                          error=Failure(stage="score", code="unparseable_reply", message="the judge's reply held no "
                                        "score for 'naturalness'", raw=["The image looks natural overall, " * 8]))
    probabilities = {q: rng.dirichlet(np.ones(11)).round(6).tolist() for q in QUESTIONS}
    sub_scores = {q: float(np.dot(p, range(11))) for q, p in probabilities.items()}
    sc, pq = min(sub_scores["editing_success"], sub_scores["over_editing"]), min(sub_scores["naturalness"],
                                                                                 sub_scores["artifacts"])
    verdict = Verdict(rubric_id="viescore", rubric_version="1", mode="logits", sub_scores=sub_scores, sc=sc, pq=pq,
                      overall=math.sqrt(sc * pq), aggregation="overall = sqrt(sc * pq)", rubric_sha256="0" * 64,
                      score_mass={q: 0.97 for q in QUESTIONS}, raw=probabilities, visual_tokens=1024)
    return ItemRecord(**common, status="scored", edit=edit, score=verdict, judge=JUDGE,
                      elapsed=Elapsed(edit_s=9.1, score_s=0.8))


def build(run: Path, items: int, sources: int) -> tuple[int, float]:
    """The synthetic run folder; the bytes of images written, and the seconds it took."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    data = run.parent / "data"
    data.mkdir(parents=True)
    source_paths = []
    written = 0
    for k in range(sources):
        png = _png(rng)
        path = data / f"source-{k:04d}.png"
        path.write_bytes(png)
        source_paths.append(path)
        written += len(png)
    variants = [_png(rng) for _ in range(EDIT_VARIANTS)]
    records = []
    for n in range(items):
        category = CATEGORIES[n % len(CATEGORIES)]
        record = _record(n, category, source_paths[n % sources], rng)
        if record.edit.path:
            path = run / record.edit.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(variants[n % EDIT_VARIANTS])
            written += path.stat().st_size
        records.append(record)
    Journal(run / RESULTS_NAME).rewrite(records)
    (run.parent / LAST_RECORD).write_bytes(msgspec.json.encode(records[-1]))
    status = Status(service="editor", state="ready", model=EDITOR.model, revision=EDITOR.revision, dtype=EDITOR.dtype,
                    backend=EDITOR.backend, devices=["cuda:0"], versions={"diffusers": "0.39.0", "torch": "2.9.0"})
    judge = msgspec.structs.replace(status, service="scorer", model=JUDGE.model, revision=JUDGE.revision,
                                    backend=JUDGE.backend, versions={"transformers": "5.0.0", "torch": "2.9.0"})
    statuses = [r.status for r in records]
    write_manifest(run, Manifest(
        schema=SCHEMA_VERSION, editstack_version="0.1.0", started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T06:00:00+00:00", dataset=DatasetInfo(spec="synthetic", items=items),
        config=RunConfig(dataset="synthetic"), editors=[status], scorer=judge, rubric=RubricInfo("viescore", "1"),
        params=RunParams(steps=40, guidance=4.0, seed=0, seed_rule="synthetic"),
        timings=Timings(wall_s=21600.0), counts=Counts(scored=statuses.count("scored"), failed=statuses.count("failed"))))
    return written, time.perf_counter() - start


def measure(step: str, run: Path) -> None:
    """One step, in this process: prints its seconds and this process's peak RSS as JSON."""
    start = time.perf_counter()
    if step == "end":
        writer = ThumbnailWriter(run)
        writer.add(msgspec.json.decode((run.parent / LAST_RECORD).read_bytes(), type=ItemRecord))
        writer.close()
        write_reports(run)
    elif step == "resume":
        with RunFolderLock(run):
            journal = Journal(run / RESULTS_NAME)
            journal.rewrite(journal.load().records.values())
            write_manifest(run, msgspec.structs.replace(read_manifest(run), finished_at="2026-01-02T00:00:00+00:00"))
            write_reports(run)
    else:
        write_reports(run)
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux carries a forked child's pre-exec high-water mark (the parent's
    # memory, here the images built) into ru_maxrss, but VmHWM counts this program's pages only
    peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    print(json.dumps({"s": seconds, "rss_mb": peak_kb / 1024}))


def _step(step: str, run: Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--measure", step, str(run)], capture_output=True, text=True,
                          timeout=3600)
    if done.returncode:
        raise RuntimeError(f"step {step} exited with {done.returncode}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def _stamps(run: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000, help="items in the synthetic run")
    parser.add_argument("--sources", type=int, default=300, help="distinct source images the items share")
    parser.add_argument("--measure", nargs=2, metavar=("STEP", "RUN"), help=argparse.SUPPRESS)  # a step's own process
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], Path(args.measure[1]))
        return
    print(f"machine: {machine()}; load average at start {load_average()}")
    tmp = short_dir("es-bench-report-")
    try:
        run = tmp / "run"
        image_bytes, build_s = build(run, args.items, args.sources)
        print(f"built {args.items} items ({args.sources} shared sources, {image_bytes / 2**30:.2f} GiB of 512² PNGs) "
              f"in {build_s:.0f} s")

        baseline = _step("baseline", run)
        print(f"baseline, every page and thumbnail from scratch: {baseline['s']:.2f} s, peak RSS {baseline['rss_mb']:.0f} MB")

        shutil.rmtree(run / "gallery")
        for name in ("report.md", "report.html", "summary.json", "summary.csv", "summary.meta.json"):
            (run / name).unlink()
        last = msgspec.json.decode((tmp / LAST_RECORD).read_bytes(), type=ItemRecord)
        if last.edit.path:  # its edit is newer than any thumbnail: made again, as when the item finishes
            os.utime(run / last.edit.path)
        end = _step("end", run)
        print(f"end of run, the last item's thumbnails and the report: {end['s']:.2f} s, peak RSS {end['rss_mb']:.0f} MB")

        pages = [run / "report.html", *(run / "gallery").glob("*.html")]
        thumbs = list((run / "thumbs").iterdir())
        max_page_mb = max(p.stat().st_size for p in pages) / 2**20
        print(f"pages: report.html and {len(pages) - 1} gallery pages, the largest {max_page_mb:.2f} MB; "
              f"{len(thumbs)} thumbnails, {sum(p.stat().st_size for p in thumbs) / 2**20:.0f} MB")

        before = _stamps(run)
        resume = _step("resume", run)
        after = _stamps(run)
        written = sorted(str(p.relative_to(run)) for p, stamp in after.items() if before.get(p) != stamp)
        print(f"resume with nothing to do: {resume['s']:.2f} s, peak RSS {resume['rss_mb']:.0f} MB; wrote "
              f"{len(written)} of {len(after)} files: {', '.join(written)}")

        ratio = end["s"] / baseline["s"]
        print(f"report: items={args.items} write_s={end['s']:.2f} baseline_write_s={baseline['s']:.2f} "
              f"ratio={ratio:.3f} peak_rss_mb={end['rss_mb']:.0f} max_page_mb={max_page_mb:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
