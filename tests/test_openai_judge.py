"""The OpenAI-compatible judge backend and the judge cache.

End to end: the real `transformers serve` (tests/transformers_serve.py) serving the embedded tiny
Qwen3-VL on the CPU, the real scorer service judging through it, the runner as a real process. That
server returns no logprobs, so it has no logits mode, and the random tiny judge's replies never
parse, so generate-mode items fail with their raw replies kept: the right outcome. Retries,
Retry-After, logits-mode arithmetic and the key's secrecy are checked against `FakeChatServer`, a
small local HTTP server; the cache against `CountingJudge`, a stand-in judge that counts its calls.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from editstack.errors import ItemFailure
from editstack.wire.codec import Blobs
from editstack.wire.protocol import ScoreItem, ScoreReply, ScoreRequest, Verdict
from editstack.wire.transport import Client
from editstack_scorer.backend import ScoreJob
from editstack_scorer.cache import JudgeCache
from editstack_scorer import openai_judge
from editstack_scorer.openai_judge import CONTINUE, ONE_TOKEN_TEN, OpenAIJudge
from editstack_scorer.rubric import answer_distribution, expected_score, load_rubric
from editstack_scorer.settings import ScorerSettings
from editstack_scorer.worker import ScorerWorker

from conftest import service_python

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_ITEMS = 24
API_KEY = "sk-editstack-test-4f1c9d2e7a6b"
# a generate-mode reply that parses for every group of the viescore rubric
GOOD_REPLY = '{"instruction_followed": 8, "not_over_edited": 6, "naturalness": 7, "no_artifacts": 9}'
SOURCE = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)


# ---- a fake OpenAI-compatible server -----------------------------------------------------------

Answer = tuple[int, dict[str, str], dict]  # HTTP status, headers, JSON body


def completion(content: str = "", top: dict[str, float] | None = None) -> Answer:
    """A 200 chat completion replying `content`, with the first token's top logprobs `top` (token ->
    probability) when given."""
    logprobs = None
    if top is not None:
        candidates = [{"token": t, "logprob": float(np.log(p)), "bytes": None} for t, p in top.items()]
        logprobs = {"content": [{**candidates[0], "top_logprobs": candidates}]}
    choice = {"index": 0, "finish_reason": "stop", "logprobs": logprobs,
              "message": {"role": "assistant", "content": content}}
    return 200, {}, {"id": "fake", "object": "chat.completion", "created": 0, "model": "fake-judge",
                     "choices": [choice], "usage": {"prompt_tokens": 50, "completion_tokens": 3, "total_tokens": 53}}


def refusal(status: int, message: str, **headers: str) -> Answer:
    return status, headers, {"error": {"message": message, "type": "fake", "code": None}}


class FakeChatServer:
    """A fake chat-completions server on 127.0.0.1: `answer(body, n)` gives the n-th request's reply
    (n counts from 0); every request's arrival time and body are kept in `requests`."""

    def __init__(self, answer: Callable[[dict, int], Answer]) -> None:
        self.requests: list[tuple[float, dict]] = []
        lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    fake.requests.append((time.monotonic(), {**body, "authorization": self.headers["Authorization"]}))
                    n = len(fake.requests) - 1
                status, headers, reply = answer(body, n)
                data = json.dumps(reply).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def is_probe(body: dict) -> bool:
    """Whether a request is one of the judge's start-up probes: a question asks with the rubric's system turn."""
    return body["messages"][0]["role"] != "system"


def scoring_requests(server: FakeChatServer) -> list[tuple[float, dict]]:
    return [(arrived, body) for arrived, body in server.requests if not is_probe(body)]


