"""The editor service, run for real in its own environment (transformers 4.57, diffusers 0.39)
with the embedded tiny Qwen-Image-Edit model."""

from __future__ import annotations

import threading
import time

import numpy as np

from editstack.wire.codec import Blobs, Limits, encode_png, read_image
from editstack.errors import EditstackError
from editstack.wire.protocol import EditItem, EditParams, EditRequest, ImageRef
from editstack.wire.transport import Client


RNG = np.random.default_rng(7)
SOURCE = RNG.integers(0, 256, (64, 96, 3), dtype=np.uint8)


def _edit(client: Client, images: list, seeds: list[int], size: tuple[int, int] | None = (64, 64),
          instructions: list[str] | None = None, **params):
    blobs = Blobs()
    items = [EditItem(id=f"item-{k}", instruction=(instructions or ["make the sky blue"] * len(images))[k],
                      images=[blobs.add(im) if isinstance(im, np.ndarray) else im(blobs)], seed=seed,
                      width=size and size[0], height=size and size[1])
             for k, (im, seed) in enumerate(zip(images, seeds, strict=True))]
    reply, received = client.edit(EditRequest(items, EditParams(**params)), blobs)
    return reply, received


def _png(result, received) -> bytes:
    return encode_png(read_image(result.image, received, Limits()))


def test_ping_reports_loading_then_ready_with_model_and_library_versions(start_editor) -> None:
    service = start_editor(wait=False)
    states = []
    deadline = time.monotonic() + 120
    with Client(service.endpoint, timeout_s=1, retries=0) as client:
        while time.monotonic() < deadline:
            try:
                status = client.ping()
            except EditstackError:
                continue
            states.append(status.state)
            if status.state == "ready":
                break
            time.sleep(0.05)
    assert states[0] == "loading" and states[-1] == "ready"
    assert status.service == "editor" and status.model == "embedded-tiny" and status.workers == 1
    assert status.versions["diffusers"] == "0.39.0" and status.versions["transformers"] == "4.57.6"
    assert status.embedded_tiny and status.backend == "diffusers/QwenImageEditPlusPipeline"
    assert status.dtype == "float32" and status.devices == ["cpu"] and status.edit_defaults.steps == 4


def test_batch_edit_gives_requested_size_and_is_deterministic_per_seed(start_editor) -> None:
    service = start_editor()
    with Client(service.endpoint, timeout_s=120) as client:
        reply, received = _edit(client, [SOURCE] * 4, seeds=[1, 1, 2, 3], steps=2)
        assert [r.error for r in reply.items] == [None] * 4
        pngs = [_png(r, received) for r in reply.items]
        assert all(read_image(r.image, received, Limits()).shape == (64, 64, 3) for r in reply.items)
        assert pngs[0] == pngs[1], "same seed and inputs in one batch gave different bytes"
        assert len({pngs[0], pngs[2], pngs[3]}) == 3, "different seeds gave the same bytes"
        again, received_again = _edit(client, [SOURCE], seeds=[1], steps=2)
        assert _png(again.items[0], received_again) == pngs[0], "the same item alone gave different bytes"
        other_size, received = _edit(client, [SOURCE], seeds=[1], size=(32, 48), steps=2)
        assert read_image(other_size.items[0].image, received, Limits()).shape == (48, 32, 3)


def test_identity_backend_returns_the_source_bytes_exactly(start_editor) -> None:
    service = start_editor(model="identity")
    with Client(service.endpoint, timeout_s=30) as client:
        status = client.ping()
        assert not status.embedded_tiny and status.backend == "identity"
        reply, received = _edit(client, [SOURCE], seeds=[0], size=None)
        resized, received_resized = _edit(client, [SOURCE], seeds=[0], size=(32, 48))
    assert bytes(received[reply.items[0].image.frame]) == SOURCE.tobytes()
    assert read_image(resized.items[0].image, received_resized, Limits()).shape == (48, 32, 3), \
        "a requested size is honoured"


def test_each_bad_input_gets_its_item_error_and_the_next_request_succeeds(start_editor) -> None:
    service = start_editor(max_image_px=str(128 * 128))
    bad_png = lambda blobs: blobs.add(b"\x89PNG\r\n\x1a\n garbage")  # noqa: E731
    zero = lambda blobs: (blobs.frames.append(b""), ImageRef(len(blobs.frames) - 1, "raw", (0, 5, 3), "uint8"))[1]  # noqa: E731
    huge = np.zeros((200, 200, 3), dtype=np.uint8)
    rgba = np.dstack([SOURCE, np.full(SOURCE.shape[:2], 255, np.uint8)])
    with Client(service.endpoint, timeout_s=120) as client:
        reply, received = _edit(client, [bad_png, zero, huge, SOURCE, rgba],
                                seeds=[0] * 5, instructions=["x", "x", "x", "   ", "make it red"], steps=2)
        codes = [r.error.code if r.error else None for r in reply.items]
        assert codes == ["bad_image", "bad_image", "bad_image", "bad_instruction", None]
        messages = [r.error.message for r in reply.items[:4]]
        assert "'item-0'" in messages[0] and "unreadable image" in messages[0]
        assert "'item-1'" in messages[1] and "empty image" in messages[1]
        assert "'item-2'" in messages[2] and "over the limit" in messages[2]
        assert "'item-3'" in messages[3] and "empty instruction" in messages[3]
        assert reply.items[4].notes == ["images[0]: converted RGBA to RGB over white"]

        for params, size, field in (({"steps": 0}, (64, 64), "steps"), ({"guidance": -1.0}, (64, 64), "guidance"),
                                    ({}, (50, 64), "width")):
            reply, _ = _edit(client, [SOURCE], seeds=[0], size=size, **params)
            error = reply.items[0].error
            assert error.code == "bad_param" and f"'{field}'" in error.message, error

        sliver = np.zeros((2, 1000, 3), dtype=np.uint8)  # passes every check, then breaks the pipeline
        reply, received = _edit(client, [SOURCE, sliver, SOURCE], seeds=[0, 0, 0], steps=2)
        assert [r.error.code if r.error else None for r in reply.items] == [None, "model_error", None]
        assert "'item-1'" in reply.items[1].error.message

        reply, received = _edit(client, [SOURCE], seeds=[0], steps=2)
        assert reply.items[0].error is None


