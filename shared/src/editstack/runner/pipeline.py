"""The runner: a dataset in, edits and scores pipelined through the services, a run folder out.

    dataset ─► batches ─► edit threads (one per editor worker, all endpoints) ─► edits/…png
                                     │ bounded queue (back-pressure)
                                     ▼
                              score thread ─► scorer ─► results.jsonl ─► reports

Batch k is scored while batch k+1 is edited. A service that stops answering is retried until the
stage's deadline; then the batch's items are recorded as failed with the cause and the run goes on.
Resume: items with a complete record are skipped; failed ones are dropped from the journal and
retried, so every item has exactly one record at the end. A failure never becomes a score.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import msgspec
import numpy as np
from tqdm import tqdm

import editstack
from editstack.errors import (
    ConfigError,
    DatasetError,
    ImageError,
    ProtocolError,
    RemoteError,
    RunFolderError,
    ServiceNotReady,
    ServiceUnavailable,
    StageFailure,
)
from editstack.runner.config import RunConfig, to_yaml
from editstack.runner.datasets import Item, Problem, Reference, load_dataset, select, select_problems
from editstack.runner.files import write_atomic
from editstack.runner.layouts import find_edit
from editstack.runner.protocols import PROTOCOLS, protocol_for
from editstack.runner.report import summary_table, write_reports
from editstack.runner.runfolder import (
    CONFIG_NAME,
    RESULTS_NAME,
    SCHEMA_VERSION,
    Counts,
    DatasetInfo,
    EditOutcome,
    Elapsed,
    EmbeddedTiny,
    Failure,
    ItemRecord,
    ItemStatus,
    Journal,
    JudgeIdentity,
    Manifest,
    RubricInfo,
    RunFolderLock,
    RunParams,
    Stage,
    Timings,
    write_manifest,
)
from editstack.wire.codec import Blobs, Limits, encode_png, read_image, read_image_file
from editstack.wire.protocol import (
    PROTOCOL_VERSION,
    EditItem,
    EditParams,
    EditRequest,
    Identity,
    ItemError,
    ScoreDefaults,
    ScoreItem,
    ScoreRequest,
    Status,
    Verdict,
)
from editstack.wire.transport import Client

log = logging.getLogger(__name__)

T = TypeVar("T")
_RETRY_PAUSE_S = 1.0
_PING_TIMEOUT_S = 2.0
_PROGRESS_EVERY_S = 10.0


@dataclass
class Pending:
    """An edited item on its way to the scorer."""

    item: Item
    edit: EditOutcome
    sources: list[np.ndarray] | None = field(repr=False)  # None: read from item.sources when scored
    edited: np.ndarray | Path = field(repr=False)  # a Path: an existing edit, sent as its file bytes
    notes: list[str] = field(default_factory=list)
    editor: Identity | None = None  # None: an existing edit, made by whatever made it
    edit_s: float = 0.0


def item_seed(base_seed: int, item_id: str) -> int:
    """Each item's seed: fixed by the base seed and its id, so a subset or a resume edits it the same."""
    return (base_seed * 1_000_003 + zlib.crc32(item_id.encode("utf-8"))) % 2**31


