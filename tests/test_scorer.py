"""The scorer service, run for real in its own environment (transformers 5) with the embedded
tiny Qwen3-VL judge."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from editstack.errors import ItemFailure
from editstack.wire.codec import Blobs
from editstack.wire.protocol import ScoreItem, ScoreRequest, Verdict
from editstack.wire.transport import Client
from editstack_scorer.settings import ScorerSettings
from editstack_scorer.worker import ScorerWorker, combine_repeats

from conftest import service_python

RNG = np.random.default_rng(11)
SOURCE = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
EDITED = [RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
INSTRUCTIONS = ["make the sky blue", "add a red hat", "remove the dog", "把天空变成蓝色"]


@pytest.fixture
def scorer(start_service, tiny_judge_dir):
    settings = {"SCORER_TINY_DIR": str(tiny_judge_dir), "SCORER_MAX_NEW_TOKENS": "16",
                "SCORER_MAX_IMAGE_PX": str(128 * 128)}
    service = start_service("scorer", [service_python("scorer"), "-m", "editstack_scorer"], env=settings)
    with Client(service.endpoint, timeout_s=120) as client:
        yield client


def _score(client: Client, pairs: list, instructions: list[str], **request):
    blobs = Blobs()
    items = []
    for k, ((source, edited), instruction) in enumerate(zip(pairs, instructions, strict=True)):
        add = lambda image: image(blobs) if callable(image) else blobs.add(image)  # noqa: E731
        items.append(ScoreItem(id=f"item-{k}", instruction=instruction, sources=[add(source)],
                               edited=None if edited is None else add(edited)))
    return client.score(ScoreRequest(items, **request), blobs).items


def test_ping_reports_transformers_5_and_the_rubric(scorer) -> None:
    status = scorer.ping()
    assert status.service == "scorer" and status.state == "ready"
    assert status.versions["transformers"].startswith("5.")
    defaults = status.score_defaults
    assert defaults.rubric_id == "viescore" and defaults.rubric_version == "1" and defaults.mode == "logits"
    assert "overall = sqrt(sc * pq)" in defaults.aggregation
    assert status.embedded_tiny and status.backend == "transformers/Qwen3VLForConditionalGeneration"
    assert status.dtype == "float32" and status.devices == ["cpu"]


def test_logits_scores_are_bounded_reproducible_and_batch_equals_one_by_one(scorer) -> None:
    pairs = [(SOURCE, edited) for edited in EDITED]
    batch = _score(scorer, pairs, INSTRUCTIONS, mode="logits")
    again = _score(scorer, pairs, INSTRUCTIONS, mode="logits")
    alone = [_score(scorer, [pair], [instruction], mode="logits")[0] for pair, instruction in zip(pairs, INSTRUCTIONS, strict=True)]
    for result, repeat, single in zip((r.verdict for r in batch), (r.verdict for r in again),
                                      (r.verdict for r in alone), strict=True):
        assert result.mode == "logits" and result.rubric_id == "viescore"
        scores = [*result.sub_scores.values(), result.sc, result.pq, result.overall]
        assert len(result.sub_scores) == 4 and all(0.0 <= s <= 10.0 for s in scores)
        assert result.sc == min(result.sub_scores["instruction_followed"], result.sub_scores["not_over_edited"])
        assert result.overall == pytest.approx((result.sc * result.pq) ** 0.5)
        assert set(result.score_mass) == set(result.sub_scores) and all(0 < m <= 1 for m in result.score_mass.values())
        assert all(len(p) == 11 and sum(p) == pytest.approx(1.0) for p in result.raw.values())
        assert (repeat.sub_scores, repeat.overall) == (result.sub_scores, result.overall)
        for name, value in result.sub_scores.items():
            assert single.sub_scores[name] == pytest.approx(value, abs=1e-4)


def test_generate_mode_with_the_tiny_judge_fails_items_and_keeps_the_raw_reply(scorer) -> None:
    results = _score(scorer, [(SOURCE, EDITED[0]), (SOURCE, EDITED[1])], INSTRUCTIONS[:2], mode="generate")
    for result in results:
        assert result.error is not None and result.error.code == "unparseable_reply"
        assert "unparseable judge reply" in result.error.message and result.error.raw
        assert result.verdict is None


def test_repeats_are_refused_in_logits_mode_and_generate_repeats_never_yield_a_number(scorer) -> None:
    pairs, instructions = [(SOURCE, EDITED[0]), (SOURCE, EDITED[1])], INSTRUCTIONS[:2]
    for result in _score(scorer, pairs, instructions, mode="logits", repeats=3):
        assert result.verdict is None and result.error.code == "bad_param"
        assert "field 'repeats'" in result.error.message and "generate mode" in result.error.message
    results = _score(scorer, pairs, instructions, mode="generate", repeats=2)
    for result in results:
        assert result.verdict is None and result.error.code == "unparseable_reply"
        assert "repeat 1 of 2" in result.error.message and len(result.error.raw) == 3  # 1 + SCORER_GENERATE_RETRIES
    # every attempt of a repeat samples with a seed of its own: alone, the second item gets the same replies
    [alone] = _score(scorer, pairs[1:], instructions[1:], mode="generate", repeats=2)
    assert alone.error.raw == results[1].error.raw


def test_each_bad_input_gets_its_item_error_and_the_next_request_succeeds(scorer) -> None:
    bad_png = lambda blobs: blobs.add(b"\x89PNG\r\n\x1a\n garbage")  # noqa: E731
    huge = np.zeros((200, 200, 3), dtype=np.uint8)
    sliver = np.zeros((2, 600, 3), dtype=np.uint8)  # 300:1 — the processor cannot patch it: a model error
    results = _score(scorer, [(bad_png, EDITED[0]), (SOURCE, huge), (SOURCE, None), (SOURCE, EDITED[0]),
                              (SOURCE, sliver), (SOURCE, EDITED[1])],
                     ["x", "x", "x", "  ", "x", "make the sky blue"])
    codes = [r.error.code if r.error else None for r in results]
    assert codes == ["bad_image", "bad_image", "missing_image", "bad_instruction", "model_error", None]
    assert "'item-0' field 'sources[0]'" in results[0].error.message
    assert "'item-1' field 'edited'" in results[1].error.message and "over the limit" in results[1].error.message
    assert "'item-2' field 'edited'" in results[2].error.message
    assert "'item-4'" in results[4].error.message
    assert all(r.verdict is None for r in results[:5])

    for request, field in (({"rubric": "nope"}, "rubric"), ({"mode": "vibes"}, "mode")):
        [result] = _score(scorer, [(SOURCE, EDITED[0])], ["x"], **request)
        assert result.error.code == "bad_param" and f"field '{field}'" in result.error.message
        assert "viescore" in result.error.message or "logits" in result.error.message
    [result] = _score(scorer, [(SOURCE, EDITED[0])], ["make the sky blue"])
    assert result.error is None and result.verdict is not None


def test_work_over_the_judges_bounds_is_refused_per_item_naming_the_limit(start_service, tiny_judge_dir) -> None:
    service = start_service("scorer", [service_python("scorer"), "-m", "editstack_scorer"],
                            env={"SCORER_TINY_DIR": str(tiny_judge_dir), "SCORER_MAX_INSTRUCTION_CHARS": "100",
                                 "SCORER_JUDGE_IMAGE_PX": "0"})  # shown as sent
    large = np.zeros((1536, 1536, 3), dtype=np.uint8)  # 2,304 visual tokens each: two exceed the 4,096 positions
    with Client(service.endpoint, timeout_s=120) as client:
        results = _score(client, [(large, large), (SOURCE, EDITED[0]), (SOURCE, EDITED[1])],
                         ["make the sky blue", "x" * 101, "make the sky blue"])
    assert [r.error.code if r.error else None for r in results] == ["limit_exceeded", "limit_exceeded", None]
    assert "over the model's limit of 4096" in results[0].error.message
    assert "'instruction': 101 characters is over the limit of 100" in results[1].error.message


def test_the_judge_sees_each_image_within_its_pixel_budget_and_counts_its_visual_tokens(start_service,
                                                                                        tiny_judge_dir) -> None:
    service = start_service("scorer", [service_python("scorer"), "-m", "editstack_scorer"],
                            env={"SCORER_TINY_DIR": str(tiny_judge_dir)})
    large = np.zeros((1536, 1536, 3), dtype=np.uint8)  # 2,304 visual tokens as sent, over the tiny judge's limit
    with Client(service.endpoint, timeout_s=120) as client:
        assert client.ping().score_defaults.judge_image_px == 768 * 768  # the default: GPT-4o's high-detail view
        [result] = _score(client, [(large, large)], ["make the sky blue"], mode="logits")
        [small] = _score(client, [(SOURCE, EDITED[0])], ["make the sky blue"], mode="logits")
    # shown at 768² = 24 x 24 tokens of 32 px per image; the two sc questions show source and edit, the
    # two pq questions the edit alone: 6 images read
    assert result.error is None and result.verdict.visual_tokens == 6 * 24 * 24
    # 64² is within the budget and sent on as it is; the processor's own floor (256²) makes it 8 x 8 tokens
    assert small.verdict.visual_tokens == 6 * 8 * 8


def test_a_benchmark_rubric_asks_each_item_its_own_questions_on_1_to_5_with_every_input_shown(scorer) -> None:
    blobs = Blobs()
    knowing = ScoreItem(id="knowing", instruction="add a weight", sources=[blobs.add(SOURCE)],
                        edited=blobs.add(EDITED[0]), explanation="the heavier side goes down")
    viewpoint = ScoreItem(id="viewpoint", instruction="show it from above", sources=[blobs.add(SOURCE)],
                          edited=blobs.add(EDITED[1]), references=[blobs.add(EDITED[2])])
    logits = scorer.score(ScoreRequest([knowing, viewpoint], mode="logits", rubric="kris"), blobs).items
    for result in logits:
        verdict = result.verdict
        assert verdict.scale == (1, 5) and verdict.rubric_id == "kris" and len(verdict.rubric_sha256) == 64
        assert all(1 <= v <= 5 for v in verdict.sub_scores.values()) and verdict.sc is None
        assert all(len(verdict.raw[name]) == 5 for name in verdict.sub_scores)  # P(1..5) per question
    assert set(logits[0].verdict.sub_scores) == {"visual_consistency", "visual_quality", "instruction_following",
                                                 "knowledge_plausibility"}
    # 64 visual tokens per 64² image: consistency shows 2 images, quality 1, and the two knowledge
    # questions 2 each; the viewpoint's instruction question shows source, edit and ground truth: 3
    assert logits[0].verdict.visual_tokens == 64 * (2 + 1 + 2 + 2)
    assert logits[1].verdict.visual_tokens == 64 * (2 + 1 + 3)
    generate = scorer.score(ScoreRequest([knowing, viewpoint], mode="generate", rubric="kris"), blobs).items
    for result in generate:  # the random tiny judge never writes the JSON asked for: no number, raw kept
        assert result.verdict is None and result.error.code == "unparseable_reply" and result.error.raw


# ---- repeated judgements, torch-free: the worker on a scripted judge --------------------------

def _verdict(overall: float, sc: float = 4.0, pq: float = 6.0, raw: str = "r") -> Verdict:
    return Verdict(rubric_id="viescore", rubric_version="1", mode="generate", sub_scores={"a": sc, "b": pq},
                   sc=sc, pq=pq, overall=overall, aggregation="overall = sqrt(sc * pq)", raw={"sc": [raw]}, attempts=1)


def test_combined_repeats_average_every_score_and_keep_each_repeat() -> None:
    combined = combine_repeats([_verdict(2.0, sc=1, pq=3, raw="x"), _verdict(5.0, sc=4, pq=9, raw="y"),
                                _verdict(8.0, sc=7, pq=6, raw="z")])
    assert (combined.sc, combined.pq, combined.overall) == (4.0, 6.0, 5.0)  # overall: the mean, not sqrt(4 * 6)
    assert combined.sub_scores == {"a": 4.0, "b": 6.0}
    assert combined.repeat_overall == [2.0, 5.0, 8.0]
    assert combined.repeat_sub_scores == [{"a": 1, "b": 3}, {"a": 4, "b": 9}, {"a": 7, "b": 6}]
    assert combined.raw == {"sc": ["x", "y", "z"]} and combined.attempts == 3
    assert combined.aggregation == "overall = sqrt(sc * pq); each score the mean over 3 sampled repeats"


def test_combining_refuses_one_verdict_and_verdicts_of_another_rubric() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        combine_repeats([_verdict(1.0)])
    other = msgspec.structs.replace(_verdict(1.0), rubric_version="2")
    with pytest.raises(ValueError, match="repeat 2 was judged under another rubric"):
        combine_repeats([_verdict(1.0), other])


class _ScriptedJudge:
    """Replies per (instruction, repeat): a number is a verdict with that overall, None a failure."""

    backend = "scripted"

    def __init__(self, script: dict[str, list[float | None]]) -> None:
        self.script = script
        self.calls: list[tuple[list[str], int | None]] = []

    def score(self, jobs, mode, rubric, repeat=None):
        self.calls.append(([job[2] for job in jobs], repeat))
        outs = []
        for _, _, instruction, *_ in jobs:
            value = self.script[instruction][repeat]
            outs.append(_verdict(value, raw=f"{instruction} {repeat}") if value is not None else
                        ItemFailure("unparseable_reply", "no JSON", raw=[f"{instruction} {repeat} bad"]))
        return outs


def _handle(judge: _ScriptedJudge, instructions: list[str], **request) -> list:
    blobs = Blobs()
    items = [ScoreItem(id=f"i{k}", instruction=text, sources=[blobs.add(SOURCE)], edited=blobs.add(EDITED[0]))
             for k, text in enumerate(instructions)]
    worker = ScorerWorker(judge, lambda *job: job, ScorerSettings(mode="generate"))
    reply, _ = worker.handle(ScoreRequest(items, **request), [memoryview(f) for f in blobs.frames])
    return reply.items


def test_a_failed_repeat_fails_its_item_with_every_raw_reply_and_is_not_asked_again() -> None:
    judge = _ScriptedJudge({"good": [2.0, 4.0, 9.0], "flaky": [3.0, None, 5.0]})
    good, flaky = _handle(judge, ["good", "flaky"], repeats=3)
    assert good.error is None and good.verdict.repeat_overall == [2.0, 4.0, 9.0] and good.verdict.overall == 5.0
    assert flaky.verdict is None and flaky.error.code == "unparseable_reply"
    assert "repeat 2 of 3: no JSON" in flaky.error.message and flaky.error.raw == ["flaky 0", "flaky 1 bad"]
    assert judge.calls == [(["good", "flaky"], 0), (["good", "flaky"], 1), (["good"], 2)]


@pytest.mark.parametrize(("request_fields", "expected"), [
    ({"repeats": 0}, "field 'repeats': 0 is outside 1..16"),
    ({"repeats": 17}, "field 'repeats': 17 is outside 1..16"),
    ({"repeats": 2, "mode": "logits"}, "field 'repeats': 2 needs generate mode; logits mode is deterministic"),
])
def test_repeats_out_of_range_or_in_logits_mode_fail_each_item_with_bad_param(request_fields, expected) -> None:
    judge = _ScriptedJudge({})
    results = _handle(judge, ["x", "y"], **request_fields)
    assert [(r.error.code, expected in r.error.message) for r in results] == [("bad_param", True)] * 2
    assert not judge.calls


def test_one_repeat_asks_the_judge_once_as_before() -> None:
    judge = _ScriptedJudge({"x": {None: 7.0}})
    [result] = _handle(judge, ["x"])
    assert result.verdict.overall == 7.0 and result.verdict.repeat_overall == [] and judge.calls == [(["x"], None)]
