"""Fakes for fast runner tests: services served in-process on the real transport (a real ROUTER
socket, the real codec and Lazy Pirate client), with model-free workers. The editor side is the real
echo worker; the scorer side is `FakeScorerWorker`, a stand-in judge whose verdicts are arithmetic
on the item id. Named as fakes: nothing here measures anything."""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from editstack.service.echo import EchoWorker
from editstack.wire.codec import Blobs, Limits
from editstack.wire.protocol import (
    EditDefaults,
    EditRequest,
    ErrorReply,
    ItemError,
    Reply,
    ScoreDefaults,
    ScoreItem,
    ScoreReply,
    ScoreRequest,
    ScoreResult,
    Status,
    Verdict,
)
from editstack.wire.transport import Server, Worker
from editstack_scorer.rubric import Rubric, known_rubrics, load_rubric
from editstack_scorer.worker import combine_repeats

FAKE_AGGREGATION = "fake: sc = crc32(id) mod 11, pq = 5, overall = sqrt(sc * pq)"
FAIL_MARK = "fail the judge"  # an instruction holding this gets a model_error from the fake judge


def fake_sc(item_id: str) -> float:
    return float(zlib.crc32(item_id.encode()) % 11)


def fake_pq(repeat: int, repeats: int) -> float:
    """pq of repeat `repeat` (0 first) of `repeats`: 5 judged once, else spread evenly around 5."""
    return 5.0 + repeat - (repeats - 1) / 2


class FakeScorerWorker:
    """A fake judge: sc from the item id, pq 5, a model_error for instructions holding FAIL_MARK; asked
    for K > 1 repeats, repeat r has pq `fake_pq(r, K)`, combined by the real scorer's rule. Asked for
    a shipped rubric by name, it answers every question that rubric asks of the item with an integer
    from the item id and question name, aggregated by the real rubric. `items` keeps every item it
    was sent; `delay_s` makes every request slow; `drop_last` breaks the protocol by leaving out a
    result."""

    def __init__(self, delay_s: float = 0.0, drop_last: bool = False) -> None:
        self.requests = 0
        self.items: dict[str, ScoreItem] = {}
        self.delay_s = delay_s
        self.drop_last = drop_last

    def handle(self, request: EditRequest | ScoreRequest, blobs: list[memoryview]) -> tuple[Reply, Blobs | None]:
        if not isinstance(request, ScoreRequest):
            return ErrorReply("unsupported", "the fake scorer only answers score requests"), None
        self.requests += 1
        time.sleep(self.delay_s)
        results = []
        for item in request.items:
            if FAIL_MARK in item.instruction:
                results.append(ScoreResult(id=item.id, error=ItemError("model_error", f"item {item.id!r}: fake failure")))
                continue
            self.items[item.id] = item
            if request.rubric in known_rubrics():
                results.append(ScoreResult(id=item.id, verdict=_rubric_verdict(load_rubric(request.rubric), item)))
                continue
            sc = fake_sc(item.id)
            verdicts = [Verdict(rubric_id="fake", rubric_version="1", mode=request.mode or "logits",
                                sub_scores={"sc": sc, "pq": pq}, sc=sc, pq=pq, overall=(sc * pq) ** 0.5,
                                aggregation=FAKE_AGGREGATION)
                        for pq in (fake_pq(r, request.repeats) for r in range(request.repeats))]
            verdict = verdicts[0] if len(verdicts) == 1 else combine_repeats(verdicts)
            results.append(ScoreResult(id=item.id, verdict=verdict, elapsed_s=0.001))
        return ScoreReply(items=results[:-1] if self.drop_last else results), None


def _rubric_verdict(rubric: Rubric, item: ScoreItem) -> Verdict:
    has = {need for need, present in (("explanation", item.explanation), ("reference_image", item.references),
                                      ("reference_text", item.reference_text)) if present}
    asked = rubric.asked(has)
    lo, hi = rubric.scale
    sub_scores = {q.name: float(lo + zlib.crc32(f"{item.id} {q.name}".encode()) % (hi - lo + 1))
                  for q in rubric.questions if q.group in asked}
    return rubric.result(mode="generate", sub_scores=sub_scores, raw={}, asked=asked)


def echo_status(server: Server) -> Status:
    return Status(service="editor", state="ready" if server.workers else "loading", model="echo", backend="echo",
                  dtype="uint8", devices=["cpu"], workers=server.workers,
                  edit_defaults=EditDefaults(steps=4, guidance=1.0, negative_prompt=" "))


def fake_scorer_status(server: Server) -> Status:
    defaults = ScoreDefaults(mode="logits", rubric_id="fake", rubric_version="1", aggregation=FAKE_AGGREGATION)
    return Status(service="scorer", state="ready" if server.workers else "loading", model="fake-judge",
                  backend="fake", dtype="float32", devices=["cpu"], workers=server.workers, score_defaults=defaults)


@contextmanager
def in_process_service(endpoint: str, status: Callable[[Server], Status], worker: Worker) -> Iterator[Server]:
    """`worker` served on `endpoint` by the real server loop, in a thread of this process."""
    server = Server(endpoint, lambda: status(server), Limits(), stop_drain_s=0)  # a test does not wait for replies
    with serving(server, worker):
        yield server


@contextmanager
def serving(server: Server, worker: Worker) -> Iterator[Server]:
    """`server` (bound already, or bound by its loop) serving `worker` in a thread until the block ends."""
    server.add_worker(worker)
    thread = threading.Thread(target=server.run, name=f"fake-{server.endpoint}", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopped.set()
        thread.join(timeout=5)


@contextmanager
def fake_services(folder: str, scorer_worker: Worker | None = None,
                  scorer_status: Callable[[Server], Status] = fake_scorer_status) -> Iterator[dict[str, str]]:
    """An echo editor and a fake scorer on ipc sockets in `folder`; yields their endpoints."""
    editor, scorer = f"ipc://{folder}/editor.sock", f"ipc://{folder}/scorer.sock"
    with in_process_service(editor, echo_status, EchoWorker(Limits())), \
            in_process_service(scorer, scorer_status, scorer_worker or FakeScorerWorker()):
        yield {"editor": editor, "scorer": scorer}