def run(config: RunConfig) -> int:
    """Execute a run; returns 0 when every selected item was scored (or edited, with only=edit).

    Nothing is written before every service is ready: a run that cannot start leaves no folder and
    no journal changed behind it."""
    run_dir = Path(config.run_dir)
    items, every_problem = load_dataset(config.dataset)
    try:
        items = select(items, config.categories or None, config.limit, config.limit_per_category,
                       problems=every_problem)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    # only the selection's problems count (toward --strict and the exit status); the rest are listed
    problems = select_problems(every_problem, config.categories or None)
    unselected = [p for p in every_problem if p not in problems]
    for problem in problems:
        log.error("dataset: %s", problem)
    if unselected:
        log.info("dataset: %d problem(s) in items outside the selection (listed in the report)", len(unselected))
    if config.strict and problems:
        raise DatasetError(problems)
    # the benchmark's protocol, and its rubric, unless the config names others; recorded resolved
    protocol = config.scorer.protocol or protocol_for(items[0].benchmark if items else "")
    config = msgspec.structs.replace(config, scorer=msgspec.structs.replace(
        config.scorer, protocol=protocol, rubric=config.scorer.rubric or PROTOCOLS[protocol].rubric))

    roles = {} if config.only == "score" else {ep: "editor" for ep in config.editor.endpoints}
    if config.only != "edit":
        roles[config.scorer.endpoint] = "scorer"
    ready = wait_ready(roles, config.connect_timeout_s, config.load_timeout_s)
    editors = {ep: ready[ep] for ep in roles if roles[ep] == "editor"}
    scorer = ready.get(config.scorer.endpoint) if config.only != "edit" else None

    with RunFolderLock(run_dir):
        journal = Journal(run_dir / RESULTS_NAME)
        earlier = journal.load().records
        finished = {"edit": {"edited", "scored"}, "score": {"scored"}, None: {"scored"}}[config.only]
        selected = {item.id for item in items}
        # complete records stay, and so do records of items outside this selection (an earlier, wider run)
        kept = {i: r for i, r in earlier.items() if r.status in finished or i not in selected}
        _check_provenance(run_dir, kept.values(), editors, scorer, config)
        journal.rewrite(kept.values())  # failed records go: their items are retried below
        todo = [item for item in items if item.id not in kept]
        log.info("run %s: %d items selected, %d already complete, %d to do", run_dir, len(items),
                 len(items) - len(todo), len(todo))

        write_atomic(run_dir / CONFIG_NAME, to_yaml(config))
        manifest = _manifest(config, list(editors.values()), scorer, len(items), problems, unselected)
        write_manifest(run_dir, manifest)

        pipeline = Pipeline(config, run_dir, journal, editors, scorer, earlier)
        started = time.monotonic()
        pipeline.run(todo)
        if pipeline.fatal is not None:  # the journal itself could not be written: stop, say why
            raise pipeline.fatal

        final = journal.load().records
        statuses = Counter(r.status for r in final.values())
        manifest = msgspec.structs.replace(
            manifest, finished_at=_now(),
            timings=Timings(wall_s=round(time.monotonic() - started, 3), edit_busy_s=round(pipeline.busy_s["edit"], 3),
                            score_busy_s=round(pipeline.busy_s["score"], 3)),
            counts=Counts(scored=statuses["scored"], edited=statuses["edited"], failed=statuses["failed"]))
        write_manifest(run_dir, manifest)
        paths = write_reports(run_dir)
    failed = [i.id for i in items if i.id not in final or final[i.id].status not in finished]
    log.info("run %s finished: %s; %d failed, %d dataset problem(s)", run_dir,
             msgspec.to_builtins(manifest.counts), len(failed), len(problems))
    print(f"{summary_table(paths.summary_json)}\n\nreport: {paths.markdown} (and {paths.html.name})", flush=True)
    return 0 if not failed and not problems else 1