def probes_then(scoring: Callable[[dict, int], Answer], logprobs: bool = True, ten: str = "10",
                after_one: str | None = "0") -> Callable[[dict, int], Answer]:
    """Answers the judge's start-up probes as a server that gives logprobs or not, whose model writes
    10 with the first token `ten`, and that continues a reply prefilled with "1" with the token
    `after_one` (None: it refuses the field, as OpenAI's API does); then each question with `scoring`
    (n counting questions only)."""
    questions = itertools.count()

    def answer(body: dict, n: int) -> Answer:
        if not is_probe(body):
            return scoring(body, next(questions))
        if body.get("continue_final_message"):
            return refusal(400, "Unrecognized request argument supplied: continue_final_message") \
                if after_one is None else completion(after_one, {after_one: 0.9})
        if "number 10" in body["messages"][0]["content"]:
            return completion(ten, {"9": 0.1, ten: 0.8})  # not in order: the most probable is the answer
        return completion("5", {"5": 0.9} if logprobs and body.get("logprobs") else None)
    return answer


def continued(server: FakeChatServer) -> list[dict]:
    """The requests, probes included, that asked the server to continue a prefilled reply."""
    return [body for _, body in server.requests if body.get("continue_final_message")]


def judge(server: FakeChatServer, **options) -> OpenAIJudge:
    settings = {"api_key": API_KEY, "concurrency": 2, "timeout_s": 5.0, "retries": 2, "start_timeout_s": 5.0,
                "max_new_tokens": 16, "generate_retries": 0, "image_px": 32 * 32, **options}
    return OpenAIJudge(server.url, "fake-judge", **settings)


def job(seed: int = 0, instruction: str = "make the sky red") -> ScoreJob:
    rng = np.random.default_rng(seed)
    source, edited = (Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(2))
    return ScoreJob([source], edited, instruction)


# ---- retries, errors and the key -----------------------------------------------------------------

def test_a_rate_limited_then_failing_request_is_retried_after_its_retry_after_and_then_scored() -> None:
    failures = [refusal(429, "slow down", **{"Retry-After": "1"}), refusal(503, "overloaded")]
    answer = lambda body, n: failures[n] if n < len(failures) else completion(GOOD_REPLY)  # noqa: E731
    with FakeChatServer(probes_then(answer)) as server:
        scored = job()
        [verdict] = judge(server).score([scored], "generate", load_rubric("viescore"))
        asked = scoring_requests(server)
    assert isinstance(verdict, Verdict), verdict
    assert verdict.sub_scores == {"instruction_followed": 8, "not_over_edited": 6, "naturalness": 7, "no_artifacts": 9}
    assert len(asked) == 4  # group sc: 429, 503, 200; group pq: 200
    assert asked[1][0] - asked[0][0] >= 0.95, "the Retry-After of 1 s was not waited for"
    usage = scored.meter.usage()
    assert (usage.calls, usage.prompt_tokens, usage.completion_tokens) == (2, 100, 6) and usage.judge_s >= 1.0
    image = asked[0][1]["messages"][1]["content"][0]["image_url"]["url"]
    assert image.startswith("data:image/png;base64,")


@pytest.mark.parametrize(("failure", "requests", "cause"), [
    (refusal(503, "the model is overloaded"), 3, "answered HTTP 503: the model is overloaded"),
    # a Retry-After beyond the client's 120 s bound is final: not retried, not waited for
    (refusal(429, "quota exceeded", **{"Retry-After": "600"}), 1, "answered HTTP 429: quota exceeded"),
    (refusal(400, "image too large"), 1, "answered HTTP 400: image too large"),
])
def test_a_request_that_finally_fails_fails_its_item_with_the_cause_never_a_score(failure, requests, cause) -> None:
    with FakeChatServer(probes_then(lambda body, n: failure)) as server:
        started = time.monotonic()
        outcomes = judge(server).score([job(1), job(2)], "generate", load_rubric("viescore"))
        assert time.monotonic() - started < 10
        asked = len(scoring_requests(server))
    assert asked == 2 * requests  # each job: the first try and the client's retries (2)
    for outcome in outcomes:
        assert isinstance(outcome, ItemFailure) and outcome.error.code == "model_error", outcome
        assert cause in outcome.error.message and "fake-judge" in outcome.error.message