def test_two_cpu_workers_serve_requests_concurrently(start_editor) -> None:
    service = start_editor(devices="cpu,cpu")
    replies: list = []

    def slow_edit() -> None:
        with Client(service.endpoint, timeout_s=300) as client:
            replies.append(_edit(client, [SOURCE], seeds=[0], steps=60)[0])

    threads = [threading.Thread(target=slow_edit) for _ in range(2)]
    with Client(service.endpoint, timeout_s=10) as client:
        assert client.ping().workers == 2
        for thread in threads:
            thread.start()
        busy = 0
        deadline = time.monotonic() + 60
        while busy < 2 and time.monotonic() < deadline and any(t.is_alive() for t in threads):
            busy = max(busy, client.ping().busy)
            time.sleep(0.02)
    for thread in threads:
        thread.join(300)
    assert busy == 2, "the two requests were never in flight on both workers at once"
    assert [r.items[0].error for r in replies] == [None, None]


def test_the_embedded_model_edits_a_multi_image_item_and_a_phone_photo_at_its_own_size(start_editor) -> None:
    service = start_editor()
    photo = np.random.default_rng(3).integers(0, 256, (3024, 4032, 3), dtype=np.uint8)  # 12 MP, 4:3
    with Client(service.endpoint, timeout_s=300) as client:
        assert client.ping().backend == "diffusers/QwenImageEditPlusPipeline"
        blobs = Blobs()
        pair = EditItem(id="pair", instruction="put the second object into the first scene",
                        images=[blobs.add(SOURCE), blobs.add(SOURCE[::-1].copy())], seed=1, width=64, height=64)
        phone = EditItem(id="phone", instruction="make the sky blue", images=[blobs.add(photo)], seed=1)
        reply, received = client.edit(EditRequest([pair, phone], EditParams(steps=2)), blobs)
    assert [r.error for r in reply.items] == [None, None]
    assert read_image(reply.items[0].image, received, Limits()).shape == (64, 64, 3)
    # no size asked for: the pipeline's own rule (4:3, sides multiples of 32), within the 256² default cap
    assert read_image(reply.items[1].image, received, Limits()).shape == (224, 288, 3)


def test_a_one_image_model_refuses_a_multi_image_item_with_a_coded_error(start_editor) -> None:
    service = start_editor(model="identity")
    with Client(service.endpoint, timeout_s=30) as client:
        blobs = Blobs()
        items = [EditItem(id="pair", instruction="x", images=[blobs.add(SOURCE), blobs.add(SOURCE)]),
                 EditItem(id="one", instruction="x", images=[blobs.add(SOURCE)])]
        reply, _ = client.edit(EditRequest(items), blobs)
    assert reply.items[0].error.code == "unsupported" and "takes at most 1" in reply.items[0].error.message
    assert reply.items[1].error is None


def test_model_offload_and_float8_layerwise_casting_edit_on_a_cpu_and_are_reported(start_editor) -> None:
    service = start_editor(offload="model", layerwise_cast="float8_e4m3fn")
    with Client(service.endpoint, timeout_s=120) as client:
        defaults = client.ping().edit_defaults
        reply, received = _edit(client, [SOURCE], seeds=[0], steps=2)
    assert (defaults.offload, defaults.layerwise_cast) == ("model", "float8_e4m3fn")
    assert reply.items[0].error is None
    # the weights really are stored in float8, most of them (layerwise casting keeps norms as they were)
    weights = service.tail().split("transformer weights ")[1].split("\n")[0]
    assert weights.split("(")[1].startswith("float8_e4m3fn"), weights
    assert read_image(reply.items[0].image, received, Limits()).shape == (64, 64, 3)


def test_group_offload_on_a_cpu_is_refused_at_start_naming_the_setting(start_editor) -> None:
    service = start_editor(wait=False, offload="group", devices="cuda:0,cpu")
    assert service.proc.wait(60) == 2
    assert ("editor: EDITOR_OFFLOAD='group' moves weights between the CPU and an accelerator, but "
            "EDITOR_DEVICES='cuda:0,cpu' lists 'cpu'") in service.tail()