class Pipeline:
    """The edit and score stages of one run, as threads joined by a bounded queue."""

    def __init__(self, config: RunConfig, run_dir: Path, journal: Journal, editors: dict[str, Status],
                 scorer: Status | None, earlier: dict[str, ItemRecord]) -> None:
        self.config = config
        self.run_dir = run_dir
        self.journal = journal
        self.editors = editors
        self.scorer = scorer
        self.earlier = earlier
        self.protocol = PROTOCOLS[config.scorer.protocol or "viescore"]
        self.limits = Limits()
        self.to_score: queue.Queue[list[Pending] | None] = queue.Queue(maxsize=config.queue_batches)
        self.busy_s = {"edit": 0.0, "score": 0.0}
        self._busy_lock = threading.Lock()
        self.fatal: RunFolderError | None = None  # set when the journal cannot be written: the run stops
        self._recorded: set[str] = set()  # ids recorded by this run, so a failed batch records only the rest

    def run(self, todo: Sequence[Item]) -> None:
        ready, to_edit = self._existing_edits(todo)
        progress = {stage: _Progress(stage, len(to_edit) if stage == "edit" else len(todo), position)
                    for position, stage in enumerate(("edit", "score"))}
        self.progress = progress
        threads = [threading.Thread(target=self._score_loop, name="score", daemon=True)] if self.config.only != "edit" else []
        batches: queue.Queue[list[Item]] = queue.Queue()
        size = self.config.editor.items_per_request
        for start in range(0, len(to_edit), size):
            batches.put(list(to_edit[start:start + size]))
        for endpoint, status in self.editors.items():
            # one client per service worker keeps every worker of every endpoint busy
            for n in range(status.workers):
                threads.append(threading.Thread(target=self._edit_loop, args=(endpoint, batches),
                                                name=f"edit-{endpoint}-{n}", daemon=True))
        for thread in threads:
            thread.start()
        size = self.config.scorer.items_per_request
        for start in range(0, len(ready), size):
            self.to_score.put(ready[start:start + size])
        for thread in threads:
            if thread.name != "score":
                thread.join()
        if self.config.only != "edit":
            self.to_score.put(None)
            threads[0].join()
        for bar in progress.values():
            bar.close()

    # ---- edit stage --------------------------------------------------------------------------

    def _existing_edits(self, todo: Sequence[Item]) -> tuple[list[Pending], list[Item]]:
        """Items whose edit already exists (score-only, or edited by an earlier edit-only run); their
        images are read only when their batch is scored."""
        ready, to_edit = [], []
        for item in todo:
            path = self._existing_edit_path(item)
            if path is None:
                to_edit.append(item)
                continue
            if not path.is_file():
                error = ItemError("missing_image", f"item {item.id!r} field 'edited': no file {path}")
                self._record(item, "failed", EditOutcome(status="existing", path=str(path)), error=_failure("edit", error))
                continue
            earlier = self.earlier.get(item.id)
            if self.config.only == "score" or earlier is None:
                ready.append(Pending(item, EditOutcome(status="existing", path=str(path)), None, path))
            else:  # edited by an earlier edit-only run of this folder: keep what it recorded
                ready.append(Pending(item, earlier.edit, None, path, list(earlier.notes), earlier.editor,
                                     earlier.elapsed.edit_s))
        return ready, to_edit

    def _existing_edit_path(self, item: Item) -> Path | None:
        if self.config.only == "score":  # a run folder, an editstack tree or a benchmark's own layout
            return find_edit(Path(self.config.edits or ""), item)
        earlier = self.earlier.get(item.id)
        if earlier and earlier.status == "edited" and earlier.edit.path and (self.run_dir / earlier.edit.path).is_file():
            return self.run_dir / earlier.edit.path
        return None

    def _edit_loop(self, endpoint: str, batches: queue.Queue[list[Item]]) -> None:
        cfg = self.config.editor
        with Client(endpoint, timeout_s=cfg.timeout_s, retries=cfg.retries) as client:
            while True:
                try:
                    batch = batches.get_nowait()
                except queue.Empty:
                    return
                if self.fatal is not None:
                    return
                identity = self.editors[endpoint].identity()
                try:
                    pending = self._edit_batch(client, identity, batch)
                except Exception as exc:  # a defect or a broken reply: this batch fails, the run goes on
                    self._fail_batch(batch, "edit", exc, identity)
                    pending = []
                self.progress["edit"].update(len(batch))
                if pending and self.config.only == "edit":
                    for p in pending:
                        self._record(p.item, "edited", p.edit, notes=p.notes, editor=p.editor,
                                     elapsed=Elapsed(edit_s=p.edit_s))
                elif pending:
                    self.to_score.put(pending)  # blocks while the scorer is behind: back-pressure

    def _edit_batch(self, client: Client, editor: Identity, batch: list[Item]) -> list[Pending]:
        cfg = self.config.editor
        blobs, items, sent, notes, sources = Blobs(), [], [], {}, {}
        for item in batch:
            seed = item_seed(cfg.seed, item.id)
            try:
                arrays, item_notes = _load_sources(item)
            except ImageError as exc:
                self._record(item, "failed", EditOutcome(status="failed", seed=seed),
                             error=_failure("edit", ItemError("bad_image", str(exc))))
                continue
            notes[item.id], sources[item.id] = item_notes, arrays
            items.append(EditItem(id=item.id, instruction=item.instruction, images=[blobs.add(a) for a in arrays],
                                  seed=seed, width=cfg.width, height=cfg.height))
            sent.append(item)
        if not sent:
            return []
        request = EditRequest(items, EditParams(steps=cfg.steps, guidance=cfg.guidance, negative_prompt=cfg.negative_prompt))
        try:
            reply, received = self._timed("edit", cfg.deadline_s,
                                          lambda budget_s: client.edit(request, blobs, budget_s=budget_s))
            _check_count(reply.items, sent, client.endpoint)
        except StageFailure as exc:
            for item in sent:
                self._record(item, "failed", EditOutcome(status="failed", seed=item_seed(cfg.seed, item.id)),
                             error=_failure("edit", exc.error), notes=notes[item.id], editor=editor)
            return []
        pending = []
        for item, result in zip(sent, reply.items, strict=True):
            item_notes = notes[item.id] + list(result.notes)
            seed = item_seed(cfg.seed, item.id)
            if result.error is not None:
                self._record(item, "failed", EditOutcome(status="failed", seed=seed), error=_failure("edit", result.error),
                             notes=item_notes, editor=editor, elapsed=Elapsed(edit_s=result.elapsed_s))
                continue
            edited = read_image(result.image, received, self.limits)
            path = Path("edits") / item.category / f"{item.id}.png"
            write_atomic(self.run_dir / path, encode_png(edited))
            pending.append(Pending(item, EditOutcome(status="ok", path=str(path), seed=seed), sources[item.id], edited,
                                   item_notes, editor, result.elapsed_s))
        return pending

    # ---- score stage -------------------------------------------------------------------------

    def _score_loop(self) -> None:
        cfg = self.config.scorer
        with Client(cfg.endpoint, timeout_s=cfg.timeout_s, retries=cfg.retries) as client:
            # the loop drains the queue even after a fatal error, so no edit thread blocks on it
            while (batch := self.to_score.get()) is not None:
                for start in range(0, len(batch), cfg.items_per_request):
                    chunk = batch[start:start + cfg.items_per_request]
                    if self.fatal is None:
                        try:
                            self._score_batch(client, chunk)
                        except Exception as exc:  # a defect or a broken reply: this batch fails, the run goes on
                            self._fail_batch([p.item for p in chunk], "score", exc, None, chunk)
                    self.progress["score"].update(len(chunk))

    def _score_batch(self, client: Client, batch: list[Pending]) -> None:
        cfg = self.config.scorer
        blobs, items, sent = Blobs(), [], []
        for p in batch:
            try:
                if p.sources is None:
                    p.sources, source_notes = _load_sources(p.item)
                    p.notes += source_notes
                edited = p.edited.read_bytes() if isinstance(p.edited, Path) else p.edited
                given = self.protocol.judge_references(p.item.category, p.item.references)
                references, reference_notes = _load_references(p.item, given)
                p.notes += reference_notes
            except (ImageError, OSError) as exc:
                self._finish(p, "failed", error=_failure("score", ItemError("bad_image", str(exc))))
                continue
            texts = {kind: "\n\n".join(r.value for r in given if r.kind == kind) for kind in ("text", "explanation")}
            items.append(ScoreItem(id=p.item.id, instruction=p.item.instruction,
                                   sources=[blobs.add(a) for a in p.sources], edited=blobs.add(edited),
                                   references=[blobs.add(a) for a in references], reference_text=texts["text"],
                                   explanation=texts["explanation"]))
            sent.append(p)
        if not sent:
            return
        request = ScoreRequest(items, mode=cfg.mode, rubric=cfg.rubric, repeats=cfg.judge_repeats)
        try:
            reply = self._timed("score", cfg.deadline_s, lambda budget_s: client.score(request, blobs, budget_s=budget_s))
            _check_count(reply.items, sent, client.endpoint)
        except StageFailure as exc:
            for p in sent:
                self._finish(p, "failed", error=_failure("score", exc.error))
            return
        for p, result in zip(sent, reply.items, strict=True):
            p.notes += result.notes
            if result.verdict is None:
                error = result.error or ItemError("internal", f"item {p.item.id!r}: the scorer sent neither verdict nor error")
                self._finish(p, "failed", error=_failure("score", error), score_s=result.elapsed_s)
            else:
                self._finish(p, "scored", verdict=result.verdict, score_s=result.elapsed_s)

    def _finish(self, p: Pending, status: ItemStatus, *, verdict: Verdict | None = None, error: Failure | None = None,
                score_s: float = 0.0) -> None:
        """Record an item that reached the score stage, with the judge that saw it."""
        self._record(p.item, status, p.edit, score=verdict, error=error, notes=p.notes, editor=p.editor,
                     judge=_judge(self.scorer, verdict) if self.scorer else None,
                     elapsed=Elapsed(edit_s=p.edit_s, score_s=score_s))

    # ---- shared ------------------------------------------------------------------------------

    def _timed(self, stage: str, deadline_s: float, call: Callable[[float], T]) -> T:
        """`call(budget_s)` retried while its service is unavailable, loading or busy; `deadline_s`
        bounds the wall time of all attempts together, counted from the first."""
        start = time.monotonic()
        while True:
            attempt = time.monotonic()
            try:
                result = call(deadline_s - (attempt - start))
                with self._busy_lock:
                    self.busy_s[stage] += time.monotonic() - attempt
                return result
            except ServiceUnavailable as exc:
                error = ("service_unavailable", str(exc))
            except RemoteError as exc:
                if not exc.retryable:
                    raise StageFailure(exc.code, str(exc)) from exc
                error = (exc.code, str(exc))
            elapsed = time.monotonic() - start
            if elapsed + _RETRY_PAUSE_S >= deadline_s:
                raise StageFailure(error[0], f"{error[1]} (gave up after {elapsed:.0f}s, deadline {deadline_s:.0f}s)")
            log.warning("%s stage: %s; retrying (%.0fs of %.0fs)", stage, error[1], elapsed, deadline_s)
            time.sleep(_RETRY_PAUSE_S)

    def _fail_batch(self, items: Sequence[Item], stage: Stage, exc: Exception, editor: Identity | None,
                    pending: Sequence[Pending] = ()) -> None:
        """Record every item of a batch that broke with `exc` as failed with its cause, except those
        already recorded; the run goes on with the next batch."""
        if isinstance(exc, OSError):
            error = ItemError("io_error", _os_error(exc))
        elif isinstance(exc, ProtocolError):
            error = ItemError("bad_message", str(exc))
        else:
            log.error("%s stage: a batch failed", stage, exc_info=exc)
            error = ItemError("internal", f"{type(exc).__name__}: {exc}")
        by_id = {p.item.id: p for p in pending}
        for item in items:
            if item.id in self._recorded:
                continue
            if item.id in by_id:
                self._finish(by_id[item.id], "failed", error=_failure(stage, error))
            else:
                self._record(item, "failed", EditOutcome(status="failed", seed=item_seed(self.config.editor.seed, item.id)),
                             error=_failure(stage, error), editor=editor)

    def _record(self, item: Item, status: ItemStatus, edit: EditOutcome, *, score: Verdict | None = None,
                error: Failure | None = None, notes: list[str] | None = None, editor: Identity | None = None,
                judge: JudgeIdentity | None = None, elapsed: Elapsed = Elapsed()) -> None:
        record = ItemRecord(
            schema=SCHEMA_VERSION, id=item.id, category=item.category, instruction=item.instruction,
            language=item.language, sources=[str(path.resolve()) for path in item.sources],
            references=list(item.references), metadata=item.metadata, groups=list(item.groups),
            benchmark=item.benchmark, status=status, edit=edit, score=score, error=error, notes=notes or [],
            elapsed=Elapsed(edit_s=round(elapsed.edit_s, 4), score_s=round(elapsed.score_s, 4)),
            editor=editor, judge=judge, finished_at=_now(),
        )
        try:
            self.journal.append(record)
        except OSError as exc:
            if self.fatal is None:
                self.fatal = RunFolderError(f"cannot write {self.journal.path}: {_os_error(exc)}; the run stopped "
                                            "(run it again once there is room: complete items are kept)")
                log.error("%s", self.fatal)
            return
        self._recorded.add(item.id)
        if error is not None:
            log.warning("item %r failed at %s: %s", item.id, error.stage, error.message)


