"""Parse a `generate`-mode judge reply into sub-scores, checked against a schema.

Rules, applied in order; a reply that breaks one is rejected with `ReplyRejected(reason)`:

1. Empty or whitespace-only text is rejected.
2. If the text holds a Markdown code fence (```json ... ``` or ``` ... ```), the content of the first
   fence is the candidate; otherwise the candidate runs from the first "{" to the last "}", so a
   bare JSON object and an object with prose around it both parse. No "{...}" at all: rejected.
3. The candidate must be one valid JSON object (two objects in prose span as one invalid candidate,
   and are rejected rather than guessed between).
4. Every requested key must be present, and each value a JSON number (not a string, bool or null)
   from 0 to 10 inclusive; integers and decimals are both accepted. Out-of-range values are
   rejected, never clamped. Other keys (such as "reasoning") are ignored.

Torch-free: the unit tests run it without the model stack.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated

import msgspec

from editstack_scorer.rubric import SCORE_MAX, SCORE_MIN

_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_Score = Annotated[float, msgspec.Meta(ge=SCORE_MIN, le=SCORE_MAX)]


class ReplyRejected(ValueError):
    """A reply broke one of the module's rules; `reason` names the rule and the offending value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_reply(text: str, keys: tuple[str, ...]) -> dict[str, float]:
    """The sub-scores named by `keys` from one reply, as floats in 0..10; raises ReplyRejected."""
    if not text.strip():
        raise ReplyRejected("empty reply")
    fence = _FENCE.search(text)
    if fence:
        candidate = fence.group(1)
    else:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end < start:
            raise ReplyRejected("no JSON object in reply")
        candidate = text[start : end + 1]
    try:
        reply = msgspec.json.decode(candidate, type=_schema(keys))
    except msgspec.ValidationError as e:
        raise ReplyRejected(f"reply does not match the schema: {e}") from e
    except msgspec.DecodeError as e:
        raise ReplyRejected(f"reply is not valid JSON: {e}") from e
    return {key: getattr(reply, key) for key in keys}


@cache
def _schema(keys: tuple[str, ...]) -> type[msgspec.Struct]:
    """A Struct type requiring each key as a 0-10 number; a rubric has few groups, so these are cached."""
    return msgspec.defstruct("JudgeReply", [(key, _Score) for key in keys])
