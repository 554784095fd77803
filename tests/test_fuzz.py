"""Every service survives any message: a structure-aware fuzz of the wire against the real echo,
editor and scorer processes, after replaying the corpus of past crashers in tests/fuzz_corpus/.

Each message is a valid one mutated at one or more layers: the frames (version, count, order), the
header's bytes, its msgpack structure (types, missing and unknown fields, tags, nesting depth), the
encoding of its strings, ImageRef fields and blob bytes. Every message must be answered (an error
reply, or a reply whose items carry errors), the process must stay alive, and a valid request must
succeed afterwards. Work items are made to fail their checks before the model (the editor gets an
output width it refuses, the scorer an unreadable edited image), so a run costs seconds; a handful
of valid but odd items go through the model.

A message that goes unanswered is written to the test's tmp folder in the corpus format: copy it
into tests/fuzz_corpus/ with a sentence saying what it broke.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
import re
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq
from PIL import Image

from editstack.errors import ProtocolError
from editstack.wire.codec import Blobs, Limits, decode_reply, decode_request, encode, encode_png
from editstack.wire.protocol import (
    PROTOCOL_VERSION,
    EditItem,
    EditParams,
    EditReply,
    EditRequest,
    ScoreItem,
    ScoreReply,
    ScoreRequest,
)
from editstack.wire.transport import Client

from conftest import service_python

CORPUS = Path(__file__).parent / "fuzz_corpus"
SEED = 20261126
MESSAGES = 2000  # per service
WALL_S = 60.0  # per service: the fuzz stops early past it (and says so), the count still bounds it
REPLY_TIMEOUT_S = 10.0  # for a message refused before the model; valid items get MODEL_TIMEOUT_S
MODEL_TIMEOUT_S = 120.0
MAX_IMAGE_PX = 64 * 64  # each service's limit here: larger claims are refused before decoding
MAX_BATCH = 4

# strings that are not UTF-8: a bad start byte, a lone surrogate, an overlong "/", a code point
# past U+10FFFF, a truncated sequence, a continuation byte alone
INVALID_UTF8 = [b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"]
ODD_TEXT = ["", " ", "\x00", "\ufeff", "\u202etxet", "把天空变成蓝色", "😀" * 5, "a" * 5000, "\ud7ff\ue000"]
ODD_VALUES: list[Any] = [None, True, False, 0, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 0.5, math.nan, math.inf,
                         -math.inf, 1e308, "", "x", "é", b"", b"\x00bytes", [], {}, [1, 2], {"a": 1}, [[[]]]]


@dataclass
class Case:
    """One message to send: its frames, what was done to it, and what its answer must be."""

    frames: list[bytes]
    what: str
    # the number of work items when no bytes were mutated (header, blobs, frames) and every item was
    # made to fail before the model: a work reply must then carry that many items, each with an error
    failing_items: int | None = None
    valid: bool = False  # a valid request: a work reply with one result per item (image, verdict or error)


# ---- valid messages and their mutations ---------------------------------------------------------

def _array(rng: random.Random) -> np.ndarray:
    shape = (rng.randint(1, 12), rng.randint(1, 12), *rng.choice([(), (3,), (4,)]))
    return np.random.default_rng(rng.getrandbits(32)).integers(0, 256, shape, dtype=np.uint8)


def _frame(blob: Any) -> bytes:
    return bytes(memoryview(blob).cast("B")) if isinstance(blob, np.ndarray) else bytes(blob)


def _valid(rng: random.Random, service: str) -> tuple[dict[str, Any], list[bytes]]:
    """A valid message as its header's builtin tree (op, fields) and its blob frames."""
    if rng.random() < 0.1:
        return {"op": "ping"}, []
    blobs = Blobs()
    op = "score" if service == "scorer" else "edit"
    op = op if rng.random() < 0.9 else rng.choice(["edit", "score"])  # sometimes the other service's
    items: list[Any] = []
    for k in range(rng.randint(0, 3)):
        source = blobs.add(_array(rng), rng.choice(["raw", "png"]))
        if op == "edit":
            items.append(EditItem(f"item-{k}", "make the sky blue", [source], seed=rng.randrange(2**31)))
        else:
            items.append(ScoreItem(f"item-{k}", "make the sky blue", [source], blobs.add(_array(rng))))
    message = EditRequest(items) if op == "edit" else ScoreRequest(items)
    return msgspec.to_builtins(message), [_frame(f) for f in blobs.frames]