def test_a_server_that_does_not_answer_in_time_fails_the_item_naming_the_timeout() -> None:
    def slow(body: dict, n: int) -> Answer:
        time.sleep(1.5)
        return completion(GOOD_REPLY)

    timed_out = job()
    with FakeChatServer(probes_then(slow)) as server:
        [outcome] = judge(server, timeout_s=0.5, retries=0).score([timed_out], "generate", load_rubric("viescore"))
    assert isinstance(outcome, ItemFailure)
    assert "did not answer within 0.5 s, 0 retries included" in outcome.error.message
    usage = timed_out.meter.usage()  # the wait was spent all the same
    assert (usage.calls, usage.prompt_tokens) == (1, 0) and usage.judge_s >= 0.5


def test_an_item_whose_call_finally_fails_reports_the_seconds_it_cost_in_its_usage() -> None:
    def overloaded(body: dict, n: int) -> Answer:
        time.sleep(0.3)  # a long generation, and then a 5xx: the time (and perhaps money) was spent
        return refusal(503, "the model is overloaded")

    with FakeChatServer(probes_then(overloaded)) as server:
        worker = ScorerWorker(judge(server, retries=0), ScoreJob, ScorerSettings(mode="generate"))
        [result] = _handle(worker, ["add a hat"]).items
    assert result.error.code == "model_error" and "HTTP 503" in result.error.message
    assert (result.cached, result.usage.calls, result.usage.prompt_tokens, result.usage.completion_tokens) == \
        (False, 1, 0, 0)  # the server counted no tokens
    assert result.usage.judge_s >= 0.3


