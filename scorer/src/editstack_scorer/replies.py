"""Parse a `generate`-mode judge reply into sub-scores, checked against a schema.

Rules, applied in order; a reply that breaks one is rejected with `ReplyRejected(reason)`:

1. Empty or whitespace-only text is rejected.
2. If the text holds a Markdown code fence (```json ... ``` or ``` ... ```), the content of the first
   fence is the candidate; otherwise the candidate runs from the first "{" to the last "}", so a
   bare JSON object and an object with prose around it both parse. No "{...}" at all: rejected.
3. The candidate must be one valid JSON object (two objects in prose span as one invalid candidate,
   and are rejected rather than guessed between).
4. Every requested key must be present, and each value a JSON number (not a string, bool or null)
   within the rubric's scale (0 to 10, or 1 to 5), bounds included; integers and decimals are both
   accepted. Out-of-range values are
   rejected, never clamped. Other keys (such as "reasoning") are ignored.

Torch-free: the unit tests run it without the model stack.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated

import msgspec

_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)


class ReplyRejected(ValueError):
    """A reply broke one of the module's rules; `reason` names the rule and the offending value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_reply(text: str, keys: tuple[str, ...], scale: tuple[int, int] = (0, 10)) -> dict[str, float]:
    """The sub-scores named by `keys` from one reply, as floats within `scale`; raises ReplyRejected."""
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
        reply = msgspec.json.decode(candidate, type=_schema(keys, scale))
    except msgspec.ValidationError as e:
        raise ReplyRejected(f"reply does not match the schema: {e}") from e
    except msgspec.DecodeError as e:
        raise ReplyRejected(f"reply is not valid JSON: {e}") from e
    return {key: getattr(reply, key) for key in keys}


@cache
def _schema(keys: tuple[str, ...], scale: tuple[int, int]) -> type[msgspec.Struct]:
    """A Struct type requiring each key as a number within `scale`; a rubric has few groups, so these are cached."""
    score = Annotated[float, msgspec.Meta(ge=scale[0], le=scale[1])]
    return msgspec.defstruct("JudgeReply", [(key, score) for key in keys])