def _fail_before_the_model(tree: Any, service: str) -> None:
    """Make every work item fail its checks before the model: an editor output width of 7 (no multiple
    of its size step; checked after the image is read), a scorer edited image whose raw pixels are
    declared PNG (unreadable; checked after the source is read)."""
    items = tree.get("items") if isinstance(tree, dict) else None
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and service == "editor":
            item["width"] = 7
        elif isinstance(item, dict) and service == "scorer" and isinstance(item.get("edited"), dict):
            item["edited"]["encoding"] = "png"


def _locations(tree: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in the tree, the root's parent included as (None, None)."""
    found: list[tuple[Any, Any]] = [(None, None)]
    stack = [tree]
    while stack:
        node = stack.pop()
        keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else ()
        for key in keys:
            found.append((node, key))
            stack.append(node[key])
    return found


def _deep_marker(depth: int) -> str:
    """A string that `_encode` swaps for `depth` nested containers (msgspec's encoder recurses too)."""
    return f"~deep{depth:05d}~"


def _encode(tree: Any) -> bytes:
    """The tree as msgpack, each deep marker swapped for its nesting: arrays of one, or maps of one."""
    def nested(match: re.Match) -> bytes:
        depth = int(match.group(1))
        return (b"\x91" if depth % 2 else b"\x81\xa1k") * depth + b"\xc0"

    return re.sub(rb"\xab~deep(\d{5})~", nested, msgspec.msgpack.encode(tree))


def _mutate_tree(rng: random.Random, tree: dict[str, Any], blobs: list[bytes]) -> tuple[Any, str]:
    """The tree changed in one structure-aware way, and a word on how."""
    container, key = rng.choice(_locations(tree))
    kind = rng.choice(["value", "delete", "unknown", "op", "items", "depth", "text", "ref", "params", "deadline"])
    if kind == "value" and container is not None:
        container[key] = rng.choice(ODD_VALUES)
    elif kind == "delete" and container is not None:
        del container[key]
    elif kind == "unknown":
        tree[rng.choice(["x", "extra", "op2", "items2", ""])] = rng.choice(ODD_VALUES)
    elif kind == "op":
        tree["op"] = rng.choice(["ping", "edit", "score", "status", "edit_reply", "score_reply", "error", "", "EDIT", 5])
    elif kind == "items" and isinstance(tree.get("items"), list) and tree["items"]:
        tree["items"] = tree["items"] * rng.randint(2, 3)  # over the batch limit, or repeated ids and frames
    elif kind == "depth":
        depth = rng.choice([8, 30, 31, 32, 40, 200, 1000, 5000])
        if container is None:
            tree[rng.choice(["x", "items", "params"])] = _deep_marker(depth)
        else:
            container[key] = _deep_marker(depth)
        kind = f"depth {depth}"
    elif kind == "text":
        strings = [(c, k) for c, k in _locations(tree)[1:] if isinstance(c[k], str)]
        if strings:
            where, name = rng.choice(strings)
            where[name] = rng.choice(ODD_TEXT + ["i" * (Limits.max_instruction_chars + 1)])
    elif kind == "ref":
        refs = [r for r in (_locations(tree)[1:]) if isinstance(r[0][r[1]], dict) and "encoding" in r[0][r[1]]]
        if refs:
            ref = rng.choice(refs)
            field = rng.choice(["frame", "encoding", "shape", "dtype"])
            ref[0][ref[1]][field] = rng.choice({
                "frame": [-1, 0, 1, len(blobs), 2**31, 2**63 - 1, "0", None],
                "encoding": ["raw", "png", "jpeg", "", None, 1],
                "shape": [[], [0, 0], [-1, 4, 3], [2**31, 2**31, 3], [4, 4, 2], [4, 4, 5], [4], [1, 1, 1, 1], [4, 4, "3"],
                          [2**32, 2**32], [-2, -2, 3]],
                "dtype": ["uint8", "float32", "", "uint16", None],
            }[field])
            kind = f"ref {field}"
    elif kind == "params":
        if tree.get("op") == "edit":
            tree["params"] = {rng.choice(["steps", "guidance", "negative_prompt"]): rng.choice(
                [0, -1, 1001, 2**40, math.nan, math.inf, -1.0, "4", None, "😀" * 100, "n" * 70_000])}
        else:
            tree[rng.choice(["mode", "rubric"])] = rng.choice(["nope", "", None, "generate", "logits", 3, "🙂"])
    elif kind == "deadline":
        tree["deadline_s"] = rng.choice([math.nan, -1.0, 0.0, 1e-9, math.inf, "1", 1e308, None])
    return tree, kind


def _encode_with_invalid_utf8(rng: random.Random, tree: dict[str, Any]) -> tuple[bytes, str]:
    """The tree's header with one string, a value or a key, swapped for bytes that are not UTF-8."""
    marker = f"MK{rng.getrandbits(40):010x}"
    container, key = rng.choice([(c, k) for c, k in _locations(tree)[1:] if isinstance(c, dict)] or [(tree, "op")])
    if rng.random() < 0.3:
        container[marker] = container.pop(key, None)  # the key itself
    else:
        container[key] = marker
    bad = b"".join(rng.choice(INVALID_UTF8) for _ in range(3))
    replacement = (bad + b"a" * len(marker))[: len(marker)]  # same length: the msgpack length prefix stays right
    return _encode(tree).replace(marker.encode(), replacement), f"invalid UTF-8 in {key!r}"


def _mutate_header(rng: random.Random, header: bytes) -> tuple[bytes, str]:
    data = bytearray(header)
    kind = rng.choice(["flip", "truncate", "insert", "append", "c1", "repeat"])
    if kind == "flip" and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(len(data) + 1):]
    elif kind == "insert":
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    elif kind == "append":
        data += rng.randbytes(rng.randint(1, 64))
    elif kind == "c1" and data:
        data[rng.randrange(len(data))] = 0xC1  # never used in msgpack
    elif kind == "repeat" and data:
        at = rng.randrange(len(data))
        data[at:at] = data[at:at + rng.randint(1, 32)] * rng.randint(2, 50)
    return bytes(data), f"header {kind}"


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR (with a right CRC) claims another size: a decompression bomb's header."""
    png = bytearray(encode_png(np.zeros((2, 2, 3), dtype=np.uint8)))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def _other_format(rng: random.Random) -> bytes:
    """A small image in a format Pillow reads besides PNG (a "png" blob may hold any of them)."""
    image = Image.fromarray(_array(random.Random(rng.getrandbits(32)))).convert(rng.choice(["P", "RGB", "L", "1", "CMYK"]))
    out = io.BytesIO()
    image.save(out, format=rng.choice(["GIF", "BMP", "TIFF", "PNG"]) if image.mode != "CMYK" else "TIFF")
    return out.getvalue()