def test_a_refused_key_stops_the_judge_at_start_without_showing_the_key(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    answer = lambda body, n: refusal(401, f"Incorrect API key provided: {API_KEY}")  # noqa: E731
    with FakeChatServer(answer) as server, pytest.raises(RuntimeError) as refused:
        judge(server)
    assert "refused the API key (HTTP 401)" in str(refused.value)
    assert API_KEY not in str(refused.value) and API_KEY not in caplog.text
    assert server.requests[0][1]["authorization"] == f"Bearer {API_KEY}"  # the key went where it belongs


# ---- logits mode -----------------------------------------------------------------------------------

def test_logits_mode_reads_top_logprobs_and_asks_what_follows_a_1_as_the_transformers_judge_reads_it() -> None:
    first = {"7": 0.5, "8": 0.3, "1": 0.2, "is": 0.01}  # a tokenizer writing 10 as "1", "0"
    def answer(body: dict, n: int) -> Answer:
        if body.get("continue_final_message"):  # the reply prefilled with "1": what comes next
            assert body["messages"][-1] == {"role": "assistant", "content": "1"}
            return completion("0", {"0": 0.25, "<|im_end|>": 0.7})
        return completion("7", first)

    with FakeChatServer(probes_then(answer, ten="1")) as server:
        served = judge(server)
        [verdict] = served.score([job()], "logits", load_rubric("viescore"))
    assert served.fingerprint["ten"] == CONTINUE
    dist, mass = answer_distribution([first.get(str(d), 0.0) for d in range(10)], 0.25, (0, 10))
    assert isinstance(verdict, Verdict) and verdict.mode == "logits"
    assert verdict.sub_scores["naturalness"] == pytest.approx(expected_score(dist))
    assert verdict.sub_scores["naturalness"] == pytest.approx(7 * .5 + 8 * .3 + 1 * .15 + 10 * .05)
    assert verdict.score_mass["naturalness"] == pytest.approx(mass)


def test_logits_mode_reads_a_single_token_10_as_the_answer_10_without_a_second_request() -> None:
    with FakeChatServer(probes_then(lambda body, n: completion("10", {"10": 0.6, "9": 0.3, "1": 0.1}))) as server:
        [verdict] = judge(server).score([job()], "logits", load_rubric("viescore"))
    assert verdict.sub_scores["no_artifacts"] == pytest.approx(10 * .6 + 9 * .3 + 1 * .1) and not continued(server)


@pytest.mark.parametrize("after_one", ["0", None], ids=["vllm-serving-it", "openai-api"])
def test_a_model_that_writes_10_as_one_token_reads_a_lone_1_as_the_answer_1_and_never_continues_a_reply(
        after_one) -> None:
    # "10" one token, below the top 20 here; OpenAI's API would refuse the continuation with HTTP 400
    answer = lambda body, n: completion("1", {"1": 0.7, "2": 0.3})  # noqa: E731
    with FakeChatServer(probes_then(answer, ten="10", after_one=after_one)) as server:
        served = judge(server)
        [verdict] = served.score([job()], "logits", load_rubric("viescore"))
    assert served.fingerprint["ten"] == ONE_TOKEN_TEN  # it decides the answers, so it keys the cache
    assert isinstance(verdict, Verdict) and verdict.sub_scores["naturalness"] == pytest.approx(1 * .7 + 2 * .3)
    assert continued(server) == []


@pytest.mark.parametrize(("after_one", "why"), [
    (None, "answered HTTP 400: Unrecognized request argument supplied: continue_final_message"),
    ("1", "continuing a reply prefilled with '1' its first token was '1', not '0'"),  # the field ignored
], ids=["refuses-the-field", "ignores-the-field"])
def test_a_server_that_can_read_no_10_fails_logits_items_on_a_0_to_10_rubric_but_scores_a_1_to_5_one(
        after_one, why, caplog) -> None:
    caplog.set_level(logging.WARNING)
    answer = lambda body, n: completion("4", {"4": 0.6, "5": 0.4})  # noqa: E731
    with FakeChatServer(probes_then(answer, ten="1", after_one=after_one)) as server:
        served = judge(server)
        outcomes = served.score([job(), job(1)], "logits", load_rubric("viescore"))
        assert scoring_requests(server) == []  # asked nothing it could not read
        [scored] = served.score([job()], "logits", load_rubric("imgedit"))
    for outcome in outcomes:
        assert isinstance(outcome, ItemFailure) and outcome.error.code == "bad_param", outcome
        assert "rubric 'viescore' reaches 10" in outcome.error.message
        assert "its first token was '1', not '10'" in outcome.error.message and why in outcome.error.message
    assert isinstance(scored, Verdict) and scored.overall == pytest.approx(4 * .6 + 5 * .4)
    assert "logits" not in served.unavailable_modes and served.fingerprint["ten"] == "unreadable"
    assert why in caplog.text  # said at start, not only per item
    assert len(continued(server)) == 1  # one probe, no question


def test_each_image_is_encoded_once_per_item_however_many_questions_show_it(monkeypatch) -> None:
    encoded = []
    real = openai_judge._image_part
    monkeypatch.setattr(openai_judge, "_image_part", lambda image: encoded.append(image) or real(image))
    with FakeChatServer(probes_then(lambda body, n: completion("7", {"7": 1.0}))) as server:
        judge(server).score([job(), job(1)], "logits", load_rubric("viescore"))
        questions = len(scoring_requests(server))
    assert questions == 2 * 4 and len(encoded) == 2 * 2  # 4 questions an item, a source and an edit each


def test_a_server_without_logprobs_has_no_logits_mode_and_refuses_logits_items_without_asking() -> None:
    with FakeChatServer(probes_then(lambda body, n: completion(GOOD_REPLY), logprobs=False)) as server:
        served = judge(server)
        outcomes = served.score([job(), job(1)], "logits", load_rubric("viescore"))
        asked = len(scoring_requests(server))
    assert "returned no logprobs" in served.unavailable_modes["logits"]
    assert asked == 0
    for outcome in outcomes:
        assert isinstance(outcome, ItemFailure) and outcome.error.code == "bad_param"
        assert "field 'mode': logits mode is unavailable with this judge" in outcome.error.message


# ---- the judge cache -----------------------------------------------------------------------------

class CountingJudge:
    """A stand-in judge: every sub-score is the instruction's length (within the scale); the instruction
    "fail" fails with `code`."""

    backend = "counting"

    def __init__(self, code: str = "model_error") -> None:
        self.asked: list[tuple[list[str], int | None]] = []
        self.code = code

    def score(self, jobs, mode, rubric, repeat=None):
        self.asked.append(([j.instruction for j in jobs], repeat))
        outcomes = []
        for j in jobs:
            j.meter.add(10, 2, 0.01)
            outcomes.append(ItemFailure(self.code, "no", raw=["?"]) if j.instruction == "fail" else
                            rubric.result(mode=mode, sub_scores={q.name: float(min(len(j.instruction), rubric.scale[1]))
                                                                 for q in rubric.questions}, raw={}))
        return outcomes


def _request(instructions: list[str], edited: list[np.ndarray] | None = None, **fields) -> tuple[ScoreRequest, Blobs]:
    """A request judging edits (`edited`, else a plain image each) of SOURCE by `instructions`."""
    blobs = Blobs()
    edits = edited or [np.full((32, 32, 3), k, dtype=np.uint8) for k in range(len(instructions))]
    items = [ScoreItem(id=f"i{k}", instruction=text, sources=[blobs.add(SOURCE)], edited=blobs.add(edit))
             for k, (text, edit) in enumerate(zip(instructions, edits, strict=True))]
    return ScoreRequest(items, **fields), blobs


def _handle(worker: ScorerWorker, *args, **fields) -> ScoreReply:
    request, blobs = _request(*args, **fields)
    return worker.handle(request, [memoryview(frame) for frame in blobs.frames])[0]


def _worker(judge: CountingJudge, folder: Path, **fingerprint) -> ScorerWorker:
    return ScorerWorker(judge, ScoreJob, ScorerSettings(mode="generate"),
                        JudgeCache(folder, {"model": "counting", **fingerprint}))


def test_a_second_request_for_the_same_judgements_is_answered_by_the_cache_without_asking_the_judge(tmp_path) -> None:
    judge = CountingJudge()
    first = _handle(_worker(judge, tmp_path), ["add a hat", "remove the dog"])
    again = _handle(_worker(judge, tmp_path), ["add a hat", "remove the dog"])  # a new worker: a restart
    assert len(judge.asked) == 1
    assert [r.verdict for r in again.items] == [r.verdict for r in first.items]
    assert [(r.cached, r.usage) for r in again.items] == [(True, None)] * 2
    assert [(r.cached, r.usage.calls, r.usage.prompt_tokens) for r in first.items] == [(False, 1, 10)] * 2


@pytest.mark.parametrize("change", ["pixel", "instruction", "rubric", "mode", "judge"])
def test_any_change_to_the_question_or_the_judge_is_a_cache_miss(tmp_path, change) -> None:
    judge = CountingJudge()
    _handle(_worker(judge, tmp_path), ["add a hat"])
    edited = np.zeros((32, 32, 3), dtype=np.uint8)
    edited[5, 7, 1] = 1  # one channel of one pixel
    worker = _worker(judge, tmp_path, **({"model": "another"} if change == "judge" else {}))
    _handle(worker, ["add a hat!" if change == "instruction" else "add a hat"], [edited] if change == "pixel" else None,
            rubric="imgedit" if change == "rubric" else None, mode="logits" if change == "mode" else None)
    assert len(judge.asked) == 2


def test_an_unparseable_reply_is_kept_but_a_failure_to_get_an_answer_is_asked_again(tmp_path) -> None:
    for code, asked in (("unparseable_reply", 1), ("model_error", 2)):
        judge = CountingJudge(code)
        for _ in range(2):
            reply = _handle(_worker(judge, tmp_path / code), ["fail"])
            assert reply.items[0].error.code == code and reply.items[0].error.raw == ["?"]
        assert len(judge.asked) == asked, code


def test_repeats_already_judged_come_from_the_cache_and_only_new_repeats_are_asked(tmp_path) -> None:
    judge = CountingJudge()
    _handle(_worker(judge, tmp_path), ["add a hat"], repeats=2)
    reply = _handle(_worker(judge, tmp_path), ["add a hat"], repeats=3)
    assert [repeat for _, repeat in judge.asked] == [0, 1, 2]
    assert reply.items[0].cached is False and reply.items[0].usage.calls == 1  # only repeat 3 was asked now
    assert len(reply.items[0].verdict.repeat_overall) == 3


def test_a_torn_cache_entry_is_a_miss_and_is_written_again(tmp_path) -> None:
    judge = CountingJudge()
    _handle(_worker(judge, tmp_path), ["add a hat"])
    [entry] = tmp_path.glob("*/*.json")
    entry.write_bytes(entry.read_bytes()[:20])  # a write cut short, as by a full disk
    _handle(_worker(judge, tmp_path), ["add a hat"])
    reply = _handle(_worker(judge, tmp_path), ["add a hat"])
    assert len(judge.asked) == 2 and reply.items[0].cached
    assert not list(tmp_path.glob("*/.*.tmp"))  # no temporary file left behind


def test_the_transformers_judge_counts_its_tokens_and_a_repeated_request_is_answered_from_its_cache(
        start_service, tiny_judge_dir, tmp_path) -> None:
    scorer = start_service("scorer", [service_python("scorer"), "-m", "editstack_scorer"], env={
        "SCORER_TINY_DIR": str(tiny_judge_dir), "SCORER_CACHE_DIR": str(tmp_path / "judge-cache"),
        "SCORER_MAX_NEW_TOKENS": "8", "SCORER_GENERATE_RETRIES": "0"})
    with Client(scorer.endpoint, timeout_s=120) as client:
        def score(mode: str) -> list:
            return client.score(*_request(["add a hat", "remove the dog"], mode=mode)).items
        logits, generate, again = score("logits"), score("generate"), score("generate")
    for result in logits:  # four questions, each one forward pass over the prompt: nothing generated
        assert result.verdict is not None and not result.cached
        assert result.usage.calls == 4 and result.usage.prompt_tokens > 0 and result.usage.completion_tokens == 0
    for result in generate:  # group sc asked once, its reply unparseable: the item fails, its cost counted
        assert result.error.code == "unparseable_reply" and not result.cached
        assert result.usage.calls == 1 and result.usage.prompt_tokens > 0 and 0 < result.usage.completion_tokens <= 8
    assert [(r.cached, r.usage, r.error) for r in again] == [(True, None, r.error) for r in generate]


# ---- end to end through `transformers serve` -------------------------------------------------------

@pytest.fixture
def served_judge(tiny_judge_dir, tmp_path) -> Iterator[dict]:
    """`transformers serve` of the tiny judge on a free local port; its log counts the requests."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "hub").mkdir()  # /v1/models scans the hub cache, which must exist
    log = tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    with open(log, "wb") as out:
        server = subprocess.Popen([service_python("scorer"), str(ROOT / "tests" / "transformers_serve.py"),
                                   str(tiny_judge_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                                   "--log-level", "info"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"transformers serve exited: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as health:
                    if health.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"transformers serve not up in 120 s: {log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield {"url": f"http://127.0.0.1:{port}/v1", "log": log, "model": str(tiny_judge_dir)}
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def _judge_calls(log: Path) -> int:
    return log.read_text().count("POST /v1/chat/completions")


def test_the_sample_is_judged_through_transformers_serve_and_a_second_run_asks_the_judge_nothing(
        tmp_path, served_judge, start_service) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(API_KEY + "\n")
    scorer = start_service("scorer", [service_python("scorer"), "-m", "editstack_scorer"], env={
        "SCORER_BACKEND": "openai", "SCORER_API_BASE": served_judge["url"], "SCORER_API_MODEL": served_judge["model"],
        "SCORER_API_KEY_FILE": str(key_file), "SCORER_CACHE_DIR": str(tmp_path / "judge-cache"),
        "SCORER_MODE": "generate", "SCORER_MAX_NEW_TOKENS": "8", "SCORER_GENERATE_RETRIES": "0",
        "SCORER_JUDGE_IMAGE_PX": str(64 * 64), "SCORER_BATCH_SIZE": "8", "SCORER_API_CONCURRENCY": "16"})
    editor = start_service("editor", [sys.executable, "-m", "editstack.service.echo", "{endpoint}"])
    with Client(scorer.endpoint, timeout_s=30) as client:
        status = client.ping()
        blobs = Blobs()
        item = ScoreItem(id="x", instruction="add a hat", sources=[blobs.add(SOURCE)], edited=blobs.add(SOURCE))
        refused = client.score(ScoreRequest([item], mode="logits"), blobs).items[0]
    assert status.backend == f"openai-compatible ({served_judge['url']})" and status.embedded_tiny
    assert status.workers == 2 and status.devices == []  # 16 calls at once: two batches of 8 served together
    assert "openai" in status.versions and "returned no logprobs" in status.score_defaults.unavailable_modes["logits"]
    assert refused.error.code == "bad_param" and "logits mode is unavailable" in refused.error.message
    probes = _judge_calls(served_judge["log"])  # the scorer's own at start

    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": "sample", "run_dir": str(tmp_path / "run"),
        "editor": {"endpoints": [editor.endpoint], "items_per_request": 8, "timeout_s": 60, "deadline_s": 60},
        "scorer": {"endpoint": scorer.endpoint, "mode": "generate", "items_per_request": 8, "timeout_s": 120,
                   "deadline_s": 300}}))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = [sys.executable, "-m", "editstack.runner.cli", "run", "--config", str(config)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=300, env=env)
    calls = _judge_calls(served_judge["log"]) - probes
    second = subprocess.run([*run, "--only", "score", "--edits", str(tmp_path / "run"), "--run-dir",
                             str(tmp_path / "rescored")], capture_output=True, text=True, timeout=300, env=env)

    # every item fails (the random judge's replies never parse): exit 1, nothing made up, the raw reply kept
    assert first.returncode == 1 and second.returncode == 1, first.stderr[-3000:] + second.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(records) == SAMPLE_ITEMS
    for record in records:
        assert record["status"] == "failed" and record["score"] is None and not record["cached"]
        assert record["error"]["code"] == "unparseable_reply" and len(record["error"]["raw"]) == 1
        usage = record["usage"]
        assert usage["calls"] == 1 and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert (manifest["counts"]["cache_hits"], manifest["counts"]["cache_misses"]) == (0, SAMPLE_ITEMS)
    assert manifest["judge_usage"]["calls"] == SAMPLE_ITEMS == calls
    assert manifest["judge_usage"]["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in records)

    # the second run over the same edits: every judgement from the cache, not one request to the server
    assert _judge_calls(served_judge["log"]) - probes == calls
    rescored = [json.loads(line) for line in (tmp_path / "rescored" / "results.jsonl").read_text().splitlines()]
    assert len(rescored) == SAMPLE_ITEMS and all(r["cached"] and r["usage"] is None for r in rescored)
    assert {r["id"]: r["error"] for r in rescored} == {r["id"]: r["error"] for r in records}
    manifest = json.loads((tmp_path / "rescored" / "manifest.json").read_text())
    assert (manifest["counts"]["cache_hits"], manifest["counts"]["cache_misses"]) == (SAMPLE_ITEMS, 0)
    assert manifest["judge_usage"]["calls"] == 0

    # the key reached the server's client and nothing else: no file of either run, the cache or the log
    written = [path for folder in ("run", "rescored", "judge-cache") for path in (tmp_path / folder).rglob("*")
               if path.is_file()]
    assert len(written) > 2 * SAMPLE_ITEMS
    for path in [*written, tmp_path / "scorer.log"]:
        assert API_KEY.encode() not in path.read_bytes(), f"the API key is in {path}"