class _Progress:
    """A progress bar per stage on a terminal; periodic log lines otherwise."""

    def __init__(self, stage: str, total: int, position: int) -> None:
        self.stage, self.total, self.done = stage, total, 0
        self.start = self.last_log = time.monotonic()
        self._lock = threading.Lock()
        self._bar = tqdm(total=total, desc=stage, unit="item", position=position, leave=True,
                         disable=not sys.stderr.isatty())

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            self._bar.update(n)
            now = time.monotonic()
            if self._bar.disable and (now - self.last_log >= _PROGRESS_EVERY_S or self.done >= self.total):
                self.last_log = now
                rate = self.done / max(now - self.start, 1e-9)
                eta = (self.total - self.done) / rate if rate else float("inf")
                log.info("%s: %d/%d items, %.2f items/s, ETA %.0fs", self.stage, self.done, self.total, rate, eta)

    def close(self) -> None:
        self._bar.close()


def _load_sources(item: Item) -> tuple[list[np.ndarray], list[str]]:
    """The item's source images, and a note for each conversion made; ImageError names the field."""
    several = len(item.sources) > 1
    return _load_images(item, [(f"sources[{k}]" if several else "source", path) for k, path in enumerate(item.sources)])


def _load_references(item: Item, references: Sequence[Reference]) -> tuple[list[np.ndarray], list[str]]:
    """The reference images among `references` (what the judge compares the edit with), and a note
    for each conversion made; ImageError names the field."""
    images = [Path(r.value) for r in references if r.kind == "image"]
    return _load_images(item, [(f"references[{k}]", path) for k, path in enumerate(images)])