def _mutate_blob(rng: random.Random, blob: bytes) -> tuple[bytes, str]:
    kind = rng.choice(["truncate", "flip", "random", "empty", "extra", "bomb", "format", "png-noise"])
    if kind == "truncate":
        return blob[: rng.randrange(len(blob) + 1)], "blob truncate"
    if kind == "flip" and blob:
        data = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data), "blob flip"
    if kind == "empty":
        return b"", "blob empty"
    if kind == "extra":
        return blob + rng.randbytes(rng.randint(1, 8)), "blob extra bytes"
    if kind == "bomb":
        return _png_claiming(rng.choice([0, 1, 100_000, 2**31 - 1]), rng.choice([1, 100_000])), "blob bomb"
    if kind == "format":
        return _other_format(rng), "blob other format"
    if kind == "png-noise":
        return b"\x89PNG\r\n\x1a\n" + rng.randbytes(rng.randint(0, 64)), "blob png noise"
    return rng.randbytes(rng.randint(0, 256)), "blob random"


def _mutate_frames(rng: random.Random, frames: list[bytes]) -> tuple[list[bytes], str]:
    frames = list(frames)
    kind = rng.choice(["version", "drop", "swap", "extra", "duplicate", "empty", "many"])
    if kind == "version":
        frames[0] = rng.choice([b"", b"editstack/1", PROTOCOL_VERSION + b"\x00", b"EDITSTACK/2", PROTOCOL_VERSION * 2,
                                rng.randbytes(11)])
    elif kind == "drop":
        del frames[rng.randrange(len(frames))]
    elif kind == "swap" and len(frames) > 1:
        i, j = rng.sample(range(len(frames)), 2)
        frames[i], frames[j] = frames[j], frames[i]
    elif kind == "extra":
        frames.insert(rng.randint(2, len(frames)), rng.randbytes(rng.randint(0, 64)))
    elif kind == "duplicate":
        frames.append(frames[rng.randrange(len(frames))])
    elif kind == "empty":
        frames[rng.randrange(len(frames))] = b""
    elif kind == "many":
        frames += [rng.randbytes(rng.randint(0, 3)) for _ in range(rng.randint(50, 300))]
    return frames, f"frames {kind}"


