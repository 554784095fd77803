"""The scorer service, run for real in its own environment (transformers 5) with the embedded
tiny Qwen3-VL judge."""

from __future__ import annotations


import numpy as np
import pytest

from editstack.wire.codec import Blobs
from editstack.wire.protocol import ScoreItem, ScoreRequest
from editstack.wire.transport import Client

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
                            env={"SCORER_TINY_DIR": str(tiny_judge_dir), "SCORER_MAX_INSTRUCTION_CHARS": "100"})
    large = np.zeros((1536, 1536, 3), dtype=np.uint8)  # 2,304 visual tokens each: two exceed the 4,096 positions
    with Client(service.endpoint, timeout_s=120) as client:
        results = _score(client, [(large, large), (SOURCE, EDITED[0]), (SOURCE, EDITED[1])],
                         ["make the sky blue", "x" * 101, "make the sky blue"])
    assert [r.error.code if r.error else None for r in results] == ["limit_exceeded", "limit_exceeded", None]
    assert "over the model's limit of 4096" in results[0].error.message
    assert "'instruction': 101 characters is over the limit of 100" in results[1].error.message
