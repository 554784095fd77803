"""The runner: a dataset in, edits and scores pipelined through the services, a run folder out.

    dataset ─► edit queue ─► edit threads (one per editor worker, all endpoints) ─► edits/…png
                                     │ score queue, bounded (back-pressure)
                                     ▼
                              score threads (one per scorer worker) ─► results.jsonl ─► reports

Batch k is scored while batch k+1 is edited. Each stage's endpoints take batches from one shared
queue (runner.workqueue): a batch whose endpoint stops answering goes back to the queue for the
others, and the endpoint is pinged until it answers again. Only when no endpoint served a batch
within the stage's deadline are its items recorded as failed with the cause; the run goes on.
Services that publish themselves in a rendezvous folder (a Slurm job's) are waited for there.
Resume: items with a complete record are skipped; failed ones are dropped from the journal and
retried, so every item has exactly one record at the end. A failure never becomes a score.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import math
import os
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import msgspec
import numpy as np
from tqdm import tqdm

import editstack
from editstack.errors import (
    AuthenticationRefused,
    ConfigError,
    DatasetError,
    ImageError,
    ProtocolError,
    RemoteError,
    RunFolderError,
    ServiceNotReady,
    ServiceUnavailable,
    SettingsError,
    StageFailure,
)
from editstack.runner.config import RunConfig, to_yaml
from editstack.runner.datasets import Item, Problem, Reference, load_dataset, select, select_problems
from editstack.runner.files import write_atomic
from editstack.runner.layouts import find_edit
from editstack.runner.protocols import PROTOCOLS, protocol_for
from editstack.runner.report import ThumbnailWriter, summary_table, write_reports
from editstack.runner.runfolder import (
    CONFIG_NAME,
    RESULTS_NAME,
    SCHEMA_VERSION,
    Counts,
    DatasetInfo,
    EditOutcome,
    Elapsed,
    EmbeddedTiny,
    EndpointUse,
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
    Usage,
    Verdict,
)
from editstack.runner.workqueue import Job, WorkQueue
from editstack.wire.curve import ClientKeys, read_public_key
from editstack.wire.rendezvous import Published, wait_published
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
    references: list[np.ndarray] | None = field(default=None, repr=False)  # read when first scored


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
    # the benchmark's protocol and its rubric (recorded resolved); a benchmark's tables are built from
    # its own rubric's dimensions, so another rubric goes with the viescore protocol's tables
    protocol = config.scorer.protocol or protocol_for(items[0].benchmark if items else "")
    own = PROTOCOLS[protocol].rubric
    if own is not None and config.scorer.rubric not in (None, own):
        raise ConfigError(f"protocol {protocol!r} judges with its rubric {own!r}, not {config.scorer.rubric!r}: "
                          f"for your own wording of it, put {own}.toml in the scorer's SCORER_RUBRIC_DIR; for "
                          "another rubric, run with --protocol viescore")
    config = msgspec.structs.replace(config, scorer=msgspec.structs.replace(
        config.scorer, protocol=protocol, rubric=config.scorer.rubric or own))

    published = _rendezvous(config)
    if published:  # the services' own endpoints, recorded in the run's config
        endpoints = {role: [p.endpoint for p in published if p.service == role] for role in ("editor", "scorer")}
        config = msgspec.structs.replace(
            config, editor=msgspec.structs.replace(config.editor, endpoints=endpoints["editor"] or config.editor.endpoints),
            scorer=msgspec.structs.replace(config.scorer, endpoints=endpoints["scorer"] or config.scorer.endpoints))
    roles = {} if config.only == "score" else {ep: "editor" for ep in config.editor.endpoints}
    if config.only != "edit":
        roles |= {ep: "scorer" for ep in config.scorer.endpoints}
    keys = _client_keys(config, roles, published)
    ready = wait_ready(roles, config.connect_timeout_s, config.load_timeout_s, keys)
    editors = {ep: ready[ep] for ep in roles if roles[ep] == "editor"}
    scorers = {ep: ready[ep] for ep in roles if roles[ep] == "scorer"}
    _check_alike("editors", {ep: tuple(getattr(s.identity(), f) for f in _EDITOR_FIELDS) for ep, s in editors.items()},
                 _EDITOR_FIELDS)
    _check_alike("judges", {ep: _judge_alike(s, config) for ep, s in scorers.items()}, _JUDGE_ALIKE_FIELDS)
    scorer = next(iter(scorers.values()), None)  # one judge: every scorer judges alike

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

        pipeline = Pipeline(config, run_dir, journal, editors, scorers, earlier, keys)
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
            counts=Counts(scored=statuses["scored"], edited=statuses["edited"], failed=statuses["failed"],
                          cache_hits=sum(r.cached for r in final.values()),
                          cache_misses=sum(r.usage is not None for r in final.values())),
            judge_usage=_judge_usage(final.values()),
            endpoints=pipeline.endpoint_use())
        write_manifest(run_dir, manifest)
        paths = write_reports(run_dir)
    failed = [i.id for i in items if i.id not in final or final[i.id].status not in finished]
    log.info("run %s finished: %s; %d failed, %d dataset problem(s)", run_dir,
             msgspec.to_builtins(manifest.counts), len(failed), len(problems))
    print(f"{summary_table(paths.summary_json)}\n\nreport: {paths.markdown} (and {paths.html.name})", flush=True)
    return 0 if not failed and not problems else 1


class Pipeline:
    """The edit and score stages of one run: each a shared queue of batches and a thread per service worker."""

    def __init__(self, config: RunConfig, run_dir: Path, journal: Journal, editors: dict[str, Status],
                 scorers: dict[str, Status], earlier: dict[str, ItemRecord],
                 keys: dict[str, ClientKeys] | None = None) -> None:
        self.config = config
        self.run_dir = run_dir
        self.journal = journal
        self.editors = editors
        self.scorers = scorers
        self.scorer = next(iter(scorers.values()), None)  # the judge's identity (all scorers share it)
        self.keys = keys or {}
        self.earlier = earlier
        self.protocol = PROTOCOLS[config.scorer.protocol]  # resolved by run()
        self.limits = Limits()
        self.to_edit: WorkQueue[list[Item]] = WorkQueue(list(editors), config.editor.deadline_s)
        # back-pressure: edited items wait for the scorers up to queue_batches edit requests' worth
        self.to_score: WorkQueue[list[Pending]] = WorkQueue(list(scorers), config.scorer.deadline_s,
                                                            config.queue_batches * config.editor.items_per_request)
        self.busy_s = {"edit": 0.0, "score": 0.0}
        self._busy_lock = threading.Lock()
        self.fatal: RunFolderError | None = None  # set when the journal cannot be written: the run stops
        self._recorded: set[str] = set()  # ids recorded by this run, so a failed batch records only the rest
        self.thumbnails = ThumbnailWriter(run_dir)  # the report's, made as items finish rather than all at the end

    def run(self, todo: Sequence[Item]) -> None:
        ready, to_edit = self._existing_edits(todo)
        progress = {stage: _Progress(stage, len(to_edit) if stage == "edit" else len(todo), position)
                    for position, stage in enumerate(("edit", "score"))}
        self.progress = progress
        size = self.config.editor.items_per_request
        for start in range(0, len(to_edit), size):
            self.to_edit.put(list(to_edit[start:start + size]), len(to_edit[start:start + size]))
        self.to_edit.close()
        editing = self._threads("edit", self.editors, self.to_edit, self._edit_batch)
        scoring = self._threads("score", self.scorers, self.to_score, self._score_batch) if self.config.only != "edit" else []
        try:
            for thread in editing + scoring:
                thread.start()
            if self.config.only != "edit":
                self._queue_for_scoring(ready)
            for thread in editing:
                thread.join()
            self.to_score.close()
            for thread in scoring:
                thread.join()
            for bar in progress.values():
                bar.close()
        finally:
            self.thumbnails.close()  # nothing records any more; the report comes next and shows them

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

    def _threads(self, stage: Stage, services: dict[str, Status], work: WorkQueue,
                 attempt: Callable[[Client, list, float], int]) -> list[threading.Thread]:
        # one client per service worker keeps every worker of every endpoint busy
        return [threading.Thread(target=self._serve, args=(stage, endpoint, work, attempt), daemon=True,
                                 name=f"{stage}-{endpoint}-{n}")
                for endpoint, status in services.items() for n in range(max(status.workers, 1))]

    def _serve(self, stage: Stage, endpoint: str, work: WorkQueue, attempt: Callable[[Client, list, float], int]) -> None:
        """One thread of one endpoint: batches from the stage's queue until it is done. A batch the
        endpoint cannot serve now (no reply, loading, busy, refused) goes back to the queue, and the
        endpoint is pinged until it is ready again. After a fatal error the queue is only drained."""
        cfg = self.config.editor if stage == "edit" else self.config.scorer
        # a dropped connection moves the batch at once: resending is the queue's job, to any endpoint
        with Client(endpoint, timeout_s=cfg.timeout_s, retries=cfg.retries, curve=self.keys.get(endpoint),
                    resend_on_drop=False) as client:
            while not work.done:
                for job in work.expired():
                    self._give_up(stage, work, job)
                if self.fatal is None and not work.alive(endpoint):
                    probed = time.monotonic()
                    if self._ready(endpoint):
                        work.set_alive(endpoint)
                        log.info("%s stage: %s answers again and takes work", stage, endpoint)
                    else:  # at most one probe a pause, however fast the refusal
                        time.sleep(max(0.0, _RETRY_PAUSE_S - (time.monotonic() - probed)))
                    continue
                job = work.take(_RETRY_PAUSE_S)
                if job is None:
                    continue
                served = 0
                if self.fatal is None:
                    try:
                        served = attempt(client, job.work, work.budget_s(job))
                    except (ServiceUnavailable, RemoteError, AuthenticationRefused) as exc:  # the retryable ones
                        code = exc.code if isinstance(exc, RemoteError) else "service_unavailable"
                        if work.give_back(job, endpoint, code, str(exc)):
                            log.warning("%s stage: %s; retrying its %d item(s) on the first endpoint free", stage, exc,
                                        job.size)
                        else:
                            self._give_up(stage, work, job)
                        continue
                    except Exception as exc:  # a defect or a broken reply: this batch fails, the run goes on
                        self._fail_batch(stage, job.work, exc, endpoint)
                work.finish(job, endpoint, served)
                self.progress[stage].update(job.size)

    def _ready(self, endpoint: str) -> bool:
        """Whether a down endpoint answers ping as ready again (its silence is logged once, when it went down)."""
        with Client(endpoint, timeout_s=_PING_TIMEOUT_S, retries=0, miss_log_level=logging.DEBUG,
                    curve=self.keys.get(endpoint)) as client:
            try:
                status = _ping(client, _PING_TIMEOUT_S)
            except (AuthenticationRefused, ConfigError):
                return False
        return status is not None and status.state == "ready"

    def _give_up(self, stage: Stage, work: WorkQueue, job: Job) -> None:
        """Fail what is left of a batch no endpoint served within the deadline, with its last cause."""
        code, message = job.error
        self._fail_items(stage, job.work, ItemError(code, f"{message} (gave up after {work.deadline_s:.0f}s, the "
                                                              f"{stage} deadline: no endpoint served it)"))
        work.finish(job)
        self.progress[stage].update(job.size)

    def _queue_for_scoring(self, pending: Sequence[Pending]) -> None:
        """Edited items into the score queue, in requests of the scorers' size (waits while it is full)."""
        size = self.config.scorer.items_per_request
        for start in range(0, len(pending), size):
            self.to_score.put(list(pending[start:start + size]), len(pending[start:start + size]))

    def _edit_batch(self, client: Client, batch: list[Item], budget_s: float) -> int:
        """One attempt at a batch on `client`'s editor; the items it answered for. Edits go on to the
        score queue (or are recorded, with only=edit); what the editor cannot do now propagates."""
        cfg = self.config.editor
        editor = self.editors[client.endpoint].identity()
        blobs, items, sent, notes, sources = Blobs(), [], [], {}, {}
        for item in batch:
            if item.id in self._recorded:  # failed on an earlier attempt (a bad source image)
                continue
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
            return 0
        request = EditRequest(items, EditParams(steps=cfg.steps, guidance=cfg.guidance, negative_prompt=cfg.negative_prompt))
        try:
            reply, received = self._call("edit", lambda: client.edit(request, blobs, budget_s=budget_s))
            _check_count(reply.items, sent, client.endpoint)
        except StageFailure as exc:
            for item in sent:
                self._record(item, "failed", EditOutcome(status="failed", seed=item_seed(cfg.seed, item.id)),
                             error=_failure("edit", exc.error), notes=notes[item.id], editor=editor)
            return len(sent)
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
        if pending and self.config.only == "edit":
            for p in pending:
                self._record(p.item, "edited", p.edit, notes=p.notes, editor=p.editor, elapsed=Elapsed(edit_s=p.edit_s))
        else:
            self._queue_for_scoring(pending)  # waits while the scorers are behind: back-pressure
        return len(sent)

    # ---- score stage -------------------------------------------------------------------------

    def _score_batch(self, client: Client, batch: list[Pending], budget_s: float) -> int:
        """One attempt at a batch on `client`'s scorer; the items it answered for. Images are read
        once per item, whatever the attempts; what the scorer cannot do now propagates."""
        cfg = self.config.scorer
        blobs, items, sent = Blobs(), [], []
        for p in batch:
            if p.item.id in self._recorded:  # failed on an earlier attempt (an unreadable image)
                continue
            given = self.protocol.judge_references(p.item.category, p.item.references)
            try:
                if p.sources is None:
                    p.sources, source_notes = _load_sources(p.item)
                    p.notes += source_notes
                edited = p.edited.read_bytes() if isinstance(p.edited, Path) else p.edited
                if p.references is None:
                    p.references, reference_notes = _load_references(p.item, given)
                    p.notes += reference_notes
                references = p.references
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
            return 0
        request = ScoreRequest(items, mode=cfg.mode, rubric=cfg.rubric, repeats=cfg.judge_repeats)
        try:
            reply = self._call("score", lambda: client.score(request, blobs, budget_s=budget_s))
            _check_count(reply.items, sent, client.endpoint)
        except StageFailure as exc:
            for p in sent:
                self._finish(p, "failed", error=_failure("score", exc.error))
            return len(sent)
        for p, result in zip(sent, reply.items, strict=True):
            p.notes += result.notes
            if result.verdict is None:
                error = result.error or ItemError("internal", f"item {p.item.id!r}: the scorer sent neither verdict nor error")
                self._finish(p, "failed", error=_failure("score", error), score_s=result.elapsed_s,
                             usage=result.usage, cached=result.cached)
            else:
                self._finish(p, "scored", verdict=result.verdict, score_s=result.elapsed_s, usage=result.usage,
                             cached=result.cached)
        return len(sent)

    def _finish(self, p: Pending, status: ItemStatus, *, verdict: Verdict | None = None, error: Failure | None = None,
                score_s: float = 0.0, usage: Usage | None = None, cached: bool = False) -> None:
        """Record an item that reached the score stage, with the judge that saw it and what asking it cost."""
        self._record(p.item, status, p.edit, score=verdict, error=error, notes=p.notes, editor=p.editor,
                     judge=_judge(self.scorer, verdict) if self.scorer else None,
                     elapsed=Elapsed(edit_s=p.edit_s, score_s=score_s), usage=usage, cached=cached)

    # ---- shared ------------------------------------------------------------------------------

    def _call(self, stage: Stage, call: Callable[[], T]) -> T:
        """One attempt at `call`, its time counted as the stage's busy time. A refusal no retry can
        change (an error reply that is not retryable) is a StageFailure; the retryable ones propagate,
        so that the batch moves to another endpoint."""
        attempt = time.monotonic()
        try:
            result = call()
        except RemoteError as exc:
            if not exc.retryable:
                raise StageFailure(exc.code, str(exc)) from exc
            raise
        with self._busy_lock:
            self.busy_s[stage] += time.monotonic() - attempt
        return result

    def _fail_batch(self, stage: Stage, work: list, exc: Exception, endpoint: str) -> None:
        """Record every item of a batch that broke with `exc` on `endpoint` as failed with its cause,
        except those already recorded; the run goes on with the next batch."""
        if isinstance(exc, OSError):
            error = ItemError("io_error", _os_error(exc))
        elif isinstance(exc, ProtocolError):
            error = ItemError("bad_message", str(exc))
        else:
            log.error("%s stage: a batch failed", stage, exc_info=exc)
            error = ItemError("internal", f"{type(exc).__name__}: {exc}")
        self._fail_items(stage, work, error, self.editors[endpoint].identity() if stage == "edit" else None)

    def _fail_items(self, stage: Stage, work: list, error: ItemError, editor: Identity | None = None) -> None:
        """Record the items of `work` (edit: Items, score: Pendings) not recorded yet as failed with `error`."""
        for entry in work:
            if isinstance(entry, Pending):
                if entry.item.id not in self._recorded:
                    self._finish(entry, "failed", error=_failure(stage, error))
            elif entry.id not in self._recorded:
                self._record(entry, "failed", EditOutcome(status="failed", seed=item_seed(self.config.editor.seed, entry.id)),
                             error=_failure(stage, error), editor=editor)

    def endpoint_use(self) -> list[EndpointUse]:
        """Each endpoint's share of the items and its failed attempts (the manifest's `endpoints`)."""
        return [EndpointUse(service=service, endpoint=endpoint, items=use.items, failed_attempts=use.failed_attempts)
                for service, work in (("editor", self.to_edit), ("scorer", self.to_score))
                for endpoint, use in work.usage.items()]

    def _record(self, item: Item, status: ItemStatus, edit: EditOutcome, *, score: Verdict | None = None,
                error: Failure | None = None, notes: list[str] | None = None, editor: Identity | None = None,
                judge: JudgeIdentity | None = None, elapsed: Elapsed = Elapsed(), usage: Usage | None = None,
                cached: bool = False) -> None:
        record = ItemRecord(
            schema=SCHEMA_VERSION, id=item.id, category=item.category, instruction=item.instruction,
            language=item.language, sources=[str(path.resolve()) for path in item.sources],
            references=list(item.references), metadata=item.metadata, groups=list(item.groups),
            benchmark=item.benchmark, status=status, edit=edit, score=score, error=error, notes=notes or [],
            elapsed=Elapsed(edit_s=round(elapsed.edit_s, 4), score_s=round(elapsed.score_s, 4)),
            editor=editor, judge=judge, finished_at=_now(), usage=usage, cached=cached,
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
        self.thumbnails.add(record)
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


def _judge_usage(records: Iterable[ItemRecord]) -> Usage:
    """The judge calls of every record, summed."""
    used = [r.usage for r in records if r.usage is not None]
    return Usage(calls=sum(u.calls for u in used), prompt_tokens=sum(u.prompt_tokens for u in used),
                 completion_tokens=sum(u.completion_tokens for u in used),
                 judge_s=round(math.fsum(u.judge_s for u in used), 3))


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
# what else a verdict depends on, which every scorer of one run must share
_JUDGE_SETTINGS = ("rubric_sha256", "judge_image_px", "max_new_tokens", "generate_retries")
_JUDGE_ALIKE_FIELDS = (*_JUDGE_FIELDS, *_JUDGE_SETTINGS)


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


def _judge_alike(scorer: Status, config: RunConfig) -> tuple[object, ...]:
    """What must be the same on every scorer of a run (_JUDGE_ALIKE_FIELDS): the judge it would score
    with, and the settings its verdicts depend on; the rubric's hash only where the run asks for the
    scorer's default rubric (another's text is known from its verdicts alone)."""
    judge = _judge_now(scorer, config)
    defaults = scorer.score_defaults
    if defaults is None:
        return (*judge, None, None, None, None)
    sha256 = defaults.rubric_sha256 if judge[_JUDGE_FIELDS.index("rubric_id")] == defaults.rubric_id else None
    return (*judge, sha256, defaults.judge_image_px, defaults.max_new_tokens, defaults.generate_retries)


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


def wait_ready(roles: dict[str, str], connect_timeout_s: float, load_timeout_s: float,
               keys: Mapping[str, ClientKeys] | None = None) -> dict[str, Status]:
    """Ping every endpoint (`roles`: endpoint -> "editor" or "scorer") until all are ready; their statuses.

    Raises ServiceNotReady, one line per service, as soon as one failed to load its model or refused
    this runner's key (`keys`: the CURVE keys of tcp endpoints), when one never answered within
    `connect_timeout_s`, or when one still loads after `load_timeout_s`; ConfigError when a service
    speaks another protocol. Progress is logged while they load.
    """
    start = last_log = time.monotonic()
    statuses: dict[str, Status | None] = dict.fromkeys(roles)
    with contextlib.ExitStack() as stack:
        clients = {ep: stack.enter_context(Client(ep, timeout_s=_PING_TIMEOUT_S, retries=0, miss_log_level=logging.DEBUG,
                                                  curve=(keys or {}).get(ep))) for ep in roles}
        while True:
            for endpoint, client in clients.items():
                if statuses[endpoint] is None or statuses[endpoint].state != "ready":
                    # no ping outlasts the connect timeout by much, however many services are down
                    budget_s = max(0.2, min(_PING_TIMEOUT_S, connect_timeout_s - (time.monotonic() - start)))
                    try:
                        statuses[endpoint] = _ping(client, budget_s) or statuses[endpoint]
                    except AuthenticationRefused as exc:  # no wait makes a key welcome
                        raise ServiceNotReady([f"{roles[endpoint]} {exc}"]) from exc
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


def _rendezvous(config: RunConfig) -> list[Published]:
    """The services of the run's rendezvous folder, once as many as it expects have published; none without one."""
    folder = config.rendezvous.folder
    if not folder:
        return []
    wanted = {"editor": config.rendezvous.editors, "scorer": config.rendezvous.scorers}
    wanted = {service: n for service, n in wanted.items() if config.only != {"editor": "score", "scorer": "edit"}[service]}
    log.info("waiting for %s to publish in %s", " and ".join(f"{n} {s}(s)" for s, n in wanted.items()), folder)
    return wait_published(Path(folder), wanted, config.connect_timeout_s)


def _client_keys(config: RunConfig, roles: Mapping[str, str], published: Sequence[Published]) -> dict[str, ClientKeys]:
    """The runner's CURVE keys for each tcp endpoint: the server key a rendezvous entry published,
    else curve.server_key's; ConfigError naming an unusable key file."""
    if not config.curve.client_key:
        return {}
    try:
        default = read_public_key(Path(config.curve.server_key)) if config.curve.server_key else None
        servers = {p.endpoint: p.public_key.encode() for p in published if p.public_key}
        return {endpoint: ClientKeys.load(Path(config.curve.client_key), key) for endpoint in roles
                if endpoint.startswith("tcp://") and (key := servers.get(endpoint, default)) is not None}
    except SettingsError as exc:
        raise ConfigError(f"curve: {exc}") from None


def _check_alike(role: str, facts: Mapping[str, tuple[object, ...]], fields: Sequence[str]) -> None:
    """Refuse endpoints of one role whose `facts` (values of `fields`) differ: a run's numbers come
    from one editor and one judge, never a mix. ConfigError names two endpoints and what differs."""
    seen = {values: endpoint for endpoint, values in facts.items()}
    if len(seen) > 1:
        (a, first), (b, second) = list(seen.items())[:2]
        differ = "; ".join(f"{name} {x!r} vs {y!r}" for name, x, y in zip(fields, a, b, strict=True) if x != y)
        raise ConfigError(f"{first} and {second} are different {role} ({differ}): a run uses one editor and one judge")


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
        protocol=config.scorer.protocol,
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