def _load_images(item: Item, fields: Sequence[tuple[str, Path]]) -> tuple[list[np.ndarray], list[str]]:
    arrays, notes = [], []
    for field_name, path in fields:
        try:
            array, note = read_image_file(path)
        except ImageError as exc:
            raise ImageError(f"item {item.id!r} field {field_name!r}: {exc}") from exc
        arrays.append(array)
        notes += [f"{field_name}: {note}"] if note else []
    return arrays, notes


def _failure(stage: Stage, error: ItemError) -> Failure:
    return Failure(stage=stage, code=error.code, message=error.message, raw=list(error.raw))


def _judge(scorer: Status, verdict: Verdict | None) -> JudgeIdentity:
    """The judge of one item: the scorer's identity, and the rubric and mode its verdict came from
    (the scorer's defaults when there is no verdict)."""
    defaults = scorer.score_defaults
    if verdict is not None:
        rubric = (verdict.rubric_id, verdict.rubric_version, verdict.mode)
    elif defaults is not None:
        rubric = (defaults.rubric_id, defaults.rubric_version, defaults.mode)
    else:
        rubric = ("", "", "")
    identity = msgspec.structs.asdict(scorer.identity())
    return JudgeIdentity(**identity, rubric_id=rubric[0], rubric_version=rubric[1], mode=rubric[2])


