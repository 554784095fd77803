"""The generate-mode reply parser: every documented rule, on canned judge replies (no torch needed)."""

from __future__ import annotations

import pytest

from editstack_scorer.replies import ReplyRejected, parse_reply

KEYS = ("instruction_followed", "not_over_edited")


def rejection(text: str) -> str:
    with pytest.raises(ReplyRejected) as caught:
        parse_reply(text, KEYS)
    return caught.value.reason


def test_bare_json_object_gives_each_sub_score_as_float() -> None:
    scores = parse_reply('{"instruction_followed": 7, "not_over_edited": 9}', KEYS)
    assert scores == {"instruction_followed": 7.0, "not_over_edited": 9.0}
    assert all(isinstance(v, float) for v in scores.values())


def test_decimal_scores_are_kept_as_given() -> None:
    assert parse_reply('{"instruction_followed": 7.5, "not_over_edited": 0.25}', KEYS) == {
        "instruction_followed": 7.5,
        "not_over_edited": 0.25,
    }


def test_scores_at_the_bounds_zero_and_ten_are_accepted() -> None:
    assert parse_reply('{"instruction_followed": 0, "not_over_edited": 10}', KEYS) == {
        "instruction_followed": 0.0,
        "not_over_edited": 10.0,
    }


@pytest.mark.parametrize("fence", ["```json", "```JSON", "```"])
def test_json_inside_a_code_fence_parses(fence: str) -> None:
    text = f'Here is my verdict:\n{fence}\n{{"instruction_followed": 3, "not_over_edited": 4}}\n```\nHope it helps.'
    assert parse_reply(text, KEYS) == {"instruction_followed": 3.0, "not_over_edited": 4.0}


def test_the_fence_is_read_even_when_the_prose_around_it_has_braces() -> None:
    text = 'Scores use {0..10}.\n```json\n{"instruction_followed": 2, "not_over_edited": 8}\n```\nDone {ok}.'
    assert parse_reply(text, KEYS) == {"instruction_followed": 2.0, "not_over_edited": 8.0}


def test_only_the_first_code_fence_is_read() -> None:
    text = (
        '```json\n{"instruction_followed": 1, "not_over_edited": 2}\n```\n'
        '```json\n{"instruction_followed": 9, "not_over_edited": 9}\n```'
    )
    assert parse_reply(text, KEYS) == {"instruction_followed": 1.0, "not_over_edited": 2.0}


def test_prose_around_a_json_object_is_ignored() -> None:
    text = 'Sure. The edit works well.\n{"instruction_followed": 8, "not_over_edited": 6}\nLet me know!'
    assert parse_reply(text, KEYS) == {"instruction_followed": 8.0, "not_over_edited": 6.0}


def test_an_unclosed_fence_falls_back_to_the_json_object() -> None:
    text = '```json\n{"instruction_followed": 5, "not_over_edited": 5}\n'
    assert parse_reply(text, KEYS) == {"instruction_followed": 5.0, "not_over_edited": 5.0}


def test_extra_keys_such_as_reasoning_are_ignored() -> None:
    text = '{"reasoning": "the sky is {now} blue", "instruction_followed": 9, "not_over_edited": 7, "note": null}'
    assert parse_reply(text, KEYS) == {"instruction_followed": 9.0, "not_over_edited": 7.0}


@pytest.mark.parametrize("value", ["10.5", "11", "-1", "-0.5", "100", "1e400"])
def test_out_of_range_scores_are_rejected_not_clamped(value: str) -> None:
    reason = rejection(f'{{"instruction_followed": {value}, "not_over_edited": 5}}')
    assert "instruction_followed" in reason


def test_a_missing_key_is_rejected_naming_the_key() -> None:
    reason = rejection('{"instruction_followed": 7}')
    assert "not_over_edited" in reason


def test_a_misspelled_key_counts_as_missing() -> None:
    reason = rejection('{"instruction_followed": 7, "not_overedited": 7}')
    assert "not_over_edited" in reason


@pytest.mark.parametrize("value", ['"7"', '"seven"', "true", "null", "[7]", '{"score": 7}'])
def test_non_numeric_values_are_rejected(value: str) -> None:
    reason = rejection(f'{{"instruction_followed": {value}, "not_over_edited": 5}}')
    assert "instruction_followed" in reason


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n"])
def test_an_empty_reply_is_rejected(text: str) -> None:
    assert rejection(text) == "empty reply"


@pytest.mark.parametrize("text", ["I would rate it 7 out of 10.", "[7, 9]", "}{"])
def test_a_reply_without_a_json_object_is_rejected(text: str) -> None:
    assert rejection(text) == "no JSON object in reply"


@pytest.mark.parametrize(
    "text",
    [
        '{"instruction_followed": 7, "not_over_edited": 9,}',  # trailing comma
        "{'instruction_followed': 7, 'not_over_edited': 9}",  # single quotes
        '{"instruction_followed": NaN, "not_over_edited": 9}',
        '{"instruction_followed": 7, "not_over_edited": 9',  # cut off before the closing brace
        "```json\nnot json at all\n```",
    ],
)
def test_malformed_json_is_rejected(text: str) -> None:
    assert rejection(text).startswith(("reply is not valid JSON", "no JSON object"))


def test_two_json_objects_in_prose_are_rejected_rather_than_guessed_between() -> None:
    text = (
        'First {"instruction_followed": 1, "not_over_edited": 1} then {"instruction_followed": 9, "not_over_edited": 9}'
    )
    assert rejection(text).startswith("reply is not valid JSON")


def test_a_json_array_in_a_fence_is_rejected_by_the_schema() -> None:
    assert rejection("```json\n[7, 9]\n```").startswith("reply does not match the schema")


def test_a_rejection_is_a_value_error_carrying_its_reason() -> None:
    with pytest.raises(ValueError) as caught:
        parse_reply("", KEYS)
    assert isinstance(caught.value, ReplyRejected)
    assert str(caught.value) == caught.value.reason == "empty reply"


def test_only_the_requested_keys_are_returned() -> None:
    text = '{"naturalness": 4, "no_artifacts": 6, "instruction_followed": 1}'
    assert parse_reply(text, ("naturalness", "no_artifacts")) == {"naturalness": 4.0, "no_artifacts": 6.0}