def generate(rng: random.Random, service: str) -> Case:
    """One mutated message for `service`."""
    tree, blobs = _valid(rng, service)
    what: list[str] = []
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        tree, kind = _mutate_tree(rng, tree, blobs)
        what.append(kind)
    _fail_before_the_model(tree, service)
    if rng.random() < 0.1:
        header, kind = _encode_with_invalid_utf8(rng, tree)
        what.append(kind)
    else:
        header = _encode(tree)
    bytes_mutated = False
    if rng.random() < 0.2:
        header, kind = _mutate_header(rng, header)
        what.append(kind)
        bytes_mutated = True
    if blobs and rng.random() < 0.25:
        at = rng.randrange(len(blobs))
        blobs[at], kind = _mutate_blob(rng, blobs[at])
        what.append(kind)
        bytes_mutated = True  # another format's valid image would undo the scorer's unreadable edited image
    frames = [PROTOCOL_VERSION, header, *blobs]
    if rng.random() < 0.15:
        frames, kind = _mutate_frames(rng, frames)
        what.append(kind)
        bytes_mutated = True
    items = tree.get("items") if isinstance(tree, dict) else None
    failing = len(items) if service != "echo" and not bytes_mutated and isinstance(items, list) else None
    return Case(frames, ", ".join(what) or "valid", failing_items=failing)


def odd_but_valid(service: str) -> list[Case]:
    """A handful of valid requests with odd content, each reaching the model (or the echo)."""
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    out = io.BytesIO()
    palette.save(out, format="PNG", transparency=0)
    sixteen = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(sixteen, format="PNG")
    gray = np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
    rgba = np.random.default_rng(2).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    cases = []
    for k, (instruction, image) in enumerate([("把天空变成蓝色 😀 \u202e\x00", gray), ("x", out.getvalue()),
                                              ("make it red", sixteen.getvalue()), (" a ", rgba)]):
        blobs = Blobs()
        if service == "scorer":
            message: Any = ScoreRequest([ScoreItem(f"odd-{k}", instruction, [blobs.add(gray)], blobs.add(image))])
        else:
            message = EditRequest([EditItem(f"odd-{k}", instruction, [blobs.add(image)], seed=2**63 - 1 if k else 0,
                                            width=16, height=16)], EditParams(steps=1, negative_prompt="😀"))
        cases.append(Case([_frame(f) for f in encode(message, blobs)], f"odd valid item {k}", valid=True))
    return cases


# ---- the corpus -----------------------------------------------------------------------------------

def corpus() -> list[Case]:
    """Past crashers, one JSON file each: {"why": "...", "frames": [base64 of each frame]}."""
    cases = []
    for path in sorted(CORPUS.glob("*.json")):
        case = json.loads(path.read_text())
        cases.append(Case([base64.b64decode(f) for f in case["frames"]], f"corpus {path.name}: {case['why']}"))
    return cases


def test_the_corpus_holds_crashers_and_each_decodes_or_is_refused_naming_why() -> None:
    cases = corpus()
    assert len(cases) >= 3
    for case in cases:
        try:
            decode_request(case.frames, Limits())
        except ProtocolError as exc:
            assert str(exc), case.what


def test_the_generator_is_deterministic_and_mutates_every_layer() -> None:
    cases = [generate(random.Random(SEED), "editor") for _ in range(2)]
    assert cases[0].frames == cases[1].frames
    rng = random.Random(SEED)
    kinds = " ".join(generate(rng, service).what for service in ("echo", "editor", "scorer") * 300)
    for layer in ("frames", "header", "depth", "invalid UTF-8", "ref", "blob", "value", "op", "deadline"):
        assert layer in kinds, layer


# ---- the services ---------------------------------------------------------------------------------