_EDITOR_FIELDS = ("model", "revision", "dtype", "backend")
_JUDGE_FIELDS = (*_EDITOR_FIELDS, "rubric_id", "rubric_version", "mode")


def _check_provenance(run_dir: Path, kept: Iterable[ItemRecord], editors: dict[str, Status], scorer: Status | None,
                      config: RunConfig) -> None:
    """Refuse to resume a folder whose complete records another editor or judge produced: a run's
    numbers come from one editor and one judge, never a mix. RunFolderError names what changed."""
    editor_now = {tuple(getattr(s.identity(), f) for f in _EDITOR_FIELDS) for s in editors.values()}
    judge_now = _judge_now(scorer, config)
    for record in kept:
        if record.editor is not None and editor_now:
            before = tuple(getattr(record.editor, f) for f in _EDITOR_FIELDS)
            if before not in editor_now:
                now = next(iter(editor_now))
                raise RunFolderError(_provenance_message(run_dir, record, "editor", _EDITOR_FIELDS, before, now))
        if record.judge is not None and record.status == "scored" and record.score is not None and judge_now is not None:
            # how many times the judge was asked per item is part of how it judged
            before = (*(getattr(record.judge, f) for f in _JUDGE_FIELDS), len(record.score.repeat_overall) or 1)
            now = (*judge_now, config.scorer.judge_repeats)
            if any(a is not None and a != b for b, a in zip(before, now, strict=True)):
                raise RunFolderError(_provenance_message(run_dir, record, "judge", (*_JUDGE_FIELDS, "judge_repeats"),
                                                         before, now))


def _judge_now(scorer: Status | None, config: RunConfig) -> tuple[str | None, ...] | None:
    """The judge this run would score with; None for a field the scorer decides only per request
    (the version of a rubric other than its default)."""
    if scorer is None:
        return None
    defaults = scorer.score_defaults
    identity = scorer.identity()
    rubric_id = config.scorer.rubric or (defaults.rubric_id if defaults else None)
    version = defaults.rubric_version if defaults and rubric_id == defaults.rubric_id else None
    mode = config.scorer.mode or (defaults.mode if defaults else None)
    return (identity.model, identity.revision, identity.dtype, identity.backend, rubric_id, version, mode)


def _provenance_message(run_dir: Path, record: ItemRecord, role: str, fields: Sequence[str],
                        before: Sequence[object], now: Sequence[object | None]) -> str:
    changed = "; ".join(f"{name} {b!r} -> {a!r}" for name, b, a in zip(fields, before, now, strict=True)
                        if a is not None and a != b)
    advice = (f"re-score the edits into a folder of their own (--only score --edits {run_dir} --run-dir "
              f"{run_dir}-rescored)" if role == "judge" else "give the new editor a run folder of its own")
    return (f"{run_dir} holds results of another {role} (item {record.id!r}: {changed}); resuming would mix "
            f"two {role}s' results: {advice}")


def _check_count(results: Sequence[object], sent: Sequence[object], endpoint: str) -> None:
    if len(results) != len(sent):
        raise ProtocolError(f"{endpoint} answered {len(results)} result(s) for {len(sent)} item(s)")


def _os_error(exc: OSError) -> str:
    """One line for a failed write; a full disk says so."""
    if exc.errno == errno.ENOSPC:
        return f"disk full: no space left to write {exc.filename or 'the run folder'}"
    return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"


def wait_ready(roles: dict[str, str], connect_timeout_s: float, load_timeout_s: float) -> dict[str, Status]:
    """Ping every endpoint (`roles`: endpoint -> "editor" or "scorer") until all are ready; their statuses.

    Raises ServiceNotReady, one line per service, as soon as one failed to load its model, when one
    never answered within `connect_timeout_s`, or when one still loads after `load_timeout_s`;
    ConfigError when a service speaks another protocol. Progress is logged while they load.
    """
    start = last_log = time.monotonic()
    statuses: dict[str, Status | None] = dict.fromkeys(roles)
    with contextlib.ExitStack() as stack:
        clients = {ep: stack.enter_context(Client(ep, timeout_s=_PING_TIMEOUT_S, retries=0,
                                                  miss_log_level=logging.DEBUG)) for ep in roles}
        while True:
            for endpoint, client in clients.items():
                if statuses[endpoint] is None or statuses[endpoint].state != "ready":
                    # no ping outlasts the connect timeout by much, however many services are down
                    budget_s = max(0.2, min(_PING_TIMEOUT_S, connect_timeout_s - (time.monotonic() - start)))
                    statuses[endpoint] = _ping(client, budget_s) or statuses[endpoint]
            elapsed = time.monotonic() - start
            waiting = {ep: s for ep, s in statuses.items() if s is None or s.state != "ready"}
            if not waiting:
                return {ep: s for ep, s in statuses.items() if s is not None}
            lines = []
            for endpoint, status in waiting.items():
                name = f"{roles[endpoint]} {endpoint}"
                if status is None and elapsed >= connect_timeout_s:
                    lines.append(f"{name}: no answer within {connect_timeout_s:.0f}s (is the service running?)")
                elif status is not None and status.state == "failed":
                    lines.append(f"{name}: failed to load {status.model}: {status.error}")
                elif status is not None and elapsed >= load_timeout_s:
                    lines.append(f"{name}: still loading {status.model} after {load_timeout_s:.0f}s")
            if lines:
                raise ServiceNotReady(lines)
            if time.monotonic() - last_log >= _PROGRESS_EVERY_S:
                last_log = time.monotonic()
                for endpoint, status in waiting.items():
                    state = (f"loading {status.model} ({status.workers} worker(s) ready)" if status
                             else f"no answer yet ({elapsed:.0f}s of {connect_timeout_s:.0f}s)")
                    log.info("waiting for the %s at %s: %s", roles[endpoint], endpoint, state)
            time.sleep(_RETRY_PAUSE_S)