def _fuzz_service(service: Any, name: str, tmp_path: Path) -> None:
    """Send the corpus, the fuzz and the odd valid items to `service`; each must be answered."""
    rng = random.Random(f"{SEED}-{name}")
    socket = None
    context = zmq.Context.instance()
    sent, started = 0, time.monotonic()

    def send(case: Case) -> None:
        nonlocal socket
        if socket is None:
            socket = context.socket(zmq.REQ)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(service.endpoint)
        socket.send_multipart(case.frames)
        timeout_s = MODEL_TIMEOUT_S if case.valid else REPLY_TIMEOUT_S
        if not socket.poll(timeout_s * 1000):
            crasher = tmp_path / f"{name}-unanswered.json"
            frames = [base64.b64encode(f).decode() for f in case.frames]
            crasher.write_text(json.dumps({"why": case.what, "frames": frames}))
            alive = "alive" if service.proc.poll() is None else f"exited with {service.proc.returncode}"
            pytest.fail(f"{name}: no reply within {timeout_s}s to [{case.what}] (process {alive}); "
                        f"frames in {crasher}\n{service.tail()}")
        reply, _ = decode_reply(socket.recv_multipart())
        if case.valid:
            assert isinstance(reply, EditReply | ScoreReply) and len(reply.items) == 1, (case.what, reply)
        elif case.failing_items is not None and isinstance(reply, EditReply | ScoreReply):
            assert len(reply.items) == case.failing_items and all(r.error for r in reply.items), (case.what, reply)
        assert service.proc.poll() is None, f"{name} exited with {service.proc.returncode} after [{case.what}]"

    try:
        for case in corpus():
            send(case)
        while sent < MESSAGES and time.monotonic() - started < WALL_S:
            send(generate(rng, name))
            sent += 1
        for case in odd_but_valid(name):
            send(case)
    finally:
        if socket is not None:
            socket.close(linger=0)
    elapsed = time.monotonic() - started
    print(f"{name}: {sent} fuzzed messages in {elapsed:.1f}s")
    assert sent >= MESSAGES // 4, f"only {sent} messages within {WALL_S}s"
    with Client(service.endpoint, timeout_s=MODEL_TIMEOUT_S, retries=0) as client:
        assert client.ping().state == "ready"
        assert_serves_a_valid_request(client, name)


def assert_serves_a_valid_request(client: Client, name: str) -> None:
    image = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    blobs = Blobs()
    if name == "scorer":
        reply = client.score(ScoreRequest([ScoreItem("ok", "make it blue", [blobs.add(image)], blobs.add(image))]), blobs)
        assert reply.items[0].verdict is not None, reply
    else:
        reply, _ = client.edit(EditRequest([EditItem("ok", "make it blue", [blobs.add(image)], width=16, height=16)],
                                           EditParams(steps=1)), blobs)
        assert reply.items[0].image is not None, reply


@pytest.fixture
def fuzz_target(start_service, request) -> tuple[str, Any]:
    """(name, process) of the service the test's parameter names, started for real and ready."""
    name = request.param
    limits = {"MAX_IMAGE_PX": str(MAX_IMAGE_PX), "MAX_BATCH": str(MAX_BATCH)}
    if name == "echo":
        return name, start_service("echo", [sys.executable, "-m", "editstack.service.echo", "{endpoint}", "--max-image-px",
                                            str(MAX_IMAGE_PX), "--max-batch", str(MAX_BATCH)], timeout_s=30)
    if name == "editor":
        model = request.getfixturevalue("tiny_editor_dir")
        env = {"EDITOR_TINY_DIR": str(model), "EDITOR_CONDITION_MAX_PX": str(64 * 64),
               **{f"EDITOR_{k}": v for k, v in limits.items()}}
        return name, start_service("editor", [service_python("editor"), "-m", "editstack_editor"], env=env)
    model = request.getfixturevalue("tiny_judge_dir")
    env = {"SCORER_TINY_DIR": str(model), "SCORER_MAX_NEW_TOKENS": "16", **{f"SCORER_{k}": v for k, v in limits.items()}}
    return name, start_service("scorer", [service_python("scorer"), "-m", "editstack_scorer"], env=env)


@pytest.mark.parametrize("fuzz_target", ["echo", "editor", "scorer"], indirect=True)
def test_every_message_is_answered_and_the_service_survives(fuzz_target, tmp_path) -> None:
    name, service = fuzz_target
    _fuzz_service(service, name, tmp_path)