def _ping(client: Client, budget_s: float) -> Status | None:
    """The service's status, or None when it did not answer; a service of another protocol is refused."""
    try:
        status = client.ping(budget_s)
    except ServiceUnavailable:
        return None
    except RemoteError as exc:
        if exc.code == "bad_message":
            raise ConfigError(f"{client.endpoint} refused this runner's ping: {exc.message} (incompatible protocol?)") from exc
        return None
    if status.protocol != PROTOCOL_VERSION.decode():
        raise ConfigError(f"{client.endpoint} speaks protocol {status.protocol}, this runner {PROTOCOL_VERSION.decode()}")
    return status


def _manifest(config: RunConfig, editors: Sequence[Status], scorer: Status | None, n_items: int,
              problems: Sequence[Problem], unselected: Sequence[Problem]) -> Manifest:
    score_defaults = scorer.score_defaults if scorer else None
    # a parameter the config leaves to the editor is recorded as the editor's default
    edit_defaults = next((s.edit_defaults for s in editors if s.edit_defaults), None)
    cfg = config.editor
    params = {"steps": cfg.steps, "guidance": cfg.guidance, "negative_prompt": cfg.negative_prompt,
              "width": cfg.width, "height": cfg.height}
    from_defaults = [name for name, value in params.items() if value is None and edit_defaults is not None]
    for name in from_defaults:
        params[name] = getattr(edit_defaults, name)
    return Manifest(
        schema=SCHEMA_VERSION,
        editstack_version=editstack.__version__,
        git_commit=_git_commit(),
        started_at=_now(),
        dataset=DatasetInfo(spec=config.dataset, items=n_items, problems=[str(p) for p in problems],
                            unselected_problems=[str(p) for p in unselected]),
        config=config,
        editors=list(editors),
        scorer=scorer,
        rubric=_rubric_info(config.scorer.rubric, score_defaults),
        protocol=config.scorer.protocol or "viescore",
        params=RunParams(**params, seed=cfg.seed, seed_rule="item seed = (seed * 1000003 + crc32(item id)) mod 2^31",
                         from_editor_defaults=from_defaults),
        embedded_tiny=EmbeddedTiny(editor=any(s.embedded_tiny for s in editors),
                                   scorer=bool(scorer and scorer.embedded_tiny)),
    )


def _rubric_info(rubric_id: str | None, defaults: ScoreDefaults | None) -> RubricInfo | None:
    """The rubric the run asks for; its version and hash where the scorer said them (its default's),
    else the verdicts say them."""
    if defaults is None:
        return None
    if rubric_id in (None, defaults.rubric_id):
        return RubricInfo(defaults.rubric_id, defaults.rubric_version, defaults.rubric_sha256)
    return RubricInfo(rubric_id, "")


def _git_commit() -> str | None:
    if commit := os.environ.get("EDITSTACK_GIT_COMMIT"):
        return commit
    try:
        out = subprocess.run(["git", "-C", str(Path(editstack.__file__).parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
